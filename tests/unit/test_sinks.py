"""The one sink abstraction (posttrade/sinks.py): buffering, the retry loop, refusals,
bugs, statistics and health. How the runtime flushes a sink before an acknowledgement is
in the runtime-guarantee suite (tests/runtime_guarantees.py)."""

from __future__ import annotations

import asyncio

import pytest

from posttrade.app import App
from posttrade.config import BatchSection
from posttrade.sinks import RetryPolicy, Sink, SinkRefused, SinkStopping, SinkUnavailable
from posttrade.streams.memory import MemoryTransport

FAST = RetryPolicy(attempts=2, initial_s=0.001, max_s=0.004)


class ListSink(Sink[int]):
    """Writes into a list; `failures` scripts what the next attempts raise."""

    def __init__(self, retry: RetryPolicy = FAST):
        super().__init__("list", retry)
        self.stored: list[int] = []
        self.failures: list[Exception] = []
        self.attempts = 0

    async def write(self, batch: list[int]) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.stored.extend(batch)


def test_the_policy_comes_from_the_batch_section_and_backs_off_in_cycles():
    policy = RetryPolicy.from_config(BatchSection(max_retry=3, retry_initial_s=0.25, retry_max_s=5))
    assert (policy.attempts, policy.initial_s, policy.max_s) == (3, 0.25, 5)
    # Within a cycle 0.25, 0.5; then the longer pause before the next cycle, doubling to the cap.
    assert [policy.delay(0, a) for a in range(3)] == [0.25, 0.5, 2.0]
    assert [policy.delay(c, 2) for c in range(4)] == [2.0, 4.0, 5.0, 5.0]
    with pytest.raises(ValueError):
        BatchSection(retry_initial_s=1, retry_max_s=0.5)


async def test_a_store_that_is_away_is_retried_until_it_takes_the_batch():
    sink = ListSink()
    sink.extend([1, 2, 3])
    sink.failures = [SinkUnavailable("down"), ConnectionRefusedError("refused"), TimeoutError("slow")]
    await sink.flush()
    assert sink.stored == [1, 2, 3] and sink.pending == 0
    assert sink.attempts == 4 and sink.stats.retries == 3 and sink.stats.errors == 3
    assert sink.stats.rows == 3 and sink.stats.flushes == 1 and sink.stats.failing_since is None


async def test_a_store_asking_to_slow_down_is_waited_for_as_long_as_it_asks(monkeypatch):
    pauses: list[float] = []
    sink = ListSink(RetryPolicy(attempts=3, initial_s=0.001, max_s=0.002))

    async def pause(seconds, stream):
        pauses.append(seconds)

    monkeypatch.setattr(sink, "_pause", pause)
    sink.add(1)
    sink.failures = [SinkUnavailable("busy", retry_after=0.5)]
    await sink.flush()
    assert pauses == [0.5] and sink.stored == [1]


async def test_data_the_store_refuses_is_raised_at_once_and_stays_in_the_buffer():
    sink = ListSink()
    sink.extend([1, 2])
    sink.failures = [SinkRefused("column too narrow")]
    with pytest.raises(SinkRefused):
        await sink.flush()
    assert sink.attempts == 1 and sink.stats.refused == 1 and sink.pending == 2
    assert sink.stats.failing_since is None  # the data's fault, not the store's


async def test_a_bug_is_not_mistaken_for_a_store_that_is_away():
    sink = ListSink()
    sink.add(1)
    sink.failures = [TypeError("write() got an unexpected keyword argument")]
    with pytest.raises(TypeError):
        await sink.flush()
    assert sink.attempts == 1 and sink.stats.retries == 0 and sink.pending == 1


async def test_what_a_crashed_batch_added_is_discarded():
    sink = ListSink()
    sink.extend([1, 2])
    sink.discard()
    await sink.flush()
    assert sink.attempts == 0 and sink.stored == []


async def test_a_stopping_service_leaves_the_unwritten_batch_unacknowledged():
    sink = ListSink(RetryPolicy(attempts=1, initial_s=0.01, max_s=0.01))
    stopping = False
    sink.stopping = lambda: stopping
    sink.add(1)
    sink.failures = [SinkUnavailable("down")] * 100

    async def stop_soon():
        nonlocal stopping
        await asyncio.sleep(0.03)
        stopping = True

    with pytest.raises(SinkStopping):
        await asyncio.gather(sink.flush(), stop_soon())
    assert sink.pending == 1 and sink.stored == []


async def test_a_registered_sink_has_metrics_and_a_health_check_that_degrades_while_failing(monkeypatch):
    app = App("svc", MemoryTransport())
    sink = app.sink(ListSink())
    assert app.sink(sink) is sink  # registering twice is harmless
    with pytest.raises(ValueError, match="declared twice"):
        app.sink(ListSink())
    sink.add(1)
    await sink.flush()
    registry = app.metrics.registry
    assert registry.get_sample_value("posttrade_sink_rows_total", {"sink": "list"}) == 1
    assert registry.get_sample_value("posttrade_sink_up", {"sink": "list"}) == 1
    check = app.health_checks["sink:list"]
    ok, detail = await check()
    assert ok is True and detail["rows"] == 1
    sink.stats.failed("connection refused")
    sink.stats.failing_since -= Sink.DEGRADED_AFTER_S + 1
    ok, detail = await check()
    assert ok == "degraded" and detail["last_error"] == "connection refused"


def test_a_sink_belongs_to_one_agent():
    app = App("svc", MemoryTransport())
    channel = app.channel("c", stream="S", subjects=["s.>"], value_type=dict)
    sink = ListSink()

    @app.agent(channel, name="first", sinks=[sink])
    async def first(stream):
        pass

    with pytest.raises(ValueError, match="already belongs to agent first"):

        @app.agent(channel, name="second", sinks=[sink])
        async def second(stream):
            pass


def test_a_namespace_prefixes_streams_subjects_consumers_and_buckets():
    app = App("svc", MemoryTransport(), namespace="t1")
    channel = app.channel("fills", stream="FILLS", subjects=["trading.fills.>"], value_type=dict,
                          consume=["trading.fills.A.>"])
    assert channel.stream.name == "T1_FILLS" and channel.stream.subjects == ("t1.trading.fills.>",)
    assert channel.subjects == ("t1.trading.fills.A.>",)
    table = app.table("positions")
    assert table.bucket == "t1-svc-positions"

    @app.agent(channel, name="track")
    async def track(stream):
        pass

    assert app.agents["track"].durable == "t1-svc-track"
    plain = App("svc", MemoryTransport())
    assert plain.stream_name("FILLS") == "FILLS" and plain.subject("a.b") == "a.b"
    with pytest.raises(ValueError, match="namespace"):
        App("svc", MemoryTransport(), namespace="a.b")
