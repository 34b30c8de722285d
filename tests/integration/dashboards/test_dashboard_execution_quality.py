"""execution_quality's page in a real browser, on the desk (six services with tokens, the
demo feed running): slippage histograms, the markout curve, the worst and the recent
orders, an order's fills behind its link with every decimal exactly as the API gives it,
live updates, a bad filter answered by the API's own 400, and without a token nothing
but the token form."""

from __future__ import annotations

from urllib.parse import quote

import httpx

from .browser import TIMEOUT_MS, every_chart_points, open_page

SERVICE = "execution_quality"
RECENT = "#eq-recent tbody tr[data-id]"


def test_the_page_shows_execution_quality_live(desk, browser):
    url = desk.url(SERVICE)
    with open_page(browser, url, token=desk.tokens.read) as opened:
        page = opened.page
        assert not page.is_visible("#pt-token-form")

        # Data: orders in both tables, every chart drawn with points.
        page.wait_for_selector(RECENT, timeout=TIMEOUT_MS)
        page.wait_for_selector("#eq-worst tbody tr[data-id]", timeout=TIMEOUT_MS)
        page.wait_for_function(
            """() => ['#eq-hist-venue', '#eq-hist-side', '#eq-hist-account', '#eq-markouts'].every(
                 s => Number(document.querySelector(s + ' .pt-chart')?.dataset.points || 0) > 0)""",
            timeout=TIMEOUT_MS,
        )
        assert every_chart_points(page, "#eq-markouts") == [3]  # +1 s, +5 s, +60 s
        # One line per side, once the feed has filled both (its first fills may all be one side).
        page.wait_for_function(
            "() => ['BUY', 'SELL'].every(side => document.querySelector('#eq-hist-side .u-legend')"
            ".innerText.split(side).length === 2)",
            timeout=TIMEOUT_MS,
        )

        # Live: the newest order changes without a reload.
        newest = page.get_attribute(RECENT, "data-id")
        page.wait_for_function(
            f"id => document.querySelector('{RECENT}').dataset.id !== id", arg=newest, timeout=TIMEOUT_MS
        )

        # An order's link opens its fills on the same page, each decimal as the API gave it.
        # (An order with fills; found and clicked in one go: the table redraws every 3 s.)
        order_id = page.wait_for_function(
            """() => {
                 const keys = [...document.querySelectorAll('#eq-recent thead th')].map(th => th.dataset.key);
                 const ratio = keys.indexOf('fill_ratio');
                 for (const tr of document.querySelectorAll('#eq-recent tbody tr[data-id]')) {
                   if (!['0', '—'].includes(tr.children[ratio].innerText)) {
                     tr.querySelector('a').click();
                     return tr.dataset.id;
                   }
                 }
                 return null;
               }""",
            timeout=TIMEOUT_MS,
        ).json_value()
        page.wait_for_selector("#eq-order:not([hidden]) tbody tr[data-id]", timeout=TIMEOUT_MS)
        assert order_id in page.text_content("#eq-order h2")
        assert f"order={quote(order_id)}" in page.url or f"order={order_id}" in page.url
        api = httpx.get(
            f"{url}/metrics/execution", params={"order_id": order_id, "limit": 1000},
            headers={"Authorization": f"Bearer {desk.tokens.read}"}, timeout=10,
        ).json()["rows"]
        assert api, order_id
        shown = page.eval_on_selector_all(
            "#eq-order tbody tr[data-id]",
            """rows => Object.fromEntries(rows.map(r => [r.dataset.id,
                 [...r.children].map(td => td.innerText)]))""",
        )
        headers = page.eval_on_selector_all("#eq-order thead th", "ths => ths.map(th => th.dataset.key)")
        for row in api:
            if row["fill_id"] not in shown:
                continue  # arrived after the table's last poll
            cells = dict(zip(headers, shown[row["fill_id"]]))
            for key in ("qty", "price", "fee"):
                assert cells[key] == row[key], (key, cells[key], row[key])
        assert set(shown) & {row["fill_id"] for row in api}
        assert opened.errors == [], opened.errors
        path = opened.screenshot(SERVICE)
        assert path.stat().st_size > 0

        # A bad filter: the API's 400, word for word, in the banner.
        expected = httpx.get(
            f"{url}/metrics/execution", params={"venue": " XNAS"},
            headers={"Authorization": f"Bearer {desk.tokens.read}"}, timeout=10,
        )
        assert expected.status_code == 400
        page.fill("#eq-venue", " XNAS")
        page.click("#eq-filters button")
        page.wait_for_function(
            "() => document.getElementById('pt-error').innerText.includes('\"parameter\":\"venue\"')",
            timeout=TIMEOUT_MS,
        )
        assert expected.json()["detail"]["error"] in opened.error_text()
        # The browser logs each refused request; nothing else went wrong.
        assert all("status of 400" in error for error in opened.errors), opened.errors
