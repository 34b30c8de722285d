"""Integration tests run against the real servers of the local stack.

`make test` starts the stack before pytest, so the `stack` fixture finds it running and
costs one health check per server. Run on its own (plain `pytest tests/integration`), the
fixture starts what is missing and stops again exactly that at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from posttrade import stack as local_stack

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected test of the session, not only the ones in this folder.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> Iterator[local_stack.Endpoints]:
    endpoints = local_stack.endpoints()
    states = local_stack.up(endpoints)
    yield endpoints
    started = [state.server.name for state in states if state.started]
    if started:
        local_stack.down(endpoints, names=started)

