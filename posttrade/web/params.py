"""Request parameters: one parser per kind of value, and the JSON Schema that says exactly
what the parser accepts (published in /openapi.json under `components/schemas`).

A parser and its schema agree character for character: the schema's `pattern` is the
regular expression the parser matches, so a request valid by the OpenAPI document is
accepted and one that is not gets a 400 naming the parameter. Pages reference the
schemas from their docstrings (`account: {$ref: Name, description: ...}`).

Ranges, and why:

* times (`Time`): epoch nanoseconds 1990-01-01 .. 2200-01-01, the event contract's range
  (streams/events.py: it catches seconds or milliseconds sent by mistake), or ISO-8601
  with a year 1990..2199 (offset optional, none = UTC; fractions to the nanosecond);
* days (`Date`): YYYY-MM-DD, 1990-01-01 .. 2199-12-31, every day of the calendar and no
  other (a 30 February is refused by the pattern itself). No event can be older, and
  QuestDB refuses timestamps before 1970 (`POST /reports {"date": "0347-09-13"}`
  reached it once);
* names (`Name`: accounts, symbols, venues, rules): 1..128 characters, no control
  characters, no whitespace at either end (the events' own rule, bounded); ids (`Id`:
  order ids) the same up to 256. An empty value is refused, never read as "no filter":
  `?account=` from an unset variable must not widen a query to every account.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

TS_MIN_NS, TS_MAX_NS = 631_152_000_000_000_000, 7_258_118_400_000_000_000  # 1990-01-01, 2200-01-01
FIRST_DAY, LAST_DAY = date(1990, 1, 1), date(2199, 12, 31)
NAME_MAX = 128
ID_MAX = 256
# The largest integer any parameter may be (a signed 64-bit integer: what the stores take).
INT64_MAX = 2**63 - 1

_YEAR = r"(?:199[0-9]|2[01][0-9]{2})"
_MONTH_DAY = r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"
# 29 February of the leap years 1990..2199 (2000 is one, 2100 is not).
_LEAP_DAY = r"(?:199[26]|20(?:[02468][048]|[13579][26])|21(?:0[48]|[2468][048]|[13579][26]))-02-29"
_DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_DAY})"
_CLOCK = r"(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,9})?)?"
_OFFSET = r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"

DATE_PATTERN = rf"^{_DATE}$"
TIME_PATTERN = rf"^{_DATE}(?:[T ]{_CLOCK}{_OFFSET}?)?$"
ISO_TIME_PATTERN = TIME_PATTERN
# An object's name in object storage (stores/objects.py check_object_name): `/`-separated
# parts, none empty or starting with `.`; no backslash, no control characters.
_PART = r"[^/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]*"
OBJECT_NAME_PATTERN = rf"^{_PART}(?:/{_PART})*$"
OBJECT_NAME_MAX = 250  # 4-byte characters and a prefix stay within the 1,024 bytes of a name
INTEGER_PATTERN = r"^-?[0-9]+$"
AMOUNT_PATTERN = r"^[0-9]{1,30}(?:\.[0-9]{1,30})?$"
INTERVAL_PATTERN = r"^[1-9][0-9]{0,5}[smhd]$"
# An interval of at most 366 days, spelled as INTERVAL_PATTERN (tests/unit/test_auth.py
# checks it against the rule for every n): 999999s, 527040m, 8784h, 366d.
BUCKET_PATTERN = (
    r"^(?:[1-9][0-9]{0,5}s"
    r"|(?:[1-9][0-9]{0,4}|[1-4][0-9]{5}|5[01][0-9]{4}|52[0-6][0-9]{3}|5270[0-3][0-9]|527040)m"
    r"|(?:[1-9][0-9]{0,2}|[1-7][0-9]{3}|8[0-6][0-9]{2}|87[0-7][0-9]|878[0-4])h"
    r"|(?:[1-9][0-9]?|[12][0-9]{2}|3[0-5][0-9]|36[0-6])d)$"
)


# Spelled out rather than `\s`, whose members differ between Python and ECMA-262 regexes:
# no control character (C0, DEL, C1) anywhere, no whitespace at either end.
_NAME_END = r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_NAME_MIDDLE = r"[^\x00-\x1f\x7f-\x9f]"


def name_pattern(max_length: int) -> str:
    return rf"^{_NAME_END}(?:{_NAME_MIDDLE}{{0,{max_length - 2}}}{_NAME_END})?$"


NAME_PATTERN = name_pattern(NAME_MAX)
ID_PATTERN = name_pattern(ID_MAX)

_date_re = re.compile(DATE_PATTERN)  # every match below is a fullmatch: `$` alone lets a trailing "\n" in
_time_re = re.compile(TIME_PATTERN)
_integer_re = re.compile(INTEGER_PATTERN)
_amount_re = re.compile(AMOUNT_PATTERN)
_object_name_re = re.compile(OBJECT_NAME_PATTERN)
_interval_re = re.compile(INTERVAL_PATTERN)
_bucket_re = re.compile(BUCKET_PATTERN)
_name_re = {NAME_MAX: re.compile(NAME_PATTERN), ID_MAX: re.compile(ID_PATTERN)}

# components/schemas of every service's OpenAPI document; docstrings say `$ref: Name`.
SCHEMAS: dict[str, dict[str, Any]] = {
    "Name": {
        "type": "string",
        "minLength": 1,
        "maxLength": NAME_MAX,
        "pattern": NAME_PATTERN,
        "description": "1-128 characters, no control characters, no whitespace at either end",
    },
    "Id": {
        "type": "string",
        "minLength": 1,
        "maxLength": ID_MAX,
        "pattern": ID_PATTERN,
        "description": "1-256 characters, no control characters, no whitespace at either end",
    },
    "Date": {
        "type": "string",
        "format": "date",
        "pattern": DATE_PATTERN,
        "description": "a day, YYYY-MM-DD, from 1990-01-01 to 2199-12-31",
    },
    "Time": {
        "anyOf": [
            {"type": "integer", "minimum": TS_MIN_NS, "maximum": TS_MAX_NS, "description": "epoch nanoseconds"},
            {"type": "string", "pattern": TIME_PATTERN, "description": "ISO-8601; no offset means UTC"},
        ],
        "description": (
            "epoch nanoseconds (1990-01-01 to 2200-01-01) or ISO-8601 with a year from 1990 to 2199, "
            "e.g. `2026-01-02T14:30:00Z`, `2026-01-02T09:30:00.000000001-05:00`, `2026-01-02`"
        ),
    },
    "IsoTime": {
        "type": "string",
        "pattern": ISO_TIME_PATTERN,
        "description": "ISO-8601 with a year from 1990 to 2199; no offset means UTC, e.g. `2026-01-02T14:30:00Z`",
    },
    "Amount": {
        "type": "string",
        "pattern": AMOUNT_PATTERN,
        "description": "a decimal >= 0 in plain notation, e.g. `0.5`",
    },
    "ObjectName": {
        "type": "string",
        "maxLength": OBJECT_NAME_MAX,
        "pattern": OBJECT_NAME_PATTERN,
        "description": "`/`-separated parts, none empty or starting with `.`; no backslash, no control characters",
    },
    "Interval": {
        "type": "string",
        "pattern": INTERVAL_PATTERN,
        "description": "`<n>s`, `<n>m`, `<n>h` or `<n>d` (n from 1 to 999999)",
    },
    "Bucket": {
        "type": "string",
        "pattern": BUCKET_PATTERN,
        "description": "a time bucket `<n>s`, `<n>m`, `<n>h` or `<n>d` of at most 366 days",
    },
}


class BadRequest(HTTPException):
    """Raise from a page for an invalid request: 400 with what is wrong."""

    def __init__(self, detail: Any, status_code: int = 400):
        super().__init__(status_code=status_code, detail=detail)


def _bad(parameter: str, error: str, where: str = "parameter") -> BadRequest:
    return BadRequest({where: parameter, "error": error})


def parse_int(name: str, raw: str, *, minimum: int, maximum: int, where: str = "parameter") -> int:
    if not _integer_re.fullmatch(raw):
        raise _bad(name, f"must be an integer, got {raw!r}", where)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise _bad(name, f"must be between {minimum} and {maximum}, got {value}", where)
    return value


def query_int(
    request: Request, name: str, default: int | None = None, *, minimum: int = 0, maximum: int = INT64_MAX
) -> int | None:
    """The integer parameter `name` (absent: `default`; present but empty: 400)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    return parse_int(name, raw, minimum=minimum, maximum=maximum)


def check_name(name: str, value: str, *, max_length: int = NAME_MAX, where: str = "parameter") -> str:
    if not _name_re[max_length].fullmatch(value):
        raise _bad(name, f"must be 1-{max_length} characters without control characters or surrounding whitespace", where)
    return value


def query_name(request: Request, name: str, *, max_length: int = NAME_MAX) -> str | None:
    """A name filter (`Name`, or `Id` with max_length=ID_MAX); None when absent."""
    raw = request.query_params.get(name)
    return None if raw is None else check_name(name, raw, max_length=max_length)


def path_name(request: Request, name: str) -> str:
    return check_name(name, request.path_params[name])


def check_interval(name: str, raw: str, *, bucket: bool = False) -> str:
    """An `Interval` (or, with bucket=True, a `Bucket`: at most 366 days)."""
    if not (_bucket_re if bucket else _interval_re).fullmatch(raw):
        limit = ", at most 366 days" if bucket else ""
        raise _bad(name, f"must look like 30s, 5m, 1h or 1d{limit}; got {raw!r}")
    return raw


def path_object_name(request: Request, name: str) -> str:
    value = request.path_params[name]
    if len(value) > OBJECT_NAME_MAX or not _object_name_re.fullmatch(value):
        raise _bad(name, f"`/`-separated parts, none empty or starting with `.`, without backslashes or control "
                         f"characters, at most {OBJECT_NAME_MAX} characters; got {value[:100]!r}")
    return value


def query_choice(request: Request, name: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw not in choices:
        raise _bad(name, f"must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def parse_date(name: str, raw: str, *, where: str = "parameter") -> date:
    if not isinstance(raw, str) or not _date_re.fullmatch(raw):
        raise _bad(name, f"must be a day YYYY-MM-DD from {FIRST_DAY} to {LAST_DAY}, got {raw!r}", where)
    return date.fromisoformat(raw)


def parse_amount(name: str, raw: str, *, where: str = "parameter") -> Decimal:
    if not _amount_re.fullmatch(raw):
        raise _bad(name, f"must be a decimal >= 0 in plain notation like 0.5, got {raw!r}", where)
    return Decimal(raw)


def query_date(request: Request, name: str) -> date | None:
    raw = request.query_params.get(name)
    return None if raw is None else parse_date(name, raw)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_time(name: str, raw: str, *, epoch_ns: bool = True, where: str = "parameter") -> int:
    """`Time` → epoch ns. With `epoch_ns=False` only the ISO-8601 form is accepted.

    The pattern bounds the year of an ISO time, not the instant: an offset can move it
    up to a day past 1990..2200, which every store takes.
    """
    if epoch_ns and _integer_re.fullmatch(raw):
        return parse_int(name, raw, minimum=TS_MIN_NS, maximum=TS_MAX_NS, where=where)
    if not _time_re.fullmatch(raw):
        form = "epoch nanoseconds or ISO-8601" if epoch_ns else "ISO-8601"
        raise _bad(name, f"must be {form} from 1990 to 2199 (e.g. 2026-01-02T14:30:00Z), got {raw!r}", where)
    text, nanos = _split_fraction(raw)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    delta: timedelta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + nanos


def _split_fraction(raw: str) -> tuple[str, int]:
    """Python reads at most microseconds: the fraction (up to 9 digits) is taken apart."""
    dot = raw.find(".")
    if dot < 0:
        return raw, 0
    end = dot + 1
    while end < len(raw) and raw[end].isdigit():
        end += 1
    digits = raw[dot + 1 : end]
    return raw[:dot] + raw[end:], int(digits.ljust(9, "0"))


def query_time(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    return None if raw is None else parse_time(name, raw)


def reject_unknown(request: Request, allowed: set[str] | frozenset[str]) -> None:
    unknown = sorted(set(request.query_params.keys()) - set(allowed))
    if unknown:
        raise _bad(unknown[0], f"unknown parameter; allowed: {', '.join(sorted(allowed)) or 'none'}")
