"""The runtime's guarantees (tests/runtime_guarantees.py) on the in-memory transport."""

from __future__ import annotations

import pytest

from ..runtime_guarantees import RuntimeGuarantees, open_bus


@pytest.fixture(params=["memory"])
async def bus(request):
    async with open_bus(request.param) as bus:
        yield bus


class TestRuntimeGuarantees(RuntimeGuarantees):
    pass
