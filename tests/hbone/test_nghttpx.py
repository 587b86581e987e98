"""HBONE interop with nghttpx (nghttp2-proxy) in HTTP/2 proxy mode (``-s``), mutual TLS.

nghttpx serves CONNECT in proxy mode, but only by handing it to a backend that is itself
a proxy: an HTTP/1.1 proxy (it sends ``CONNECT host:port HTTP/1.1``) or an HTTP/2 one
(it sends an HTTP/2 CONNECT, i.e. it is then an HBONE client). So:

* ztun's outbound -> nghttpx's frontend (mTLS, ``--verify-client``) -> a tiny HTTP/1.1
  CONNECT proxy -> echo server; nghttpx's ``--frontend-frame-debug`` dump is an
  independent record of what ztun put on the wire (SETTINGS, WINDOW_UPDATE, HEADERS).
* ztun's outbound -> nghttpx -> nghttpx's HTTP/2 backend (TLS with a client certificate)
  -> ztun's HBONE server: nghttpx is the HBONE client of a ztun server.

What nghttpx cannot do (see the report): it never half-closes a CONNECT tunnel (the
client's END_STREAM does not reach the backend), and as a TLS client it checks host
names, not SPIFFE IDs — ztun's server certificate needs a DNS SAN for it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest
from harness.caps import in_ci
from harness.servers import EchoServer

from hbone.util import PEER, ZTUN_SERVER, PeerFiles, stats, wait_until
from ztun import Tunnel
from ztun.testing import SpiffeCA

pytestmark = pytest.mark.timeout(60)


def nghttpx() -> str:
    path = shutil.which("nghttpx")
    if path is None:
        if in_ci():
            pytest.fail("nghttpx is missing (apt package nghttp2-proxy)")
        pytest.skip("nghttpx is missing (apt package nghttp2-proxy)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Http1ConnectProxy:
    """The smallest HTTP/1.1 CONNECT proxy: records request heads, pipes both ways."""

    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.address = self.lsock.getsockname()[:2]
        self.requests: list[bytes] = []
        self.eofs = 0  # FINs received from nghttpx on tunnels
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._socks.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head:
                chunk = c.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head)
            target = head.split(b"\r\n", 1)[0].split()[1].decode()
            host, port = target.rsplit(":", 1)
            u = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            self._socks.append(u)
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            self._pipe(u, c, False)

    def _pipe(self, a: socket.socket, b: socket.socket, count_eof: bool) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(data)
            if count_eof:
                self.eofs += 1
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.lsock.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


class Nghttpx:
    """nghttpx -s with a mutual-TLS frontend; output (frame dump, logs) collected."""

    def __init__(self, files: PeerFiles, backend: str, extra: list[str] | None = None) -> None:
        self.port = free_port()
        argv = [
            nghttpx(),
            "--http2-proxy",
            "--conf=/dev/null",
            f"--frontend=127.0.0.1,{self.port}",
            f"--backend={backend}",
            files.key,
            files.chain,
            "--verify-client",
            f"--verify-client-cacert={files.ca}",
            "--tls-min-proto-version=TLSv1.3",
            "--no-ocsp",
            "--workers=1",
            "--frontend-frame-debug",
            "--errorlog-file=/dev/stderr",
            "--accesslog-file=/dev/stderr",
            "--frontend-http2-window-size=4194304",
            "--frontend-http2-connection-window-size=16777216",
            *(extra or []),
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(
            lambda: any("Listening on" in line for line in self.lines), 10, "nghttpx listening"
        )
        # the worker process may not accept yet right after "Listening on"
        wait_until(self._accepts, 10, "nghttpx accepting")

    def _accepts(self) -> bool:
        return any("worker thread" in line.lower() for line in self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def text(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)


@pytest.fixture
def echo(make_server: Callable[..., EchoServer]) -> EchoServer:
    return make_server("echo")


@pytest.fixture
def h1proxy() -> Iterator[Http1ConnectProxy]:
    p = Http1ConnectProxy()
    yield p
    p.close()


def test_nghttpx_frontend_serves_ztun_connect(
    pki: dict[str, PeerFiles], client_tunnel: Tunnel, echo: EchoServer, h1proxy: Http1ConnectProxy
) -> None:
    """ztun forward(protocol="hbone") through nghttpx's HTTP/2 proxy frontend: data both ways;
    nghttpx's own frame dump shows ztun's SETTINGS, connection WINDOW_UPDATE and the CONNECT
    request headers exactly as HBONE wants them."""
    backend = f"{h1proxy.address[0]},{h1proxy.address[1]}"
    ngx = Nghttpx(pki["peer"], backend)
    try:
        fwd = client_tunnel.forward(("127.0.0.1", 0), echo.address, expect=[PEER], via=ngx.address)
        c = socket.create_connection(fwd.address, timeout=10)
        data = bytes(range(256)) * 4096  # 1 MiB: several windows of nghttpx's backend side
        t = threading.Thread(target=c.sendall, args=(data,), daemon=True)
        t.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = c.recv(1 << 16)
            assert chunk, f"EOF after {len(got)} bytes"
            got += chunk
        t.join(10)
        assert bytes(got) == data
        src = c.getsockname()
        c.close()
        wait_until(lambda: "recv HEADERS frame" in ngx.text(), 10, "nghttpx frame dump")
        dump = ngx.text()
    finally:
        ngx.close()
    # SETTINGS as nghttpx received them from ztun (the first SETTINGS it logs as received)
    settings = dump.split("recv SETTINGS frame", 1)[1].split("[", 6)
    block = "[" + "[".join(settings[1:5])
    assert "SETTINGS_INITIAL_WINDOW_SIZE(0x04):4194304" in block
    assert "SETTINGS_MAX_FRAME_SIZE(0x05):1048576" in block
    assert "SETTINGS_ENABLE_PUSH(0x02):0" in block
    assert re.search(
        r"recv WINDOW_UPDATE frame <length=4, flags=0x00, stream_id=0>\s+"
        r"\(window_size_increment=16711681\)",
        dump,
    ), "16 MiB connection window"
    hdrs = dict(re.findall(r"recv \(stream_id=1\) ([^:\s][^:]*|:[a-z]+): (.*)", dump))
    assert hdrs[":method"] == "CONNECT"
    assert hdrs[":authority"] == f"{echo.address[0]}:{echo.address[1]}"
    assert ":path" not in hdrs and ":scheme" not in hdrs
    assert hdrs["forwarded"] == f'for="{src[0]}:{src[1]}"'
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", hdrs["traceparent"])
    # nghttpx turned it into an HTTP/1.1 CONNECT to its backend, headers carried along
    head = h1proxy.requests[0].decode()
    assert head.startswith(f"CONNECT {echo.address[0]}:{echo.address[1]} HTTP/1.1\r\n")
    assert f"Traceparent: {hdrs['traceparent']}" in head


def test_nghttpx_backend_is_hbone_client_of_ztun(
    ca: SpiffeCA,
    pki: dict[str, PeerFiles],
    client_tunnel: Tunnel,
    echo: EchoServer,
) -> None:
    """ztun client -> nghttpx -> nghttpx's HTTP/2 TLS backend -> ztun HBONE server (dialing
    mode) -> echo. ztun's server verifies nghttpx's client certificate (its SPIFFE ID is in
    the connection facts) and keeps the ztun client's traceparent, which nghttpx forwards.
    nghttpx verifies ztun's chain and a host name: ztun's SVID here has a DNS SAN as well."""
    svid = ca.issue_cert(uris=[ZTUN_SERVER], dns_names=["ztun-server.test"]).to_svid()
    server = Tunnel(identity=svid, trust=ca.bundle, workers=1).start()
    opens: list[object] = []
    server.subscribe(lambda ev: opens.append(ev) if ev.kind == "open" else None)
    ngx = None
    try:
        h = server.serve(("127.0.0.1", 0), deliver=False)
        peer = pki["peer"]
        backend = f"127.0.0.1,{h.address[1]};;proto=h2;tls;sni=ztun-server.test"
        ngx = Nghttpx(
            peer,
            backend,
            [
                f"--client-cert-file={peer.chain}",
                f"--client-private-key-file={peer.key}",
                f"--cacert={peer.ca}",
            ],
        )
        fwd = client_tunnel.forward(("127.0.0.1", 0), echo.address, expect=[PEER], via=ngx.address)
        c = socket.create_connection(fwd.address, timeout=10)
        c.sendall(b"through nghttpx into ztun")
        got = b""
        while len(got) < 25:
            chunk = c.recv(100)
            assert chunk
            got += chunk
        assert got == b"through nghttpx into ztun"
        c.close()
        ev = wait_until(lambda: opens, 10, "inbound open event")[0]
        assert ev.peer_id == PEER  # nghttpx's client certificate, verified by ztun
        assert ev.target == echo.address
        sent = re.search(r"recv \(stream_id=1\) traceparent: (\S+)", ngx.text())
        assert sent and ev.trace == sent.group(1)
        assert stats(server)["hbone_status"][200] == 1
    finally:
        if ngx is not None:
            ngx.close()
        server.close()
