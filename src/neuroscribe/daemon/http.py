"""The health and metrics endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` on ``[http]``.

* ``/healthz`` — 200 while the service's loops beat (liveness; restart the service when it fails);
* ``/readyz`` — 200 when every check passes, else 503; the JSON body lists each check (database,
  disk, model loaded, execution provider, each destination) with ``ok`` and a reason;
* ``/metrics`` — Prometheus text (:mod:`neuroscribe.daemon.metrics`).

Plain ``http.server`` on its own threads: a slow scrape never touches DICOM or inference threads.
It binds loopback by default; put it behind the site's reverse proxy to expose it further.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from neuroscribe.daemon.metrics import CONTENT_TYPE
from neuroscribe.log import get_logger

LOG = get_logger(__name__)

#: (ok, body) of a check.
Check = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """Serves the three endpoints from callbacks; ``start()`` returns the bound (address, port)."""

    def __init__(self, bind: str, port: int, *, live: Check, ready: Check,
                 metrics: Callable[[], bytes]) -> None:
        self.bind, self.port = bind, port
        self.live, self.ready, self.metrics = live, ready, metrics
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        self._send(200, owner.metrics(), CONTENT_TYPE)
                    elif path in ("/healthz", "/readyz"):
                        ok, body = (owner.live if path == "/healthz" else owner.ready)()
                        self._send(200 if ok else 503, json.dumps({"ok": ok, **body}, indent=1).encode(),
                                   "application/json")
                    else:
                        self._send(404, b'{"error": "not found"}\n', "application/json")
                except Exception:  # never let a check's bug kill the endpoint
                    LOG.exception("http endpoint failed", path=path)
                    self._send(500, b'{"error": "internal error"}\n', "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would flood the log

        self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="http", daemon=True)
        self._thread.start()
        address = self._server.server_address
        LOG.info("http endpoint listening", bind=address[0], port=address[1])
        return str(address[0]), int(address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
