"""What the in-memory transport and the app's start do on their own; the runtime's
guarantees on this transport are tests/unit/test_runtime_guarantees.py."""

from __future__ import annotations

import asyncio

from posttrade.app import App
from posttrade.streams.memory import MemoryTransport, subject_matches


def test_subject_matching():
    assert subject_matches("a.*.c", "a.b.c")
    assert not subject_matches("a.*.c", "a.b.d")
    assert subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.b.c")


async def test_a_start_waits_for_a_bus_that_does_not_answer_yet(monkeypatch):
    """Stream requests that time out (a cluster electing leaders) are tried again; the
    app starts once they answer, with its tables read back."""
    monkeypatch.setattr("posttrade.app.asyncio.sleep", _no_wait)
    transport = MemoryTransport()
    answers = iter([TimeoutError("nats: timeout"), TimeoutError("nats: timeout")])
    ensure_stream = transport.ensure_stream

    async def electing(spec):
        failure = next(answers, None)
        if failure is not None:
            raise failure
        return await ensure_stream(spec)

    monkeypatch.setattr(transport, "ensure_stream", electing)
    app = App("svc", transport)
    table = app.table("totals", value_type=int)
    async with app:
        assert app.started and next(answers, None) is None and len(table) == 0


_real_sleep = asyncio.sleep


async def _no_wait(seconds: float) -> None:
    await _real_sleep(0)
