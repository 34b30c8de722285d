"""Money in several currencies on the real servers, while FX quotes move.

A desk with a USD and a EUR account trades a JPY stock (some fees charged in USD), a EUR
stock, a USDT crypto pair (pegged to USD by a fixed rate) and a CHF stock nothing
quotes. ptrc's /positions and /pnl/summary and pnl's /pnl/realtime must equal
`posttrade positions compute` with the same reference data and marks, field by field
in both currencies, before and after the FX quotes move; totals are in each account's
base currency, and null with `missing_rates` where a rate is unknown. The day's P&L
report, generated after the move, says the same in both currencies.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import nats

from posttrade.streams.events import Fill, Quote, encode
from posttrade.streams.subjects import fill_subject, quote_subject

from .service_process import REPO, ServiceProcess, reference_setting
from .test_trusted_books import differences, same, settle

LOCAL = ("net_qty", "avg_open_price", "realized_pnl_gross", "fees", "realized_pnl_net", "mark", "unrealized_pnl")
BASE = ("currency", "base_currency", "fx_rate", "realized_pnl_gross_base", "fees_base", "realized_pnl_net_base",
        "unrealized_pnl_base", "total_pnl_base", "day_pnl_base", "gross_notional_base", "missing_rates")  # fmt: skip
TOTALS = ("realized_pnl_gross", "fees", "realized_pnl_net", "unrealized_pnl", "total_pnl", "gross_notional")


class Desk:
    """This run's symbols, accounts and reference data (tagged: the stack is shared)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6].upper()
        self.jp, self.eu, self.btc, self.ch = f"JP{tag}", f"EU{tag}", f"BTC{tag}", f"CH{tag}"
        self.usdjpy, self.eurusd = f"USDJPY{tag}", f"EURUSD{tag}"
        self.usd_account, self.eur_account = f"CCY{tag}US", f"CCY{tag}EU"
        self.instruments = {
            self.jp: {"currency": "JPY"},
            self.eu: {"currency": "EUR", "multiplier": 2},
            self.btc: {"currency": "USDT"},
            self.ch: {"currency": "CHF"},
            self.usdjpy: {"currency": "JPY", "fx": {"base": "USD", "quote": "JPY"}},
            self.eurusd: {"fx": {"base": "EUR", "quote": "USD"}},
        }
        self.accounts = {"default_base_currency": "USD", self.eur_account: {"base_currency": "EUR"}}
        self.fx = {"fixed": {"USDT": {"USD": "1"}}, "pivot": "USD"}
        self.marks = {self.jp: Decimal("2550"), self.eu: Decimal("181.5"), self.btc: Decimal("61000.5"),
                      self.ch: Decimal("99.5"), self.usdjpy: Decimal("150.25"), self.eurusd: Decimal("1.0825")}  # fmt: skip

    def reference_yaml(self) -> str:
        return json.dumps({"instruments": self.instruments, "accounts": self.accounts, "fx": self.fx})  # JSON is YAML

    def fills(self, seed: int) -> list[Fill]:
        rng = random.Random(seed)
        t0 = time.time_ns() - 600_000_000_000
        prices = {self.jp: (2400, 2700), self.eu: (170, 190), self.btc: (59000, 62000), self.ch: (95, 105)}
        out = []
        for i in range(120):
            symbol = rng.choice([self.jp, self.eu, self.btc]) if i < 110 else self.ch
            low, high = prices[symbol]
            out.append(Fill(
                ts=t0 + i * 1_000_000_000, fill_id=f"ccy-{uuid.uuid4().hex}",
                account=rng.choice([self.usd_account, self.eur_account]), symbol=symbol,
                side=rng.choice(["BUY", "SELL"]), qty=Decimal(rng.randint(1, 30)) / (100 if symbol == self.btc else 1),
                price=Decimal(rng.randint(low * 100, high * 100)) / 100, fee=Decimal(rng.randint(0, 300)) / 100,
                fee_currency="USD" if symbol == self.jp and rng.random() < 0.3 else None,
            ))  # fmt: skip
        return out


async def publish(url: str, fills: list[Fill], quotes: dict[str, Decimal]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    t = time.time_ns()
    for symbol, mid in quotes.items():
        tick = Decimal("0.0001")
        await js.publish(quote_subject(symbol), encode(Quote(ts=t, symbol=symbol, bid=mid - tick, ask=mid + tick)))
    futures = [await js.publish_async(fill_subject(f.account, f.symbol), encode(f)) for f in fills]
    await asyncio.gather(*futures)
    await nc.close()


def cli_rows(tmp_path: Path, desk: Desk, fills: list[Fill]) -> dict:
    files = {}
    for name, data in (("fills", None), ("instruments", desk.instruments), ("accounts", desk.accounts), ("fx", desk.fx),
                       ("marks", {s: str(m) for s, m in desk.marks.items() if s != desk.ch})):  # fmt: skip
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(data) if data is not None else "".join(encode(f).decode() + "\n" for f in fills))
    out = subprocess.run(
        [sys.executable, "-m", "posttrade.cli", "positions", "compute", str(files["fills"]), "--marks", str(files["marks"]),
         "--instruments", str(files["instruments"]), "--accounts", str(files["accounts"]), "--fx", str(files["fx"])],
        capture_output=True, check=True, cwd=REPO,
    )  # fmt: skip
    return {(r["account"], r["symbol"]): r for r in json.loads(out.stdout)["positions"]}


def expected_totals(expected: dict, account: str) -> dict:
    """An account's totals: the sums of its positions' base figures (null if one is)."""
    mine = [r for k, r in expected.items() if k[0] == account]
    totals: dict = {"missing_rates": sorted({c for r in mine for c in r["missing_rates"]})}
    for field in TOTALS:
        terms = [r[f"{field}_base"] for r in mine]
        totals[field] = None if any(t is None for t in terms) else str(sum(Decimal(t) for t in terms))
    return totals


def test_base_currency_figures_follow_the_fx_quotes(stack, tmp_path):
    desk = Desk()
    fills = desk.fills(seed=14)
    reference = reference_setting(desk.reference_yaml())
    ptrc = ServiceProcess("ptrc", stack, tmp_path, (REPO / "config/backend/ptrc/config.yaml").read_text() + reference)
    pnl = ServiceProcess("pnl", stack, tmp_path, (REPO / "config/backend/pnl/config.yaml").read_text() + reference)
    accounts = (desk.usd_account, desk.eur_account)

    def rows_of(service: ServiceProcess, path: str, key: str) -> dict:
        return {
            (r["account"], r["symbol"]): r
            for account in accounts for r in service.get(path, account=account).json()[key]
        }  # fmt: skip

    for service in (ptrc, pnl):
        service.start()
    try:
        quotes = {s: m for s, m in desk.marks.items() if s != desk.ch}  # nothing quotes CHF, or the CHF stock
        asyncio.run(publish(stack.nats_url, fills, quotes))
        for round_ in range(2):
            expected = cli_rows(tmp_path, desk, fills)
            jpy = expected[(desk.usd_account, desk.jp)]
            assert jpy["currency"] == "JPY" and jpy["fx_legs"][0]["instrument"] == desk.usdjpy
            assert expected[(desk.eur_account, desk.jp)]["fx_rate"] != jpy["fx_rate"]  # the cross through USD
            assert expected[(desk.usd_account, desk.ch)]["missing_rates"] == ["CHF"]

            settle(lambda: rows_of(ptrc, "/positions", "positions"), expected, LOCAL + BASE, f"ptrc /positions {round_}")
            settle(lambda: rows_of(pnl, "/pnl/realtime", "positions"), expected, LOCAL + BASE, f"pnl /pnl/realtime {round_}")
            for account in accounts:
                want = expected_totals(expected, account)
                base = "USD" if account == desk.usd_account else "EUR"
                [summary] = ptrc.get("/pnl/summary", account=account).json()["by_account"]
                [realtime] = pnl.get("/pnl/realtime", account=account).json()["accounts"]
                for totals in (summary, realtime):
                    assert totals["base_currency"] == base and totals["missing_rates"] == want["missing_rates"] == ["CHF"]
                    assert all(same(totals[f], want[f]) for f in TOTALS), (totals, want)
                by_symbol = {r["symbol"]: r for r in ptrc.get("/pnl/summary", account=account).json()["by_symbol"]}
                assert by_symbol[desk.jp]["currency"] == "JPY" and by_symbol[desk.eu]["currency"] == "EUR"

            if round_ == 0:
                # The FX quotes move: every figure converted through them follows, nothing else.
                desk.marks.update({desk.usdjpy: Decimal("155.5"), desk.eurusd: Decimal("1.1012")})
                asyncio.run(publish(stack.nats_url, [], {s: desk.marks[s] for s in (desk.usdjpy, desk.eurusd)}))

        # Today's P&L report, at the rates now: position rows in both currencies, account
        # rows in the base currency only.
        generated = ptrc.post("/reports", json={})
        assert generated.status_code == 201, generated.text
        day = generated.json()["date"]
        report = ptrc.get(f"/reports/{day}/daily_pnl.csv")
        assert report.status_code == 200, report.text
        rows = [
            {k: v if v != "" else None for k, v in r.items()}  # an empty cell is a null
            for r in csv.DictReader(io.StringIO(report.content.decode("utf-8-sig"))) if r["account"] in accounts
        ]
        positions = {(r["account"], r["symbol"]): r for r in rows if r["level"] == "position"}
        fields = ("net_qty", "realized_pnl_net", "unrealized_pnl", "currency", "base_currency", "fx_rate",
                  "realized_pnl_net_base", "unrealized_pnl_base", "total_pnl_base")  # fmt: skip
        assert not differences(
            positions, expected, fields
        ), differences(positions, expected, fields)[:5]
        for row in rows:
            if row["level"] == "account":
                want = expected_totals(expected, row["account"])
                assert row["base_currency"] == ("USD" if row["account"] == desk.usd_account else "EUR")
                assert row["total_pnl"] is None and row["missing_rates"] == "CHF"  # the CHF position has no rate
                assert same(row["realized_pnl_gross"], want["realized_pnl_gross"]), (row, want)
    finally:
        for service in (ptrc, pnl):
            service.stop()
