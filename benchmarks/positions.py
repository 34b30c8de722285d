"""Fills/s through the position and P&L core (both methods updated on every fill).

300,000 pre-built random fills (100 symbols, 10 accounts, one symbol with multiplier
50) are applied in chunks of 10,000; each chunk is timed on its own, and the median and
best chunk are reported for `PositionBook.apply_many` (what a batch agent calls) and
`PositionBook.apply` (one fill at a time). Chunk timing keeps a busy neighbour on a
shared machine from hiding the core's own speed; the load average is recorded.

The end-to-end figures of issue 3 live beside it: `benchmarks/pnl.py` (update
published → visible at /pnl/realtime) and `benchmarks/reports.py` (report generation).

Writes benchmarks/results/positions.json and prints a table.

    python benchmarks/positions.py [--fills 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from decimal import Decimal
from pathlib import Path

from posttrade.core.positions import PositionBook
from posttrade.streams.events import Fill

RESULTS = Path(__file__).parent / "results" / "positions.json"
CHUNK = 10_000


def random_fills(n: int, symbols: int = 100, accounts: int = 10, seed: int = 7) -> list[Fill]:
    rng = random.Random(seed)
    names = [f"SYM{i:03d}" for i in range(symbols)]
    account_names = [f"ACC{i:02d}" for i in range(accounts)]
    cents = [rng.randint(1_000, 50_000) for _ in names]
    fills = []
    for i in range(n):
        s = rng.randrange(symbols)
        fills.append(
            Fill(
                ts=1_700_000_000_000_000_000 + i,
                fill_id=f"F{i}",
                account=rng.choice(account_names),
                symbol=names[s],
                side=rng.choice(("BUY", "SELL")),
                qty=Decimal(rng.randint(1, 500)),
                price=Decimal(cents[s] + rng.randint(-200, 200)).scaleb(-2),
                fee=Decimal(rng.randint(-50, 200)).scaleb(-2),
            )
        )
    return fills


def chunk_rates(fills: list[Fill], mode: str, rounds: int = 3) -> list[float]:
    rates = []
    for _ in range(rounds):
        book = PositionBook(multipliers={"SYM000": 50})
        for i in range(0, len(fills), CHUNK):
            part = fills[i : i + CHUNK]
            started = time.perf_counter()
            if mode == "apply_many":
                book.apply_many(part)
            else:
                for fill in part:
                    book.apply(fill)
            rates.append(len(part) / (time.perf_counter() - started))
    return sorted(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fills", type=int, default=300_000)
    args = parser.parse_args()
    fills = random_fills(args.fills)
    result: dict = {"fills": args.fills, "goal_core_fills_per_s": 200_000, "load_average": os.getloadavg()[0]}
    print(f"{'call':<12}{'median fills/s':>16}{'best fills/s':>14}")
    for mode in ("apply_many", "apply"):
        rates = chunk_rates(fills, mode)
        median, best = rates[len(rates) // 2], rates[-1]
        result[f"core_fills_per_s_{mode}_median"] = round(median)
        result[f"core_fills_per_s_{mode}_best"] = round(best)
        print(f"{mode:<12}{median:>16,.0f}{best:>14,.0f}")
    result["core_fills_per_s"] = result["core_fills_per_s_apply_many_median"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"core_fills_per_s = {result['core_fills_per_s']:,} (goal 200,000) -> {RESULTS}")


if __name__ == "__main__":
    main()
