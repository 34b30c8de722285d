"""Retrying a side effect while holding a batch: a store that went away is waited for.

The batch stays unacknowledged (JetStream keeps it) and the consumer is told we are
still working on it, so nothing is redelivered meanwhile and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, TypeVar

from ..streams.stream import Stream

log = logging.getLogger(__name__)
T = TypeVar("T")


async def until_done(
    stream: Stream | None,
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    permanent: Callable[[Exception], bool] = lambda exc: False,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
    on_retry: Callable[[Exception], None] | None = None,
) -> T:
    """Run `operation` until it succeeds, backing off exponentially between tries.

    Exceptions for which `permanent(exc)` is true are raised at once (retrying cannot
    help, e.g. data the store refuses). Everything else is treated as the dependency
    being away.
    """
    delay = first_delay
    attempt = 0
    while True:
        try:
            return await operation()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if permanent(exc):
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(exc)
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, exc)
            if stream is not None:
                await stream.keep_alive()
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
