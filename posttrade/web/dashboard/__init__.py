"""Every service's page at `/`: one HTML shell, the shared script and style, the page's
own script, and the chart libraries, all shipped in `static/` (no CDN: a desk's page
works offline).

The page is the service's API drawn: its script reads the same endpoints an API client
does (with the same 4xx JSON on bad input, shown to the user) and follows the service's
live streams (`web/live.py`). The HTML itself holds no account data, so `/` and
`/static/...` are public; the data behind them needs the token when one is configured,
which the page asks for and sends as `Authorization: Bearer`.

Libraries (vendored under `static/vendor/<name>-<version>/` with their licences):
* uPlot 1.6.32 — time series and histograms: ~50 KB, canvas, draws tens of thousands of
  points without effort; made for exactly the streaming line charts a desk watches.
* TradingView lightweight-charts 5.2.1 — candlesticks (hot_cache's bars): the financial
  chart the desk knows, ~200 KB, loaded by the one page that draws bars.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

import yaml
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse

from ...config import SERVICES, ServiceConfig, default_config_dir

if TYPE_CHECKING:
    from ...app import App

STATIC = Path(str(resources.files(__package__) / "static"))
UPLOT = "vendor/uplot-1.6.32"
LIGHTWEIGHT_CHARTS = "vendor/lightweight-charts-5.2.1"

TITLES = {
    "ptrc": "Positions & risk",
    "pnl": "P&L",
    "hot_cache": "Hot cache",
    "questdb_writer": "QuestDB writer",
    "feast_pipeline": "Features",
    "execution_quality": "Execution quality",
}
# Scripts a page loads before its own, beyond uPlot (every page draws a time series).
EXTRA_SCRIPTS = {"hot_cache": [f"{LIGHTWEIGHT_CHARTS}/lightweight-charts.standalone.production.js"]}

_SHELL = Template((STATIC / "page.html").read_text())


def install_dashboard(app: App, config: ServiceConfig) -> None:
    """Serve the service's page at `/` and its files at `/static/...`."""
    service = service_kind(config)
    page_config = {
        "service": service,
        "instance": config.service.name,
        "title": TITLES.get(service, service),
        "links": navigation_links(config),
        "titles": TITLES,
        "auth": bool(config.service.auth_token or config.service.read_token),
    }
    scripts = [f"{UPLOT}/uPlot.iife.min.js", *EXTRA_SCRIPTS.get(service, []), "posttrade.js", f"pages/{service}.js"]
    shell = _SHELL.substitute(
        title=html.escape(f"{page_config['title']} · posttrade"),
        styles="".join(f'<link rel="stylesheet" href="/static/{s}">' for s in (f"{UPLOT}/uPlot.min.css", "posttrade.css")),
        # `</` cannot end the script element from inside the JSON.
        config=json.dumps(page_config).replace("</", "<\\/"),
        scripts="".join(f'<script src="/static/{s}"></script>' for s in scripts),
    )

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(shell, headers={"Cache-Control": "no-cache"})

    async def static(request: Request) -> FileResponse:
        name = request.path_params["name"]
        path = (STATIC / name).resolve()
        if not path.is_relative_to(STATIC.resolve()) or not path.is_file() or name == "page.html":
            raise HTTPException(404, f"no such file: /static/{name}")
        # Vendored files carry their version in the path: cached for good. Ours revalidate.
        cache = "public, max-age=31536000, immutable" if name.startswith("vendor/") else "no-cache"
        return FileResponse(path, headers={"Cache-Control": cache})

    app.page("/", public=True, documented=False)(page)
    app.page("/static/{name:path}", public=True, documented=False)(static)


def service_kind(config: ServiceConfig) -> str:
    """Which of the six services `config` is for (its `service.name` can be anything: a
    test's instance, a second ptrc): the module its config class is defined in."""
    module = type(config).__module__.rpartition(".")[2]
    return module if module in SERVICES else config.service.name


def navigation_links(config: ServiceConfig) -> dict[str, str]:
    """service -> URL of its page, or `:port` (the page's own host at that port)."""
    links: dict[str, str] = {}
    for service in SERVICES:
        if service in config.dashboard.links:
            links[service] = config.dashboard.links[service]
        elif service == service_kind(config):
            links[service] = "/"
        else:
            port = _configured_port(service)
            if port is not None:
                links[service] = f":{port}"
    return links


def _configured_port(service: str) -> int | None:
    try:
        data = yaml.safe_load((default_config_dir() / service / "config.yaml").read_text()) or {}
        return int(data["service"]["port"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None
