"""Decoding is validation: every event type accepts a good message and refuses a bad one
with a reason that names what is wrong."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from posttrade.streams.events import Bar, Fill, InvalidEvent, MarketTrade, Order, Quote, decode, encode

TS = 1_700_000_000_000_000_000

GOOD = {
    Fill: {"ts": TS, "fill_id": "F1", "account": "A1", "symbol": "XYZ", "side": "BUY", "qty": "10", "price": "100.5"},
    Order: {"ts": TS, "order_id": "O1", "account": "A1", "symbol": "XYZ", "side": "SELL", "qty": "10",
            "order_type": "LIMIT", "limit_price": "99.5"},
    Quote: {"ts": TS, "symbol": "XYZ", "bid": "100.25", "ask": "100.27", "bid_size": "5", "ask_size": "0"},
    MarketTrade: {"ts": TS, "symbol": "XYZ", "price": "100.26", "size": "3"},
    Bar: {"ts": TS, "symbol": "XYZ", "interval": "1m", "open": "100", "high": "101", "low": "99", "close": "100.5",
          "volume": "1000"},
}


def raw(event_type, **changes) -> bytes:
    return json.dumps({**GOOD[event_type], **changes}).encode()


@pytest.mark.parametrize("event_type", list(GOOD))
def test_a_good_message_round_trips(event_type):
    event = decode(event_type, raw(event_type))
    assert decode(event_type, encode(event)) == event


BAD = [
    (Fill, {"qty": "0"}, "qty must be a finite number > 0"),
    (Fill, {"price": "NaN"}, "price must be a finite number > 0"),
    (Fill, {"fee": "Infinity"}, "fee must be a finite number"),
    (Fill, {"account": " A1"}, "account must be a non-empty string"),
    (Fill, {"ts": 1_700_000_000}, "ts must be epoch nanoseconds"),
    (Order, {"order_id": ""}, "order_id must be a non-empty string"),
    (Order, {"qty": "-1"}, "qty must be a finite number > 0"),
    (Order, {"limit_price": "0"}, "limit_price must be a finite number > 0"),
    (Order, {"limit_price": None}, "a LIMIT order needs limit_price"),
    (Quote, {"symbol": "XYZ "}, "symbol must be a non-empty string"),
    (Quote, {"bid": "0"}, "bid must be a finite number > 0"),
    (Quote, {"ask_size": "-1"}, "ask_size must be a finite number >= 0"),
    (Quote, {"bid": "100.30"}, "crossed quote"),
    (MarketTrade, {"size": "0"}, "size must be a finite number > 0"),
    (MarketTrade, {"symbol": ""}, "symbol must be a non-empty string"),
    (Bar, {"interval": ""}, "interval must be a non-empty string"),
    (Bar, {"low": "-1"}, "low must be a finite number > 0"),
    (Bar, {"volume": "-5"}, "volume must be a finite number >= 0"),
    (Bar, {"close": "102"}, "low <= open, close <= high"),
    (Bar, {"open": "98"}, "low <= open, close <= high"),
    (Bar, {"count": -1}, "count must be >= 0"),
]


@pytest.mark.parametrize(("event_type", "changes", "reason"), BAD)
def test_a_bad_value_is_refused_with_its_reason(event_type, changes, reason):
    with pytest.raises(InvalidEvent, match=reason.replace("(", r"\(")):
        decode(event_type, raw(event_type, **changes))


def test_decimals_stay_exact():
    fill = decode(Fill, raw(Fill, price="100.123456789012"))
    assert fill.price == Decimal("100.123456789012")
    assert b'"100.123456789012"' in encode(fill)
