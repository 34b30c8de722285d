"""The dashboard tests share one desk and one browser, for this package only: the desk's
demo feed publishes into the shared streams while it runs, which no other test expects,
so it stops when the last dashboard test is done."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .browser import chromium
from .desk import Desk, running_desk


@pytest.fixture(scope="package")
def desk(stack, tmp_path_factory) -> Iterator[Desk]:
    """The six services with tokens (token_fleet), their pages linked to each other, and
    the demo feed running under a tag of its own."""
    with running_desk(stack, tmp_path_factory.mktemp("desk")) as desk:
        yield desk


@pytest.fixture(scope="package")
def browser():
    with chromium() as browser:
        yield browser
