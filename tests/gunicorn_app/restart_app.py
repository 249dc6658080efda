"""A WSGI app for the gunicorn restart test: each request connects afresh to the supervisor
the hooks exported (MPPOOL_ADDRESS/MPPOOL_AUTHKEY) and answers with its pid."""

from __future__ import annotations

from typing import Any

import mppool


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    try:
        with mppool.connect(timeout=2) as client:
            body, status = str(client.info()["pid"]).encode(), "200 OK"
    except mppool.ServerUnavailable as exc:
        body, status = str(exc).encode(), "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
