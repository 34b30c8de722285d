"""`QuestDBExporter`: a query's result in full through QuestDB's `/exp` CSV export.

`http.client` rather than the QuestDBClient's httpx client: for a 200 MB export,
httpx's pure-Python HTTP/1.1 parsing costs about 0.7 CPU-seconds, `http.client` 0.2,
and on a 2-core machine CPU is what a report generation waits for. The address and
credentials are those of a `QuestDBClient` (its base URL, its headers and auth).

Blocking (the threading scheme of `posttrade.stores`): call `export_csv` from a worker
thread, or await `export_csv_async`.

QuestDB answers 429 while it serves its maximum of concurrent exports (2 by default):
that is waited out for `retry_s`, then raised like any other refusal. A table that
does not exist exports as nothing (b""). An export cut short (the connection lost
mid-body) raises `QuestDBUnavailableError`, never returns part of the rows.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import time
from urllib.parse import urlencode, urlsplit


from . import QuestDBClient, QuestDBError, QuestDBUnavailableError


class QuestDBExporter:
    def __init__(self, questdb: QuestDBClient, *, retry_s: float, timeout_s: float = 300.0):
        url = urlsplit(questdb.base_url)
        self.tls = url.scheme == "https"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.tls else 80)
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.headers = questdb.auth_headers

    async def export_csv_async(self, sql: str) -> bytes:
        return await asyncio.to_thread(self.export_csv, sql)

    def export_csv(self, sql: str) -> bytes:
        """The CSV `/exp` gives for `sql`: a header line, then the rows (b"" when the table
        does not exist)."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        path = "/exp?" + urlencode({"query": sql})
        while True:
            if self.tls:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                conn.request("GET", path, headers=self.headers)
                response = conn.getresponse()
                body = response.read()  # raises IncompleteRead if the export is cut short
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                raise QuestDBUnavailableError(f"QuestDB export from {self.host}:{self.port} failed: {exc!r}",
                                              query=sql) from exc
            finally:
                conn.close()
            if status == 200:
                return body
            text = body.decode("utf-8", "replace")
            if status == 429 and time.monotonic() < deadline:  # QuestDB's concurrent exports are all taken
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if status == 400 and "does not exist" in text:
                return b""
            error = QuestDBUnavailableError if status >= 429 else QuestDBError
            raise error(f"export failed (HTTP {status}): {text[:500]}", query=sql, status=status)
