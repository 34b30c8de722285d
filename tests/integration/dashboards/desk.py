"""The whole desk for the dashboard tests: the six services with an auth token and a
read-only token (token_fleet), each page's navigation bar pointing at the others, and the
demo feed publishing under a tag of the run's own for as long as the desk runs, so the
pages have fills, quotes, bars and orders to show and keep changing while a test looks.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from posttrade.commands.run import tagged_reference_file
from posttrade.demo.feed import ACCOUNTS, INSTRUMENTS, DemoFeed, FeedSettings
from posttrade.streams.nats import NatsTransport

from ..service_process import ServiceProcess
from ..token_fleet import Tokens, token_fleet

FEED_RATE = 60.0  # events/s: enough for every page to move within a second or two


@dataclass
class Desk:
    services: dict[str, ServiceProcess]
    tokens: Tokens
    tag: str

    def url(self, service: str) -> str:
        return self.services[service].url

    @property
    def accounts(self) -> list[str]:
        return [f"{a.name}-{self.tag}" for a in ACCOUNTS]

    @property
    def symbols(self) -> list[str]:
        return [f"{i.symbol}-{self.tag}" for i in INSTRUMENTS]


class _Feed(threading.Thread):
    def __init__(self, nats_url: str, tag: str):
        super().__init__(name="desk-feed", daemon=True)
        self.nats_url = nats_url
        self.settings = FeedSettings(rate=FEED_RATE, seed=7, tag=tag)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        async def main() -> None:
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            self.ready.set()
            transport = NatsTransport(self.nats_url, name=f"desk-feed-{self.settings.tag}")
            try:
                await DemoFeed(transport, self.settings).run(stop=self.stop_event)
            finally:
                await transport.close()

        try:
            asyncio.run(main())  # cancels and awaits whatever the client left running
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.failure = exc
        finally:
            self.ready.set()

    def stop(self) -> None:
        self.ready.wait(30)
        if self.loop is not None and self.stop_event is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.join(timeout=30)
        if self.failure is not None:
            raise self.failure


@contextmanager
def running_desk(stack, tmp: Path) -> Iterator[Desk]:
    tag = "D" + uuid.uuid4().hex[:6].upper()
    # The services value the tagged symbols by the demo's reference data, renamed alike.
    env = {"POSTTRADE__REFERENCE_FILE": str(tagged_reference_file(tmp, tag))}
    with token_fleet(stack, tmp, link_pages=True, env=env) as (services, tokens):
        feed = _Feed(stack.nats_url, tag)
        feed.start()
        try:
            yield Desk(services, tokens, tag)
        finally:
            feed.stop()
