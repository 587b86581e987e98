#!/usr/bin/env python3
"""Baseline relays for the benchmarks: a plain Python asyncio TCP relay, and either side of an
asyncio + ssl mutual-TLS 1.3 relay pair (client side: plaintext in, TLS out; server side: TLS
in, plaintext out). Protocol-based, with flow control (a full write buffer pauses reading on
the other side), TCP_NODELAY everywhere, and half-close carried where the transport allows it
(TLS transports cannot half-close: the other side is closed instead).

usage:
  pyrelay.py --listen 127.0.0.1:0 --to HOST:PORT
             [--accept-tls CERT,KEY,CA]          # server side of a TLS pair
             [--connect-tls CERT,KEY,CA,PEER_ID] # client side; PEER_ID: expected URI SAN
             [--uvloop]
Prints "READY <port>" once listening; runs until SIGTERM/SIGINT or stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import ssl
import sys


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Half(asyncio.Protocol):
    """One side of a relayed connection; ``peer`` is the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        p = self.peer
        if p is None or p.transport is None:
            return False
        if p.transport.can_write_eof() and not p.eof:
            p.transport.write_eof()
            return True  # keep our side open for the other direction
        if p.eof or not p.transport.can_write_eof():
            p.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        p = self.peer
        if p is not None and p.transport is not None and not p.closed:
            if exc is not None:
                p.transport.abort()
            else:
                p.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def uri_sans(cert: dict[str, object] | None) -> list[str]:
    sans = (cert or {}).get("subjectAltName", ())
    return [v for k, v in sans if k == "URI"]  # type: ignore[union-attr,misc]


class Inbound(Half):
    def __init__(self, to: tuple[str, int], ctx: ssl.SSLContext | None, peer_id: str | None):
        super().__init__()
        self.to, self.ctx, self.peer_id = to, ctx, peer_id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _, out = await loop.create_connection(
                Half, *self.to, ssl=self.ctx, server_hostname="" if self.ctx else None
            )
        except (OSError, ssl.SSLError):
            self.transport.abort()
            return
        if self.peer_id is not None:
            got = uri_sans(out.transport.get_extra_info("peercert"))
            if self.peer_id not in got:
                out.transport.abort()
                self.transport.abort()
                return
        self.peer, out.peer = out, self
        if self.closed:
            out.transport.close()
            return
        self.transport.resume_reading()


def tls_context(server: bool, cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # SPIFFE: the URI SAN is checked instead
    return ctx


async def main(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    accept_ctx = connect_ctx = None
    peer_id = None
    if a.accept_tls:
        accept_ctx = tls_context(True, *a.accept_tls.split(","))
    if a.connect_tls:
        cert, key, ca, peer_id = a.connect_tls.split(",")
        connect_ctx = tls_context(False, cert, key, ca)
    to = hostport(a.to)
    host, port = hostport(a.listen)
    server = await loop.create_server(
        lambda: Inbound(to, connect_ctx, peer_id), host, port, ssl=accept_ctx, backlog=4096
    )
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not sys.stdin.isatty():
        with contextlib.suppress(Exception):
            loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.read(1) or stop.set())
    await stop.wait()
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--to", required=True)
    ap.add_argument("--accept-tls")
    ap.add_argument("--connect-tls")
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(args))
