"""Synthetic trading for local runs: a market of 25 instruments in USD, JPY, EUR and
USDT (equities, a future, FX and crypto pairs), accounts that trade in it, and a feed
that publishes it all on NATS (`posttrade demo feed`, and `posttrade up`).

`market` (quotes and the tape), `execution` (orders filled against the quotes),
`feed` (the deterministic generator and the real-time publisher).
"""

from .feed import ACCOUNTS, Account, DemoFeed, FeedGenerator, FeedProgress, FeedSettings
from .market import INSTRUMENTS, Fees, Instrument, tagged_reference

__all__ = [
    "ACCOUNTS",
    "INSTRUMENTS",
    "Account",
    "DemoFeed",
    "FeedGenerator",
    "FeedProgress",
    "FeedSettings",
    "Fees",
    "Instrument",
    "tagged_reference",
]
