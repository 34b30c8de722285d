"""Reference data: what every service that values money must agree on.

One file read by every service, the validation gate and (as JSON sections) the CLI:
`reference.yaml` beside the service configs (`config/backend/`), or the path in the
services' `reference_file` setting (`POSTTRADE__REFERENCE_FILE`):

    instruments:                     # per symbol; absent: multiplier 1, the default currency
      ESU4:   {multiplier: 50, currency: USD}
      USDJPY: {fx: {base: USD, quote: JPY}}     # an FX pair: its own currency is the quote
      BTCUSDT: {currency: USDT}
    accounts:
      default_base_currency: USD     # the base of accounts not named below (default USD)
      ACC-EU: {base_currency: EUR}
    fx:
      fixed: {USDT: {USD: "1"}}      # 1 USDT = 1 USD: pegged or internal units
      pivot: USD                     # crosses go through it (default USD)

Symbols and account names are case-sensitive, which is why this is a file of its own and
not part of the services' configs (whose environment overrides are lower-cased).

The rules, checked on load (a `ReferenceError` names the entry):
- a currency code is 2 to 12 upper-case letters or digits, starting with a letter;
- an instrument without `currency` is in `accounts.default_base_currency`, except an FX
  instrument, which is in its pair's quote currency (a `currency` other than the quote
  is an error);
- at most one instrument per pair, in either direction (USDJPY and JPYUSD is an error:
  which mark would win is not a question to answer silently);
- fixed rates and multipliers are positive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import yaml

from posttrade.core.exact import ONE

REFERENCE_FILE = "reference.yaml"
DEFAULT_CURRENCY = "USD"
_CURRENCY = re.compile(r"[A-Z][A-Z0-9]{1,11}")


class ReferenceError(ValueError):
    pass


def check_currency(code: object, where: str) -> str:
    """`code` if it is a currency code (module doc), else a `ReferenceError` naming `where`."""
    if not isinstance(code, str) or not _CURRENCY.fullmatch(code):
        raise ReferenceError(f"{where}: a currency code is 2-12 upper-case letters or digits, got {code!r}")
    return code


class FxPair(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An FX instrument's pair: its price is the number of `quote` units one `base` buys."""

    base: str
    quote: str


class Instrument(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    multiplier: Decimal = ONE
    currency: str | None = None  # None: as the module doc says
    fx: FxPair | None = None


class Reference:
    """Instruments, account base currencies and fixed FX rates, validated (module doc)."""

    __slots__ = ("instruments", "default_base_currency", "base_currencies", "fixed", "pivot", "_pairs", "_currencies", "_rate_symbols")

    def __init__(
        self,
        instruments: Mapping[str, Instrument] | None = None,
        *,
        default_base_currency: str = DEFAULT_CURRENCY,
        base_currencies: Mapping[str, str] | None = None,
        fixed: Mapping[str, Mapping[str, Decimal]] | None = None,
        pivot: str = DEFAULT_CURRENCY,
    ):
        self.default_base_currency = check_currency(default_base_currency, "accounts.default_base_currency")
        self.pivot = check_currency(pivot, "fx.pivot")
        self.base_currencies = {
            account: check_currency(code, f"accounts.{account}.base_currency")
            for account, code in (base_currencies or {}).items()
        }
        self.instruments: dict[str, Instrument] = {}
        self._currencies: dict[str, str] = {}
        self._rate_symbols: dict[tuple[str, str], frozenset[str]] = {}
        # (from, to) -> (symbol, inverse): the FX instrument quoting that pair.
        self._pairs: dict[tuple[str, str], tuple[str, bool]] = {}
        for symbol, instrument in (instruments or {}).items():
            self._add_instrument(symbol, instrument)
        self.fixed: dict[tuple[str, str], Decimal] = {}
        for source, targets in (fixed or {}).items():
            check_currency(source, "fx.fixed")
            for target, rate in targets.items():
                check_currency(target, f"fx.fixed.{source}")
                rate = Decimal(str(rate)) if not isinstance(rate, Decimal) else rate
                if not (rate.is_finite() and rate > 0):
                    raise ReferenceError(f"fx.fixed.{source}.{target}: a rate must be > 0, got {rate}")
                self.fixed[(source, target)] = rate

    def _add_instrument(self, symbol: str, instrument: Instrument) -> None:
        where = f"instruments.{symbol}"
        if not (instrument.multiplier.is_finite() and instrument.multiplier > 0):
            raise ReferenceError(f"{where}.multiplier must be > 0, got {instrument.multiplier}")
        pair = instrument.fx
        if pair is None:
            currency = instrument.currency or self.default_base_currency
        else:
            check_currency(pair.base, f"{where}.fx.base")
            check_currency(pair.quote, f"{where}.fx.quote")
            if pair.base == pair.quote:
                raise ReferenceError(f"{where}.fx: base and quote are both {pair.base}")
            if instrument.currency not in (None, pair.quote):
                raise ReferenceError(
                    f"{where}: an FX instrument is in its quote currency {pair.quote}, not {instrument.currency}"
                )
            currency = pair.quote
            for key in ((pair.base, pair.quote), (pair.quote, pair.base)):
                if key in self._pairs:
                    raise ReferenceError(
                        f"{where}: {self._pairs[key][0]} already quotes {pair.base}/{pair.quote} "
                        "(at most one instrument per pair)"
                    )
            self._pairs[(pair.base, pair.quote)] = (symbol, False)
            self._pairs[(pair.quote, pair.base)] = (symbol, True)
        self._currencies[symbol] = check_currency(currency, f"{where}.currency")
        self.instruments[symbol] = instrument

    # -- reads -------------------------------------------------------------------------

    def multiplier(self, symbol: str) -> Decimal:
        instrument = self.instruments.get(symbol)
        return ONE if instrument is None else instrument.multiplier

    @property
    def multipliers(self) -> dict[str, Decimal]:
        return {symbol: i.multiplier for symbol, i in self.instruments.items() if i.multiplier != ONE}

    def currency(self, symbol: str) -> str:
        """The currency `symbol`'s prices, and so its positions' money, are in."""
        return self._currencies.get(symbol, self.default_base_currency)

    def base_currency(self, account: str) -> str:
        return self.base_currencies.get(account, self.default_base_currency)

    def fx_instrument(self, source: str, target: str) -> tuple[str, bool] | None:
        """The instrument quoting `source`/`target` and whether its price must be inverted
        to give the rate from `source` to `target`; None when none does."""
        return self._pairs.get((source, target))

    def fx_symbols(self) -> set[str]:
        return {symbol for symbol, _ in self._pairs.values()}

    def rate_symbols(self, source: str, target: str) -> frozenset[str]:
        """Every FX instrument whose mark a conversion from `source` to `target` may read
        (directly, or on one of the two legs through the pivot)."""
        cached = self._rate_symbols.get((source, target))
        if cached is None:
            pairs = ((source, target), (source, self.pivot), (self.pivot, target))
            cached = frozenset(found[0] for found in map(self._pairs.get, pairs) if found is not None)
            self._rate_symbols[(source, target)] = cached
        return cached

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Mapping[str, Any] | None) -> Reference:
        """From the file's three sections (module doc), each optional."""
        data = dict(data or {})
        unknown = set(data) - {"instruments", "accounts", "fx"}
        if unknown:
            raise ReferenceError(f"unknown section(s) {sorted(unknown)}: expected instruments, accounts, fx")
        return cls(
            instruments_from(data.get("instruments")),
            **accounts_from(data.get("accounts")),
            **fx_from(data.get("fx")),
        )

    @classmethod
    def load(cls, path: str | Path | None, default: Path | None = None) -> Reference:
        """From `path`; without one from `default` if that file exists, else the defaults
        (everything in USD)."""
        file = Path(path) if path else default
        if file is None:
            return cls()
        try:
            text = file.read_text()
        except FileNotFoundError:
            if path:
                raise ReferenceError(f"no reference data file at {file}") from None
            return cls()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ReferenceError(f"{file}: not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ReferenceError(f"{file}: the top level must be a mapping")
        try:
            return cls.from_data(data)
        except ReferenceError as exc:
            raise ReferenceError(f"{file}: {exc}") from None


def instruments_from(data: Mapping[str, Any] | None) -> dict[str, Instrument]:
    """The `instruments` section: symbol -> {multiplier, currency, fx}."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ReferenceError("instruments: expected a mapping of symbol -> instrument")
    out = {}
    for symbol, section in data.items():
        try:
            out[str(symbol)] = msgspec.convert(section or {}, Instrument, strict=False)
        except msgspec.ValidationError as exc:
            raise ReferenceError(f"instruments.{symbol}: {exc}") from None
    return out


def accounts_from(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `accounts` section: `default_base_currency` and account -> {base_currency}."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ReferenceError("accounts: expected a mapping")
    out: dict[str, Any] = {"base_currencies": {}}
    for name, section in data.items():
        if name == "default_base_currency":
            out["default_base_currency"] = section
        elif isinstance(section, Mapping) and set(section) == {"base_currency"}:
            out["base_currencies"][str(name)] = section["base_currency"]
        else:
            raise ReferenceError(f"accounts.{name}: expected {{base_currency: CODE}}, got {section!r}")
    return out


def fx_from(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `fx` section: `fixed` rates and the `pivot`."""
    if data is None:
        return {}
    if not isinstance(data, Mapping) or set(data) - {"fixed", "pivot"}:
        raise ReferenceError(f"fx: expected {{fixed: ..., pivot: ...}}, got {data!r}")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, Mapping) or not all(isinstance(t, Mapping) for t in fixed.values()):
        raise ReferenceError("fx.fixed: expected {FROM: {TO: rate}}")
    out: dict[str, Any] = {"fixed": {}}
    for source, targets in fixed.items():
        rates = {}
        for target, raw in targets.items():
            try:
                rates[target] = Decimal(str(raw))
            except ArithmeticError:
                raise ReferenceError(f"fx.fixed.{source}.{target}: not a number: {raw!r}") from None
        out["fixed"][source] = rates
    if "pivot" in data:
        out["pivot"] = data["pivot"]
    return out
