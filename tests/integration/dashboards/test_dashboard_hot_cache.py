"""hot_cache's page in a real browser, on the desk (six services with tokens, the demo
feed running): the figures and the keys per family, the hit rate and freshness over time,
a symbol's bars as candlesticks following the feed, the page's own reads never counted
in the hit rate, a bad interval answered by the API's own 400, and without a token
nothing but the token form."""

from __future__ import annotations

import httpx

from .browser import TIMEOUT_MS, open_page, points

SERVICE = "hot_cache"
FAMILY_ROWS = "#pt-main .pt-table tbody tr[data-id]"



def reads(url: str) -> int:
    stats = httpx.get(f"{url}/cache/stats", timeout=30).json()
    return stats["hits"] + stats["misses"]


def test_the_page_shows_the_cache_and_a_symbols_bars_live(desk, browser):
    url = desk.url(SERVICE)
    auth = {"Authorization": f"Bearer {desk.tokens.read}"}
    symbol = desk.symbols[0]
    with open_page(browser, url, token=desk.tokens.read) as opened:
        page = opened.page
        assert not page.is_visible("#pt-token-form")

        # The keys per family, the history charts drawn with points.
        page.wait_for_function(
            """() => ['bars', 'quotes', 'positions'].every(f => document.querySelector(`tr[data-id="${f}"]`))""",
            timeout=TIMEOUT_MS,
        )
        page.wait_for_function(
            "() => Number(document.querySelector('.pt-chart[data-chart=\"lag.bars\"]').dataset.points || 0) >= 2",
            timeout=TIMEOUT_MS,
        )
        assert "hit rate" in page.inner_text("#pt-main")

        # The desk's symbol, 1 s bars: candlesticks, and the newest bars exactly as the API gives them.
        page.fill("#pt-symbol", symbol)
        page.fill("#pt-interval", "1s")
        page.fill("#pt-limit", "50")
        page.click("#pt-show-bars")
        page.wait_for_function(
            "s => document.getElementById('pt-bars-info').innerText.startsWith(s + ' 1s:')"
            " && Number(document.getElementById('pt-candles').dataset.points) > 0",
            arg=symbol, timeout=TIMEOUT_MS,
        )
        assert 0 < points(page, "#pt-candles") <= 50
        shown = page.eval_on_selector_all(
            "#pt-bars tbody tr[data-id]", "rows => rows.map(r => [r.dataset.id, [...r.children].map(td => td.innerText)])"
        )
        api = httpx.get(f"{url}/bars/{symbol}", params={"interval": "1s", "limit": 50}, headers=auth, timeout=30).json()
        by_ts = {str(bar["ts"]): bar for bar in api["bars"]}
        headers = page.eval_on_selector_all("#pt-bars thead th", "ths => ths.map(th => th.dataset.key)")
        newest_shown = max(int(ts) for ts, _ in shown)
        compared = 0
        for ts, cells in shown:
            bar = by_ts.get(ts)
            if bar is None or bar is api["bars"][-1] or int(ts) == newest_shown:
                continue  # gone since the page's read, or a bar still forming
            row = dict(zip(headers, cells))
            assert [row[k] for k in ("open", "high", "low", "close", "volume", "vwap")] == [
                bar[k] for k in ("open", "high", "low", "close", "volume", "vwap")
            ]
            compared += 1
        assert compared > 0
        counted = reads(url)  # the API's reads so far (the one above among them)

        # Live: the newest bar moves (a trade in it, or a newer bar) without a reload, and the history grows.
        newest = page.get_attribute("#pt-candles", "data-newest")
        page.wait_for_function(
            "n => document.getElementById('pt-candles').dataset.newest !== n", arg=newest, timeout=TIMEOUT_MS
        )
        samples = points(page, '.pt-chart[data-chart="hit_rate"]')
        page.wait_for_function(
            "n => Number(document.querySelector('.pt-chart[data-chart=\"hit_rate\"]').dataset.points) > n",
            arg=samples, timeout=TIMEOUT_MS,
        )
        assert opened.errors == [], opened.errors
        path = opened.screenshot(SERVICE)
        assert path.stat().st_size > 0

        # The page read bars every 2 s meanwhile: none of it is in the desk's hit rate. An API read is.
        assert reads(url) == counted
        httpx.get(f"{url}/bars/{symbol}", params={"interval": "1s", "limit": 1}, headers=auth, timeout=30)
        assert reads(url) == counted + 1

        # A bad interval: the API's 400, word for word, in the banner.
        expected = httpx.get(f"{url}/bars/{symbol}", params={"interval": "7x"}, headers=auth, timeout=30)
        assert expected.status_code == 400
        page.fill("#pt-interval", "7x")
        page.click("#pt-show-bars")
        page.wait_for_function(
            "() => document.getElementById('pt-error').innerText.includes('\"parameter\":\"interval\"')",
            timeout=TIMEOUT_MS,
        )
        assert "bars: bad request" in opened.error_text()
        assert expected.json()["detail"]["error"] in opened.error_text()
        assert points(page, "#pt-candles") == 0  # not the previous selection's bars
        # The browser logs each refused request; nothing else went wrong.
        assert all("status of 400" in error for error in opened.errors), opened.errors
