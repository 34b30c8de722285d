"""The six pages as one desk, in a real browser: one navigation bar across them that
leads to each service's own page, the token asked for once per service and sent, no
console error anywhere. What each page shows is tested in test_dashboard_<service>.py."""

from __future__ import annotations

import httpx
import pytest

from posttrade.config import SERVICES

from .browser import open_page

TIMEOUT_MS = 30_000


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
def test_the_pages_are_not_part_of_the_api_document(desk, service):
    paths = httpx.get(f"{desk.url(service)}/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith(("/static", "/live", "/dashboard"))]
