"""`posttrade validate`: the SPEC's validation gate, automated.

The four tests (P&L accuracy, data flow, performance, integration) run against the
six services, each check printed as PASS/FAIL with the figure measured beside its
criterion and written as JSON. See docs/validate.md.

| module          | what                                                            |
|-----------------|-----------------------------------------------------------------|
| `expected`      | the test trades, the validation instruments and currencies,     |
|                 | and the values they must give (pure)                            |
| `accuracy`      | test 1: ptrc /positions, /pnl/summary, pnl /pnl/realtime, report; |
|                 | money in several currencies, before and after an FX move        |
| `dataflow`      | test 2: each hop queried in its store                           |
| `performance`   | test 3: hit rate, writer rows/s, P&L latency, report time       |
| `integration`   | test 4: /health, dependencies, ERROR lines in the logs          |
| `report`        | the result: checks, the table, the JSON                         |
| `context`       | URLs, run names, clients                                         |
| `runner`        | the order of the run; `--start`                                 |
"""

from .report import FAIL, PASS, Check, GateReport
from .runner import GateOptions, run, run_gate

__all__ = ["FAIL", "PASS", "Check", "GateOptions", "GateReport", "run", "run_gate"]
