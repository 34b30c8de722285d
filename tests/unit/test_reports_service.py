"""The /reports pages and the daily run, on an App with a local object store.

Only the current day's position reports are generated here (they come from the live
table, no database involved); the QuestDB and ClickHouse parts are in
tests/integration/test_reports.py.
"""

from __future__ import annotations

import io
import threading
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal as D
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pyarrow.parquet as pq
import pytest

from posttrade.agents.reports import BlotterSpool, ExportedChunk, ReportsSection, install_reports
from posttrade.app import App
from posttrade.core.positions import PositionState
from posttrade.core.reports import (
    FORMATS,
    REPORT_KINDS,
    ChunkHead,
    TradingDay,
    blotter_parquet,
    fingerprint_of,
)
from posttrade.stores.objects import LocalObjectStore
from posttrade.stores.parquet import parquet_layout
from posttrade.stores.questdb import QuestDBClient, QuestDBError
from posttrade.stores.questdb.export import QuestDBExporter
from posttrade.streams.memory import MemoryTransport
from posttrade.web.server import build_web_app
from tests.unit.test_reports import worked_example_book
from tests.unit.test_reports_blotter import T0, blotter_rows


class Service:
    def __init__(self, root, **settings):
        self.app = App("ptrc", MemoryTransport())
        self.positions = self.app.table("positions", value_type=PositionState, key_type=tuple[str, str])
        self.store = LocalObjectStore(root)
        # Nothing listens there: these tests never reach QuestDB.
        self.questdb = QuestDBClient(host="127.0.0.1", port=9, timeout=1)
        self.marks = {"XYZ": D(95), "ES": D(5000)}
        self.reports = install_reports(
            self.app, positions=self.positions, mark_of=self.marks.get, multipliers={"ES": D(50)},
            object_store=self.store, questdb=self.questdb, clickhouse=None,
            settings=ReportsSection(**{"spool_dir": str(root.parent / f"{root.name}-spool"), **settings}),
        )

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(self.app)), base_url="http://ptrc")


def today() -> date:
    return TradingDay().of(datetime.now(timezone.utc))


async def test_todays_position_reports_come_from_the_live_table(tmp_path):
    svc = Service(tmp_path)
    async with svc.app, svc.client() as http:
        for position in worked_example_book():
            svc.positions[(position.account, position.symbol)] = position.to_state()
        response = await http.post("/reports", json={"kinds": ["daily_pnl", "positions"]})
        assert response.status_code == 201, response.text
        body = response.json()
        csv_text = (await http.get(f"/reports/{today()}/daily_pnl.csv")).text
        parquet = await http.get(f"/reports/{today()}/positions.parquet")
    assert body["date"] == today().isoformat()
    assert [(r["name"], r["rows"]) for r in body["reports"]] == [
        (f"{today()}/daily_pnl.csv", 5), (f"{today()}/daily_pnl.parquet", 5),
        (f"{today()}/positions.csv", 3), (f"{today()}/positions.parquet", 3),
    ]
    assert body["generation_seconds"] > 0 and "positions.read" in body["steps"]
    lines = csv_text.splitlines()
    assert lines[0].startswith("date,level,account,symbol,net_qty,mark,realized_pnl_gross")
    xyz = next(line for line in lines if ",XYZ," in line).split(",")
    # net -5, mark 95, realized gross 150, fees 4, net 146, unrealized -25, total 121, day 121
    assert xyz[4:12] == ["-5", "95", "150", "4", "146", "-25", "121", "121"]
    acc2 = next(line for line in lines if line.split(",")[1:3] == ["account", "ACC2"]).split(",")
    assert acc2[9:12] == ["", "", ""]  # ZZZ has no mark: unrealized, total and day P&L unknown
    assert parquet.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(parquet.content))
    assert table.column("symbol").to_pylist() == ["ES", "XYZ", "ZZZ"]
    assert table.column("market_value").to_pylist() == [D(500000), D(-475), None]


async def test_reports_are_listed_filtered_by_date_and_downloaded(tmp_path):
    svc = Service(tmp_path)
    await svc.store.put("reports/2026-11-22/trade_blotter.csv", b"a,b\r\n1,2\r\n")
    await svc.store.put("reports/2026-11-23/trade_blotter.csv", b"a\r\n")
    await svc.store.put("reports/2026-11-23/trade_blotter.parquet", b"PAR1")
    await svc.store.put("elsewhere/x.csv", b"no")
    async with svc.app, svc.client() as http:
        everything = (await http.get("/reports")).json()
        one_day = (await http.get("/reports", params={"date": "2026-11-22"})).json()
        bad_date = await http.get("/reports", params={"date": "22/11/2026"})
        csv_file = await http.get("/reports/2026-11-22/trade_blotter.csv")
        with_prefix = await http.get("/reports/reports/2026-11-22/trade_blotter.csv")
        parquet_file = await http.get("/reports/2026-11-23/trade_blotter.parquet")
        missing = await http.get("/reports/2026-11-24/trade_blotter.csv")
    assert [r["name"] for r in everything["reports"]] == [
        "2026-11-23/trade_blotter.parquet", "2026-11-23/trade_blotter.csv", "2026-11-22/trade_blotter.csv",
    ]
    first = everything["reports"][0]
    assert (first["date"], first["kind"], first["format"], first["size"], first["url"]) == (
        "2026-11-23", "trade_blotter", "parquet", 4, "/reports/2026-11-23/trade_blotter.parquet")
    assert datetime.fromisoformat(first["last_modified"]).tzinfo is not None
    assert [r["name"] for r in one_day["reports"]] == ["2026-11-22/trade_blotter.csv"]
    assert bad_date.status_code == 400
    assert csv_file.status_code == 200 and csv_file.content == b"a,b\r\n1,2\r\n"
    assert csv_file.headers["content-type"] == "text/csv; charset=utf-8"
    assert 'filename="2026-11-22_trade_blotter.csv"' in csv_file.headers["content-disposition"]
    assert with_prefix.content == csv_file.content
    assert parquet_file.content == b"PAR1"
    assert missing.status_code == 404 and missing.json()["detail"]["error"] == "no such report"


@pytest.mark.parametrize(
    "path",
    ["/reports/%2E%2E/%2E%2E/etc/passwd", "/reports/2026-11-22/%2E%2E/%2E%2E/secret", "/reports/2026-11-22//x.csv",
     "/reports/.hidden"],
)
async def test_names_that_leave_the_reports_folder_are_400(tmp_path, path):
    (tmp_path / "secret").write_text("no")
    svc = Service(tmp_path / "store")
    async with svc.app, svc.client() as http:
        response = await http.get(path)
    assert response.status_code == 400, (path, response.status_code, response.text)
    assert response.json()["error"] == "bad request"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"date": "2026-02-30"}, "must be a day"),
        ({"date": "0347-09-13"}, "must be a day"),  # before any event: QuestDB must not see it
        ({"date": "2999-01-01"}, "must be a day"),
        ({"date": "2199-01-01"}, "has not started yet"),
        ({"kinds": ["pnl"]}, "choose from"),
        ({"kinds": []}, "choose from"),
        ({"day": "2026-11-23"}, "unknown field"),
    ],
)
async def test_invalid_generation_requests_are_400(tmp_path, body, needle):
    svc = Service(tmp_path)
    async with svc.app, svc.client() as http:
        response = await http.post("/reports", json=body)
    assert response.status_code == 400 and needle in response.text, response.text


async def test_the_daily_run_generates_the_previous_day_once_when_due(tmp_path):
    svc = Service(tmp_path, daily_delay_s=600)
    generated: list[date] = []

    async def fake_generate(day, kinds=REPORT_KINDS):
        generated.append(day)
        for kind in kinds:
            for fmt in FORMATS:
                await svc.store.put(f"reports/{day}/{kind}.{fmt}", b"x")

    svc.reports.generate = fake_generate
    midnight = datetime(2026, 11, 24, tzinfo=timezone.utc)
    assert await svc.reports.daily(midnight + timedelta(seconds=599)) is None  # not yet due
    await svc.reports.daily(midnight + timedelta(seconds=601))
    await svc.reports.daily(midnight + timedelta(seconds=700))  # done already
    assert generated == [date(2026, 11, 23)]
    # A restarted service finds the files and does not generate them again.
    again = Service(tmp_path, daily_delay_s=600)
    again.reports.generate = fake_generate
    await again.reports.daily(midnight + timedelta(hours=1))
    assert generated == [date(2026, 11, 23)]
    assert "daily_reports" in svc.app.timers


async def test_the_daily_run_can_be_turned_off(tmp_path):
    svc = Service(tmp_path, daily_delay_s=None)
    assert "daily_reports" not in svc.app.timers


# -- the QuestDB exporter, against a stand-in HTTP server ------------------------------------

class Answers(BaseHTTPRequestHandler):
    script: list[tuple[int, bytes]] = []
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        Answers.seen.append((self.path, self.headers.get("Authorization")))
        status, body = Answers.script.pop(0)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def questdb_standin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Answers.script, Answers.seen = [], []
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_exporter_retries_while_questdb_is_busy_and_sends_the_clients_credentials(questdb_standin):
    Answers.script = [(429, b"exceeded connection limit"), (429, b"exceeded connection limit"), (200, b'"a"\r\n"1"\r\n')]
    client = QuestDBClient(host="127.0.0.1", port=questdb_standin, username="u", password="p")
    exporter = QuestDBExporter(client, retry_s=10)
    assert exporter.export_csv("SELECT 1") == b'"a"\r\n"1"\r\n'
    assert len(Answers.seen) == 3
    path, authorization = Answers.seen[-1]
    assert path == "/exp?query=SELECT+1" and authorization == "Basic dTpw"


def test_the_exporter_reads_a_missing_table_as_empty_and_raises_other_errors(questdb_standin):
    Answers.script = [
        (400, b'{"error":"table does not exist [table=x]"}'),
        (400, b'{"error":"unexpected token"}'),
        (429, b"busy"),
    ]
    client = QuestDBClient(host="127.0.0.1", port=questdb_standin, token="secret")
    exporter = QuestDBExporter(client, retry_s=0)
    assert exporter.export_csv("SELECT * FROM x") == b""
    assert Answers.seen[0][1] == "Bearer secret"
    with pytest.raises(QuestDBError, match="unexpected token"):
        exporter.export_csv("SELEC")
    with pytest.raises(QuestDBError, match="HTTP 429"):
        exporter.export_csv("SELECT 1")


async def test_generation_with_questdb_unreachable_is_503(tmp_path):
    svc = Service(tmp_path)  # its QuestDB address has nothing listening
    async with svc.app, svc.client() as http:
        response = await http.post("/reports", json={"date": "2026-01-05", "kinds": ["trade_blotter"]})
    assert response.status_code == 503, response.text
    assert response.json()["detail"]["error"] == "a store is unavailable"


# -- the blotter spool's files -----------------------------------------------------------------


def exported(lo: int, hi: int, n: int, csv_rows: bytes = b'"x"\r\n') -> ExportedChunk:
    table = blotter_rows(n)
    parquet = blotter_parquet(table)
    head = ChunkHead(lo=lo, hi=hi, fingerprint=fingerprint_of(table), csv_size=len(csv_rows), parquet_size=len(parquet),
                     layout=parquet_layout(parquet), exported_at=lo)
    return ExportedChunk(head, memoryview(csv_rows), parquet)


def test_spool_chunks_are_written_whole_read_back_and_replaced(tmp_path):
    spool = BlotterSpool(tmp_path / "spool")
    day = date(2026, 11, 20)
    assert spool.chunks(day) == []
    spool.update(day, [exported(T0, T0 + 10, 3, b'"a"\r\n'), exported(T0 + 10, T0 + 20, 4)], [])
    first, second = spool.chunks(day)
    assert (first.head.lo, first.head.rows, second.head.rows) == (T0, 3, 4)
    csv_into = bytearray(first.head.csv_size)
    parquet = first.read(memoryview(csv_into))
    assert bytes(csv_into) == b'"a"\r\n' and parquet == blotter_parquet(blotter_rows(3))
    # a re-export of [T0, T0 + 20) replaces both (the same name is replaced in place)
    spool.update(day, [exported(T0, T0 + 20, 7)], [first, second])
    (only,) = spool.chunks(day)
    assert (only.head.lo, only.head.hi, only.head.rows) == (T0, T0 + 20, 7)


def test_a_chunk_replaced_after_its_head_was_read_is_not_read_with_the_old_head(tmp_path):
    spool = BlotterSpool(tmp_path / "spool")
    day = date(2026, 11, 20)
    spool.update(day, [exported(T0, T0 + 10, 3, b'"a"\r\n')], [])
    (listed,) = spool.chunks(day)
    spool.update(day, [exported(T0, T0 + 10, 5, b'"b"\r\n')], [])  # e.g. another process sharing the spool
    with pytest.raises(OSError, match="replaced"):
        listed.read(memoryview(bytearray(listed.head.csv_size)))
    (again,) = spool.chunks(day)
    assert again.head.rows == 5


def test_spool_ignores_what_a_crash_left_behind(tmp_path):
    spool = BlotterSpool(tmp_path / "spool")
    day = date(2026, 11, 20)
    spool.update(day, [exported(T0, T0 + 10, 3)], [])
    (good,) = spool.chunks(day)
    directory = spool.day_dir(day)
    data = good.path.read_bytes()
    (directory / f"{T0 + 10}-{T0 + 20}.chunk").write_bytes(data[:-5])  # cut short
    (directory / f".{T0 + 20}-{T0 + 30}.chunk.abc").write_bytes(data)  # a write that never got renamed
    (directory / f"{T0 + 30}-{T0 + 40}.chunk").write_bytes(b"garbage")
    assert [c.path for c in spool.chunks(day)] == [good.path]


def test_spool_days_are_dropped_after_the_days_kept(tmp_path):
    spool = BlotterSpool(tmp_path / "spool")
    for day in (date(2026, 11, 18), date(2026, 11, 19), date(2026, 11, 20)):
        spool.update(day, [exported(T0, T0 + 10, 1)], [])
    (spool.root / "not-a-day").mkdir()
    spool.drop_days_before(date(2026, 11, 20))
    assert sorted(p.name for p in spool.root.iterdir()) == ["2026-11-20", "not-a-day"]


def test_the_spool_lives_per_questdb_table_and_grid_and_can_be_turned_off(tmp_path):
    svc = Service(tmp_path)
    assert svc.reports.spool.root.parts[-3:] == ("127.0.0.1-9", "ptrc_trades", "UTC-000000-300s")
    assert "reports_spool" in svc.app.timers
    off = Service(tmp_path / "off", spool=False)
    assert off.reports.spool is None and "reports_spool" not in off.app.timers
    with pytest.raises(ValueError, match="spool_cell_s"):
        Service(tmp_path / "bad", spool_cell_s=7)
