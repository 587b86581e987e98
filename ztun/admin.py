"""ztund's admin HTTP server (ztunnel's :15000; localhost only by default).

=========================  =====  ========================================================
path                       verb   what
=========================  =====  ========================================================
``/healthz/ready``         GET    200 ``ready`` when identities, listeners and policies are
                                  in place; else 500 listing what is pending
``/config_dump``           GET    JSON: node, workloads, policies, certificates (serials,
                                  validity, never key material), listeners, reload status
``/logging``               GET    the log levels; ``POST /logging?level=debug`` sets ztun's
                                  level, ``?ztun.access=warning`` one logger's
``/quitquitquit``          POST   drain and exit, as SIGTERM
``/metrics``               GET    Prometheus text format (also ``/stats/prometheus``)
=========================  =====  ========================================================

The server runs on its own threads (``ThreadingHTTPServer``); nothing here touches the
data path. An optional second server serves only the metrics paths (for a
``listeners.metrics`` address that Prometheus scrapes from outside the node).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

__all__ = ["AdminServer", "AdminTarget"]

log = logging.getLogger(__name__)

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
METRICS_PATHS = ("/metrics", "/stats/prometheus")


class AdminTarget(Protocol):
    """What the admin server asks of the daemon."""

    registry: CollectorRegistry

    def readiness(self) -> list[str]:
        """What is still pending; empty when ready."""
        ...

    def config_dump(self) -> dict[str, Any]: ...

    def request_shutdown(self, reason: str) -> None: ...


def _logger_levels() -> dict[str, str]:
    names = ["ztun", *sorted(n for n in logging.root.manager.loggerDict if n.startswith("ztun."))]
    out = {}
    for n in names:
        lg = logging.getLogger(n)
        out[n] = logging.getLevelName(lg.getEffectiveLevel()).lower()
    return out


def set_levels(query: list[tuple[str, str]]) -> dict[str, str]:
    """Apply ``level=...`` (all of ztun) and ``<logger>=<level>`` pairs; ValueError if bad."""
    changes: list[tuple[logging.Logger, int]] = []
    for key, value in query:
        lv = LEVELS.get(value.lower())
        if lv is None:
            raise ValueError(f"unknown level {value!r} (one of {', '.join(LEVELS)})")
        if key == "level":
            changes.append((logging.getLogger("ztun"), lv))
            # loggers set on their own follow the global change, as with ztunnel's level=
            for name in list(logging.root.manager.loggerDict):
                if name.startswith("ztun."):
                    lg = logging.getLogger(name)
                    if lg.level != logging.NOTSET:
                        changes.append((lg, lv))
        elif key == "ztun" or key.startswith("ztun."):
            changes.append((logging.getLogger(key), lv))
        else:
            raise ValueError(f"unknown logger {key!r} (ztun or ztun.<name>)")
    for lg, lv in changes:
        lg.setLevel(lv)
    return _logger_levels()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin %s - %s", self.address_string(), format % args)

    def _send(
        self, status: int, body: bytes | str, ctype: str = "text/plain; charset=utf-8"
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj, indent=2, sort_keys=False) + "\n", "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        target = self.server.target
        if path in METRICS_PATHS:
            self._send(HTTPStatus.OK, generate_latest(target.registry), CONTENT_TYPE_LATEST)
            return
        if self.server.metrics_only:
            self._send(HTTPStatus.NOT_FOUND, "not found\n")
            return
        if path == "/healthz/ready":
            pending = target.readiness()
            if pending:
                self._send(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    "not ready:\n" + "".join(f"  {p}\n" for p in pending),
                )
            else:
                self._send(HTTPStatus.OK, "ready\n")
            return
        if path == "/config_dump":
            self._json(HTTPStatus.OK, target.config_dump())
            return
        if path == "/logging":
            if url.query:
                self._send(HTTPStatus.METHOD_NOT_ALLOWED, "use POST to change log levels\n")
                return
            self._json(HTTPStatus.OK, _logger_levels())
            return
        if path == "/":
            self._send(
                HTTPStatus.OK,
                "ztund admin: /healthz/ready /config_dump /logging /quitquitquit /metrics\n",
            )
            return
        if path == "/quitquitquit":
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, "use POST\n")
            return
        self._send(HTTPStatus.NOT_FOUND, "not found\n")

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 65536))
        if self.server.metrics_only:
            self._send(HTTPStatus.NOT_FOUND, "not found\n")
            return
        if path == "/logging":
            try:
                levels = set_levels(parse_qsl(url.query, keep_blank_values=True))
            except ValueError as e:
                self._send(HTTPStatus.BAD_REQUEST, f"{e}\n")
                return
            log.info("log levels set via admin: %s", url.query)
            self._json(HTTPStatus.OK, levels)
            return
        if path == "/quitquitquit":
            self._send(HTTPStatus.OK, "OK\n")
            self.server.target.request_shutdown("admin /quitquitquit")
            return
        self._send(HTTPStatus.NOT_FOUND, "not found\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], target: AdminTarget, metrics_only: bool) -> None:
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.target = target
        self.metrics_only = metrics_only
        super().__init__(address, _Handler)


class AdminServer:
    """The admin endpoints on ``address`` (``metrics_only``: just the metrics paths)."""

    def __init__(
        self, address: tuple[str, int], target: AdminTarget, *, metrics_only: bool = False
    ) -> None:
        self._server = _Server(address, target, metrics_only)
        host, port = self._server.server_address[:2]
        self.address: tuple[str, int] = (str(host), int(port))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="ztund-admin" if not metrics_only else "ztund-metrics",
            daemon=True,
        )

    def start(self) -> AdminServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
