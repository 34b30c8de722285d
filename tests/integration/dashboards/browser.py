"""A real headless browser for the dashboard tests: Debian's chromium driven by
Playwright (the Python package only: its own browser download cannot be reached here,
so it is never run; `make test` installs chromium with apt when it is missing).

`open_page` collects every console error and uncaught exception of the page, so a test
can assert there were none; `screenshot` writes to `.posttrade/screenshots/` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

REPO = Path(__file__).resolve().parents[3]
TIMEOUT_MS = 30_000  # how long a test waits for a page to show something
SCREENSHOTS = Path(os.environ.get("POSTTRADE_HOME", REPO / ".posttrade")) / "screenshots"
# Without the background-networking flags chromium keeps trying to reach Google's hosts,
# which this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


def chromium_path() -> str:
    path = os.environ.get("POSTTRADE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no chromium found: `apt-get install chromium` (make test does), or set POSTTRADE_CHROMIUM")
    return path


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class OpenPage:
    page: Page
    errors: list[str] = field(default_factory=list)

    def enter_token(self, token: str) -> None:
        """Type the token into the navigation bar's form, as a user does (the page reloads)."""
        self.page.fill("#pt-token", token)
        with self.page.expect_navigation():
            self.page.click("#pt-token-form button")

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def error_text(self) -> str:
        return self.page.inner_text("#pt-error") if self.page.is_visible("#pt-error") else ""


@contextmanager
def open_page(browser: Browser, url: str, *, token: str | None = None) -> Iterator[OpenPage]:
    """`url` in a fresh context (no token kept from another test). With `token`, it is
    entered in the page's form before the test looks."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    opened = OpenPage(page)
    page.on("console", lambda message: opened.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: opened.errors.append(f"uncaught: {exc}"))
    try:
        page.goto(url)
        if token is not None:
            opened.enter_token(token)
        yield opened
    finally:
        context.close()


def points(page: Page, selector: str) -> int:
    """How many points the chart at `selector` draws (the `data-points` the page's
    charts set when they draw)."""
    return int(page.get_attribute(selector, "data-points") or 0)


def every_chart_points(page: Page, scope: str = "#pt-main") -> list[int]:
    """The points of every chart inside `scope`, drawn or not (0)."""
    charts = f"{scope} .pt-chart, {scope} [data-points]"
    return page.eval_on_selector_all(charts, "els => els.map(e => Number(e.dataset.points || 0))")
