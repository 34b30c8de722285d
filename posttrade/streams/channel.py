"""Channels: a typed name for some NATS subjects and the JetStream stream behind them."""

from __future__ import annotations

from dataclasses import dataclass

from .transport import StreamSpec


@dataclass(frozen=True, slots=True)
class Channel:
    """What agents consume and what `App.send` publishes to.

    `stream` is the JetStream stream that durably captures `stream.subjects`;
    `subjects` optionally narrows what this channel consumes to a subset of them
    (a consumer filter), e.g. one symbol's fills.
    """

    name: str
    stream: StreamSpec
    value_type: type
    subjects: tuple[str, ...] = ()

    @property
    def filter_subjects(self) -> tuple[str, ...]:
        return self.subjects if self.subjects and self.subjects != self.stream.subjects else ()
