"""feast_pipeline's page in a real browser, on the desk (six services with tokens, the
demo feed running): every feature view's freshness and rows, freshness and rows/s over
time, an account's online feature values as /features/online gives them, live updates,
a bad feature name answered by the API's own 400, and without a token nothing but the
token form."""

from __future__ import annotations

import httpx

from .browser import TIMEOUT_MS, open_page, points

SERVICE = "feast_pipeline"
VIEWS = ("symbol_trade_features", "symbol_quote_features", "account_features", "account_order_features",
         "symbol_hourly_features")
VALUES = "#pt-online tbody tr[data-id]"


def chart_points(page, chart: str) -> int:
    return points(page, f'.pt-chart[data-chart="{chart}"]')


def test_the_page_shows_the_feature_views_and_online_values_live(desk, browser):
    url = desk.url(SERVICE)
    auth = {"Authorization": f"Bearer {desk.tokens.read}"}
    account = desk.accounts[0]
    with open_page(browser, url, token=desk.tokens.read) as opened:
        page = opened.page
        assert not page.is_visible("#pt-token-form")

        # Every view in the table; freshness and rows/s over time with points.
        page.wait_for_function(
            "views => views.every(v => document.querySelector(`tr[data-id='${v}']`))", arg=list(VIEWS),
            timeout=TIMEOUT_MS,
        )
        page.wait_for_function(
            "() => Number(document.querySelector('.pt-chart[data-chart=\"freshness\"]')?.dataset.points || 0) >= 2"
            " && Number(document.querySelector('.pt-chart[data-chart=\"rows_per_s\"]')?.dataset.points || 0) >= 2",
            timeout=TIMEOUT_MS,
        )

        # Live: the rows pushed for the accounts' orders move without a reload, the history grows.
        cell = 'tr[data-id="account_order_features"] td:nth-child(5)'
        page.wait_for_function(f"() => Number(document.querySelector('{cell}').innerText) > 0", timeout=TIMEOUT_MS)
        rows = page.inner_text(cell)
        page.wait_for_function(
            f"n => document.querySelector('{cell}').innerText !== n", arg=rows, timeout=TIMEOUT_MS
        )
        samples = chart_points(page, "freshness")
        page.wait_for_function(
            "n => Number(document.querySelector('.pt-chart[data-chart=\"freshness\"]').dataset.points) > n",
            arg=samples, timeout=TIMEOUT_MS,
        )

        # An account's online values, each as /features/online gives it.
        page.select_option("#pt-entity-kind", "account")
        page.fill("#pt-entity", account)
        page.click("#pt-show-features")
        page.wait_for_function(
            "a => document.getElementById('pt-online-info').innerText.startsWith('account ' + a + ':')"
            " && [...document.querySelectorAll('#pt-online tbody tr[data-id] td:last-child')]"
            "      .some(td => td.innerText !== '—')",
            arg=account, timeout=TIMEOUT_MS,
        )
        api = httpx.get(f"{url}/features/online", params={"account": account}, headers=auth, timeout=30).json()
        shown = dict(page.eval_on_selector_all(
            VALUES, "rows => rows.map(r => [r.dataset.id, r.lastElementChild.innerText])"
        ))
        assert set(shown) == set(api["features"])
        assert opened.errors == [], opened.errors
        path = opened.screenshot(SERVICE)
        assert path.stat().st_size > 0

        # A bad feature name: the API's 400, word for word, in the banner; no values shown.
        expected = httpx.get(
            f"{url}/features/online", params={"account": account, "features": "vwap_5m"}, headers=auth, timeout=30
        )
        assert expected.status_code == 400
        page.fill("#pt-features", "vwap_5m")  # a symbol's feature, asked of an account
        page.click("#pt-show-features")
        page.wait_for_function(
            "() => document.getElementById('pt-error').innerText.includes('\"parameter\":\"features\"')",
            timeout=TIMEOUT_MS,
        )
        assert "online values: bad request" in opened.error_text()
        assert expected.json()["detail"]["error"] in opened.error_text()
        assert page.locator(VALUES).count() == 0
        # The browser logs each refused request; nothing else went wrong.
        assert all("status of 400" in error for error in opened.errors), opened.errors
