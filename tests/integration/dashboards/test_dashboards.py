"""The six pages as one desk, in a real browser: one navigation bar across them that
leads to each service's own page, the token asked for once per service and sent, no
console error anywhere; without the token a page asks for it and reads nothing. What each
page shows is tested in test_dashboard_<service>.py."""

from __future__ import annotations

import httpx
import pytest

from posttrade.config import SERVICES

from .browser import TIMEOUT_MS, every_chart_points, open_page


def test_the_navigation_bar_leads_from_every_page_to_every_other(desk, browser):
    for service in SERVICES:
        with open_page(browser, desk.url(service), token=desk.tokens.read) as opened:
            page = opened.page
            links = page.eval_on_selector_all(
                "#pt-nav a[data-service]", "els => Object.fromEntries(els.map(a => [a.dataset.service, a.href]))"
            )
            assert {s: links[s].rstrip("/") for s in SERVICES} == {s: desk.url(s) for s in SERVICES}, service
            assert page.get_attribute(f'#pt-nav a[data-service="{service}"]', "class") == "pt-here"
            page.wait_for_selector("#pt-main .pt-panel", timeout=TIMEOUT_MS)
            assert opened.errors == [], (service, opened.errors)

    # Following a link is a page of the other service, which asks for its own token.
    with open_page(browser, desk.url("ptrc"), token=desk.tokens.read) as opened:
        with opened.page.expect_navigation():
            opened.page.click('#pt-nav a[data-service="pnl"]')
        assert opened.page.url.rstrip("/") == desk.url("pnl")
        assert opened.page.is_visible("#pt-token-form")


@pytest.mark.parametrize("service", SERVICES)
def test_without_the_token_a_page_asks_for_it_and_shows_nothing(desk, browser, service):
    with open_page(browser, desk.url(service)) as opened:
        page = opened.page
        page.wait_for_selector("#pt-token-form", state="visible", timeout=TIMEOUT_MS)
        page.wait_for_function(
            "() => document.getElementById('pt-error').innerText.includes('unauthorized')", timeout=TIMEOUT_MS
        )
        assert page.locator("#pt-main tbody tr[data-id]").count() == 0
        assert all(points == 0 for points in every_chart_points(page))
        # It asked instead of reading: no request was refused.
        assert opened.errors == [], opened.errors


@pytest.mark.parametrize("service", SERVICES)
def test_the_pages_are_not_part_of_the_api_document(desk, service):
    paths = httpx.get(f"{desk.url(service)}/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith(("/static", "/live", "/dashboard"))]
