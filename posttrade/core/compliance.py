"""Compliance rules: pure checks of fills and positions against configured limits.

The evaluator is called by the live service after each fill has been applied to the
`PositionBook` (`check_fill`) and after marks move (`check_marks`); it returns `Alert`
records and never does I/O. The rules (each off unless configured):

| rule                | scope             | breach when                                        |
|---------------------|-------------------|----------------------------------------------------|
| `restricted_symbol` | fill              | any fill in a symbol of `restricted_symbols`       |
| `wash_trade`        | fill              | a fill meets an opposite-side fill of the same     |
|                     |                   | account and symbol at the same price, at most      |
|                     |                   | `wash_trade_window_s` seconds apart (either order) |
| `max_position`      | account, symbol   | `abs(net_qty) > limit` (`max_position_by_symbol`   |
|                     |                   | overrides `max_position` for a symbol)             |
| `max_gross_notional`| account           | `sum abs(net_qty x mark x multiplier) > limit`     |
|                     |                   | (an open position without a mark at its cost)      |
| `daily_loss_limit`  | account           | `day_pnl < -daily_loss_limit` (see `positions`     |
|                     |                   | for day P&L; not evaluated while it is unknown)    |
| `missing_fx_rate`   | account, currency | an account limit is configured and a figure of the |
|                     |                   | account needs a rate to its base that is unknown   |

Account limits are in the account's base currency: the sums of `core.valuation`'s base
figures, at the current rates. A sum that needs an unknown rate is not evaluated; the
`missing_fx_rate` alert says which currency's rate is missing (symbol: the currency).

Alert storms: `restricted_symbol` and `wash_trade` alert on every offending fill (each
is a separate event to look at). The three limits alert once, **on crossing into
breach**; while the breach lasts (even if it worsens) they stay silent; when the
observed value is back within the limit the rule re-arms, and the next crossing alerts
again. The breach memory and the recent fills the wash-trade rule needs live in
`ComplianceState`, a msgspec Struct the service can persist beside the positions.

`Alert.observed` and `Alert.limit` are the two numbers compared: for the loss limit
`observed` is the day P&L and `limit` is `-daily_loss_limit` (breach when
observed < limit); for the others breach is observed > limit; for a wash trade observed
is the gap in seconds to the nearest matching fill and limit the window.

`alert_id` is deterministic: a hash of the rule, the triggering fill's id (or, for a
mark-driven check, the mark time), the account and the symbol, so replaying the same
fills produces the same ids and downstream stores can deduplicate.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any, Iterable, Literal, Mapping

import msgspec

from posttrade.core.exact import EXACT, divide, format_decimal
from posttrade.core.positions import FillLike, PositionBook

Rule = Literal[
    "restricted_symbol", "wash_trade", "max_position", "max_gross_notional", "daily_loss_limit",
    # Raised by the execution history (`core.history`), not by limits: the feed itself.
    "conflicting_duplicate", "pending_amendment", "refused_execution",
    "missing_fx_rate",
]
RULES: tuple[str, ...] = Rule.__args__  # type: ignore[attr-defined]
SEVERITIES = ("info", "warning", "critical")
_NS_PER_S = Decimal(1_000_000_000)
DEFAULT_SEVERITY: dict[str, str] = {
    "restricted_symbol": "critical",
    "wash_trade": "warning",
    "max_position": "critical",
    "max_gross_notional": "critical",
    "missing_fx_rate": "warning",
    "daily_loss_limit": "critical",
    "conflicting_duplicate": "critical",
    "pending_amendment": "warning",
    "refused_execution": "critical",
}


class ComplianceRules(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The configured rules, e.g. from a `compliance:` section of the ptrc config:

        compliance:
          max_position: 10000              # abs(net_qty) per account and symbol
          max_position_by_symbol: {ES: 50} # overrides max_position for a symbol
          max_gross_notional: 5000000      # per account, in the account currency
          daily_loss_limit: 250000         # breach when day P&L < -250000
          restricted_symbols: [XYZ]
          wash_trade_window_s: 5
          severity: {wash_trade: critical} # override DEFAULT_SEVERITY per rule

    Limits are positive Decimals (YAML numbers or strings); an absent limit switches
    its rule off. Unknown keys are errors (a typo must not silently disable a rule).
    """

    max_position: Decimal | None = None
    max_position_by_symbol: dict[str, Decimal] = {}
    max_gross_notional: Decimal | None = None
    daily_loss_limit: Decimal | None = None
    restricted_symbols: frozenset[str] = frozenset()
    wash_trade_window_s: Decimal | None = None
    severity: dict[str, str] = {}

    def __post_init__(self) -> None:
        for name in ("max_position", "max_gross_notional", "daily_loss_limit", "wash_trade_window_s"):
            value = getattr(self, name)
            if value is not None and not (value.is_finite() and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value}")
        for symbol, value in self.max_position_by_symbol.items():
            if not (value.is_finite() and value > 0):
                raise ValueError(f"max_position_by_symbol.{symbol} must be > 0, got {value}")
        for rule, level in self.severity.items():
            if rule not in RULES:
                raise ValueError(f"severity: unknown rule {rule!r} (rules: {', '.join(RULES)})")
            if level not in SEVERITIES:
                raise ValueError(f"severity.{rule} must be one of {', '.join(SEVERITIES)}")

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None) -> ComplianceRules:
        """Rules from plain config data (YAML numbers or strings both become Decimals)."""
        try:
            return msgspec.convert(dict(data or {}), cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid compliance rules: {exc}") from None

    def position_limit(self, symbol: str) -> Decimal | None:
        return self.max_position_by_symbol.get(symbol, self.max_position)

    def severity_of(self, rule: str) -> str:
        return self.severity.get(rule, DEFAULT_SEVERITY[rule])


class Alert(msgspec.Struct, kw_only=True, frozen=True):
    """One compliance alert. `symbol` is None for account-level rules."""

    alert_id: str
    rule: str
    severity: str
    account: str
    symbol: str | None
    message: str
    observed: Decimal | None
    limit: Decimal | None
    ts: int
    fill_id: str | None = None


class RecentFill(msgspec.Struct, array_like=True, frozen=True):
    """A fill remembered for the wash-trade rule."""

    ts: int
    side: str
    price: Decimal
    fill_id: str | None


class ComplianceState(msgspec.Struct, kw_only=True):
    """What the evaluator remembers between calls (serializable with msgspec).

    `breaches`: (rule, account, symbol or "") of every limit currently in breach.
    `recent`: account -> symbol -> fills inside the wash-trade window, oldest first.
    """

    breaches: set[tuple[str, str, str]] = set()
    recent: dict[str, dict[str, list[RecentFill]]] = {}


def alert_id(rule: str, trigger: str, account: str, symbol: str | None) -> str:
    """Deterministic id: the same trigger, rule, account and symbol give the same id."""
    key = "\x1f".join((rule, trigger, account, symbol or ""))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


class ComplianceEvaluator:
    """Applies `ComplianceRules` to fills and marks; see the module doc for semantics."""

    def __init__(self, rules: ComplianceRules, state: ComplianceState | None = None):
        self.rules = rules
        self.state = state if state is not None else ComplianceState()
        window = rules.wash_trade_window_s
        self._window_ns = None if window is None else int(window.scaleb(9, EXACT))

    # -- entry points ----------------------------------------------------------------

    def check_fill(self, fill: FillLike, book: PositionBook) -> list[Alert]:
        """Alerts caused by `fill`; call it after `book.apply(fill)`."""
        rules = self.rules
        alerts: list[Alert] = []
        account, symbol = fill.account, fill.symbol
        trigger = fill.fill_id or f"fill@{fill.ts}"

        if symbol in rules.restricted_symbols:
            alerts.append(
                self._alert(
                    "restricted_symbol", trigger, fill, account, symbol,
                    f"{fill.side} {format_decimal(fill.qty)} {symbol} @ "
                    f"{format_decimal(fill.price)}: {symbol} is on the restricted list",
                    None, None,
                )
            )
        if self._window_ns is not None:
            alert = self._wash_trade(fill, trigger)
            if alert is not None:
                alerts.append(alert)

        limit = rules.position_limit(symbol)
        position = book.get(account, symbol)
        if limit is not None and position is not None:
            observed = EXACT.abs(position.net_qty)
            if self._crossed("max_position", account, symbol, observed > limit):
                alerts.append(
                    self._alert(
                        "max_position", trigger, fill, account, symbol,
                        f"{account} {symbol}: position {format_decimal(position.net_qty)} "
                        f"exceeds the limit of {format_decimal(limit)}",
                        observed, limit,
                    )
                )
        alerts.extend(self._account_limits(account, book, trigger, fill))
        return alerts

    def check_marks(
        self, book: PositionBook, ts: int, symbols: Iterable[str] | None = None
    ) -> list[Alert]:
        """Re-check the account limits (notional, loss) after marks moved.

        `symbols`: the symbols whose mark changed (None: all); only accounts holding
        one of them are checked (all of them when one is an FX instrument). `ts` is the mark time: it names the trigger.
        """
        wanted = None if symbols is None else set(symbols)
        if wanted is not None and wanted & book.reference.fx_symbols():
            wanted = None  # a rate moved: any account may hold something it converts
        alerts: list[Alert] = []
        for account in book.accounts():
            if wanted is not None and not any(
                p.symbol in wanted for p in book.account_positions(account)
            ):
                continue
            alerts.extend(self._account_limits(account, book, f"mark@{ts}", None, ts))
        return alerts

    # -- rules -------------------------------------------------------------------------

    def _account_limits(
        self, account: str, book: PositionBook, trigger: str,
        fill: FillLike | None, ts: int | None = None,
    ) -> list[Alert]:
        rules = self.rules
        alerts: list[Alert] = []
        if rules.max_gross_notional is None and rules.daily_loss_limit is None:
            return alerts
        totals = book.account_totals(account)
        base = totals.base_currency
        missing = set(totals.missing_rates)
        for currency in sorted(missing):
            if self._crossed("missing_fx_rate", account, currency, True):
                alerts.append(
                    self._alert(
                        "missing_fx_rate", trigger, fill, account, currency,
                        f"{account}: no rate from {currency} to the base currency {base}; "
                        "account limits that need it are not evaluated",
                        None, None, ts,
                    )
                )
        for key in [k for k in self.state.breaches if k[0] == "missing_fx_rate" and k[1] == account]:
            if key[2] not in missing:
                self.state.breaches.discard(key)  # the rate is known again: re-armed
        notional = totals.gross_notional
        if rules.max_gross_notional is not None and notional is not None:
            limit = rules.max_gross_notional
            if self._crossed("max_gross_notional", account, "", notional > limit):
                alerts.append(
                    self._alert(
                        "max_gross_notional", trigger, fill, account, None,
                        f"{account}: gross notional {format_decimal(notional)} {base} exceeds the "
                        f"limit of {format_decimal(limit)}",
                        notional, limit, ts,
                    )
                )
        day = totals.day_pnl
        if rules.daily_loss_limit is not None and day is not None:
            floor = -rules.daily_loss_limit
            if self._crossed("daily_loss_limit", account, "", day < floor):
                alerts.append(
                    self._alert(
                        "daily_loss_limit", trigger, fill, account, None,
                        f"{account}: day P&L {format_decimal(day)} {base} is below the daily "
                        f"loss limit of {format_decimal(floor)}",
                        day, floor, ts,
                    )
                )
        return alerts

    def _wash_trade(self, fill: FillLike, trigger: str) -> Alert | None:
        window = self._window_ns
        recent_by_symbol = self.state.recent.setdefault(fill.account, {})
        recent = recent_by_symbol.setdefault(fill.symbol, [])
        oldest = fill.ts - window
        if recent and recent[0].ts < oldest:
            recent[:] = [r for r in recent if r.ts >= oldest]
        matches = [
            r for r in recent
            if r.side != fill.side and r.price == fill.price and abs(fill.ts - r.ts) <= window
        ]
        recent.append(RecentFill(fill.ts, fill.side, fill.price, fill.fill_id))
        if not matches:
            return None
        nearest = min(abs(fill.ts - r.ts) for r in matches)
        gap = divide(Decimal(nearest), _NS_PER_S)  # seconds, exact
        others = ", ".join(r.fill_id or f"fill@{r.ts}" for r in matches)
        return self._alert(
            "wash_trade", trigger, fill, fill.account, fill.symbol,
            f"{fill.account} {fill.symbol}: {fill.side} @ {format_decimal(fill.price)} "
            f"meets opposite fill(s) {others} at the same price within "
            f"{format_decimal(self.rules.wash_trade_window_s)} s",
            gap, self.rules.wash_trade_window_s,
        )

    # -- helpers -------------------------------------------------------------------------

    def _crossed(self, rule: str, account: str, symbol: str, breached: bool) -> bool:
        """True only when the (rule, account, symbol) goes from within limit to breach."""
        key = (rule, account, symbol)
        breaches = self.state.breaches
        if not breached:
            breaches.discard(key)
            return False
        if key in breaches:
            return False
        breaches.add(key)
        return True

    def _alert(
        self, rule: str, trigger: str, fill: FillLike | None, account: str,
        symbol: str | None, message: str, observed: Decimal | None,
        limit: Decimal | None, ts: int | None = None,
    ) -> Alert:
        return Alert(
            alert_id=alert_id(rule, trigger, account, symbol),
            rule=rule,
            severity=self.rules.severity_of(rule),
            account=account,
            symbol=symbol,
            message=message,
            observed=observed,
            limit=limit,
            ts=fill.ts if fill is not None else (ts or 0),
            fill_id=fill.fill_id if fill is not None else None,
        )


__all__ = [
    "Alert",
    "ComplianceEvaluator",
    "ComplianceRules",
    "ComplianceState",
    "DEFAULT_SEVERITY",
    "RULES",
    "RecentFill",
    "alert_id",
]
