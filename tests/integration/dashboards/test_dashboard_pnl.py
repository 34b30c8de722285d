"""pnl's page in a real browser, on the desk (six services with tokens, the demo feed
running): the desk's figures and every account's totals live, exactly as the API gives
them; the desk's P&L over the last hour; an account's P&L over time from QuestDB growing
live; the top movers by symbol; a bad interval answered by the API's own 400; and without
a token nothing but the token form."""

from __future__ import annotations

import re

import httpx

from .browser import TIMEOUT_MS, open_page, points

SERVICE = "pnl"
ACCOUNT_ROWS = "#pnl-accounts tbody tr[data-id]"
DECIMAL = re.compile(r"^-?\d+(\.\d+)?$")



def row_cells(page, table: str, row_id: str) -> dict[str, str]:
    return page.evaluate(
        """([table, id]) => {
            const keys = [...document.querySelectorAll(`${table} thead th`)].map(th => th.dataset.key);
            const row = [...document.querySelectorAll(`${table} tbody tr`)].find(r => r.dataset.id === id);
            return row ? Object.fromEntries([...row.children].map((td, i) => [keys[i], td.innerText])) : null;
        }""",
        [table, row_id],
    )


def check_page(url: str, token: str | None, tag: str, account: str, screenshot: str = SERVICE, opened_by=None) -> None:
    """What the test looks at, usable against any pnl with accounts whose names hold `tag`
    and a moving `account`."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    with opened_by(url, token) as opened:
        page = opened.page
        assert not page.is_visible("#pt-token-form")

        # Every account, live; the filter narrows the table to the desk's own.
        page.wait_for_function("() => document.querySelectorAll('#pnl-accounts tbody tr[data-id]').length > 0", timeout=TIMEOUT_MS)
        page.fill("#pnl-accounts .pt-filter", tag)
        page.wait_for_function(
            "tag => { const rows = [...document.querySelectorAll('#pnl-accounts tbody tr[data-id]')];"
            " return rows.length > 0 && rows.every(r => r.dataset.id.includes(tag)); }",
            arg=tag, timeout=TIMEOUT_MS,
        )
        assert page.inner_text("#pnl-desk").count("accounts") >= 1

        # Exactly as the API gives them (decimal strings, never through a float). The figures
        # move with the feed: compare the slower ones, reading again until both agree.
        for _ in range(20):
            api = httpx.get(f"{url}/pnl/realtime", params={"account": account}, headers=auth, timeout=30).json()
            (totals,) = api["accounts"]
            shown = row_cells(page, "#pnl-accounts", account)
            expected = [totals[k] for k in ("fees", "positions", "realized_pnl_net")]
            if shown and [shown[k] for k in ("fees", "positions", "realized_pnl_net")] == [
                "—" if v is None else str(v) for v in expected
            ]:
                break
            page.wait_for_timeout(300)
        else:
            raise AssertionError(f"the row of {account} never showed the API's figures: {shown} vs {totals}")
        for key in ("total_pnl", "day_pnl", "fees", "gross_notional"):
            assert shown[key] == "—" or DECIMAL.match(shown[key]), (key, shown[key])

        # The desk over the last hour (the service's 2 s ring), and it grows.
        page.wait_for_function(
            "() => Number(document.querySelector('#pnl-desk-history .pt-chart')?.dataset.points || 0) >= 2",
            timeout=TIMEOUT_MS,
        )
        samples = points(page, "#pnl-desk-history .pt-chart")
        page.wait_for_function(
            "n => Number(document.querySelector('#pnl-desk-history .pt-chart').dataset.points) > n",
            arg=samples, timeout=TIMEOUT_MS,
        )

        # One account over time: QuestDB's snapshots, then live points without a reload.
        page.fill("#pnl-account", account)
        page.fill("#pnl-interval", "10s")
        page.click("#pnl-show")
        page.wait_for_function(
            "a => document.getElementById('pnl-history-note').innerText.includes('by 10s')"
            " && document.querySelector('#pnl-total-chart .u-legend').innerText.includes(a)"
            " && Number(document.querySelector('#pnl-total-chart .pt-chart').dataset.points) > 0",
            arg=account, timeout=TIMEOUT_MS,
        )
        drawn = points(page, "#pnl-total-chart .pt-chart")
        page.wait_for_function(
            "n => Number(document.querySelector('#pnl-total-chart .pt-chart').dataset.points) > n",
            arg=drawn, timeout=TIMEOUT_MS,
        )
        assert points(page, "#pnl-day-chart .pt-chart") == points(page, "#pnl-total-chart .pt-chart")

        # Top movers by symbol, now for that account (its symbols only), ranked by |day P&L|.
        page.wait_for_function(
            "a => document.querySelector('#pnl-movers .pt-controls').innerText.includes('account ' + a)"
            " && document.querySelectorAll('#pnl-movers tbody tr[data-id]').length > 0",
            arg=account, timeout=TIMEOUT_MS,
        )
        held = {row["symbol"] for row in httpx.get(f"{url}/pnl/realtime", params={"account": account}, headers=auth, timeout=30).json()["positions"]}
        symbols = page.eval_on_selector_all("#pnl-movers tbody tr[data-id]", "rows => rows.map(r => r.dataset.id)")
        assert symbols and set(symbols) <= held, (symbols, held)

        assert opened.errors == [], opened.errors
        path = opened.screenshot(screenshot)
        assert path.stat().st_size > 0

        # A bad interval: the API's 400, word for word, in the banner.
        expected = httpx.get(f"{url}/pnl/history", params={"account": account, "interval": "7x"}, headers=auth, timeout=30)
        assert expected.status_code == 400
        page.fill("#pnl-interval", "7x")
        page.click("#pnl-show")
        page.wait_for_function(
            "() => document.getElementById('pt-error').innerText.includes('\"parameter\":\"interval\"')",
            timeout=TIMEOUT_MS,
        )
        assert "/pnl/history: bad request" in opened.error_text()
        assert expected.json()["detail"]["error"] in opened.error_text()
        # The browser logs each refused request; nothing else went wrong.
        assert all("status of 400" in error for error in opened.errors), opened.errors


def charted_account(url: str, token: str, accounts: list[str]) -> str:
    """A desk account whose total P&L is known (its chart has lines), else the first."""
    auth = {"Authorization": f"Bearer {token}"}
    for account in accounts:
        body = httpx.get(f"{url}/pnl/realtime", params={"account": account}, headers=auth, timeout=30).json()
        if body["accounts"] and body["accounts"][0]["total_pnl"] is not None:
            return account
    return accounts[0]


def test_the_page_shows_the_desks_pnl_live(desk, browser):
    def opened_by(url, token):
        return open_page(browser, url, token=token)

    url = desk.url(SERVICE)
    account = charted_account(url, desk.tokens.read, desk.accounts)
    check_page(url, desk.tokens.read, desk.tag, account, opened_by=opened_by)
