"""The runtime's guarantees (tests/runtime_guarantees.py) on the stack's NATS JetStream
server: each test's streams, consumers and buckets carry a name of its own and are
removed after it."""

from __future__ import annotations

import pytest

from ..runtime_guarantees import RuntimeGuarantees, open_bus


@pytest.fixture(params=["nats"])
async def bus(request, stack):
    async with open_bus(request.param, nats_url=stack.nats_url) as bus:
        yield bus


class TestRuntimeGuarantees(RuntimeGuarantees):
    pass
