"""ptrc's page in a real browser, on the desk (six services with tokens, the demo feed
running): the positions blotter live and exactly as the API gives it, every account's
totals in base currency, the fill flow over time, a compliance alert and a pending
amendment as the feed raises them, a reconciliation run's breaks, a report downloaded
with the token, an account chosen (and a bad one answered by the API's own 400), and
without a token nothing but the token form."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import nats

from posttrade.streams.events import Fill, encode
from posttrade.streams.subjects import fill_subject

from .browser import TIMEOUT_MS, open_page, points

SERVICE = "ptrc"
POSITION_ROWS = "#ptrc-positions tbody tr[data-id]"
DECIMAL = re.compile(r"^-?\d+(\.\d+)?$")



def table_rows(page, table: str) -> list[dict[str, str]]:
    """The rows drawn in `table`, as {column key: text} (plus "id": the row's key)."""
    return page.evaluate(
        """table => {
            const keys = [...document.querySelectorAll(`${table} thead th`)].map(th => th.dataset.key);
            return [...document.querySelectorAll(`${table} tbody tr[data-id]`)].map(row => ({
                id: row.dataset.id, ...Object.fromEntries([...row.children].map((td, i) => [keys[i], td.innerText])),
            }));
        }""",
        table,
    )


async def publish(url: str, fills: list[Fill]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for fill in fills:
        await js.publish(fill_subject(fill.account, fill.symbol), encode(fill))
    await nc.close()


def test_the_page_shows_the_desks_positions_live(desk, browser, stack):
    url = desk.url(SERVICE)
    read = {"Authorization": f"Bearer {desk.tokens.read}"}
    full = {"Authorization": f"Bearer {desk.tokens.full}"}
    account = desk.accounts[0]
    # Today's compliance report (small: this desk's alerts), to download from the page.
    generated = httpx.post(f"{url}/reports", json={"kinds": ["compliance"]}, headers=full, timeout=120)
    assert generated.status_code == 201, generated.text

    with open_page(browser, url, token=desk.tokens.read) as opened:
        page = opened.page
        assert not page.is_visible("#pt-token-form")

        # The blotter: live rows of the desk's accounts, every figure a decimal as given.
        page.wait_for_function(
            "tag => [...document.querySelectorAll('#ptrc-positions tbody tr[data-id]')].some(r => r.dataset.id.includes(tag))",
            arg=desk.tag, timeout=TIMEOUT_MS,
        )
        rows = table_rows(page, "#ptrc-positions")
        for row in rows:
            for key in ("net_qty", "avg_open_price", "mark", "total_pnl", "day_pnl", "total_pnl_base", "realized_pnl_net_base"):
                assert row[key] == "—" or DECIMAL.match(row[key]), (key, row)

        # Live without a reload: the desk's fills change rows (their fill counts) within seconds.
        def drawn_fills() -> str:
            return page.evaluate(
                "() => [...document.querySelectorAll('#ptrc-positions tbody tr[data-id]')]"
                ".map(r => r.dataset.id + r.innerText).sort().join('|')"
            )

        before = drawn_fills()
        page.wait_for_function(
            "before => [...document.querySelectorAll('#ptrc-positions tbody tr[data-id]')]"
            ".map(r => r.dataset.id + r.innerText).sort().join('|') !== before",
            arg=before, timeout=TIMEOUT_MS,
        )

        # Every account's totals in base currency, as /pnl/summary gives them.
        page.wait_for_function(
            "accounts => { const ids = [...document.querySelectorAll('#ptrc-accounts tbody tr[data-id]')].map(r => r.dataset.id);"
            " return accounts.every(a => ids.includes(a)); }",
            arg=desk.accounts, timeout=TIMEOUT_MS,
        )
        for _ in range(30):  # the totals move with the feed: read both until they agree
            api = httpx.get(f"{url}/pnl/summary", params={"account": account}, headers=read, timeout=30).json()
            (totals,) = api["by_account"]
            shown = next((r for r in table_rows(page, "#ptrc-accounts") if r["id"] == account), None)
            keys = ("positions", "fees", "realized_pnl_net")
            if shown and [shown[k] for k in keys] == [str(totals[k]) for k in keys]:
                break
            page.wait_for_timeout(300)
        else:
            raise AssertionError(f"{account}'s totals never showed the API's: {shown} vs {totals}")

        # The fill flow over the last hour (the service's 2 s ring), growing.
        page.wait_for_function(
            "() => Number(document.querySelector('#ptrc-flow .pt-chart')?.dataset.points || 0) >= 2", timeout=TIMEOUT_MS
        )
        drawn = points(page, "#ptrc-flow .pt-chart")
        page.wait_for_function(
            "n => Number(document.querySelector('#ptrc-flow .pt-chart').dataset.points) > n", arg=drawn, timeout=TIMEOUT_MS
        )

        # The feed contradicts itself: a resend with other contents (an alert, live) and a
        # bust of an execution never seen (pending: an alert and a pending amendment).
        own = f"DASH-{desk.tag}"
        symbol = desk.symbols[0]
        fill_id = f"dash-{uuid.uuid4().hex[:8]}"
        now = time.time_ns()
        first = Fill(ts=now, fill_id=fill_id, account=own, symbol=symbol, side="BUY", qty=Decimal(3), price=Decimal("101.25"))
        conflict = Fill(ts=now, fill_id=fill_id, account=own, symbol=symbol, side="BUY", qty=Decimal(4), price=Decimal("101.25"))
        bust = Fill(ts=now, fill_id=f"{fill_id}-bust", account=own, symbol=symbol, exec_type="BUST", ref_fill_id=f"{fill_id}-ghost")
        # (Playwright's sync API holds this thread's event loop: publish from another thread.)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, publish(stack.nats_url, [first, conflict, bust])).result(timeout=60)
        page.wait_for_function(
            "own => { const rows = [...document.querySelectorAll('#ptrc-alerts tbody tr[data-id]')].map(r => r.innerText);"
            " return rows.some(t => t.includes(own) && t.includes('conflicting_duplicate'))"
            " && rows.some(t => t.includes(own) && t.includes('pending_amendment')); }",
            arg=own, timeout=TIMEOUT_MS,
        )
        page.wait_for_function(
            "id => [...document.querySelectorAll('#ptrc-amendments tbody tr[data-id]')].some(r => r.dataset.id === id)",
            arg=bust.fill_id, timeout=TIMEOUT_MS,
        )
        page.wait_for_function(
            "key => [...document.querySelectorAll('#ptrc-positions tbody tr[data-id]')].some(r => r.dataset.id === key)",
            arg=f'["{own}","{symbol}"]', timeout=TIMEOUT_MS,
        )

        # A reconciliation of the last minute's replay: listed, and its breaks on a click.
        since = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
        started = httpx.post(f"{url}/reconciliation", json={"from_time": since}, headers=full, timeout=30)
        assert started.status_code == 202, started.text
        run = started.json()
        run_link = f"#ptrc-reconciliation a[href='{run['url']}']"
        page.wait_for_selector(run_link, timeout=2 * TIMEOUT_MS)
        page.wait_for_function(
            "id => [...document.querySelectorAll('#ptrc-reconciliation tbody tr[data-id]')]"
            ".some(r => r.dataset.id === id && r.innerText.includes('done'))",
            arg=run["id"], timeout=2 * TIMEOUT_MS,
        )
        page.click(run_link)
        page.wait_for_function(
            "id => document.getElementById('ptrc-breaks-title').innerText.startsWith('breaks of ' + id)",
            arg=run["id"], timeout=TIMEOUT_MS,
        )
        stored = httpx.get(f"{url}{run['url']}", headers=read, timeout=30).json()
        assert f": {stored['break_count']}" in page.inner_text("#ptrc-breaks-title")
        # The replay starts 30 s back: positions older than that are breaks, listed.
        page.wait_for_function(
            "n => document.querySelectorAll('#ptrc-breaks tbody tr[data-id]').length === n",
            arg=min(len(stored["breaks"]), 500), timeout=TIMEOUT_MS,
        )
        assert stored["break_count"] > 0

        # A report downloaded with the token (a plain link could not send it), byte for byte.
        name = next(r["name"] for r in generated.json()["reports"] if r["format"] == "csv")
        link = f"#ptrc-reports a[href='/reports/{name}']"
        page.wait_for_selector(link, timeout=TIMEOUT_MS)
        with page.expect_download(timeout=TIMEOUT_MS) as download:
            page.click(link)
        saved = download.value.path().read_bytes()
        assert saved == httpx.get(f"{url}/reports/{name}", headers=read, timeout=30).content
        assert download.value.suggested_filename == name.replace("/", "_")

        assert opened.errors == [], opened.errors
        path = opened.screenshot(SERVICE)
        assert path.stat().st_size > 0

        # One account: the blotter holds its positions only, from /positions?account=.
        page.fill("#ptrc-account", account)
        with page.expect_navigation():
            page.click("#ptrc-filter button[type=submit]")
        page.wait_for_function(
            "a => { const rows = [...document.querySelectorAll('#ptrc-positions tbody tr[data-id]')];"
            " return rows.length > 0 && rows.every(r => JSON.parse(r.dataset.id)[0] === a); }",
            arg=account, timeout=TIMEOUT_MS,
        )
        assert opened.errors == [], opened.errors

        # A bad name: the API's 400, word for word, in the banner.
        bad = "no such account "  # trailing whitespace: not a name
        expected = httpx.get(f"{url}/positions", params={"account": bad}, headers=read, timeout=30)
        assert expected.status_code == 400
        page.fill("#ptrc-account", bad)
        with page.expect_navigation():
            page.click("#ptrc-filter button[type=submit]")
        page.wait_for_function(
            "() => document.getElementById('pt-error').innerText.includes('\"parameter\":\"account\"')", timeout=TIMEOUT_MS
        )
        assert "/positions: bad request" in opened.error_text()
        assert expected.json()["detail"]["error"] in opened.error_text()
        assert page.locator(POSITION_ROWS).count() == 0
        # The browser logs each refused request; nothing else went wrong.
        assert all("status of 400" in error for error in opened.errors), opened.errors
