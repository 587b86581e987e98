"""Independent TLS stacks against ztun: Python's ssl module and the openssl CLI.

Each peer plays client (against ``t.listen``) and server (behind ``t.forward``), with two
certificate sets: ztun's own (the embedded :class:`~ztun.CertificateAuthority`) and
certificates made by the openssl command line (another trust domain, a P-384 root, an RSA
server key). For each we check that data flows both ways intact, that the connection is
TLS 1.3 with an AES-GCM suite, and that both sides report the other's SPIFFE ID.

ztun treats a TLS stream that ends without close_notify as a reset (truncation safety):
the plaintext side then gets an RST, never a clean EOF. Both endings are tested.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from mtlskit import (
    AEAD_SUITES,
    IO_TIMEOUT,
    LOOPBACK,
    Env,
    ThreadServer,
    client_context,
    connect,
    outcome,
    payload,
    peer_uri_sans,
    recv_all,
    recv_exact,
    server_context,
    sha,
    wait_until,
)

from ztun import CertificateAuthority, Svid, TrustBundle
from ztun.testing import write_svid_files

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]

OPENSSL = shutil.which("openssl") or "openssl"
CHUNK = 64 * 1024
PEM_CERT = rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----"


@dataclass
class CertSet:
    name: str
    bundle: TrustBundle
    root_pem: bytes
    root_file: Path
    server: Svid
    client: Svid
    server_files: tuple[Path, Path]
    client_files: tuple[Path, Path]

    @property
    def server_id(self) -> str:
        return str(self.server.spiffe_id)

    @property
    def client_id(self) -> str:
        return str(self.client.spiffe_id)


def ztun_certs(d: Path) -> CertSet:
    ca = CertificateAuthority(d / "ca-state", "example.org")
    server = ca.issue("spiffe://example.org/ns/web/sa/server")
    client = ca.issue("spiffe://example.org/ns/app/sa/client")
    root_file = d / "root.pem"
    root_file.write_bytes(ca.bundle.pem("example.org"))
    return CertSet(
        "ztun-ca",
        ca.bundle,
        root_file.read_bytes(),
        root_file,
        server,
        client,
        write_svid_files(server, d, "server"),
        write_svid_files(client, d, "client"),
    )


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def openssl_certs(d: Path) -> CertSet:
    """A CA and two SVIDs made with the openssl CLI only (no ztun or cryptography code)."""
    td = "theirs.test"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384",
             "-out", "ca.key", cwd=d)  # fmt: skip
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", f"/O={td}/CN=openssl root",
             "-days", "2", "-out", "ca.pem",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", f"subjectAltName=URI:spiffe://{td}", cwd=d)  # fmt: skip
    leaves = {
        "server": (f"spiffe://{td}/ns/web/sa/server", ["-algorithm", "RSA", "-pkeyopt",
                                                        "rsa_keygen_bits:2048"]),
        "client": (f"spiffe://{td}/ns/app/sa/client", ["-algorithm", "EC", "-pkeyopt",
                                                        "ec_paramgen_curve:P-256"]),
    }  # fmt: skip
    for name, (uri, keyopts) in leaves.items():
        usage = "digitalSignature,keyEncipherment" if "RSA" in keyopts else "digitalSignature"
        (d / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            f"keyUsage=critical,{usage}\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName=critical,URI:{uri}\n"
        )
        _openssl("genpkey", *keyopts, "-out", f"{name}.key", cwd=d)
        _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/O={td}",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return CertSet(
        "openssl",
        TrustBundle.from_file(td, d / "ca.pem"),
        (d / "ca.pem").read_bytes(),
        d / "ca.pem",
        Svid.from_files(d / "server.pem", d / "server.key"),
        Svid.from_files(d / "client.pem", d / "client.key"),
        (d / "server.pem", d / "server.key"),
        (d / "client.pem", d / "client.key"),
    )


@pytest.fixture(scope="module", params=["ztun-ca", "openssl"])
def certs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    d = tmp_path_factory.mktemp(f"certs-{request.param}")
    return ztun_certs(d) if request.param == "ztun-ca" else openssl_certs(d)


class RecordingServer(ThreadServer):
    """A plaintext backend: echoes until the peer's FIN or RST and records which it was."""

    def __init__(self) -> None:
        self.endings: list[str] = []

        def handler(conn: socket.socket) -> None:
            try:
                while data := conn.recv(256 * 1024):
                    conn.sendall(data)
                self.endings.append("eof")
            except ConnectionResetError:
                self.endings.append("reset")

        super().__init__(handler)


def ping_pong(sock: Any, data: bytes) -> bytes:
    """Send ``data`` to an echo in CHUNK pieces, reading each echo back (no threads: an
    SSLSocket must not be used from two threads at once)."""
    back = bytearray()
    for i in range(0, len(data), CHUNK):
        piece = data[i : i + CHUNK]
        sock.sendall(piece)
        back += recv_exact(sock, len(piece))
    return bytes(back)


# ---- Python's ssl module ------------------------------------------------------------------------


def test_python_client_to_listen(certs: CertSet, env: Env) -> None:
    ts, events = env.tunnel(certs.server, certs.bundle)
    with RecordingServer() as backend:
        lst = ts.listen((LOOPBACK, 0), backend.address)
        data = payload(1, 1 << 20)
        ctx = client_context(certs.root_pem, certs.client)
        with connect(lst.address) as raw, ctx.wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1.3"
            assert tls.cipher()[0] in AEAD_SUITES, tls.cipher()
            assert peer_uri_sans(tls) == [certs.server_id]
            assert sha(ping_pong(tls, data)) == sha(data)
            tls.unwrap()  # close_notify, then waits for ztun's
        (ev,) = events.wait_closes(1, lst.id)
        backend.join()
    assert ev.reason == "ok", (ev.reason, ev.detail)
    assert ev.peer_id == certs.client_id
    assert ev.local_id == certs.server_id
    assert ev.bytes_sent == ev.bytes_received == len(data)
    assert backend.endings == ["eof"], "close_notify must reach the backend as a clean FIN"


def test_python_client_without_close_notify_is_a_reset(certs: CertSet, env: Env) -> None:
    ts, events = env.tunnel(certs.server, certs.bundle)
    with RecordingServer() as backend:
        lst = ts.listen((LOOPBACK, 0), backend.address)
        ctx = client_context(certs.root_pem, certs.client)
        with connect(lst.address) as raw, ctx.wrap_socket(raw) as tls:
            assert ping_pong(tls, b"ping") == b"ping"
            # SSLSocket.shutdown() drops the TLS layer: a TCP FIN without close_notify.
            tls.shutdown(socket.SHUT_WR)
            after = outcome(lambda: tls.recv(100))
        (ev,) = events.wait_closes(1, lst.id)
        backend.join()
    assert ev.reason == "reset_by_downstream", (ev.reason, ev.detail)
    assert ev.detail == "TLS peer closed without close_notify"
    assert backend.endings == ["reset"], "a truncated TLS stream must not look like a clean EOF"
    assert isinstance(after, ConnectionResetError) or after == b"", after


class TlsEchoServer(ThreadServer):
    """Python's ssl as the mTLS server behind a forward: echoes, records what it saw, and
    ends with close_notify (``clean``) or with a bare TCP FIN."""

    def __init__(self, ctx: ssl.SSLContext, *, clean: bool = True) -> None:
        self.seen: list[dict[str, Any]] = []

        def handler(conn: socket.socket) -> None:
            tls = ctx.wrap_socket(conn, server_side=True)
            info: dict[str, Any] = {
                "version": tls.version(),
                "cipher": tls.cipher()[0],
                "peer": peer_uri_sans(tls),
            }
            self.seen.append(info)
            if clean:
                while data := tls.recv(256 * 1024):  # b"" on the peer's close_notify
                    tls.sendall(data)
                tls.unwrap()
            else:
                tls.sendall(recv_exact(tls, 4))
                tls.shutdown(socket.SHUT_RDWR)  # no close_notify

        super().__init__(handler)


def test_python_server_behind_forward(certs: CertSet, env: Env) -> None:
    tc, events = env.tunnel(certs.client, certs.bundle)
    with TlsEchoServer(server_context(certs.server, certs.root_pem)) as srv:
        fwd = tc.forward((LOOPBACK, 0), srv.address, expect=[certs.server_id])
        data = payload(2, 1 << 20)
        with connect(fwd.address) as app:
            assert sha(ping_pong(app, data)) == sha(data)
            app.shutdown(socket.SHUT_WR)  # -> close_notify -> server unwraps
            assert app.recv(10) == b"", "the server's close_notify must end as a clean EOF"
        (ev,) = events.wait_closes(1, fwd.id)
        srv.join()
    assert not srv.errors, srv.errors
    (info,) = srv.seen
    assert info["version"] == "TLSv1.3"
    assert info["cipher"] in AEAD_SUITES
    assert info["peer"] == [certs.client_id]
    assert ev.reason == "ok", (ev.reason, ev.detail)
    assert ev.peer_id == certs.server_id
    assert ev.local_id == certs.client_id
    assert ev.bytes_sent == ev.bytes_received == len(data)


def test_python_server_without_close_notify_is_a_reset(certs: CertSet, env: Env) -> None:
    tc, events = env.tunnel(certs.client, certs.bundle)
    with TlsEchoServer(server_context(certs.server, certs.root_pem), clean=False) as srv:
        fwd = tc.forward((LOOPBACK, 0), srv.address, expect=[certs.server_id])
        with connect(fwd.address) as app:
            assert ping_pong(app, b"ping") == b"ping"
            after = outcome(lambda: app.recv(10))
        (ev,) = events.wait_closes(1, fwd.id)
        srv.join()
    assert not srv.errors, srv.errors
    assert isinstance(after, ConnectionResetError), after
    assert ev.reason == "reset_by_upstream", (ev.reason, ev.detail)
    assert ev.detail == "TLS peer closed without close_notify"


# ---- openssl s_client / s_server ----------------------------------------------------------------


def s_client(
    addr: tuple[str, int], certs: CertSet, data: bytes, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    chain, key = certs.client_files
    cmd = [OPENSSL, "s_client", "-connect", f"{addr[0]}:{addr[1]}", "-tls1_3",
           "-cert", str(chain), "-key", str(key), "-CAfile", str(certs.root_file),
           "-verify_return_error", "-brief", "-nocommands", *extra]  # fmt: skip
    return subprocess.run(cmd, input=data, capture_output=True, timeout=IO_TIMEOUT, check=False)


def reverser(n: int) -> Any:
    """A backend that reads ``n`` bytes, sends them back reversed and closes."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(recv_exact(conn, n)[::-1])

    return handler


def cert_from_session(path: Path) -> x509.Certificate:
    out = subprocess.run(
        [OPENSSL, "sess_id", "-in", str(path), "-cert"],
        capture_output=True,
        check=True,
        timeout=IO_TIMEOUT,
    ).stdout
    m = re.search(PEM_CERT, out, re.S)
    assert m, f"no peer certificate in the saved session: {out[:500]!r}"
    return x509.load_pem_x509_certificate(m.group(0))


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def test_openssl_s_client_to_listen(certs: CertSet, env: Env, tmp_path: Path) -> None:
    data = payload(3, 200_000)
    ts, events = env.tunnel(certs.server, certs.bundle)
    with ThreadServer(reverser(len(data))) as backend:
        lst = ts.listen((LOOPBACK, 0), backend.address)
        sess = tmp_path / "session.pem"
        p = s_client(lst.address, certs, data, "-ign_eof", "-sess_out", str(sess))
        (ev,) = events.wait_closes(1, lst.id)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0, err
    assert sha(p.stdout) == sha(data[::-1]), "data did not come back intact"
    assert "Protocol version: TLSv1.3" in err
    m = re.search(r"Ciphersuite: (\S+)", err)
    assert m and m.group(1) in AEAD_SUITES, err
    assert "Verification: OK" in err
    assert uri_sans(cert_from_session(sess)) == [certs.server_id]
    assert ev.reason == "ok", (ev.reason, ev.detail)
    assert ev.peer_id == certs.client_id
    assert ev.bytes_sent == ev.bytes_received == len(data)


def test_openssl_s_client_resumes(env: Env, tmp_path: Path) -> None:
    """A session ticket from ztun's listener is good for a resumption by openssl."""
    certs = ztun_certs(tmp_path)
    ts, events = env.tunnel(certs.server, certs.bundle)

    def hello_then_close(conn: socket.socket) -> None:
        conn.sendall(b"hello\n")  # then close: s_client (-ign_eof) waits for that

    with ThreadServer(hello_then_close) as backend:
        lst = ts.listen((LOOPBACK, 0), backend.address)
        sess = tmp_path / "session.pem"
        first = s_client(lst.address, certs, b"", "-ign_eof", "-sess_out", str(sess))
        assert first.returncode == 0, first.stderr
        assert first.stdout == b"hello\n"
        events.wait_closes(1, lst.id)
        assert ts.stats().handshakes_resumed == 0
        # -brief does not say "Reused"; the full output does.
        chain, key = certs.client_files
        again = subprocess.run(
            [OPENSSL, "s_client", "-connect", f"{lst.address[0]}:{lst.address[1]}", "-tls1_3",
             "-cert", str(chain), "-key", str(key), "-CAfile", str(certs.root_file),
             "-verify_return_error", "-sess_in", str(sess), "-ign_eof", "-nocommands"],
            input=b"", capture_output=True, timeout=IO_TIMEOUT, check=False,
        )  # fmt: skip
        evs = events.wait_closes(2, lst.id)
    assert again.returncode == 0, again.stderr
    assert b"Reused, TLSv1.3" in again.stdout, again.stdout[-2000:]
    assert b"hello\n" in again.stdout
    st = ts.stats()
    assert st.handshakes == 2
    assert st.handshakes_resumed == 1
    assert [e.reason for e in evs] == ["ok", "ok"]
    assert [e.peer_id for e in evs] == [certs.client_id] * 2, "a resumed peer keeps its identity"


def test_openssl_s_server_behind_forward(certs: CertSet, env: Env) -> None:
    chain, key = certs.server_files
    # Digits only: s_server reads single letters as commands.
    to_app = b"".join(str(n).encode() * 16 + b"\n" for n in range(2000))
    from_app = b"".join(str(n).encode()[::-1] * 16 + b"\n" for n in range(2000))
    proc = subprocess.Popen(
        [OPENSSL, "s_server", "-accept", f"{LOOPBACK}:0", "-tls1_3", "-naccept", "1",
         "-cert", str(chain), "-key", str(key), "-CAfile", str(certs.root_file),
         "-Verify", "1", "-verify_return_error", "-ign_eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = _accept_port(proc)
        out_reader = _Drain(proc.stdout)
        err_reader = _Drain(proc.stderr)
        tc, events = env.tunnel(certs.client, certs.bundle)
        fwd = tc.forward((LOOPBACK, 0), (LOOPBACK, port), expect=[certs.server_id])
        with connect(fwd.address) as app:
            app.sendall(from_app)
            # s_server prints the client's certificate only when the handshake is driven by
            # the socket, not by its stdin: feed it once the handshake is reported.
            out_reader.wait_for(b"CIPHER is")
            writer = threading.Thread(target=_feed, args=(proc.stdin, to_app), daemon=True)
            writer.start()
            got = recv_exact(app, len(to_app))
            app.shutdown(socket.SHUT_WR)  # close_notify: s_server says DONE and closes
            tail = outcome(lambda: recv_all(app))
        proc.wait(timeout=IO_TIMEOUT)
        out, err = out_reader.result(), err_reader.result()
        (ev,) = events.wait_closes(1, fwd.id)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sha(got) == sha(to_app)
    assert tail == b"", tail
    assert from_app in out, "s_server did not print what the application sent"
    m = re.search(rb"CIPHER is (\S+)", out)
    assert m and m.group(1).decode() in AEAD_SUITES, out[-2000:]  # TLS 1.3-only suite names
    pem = re.search(rb"Client certificate\n(" + PEM_CERT + rb")", out, re.S)
    assert pem, out[-3000:]
    assert uri_sans(x509.load_pem_x509_certificate(pem.group(1))) == [certs.client_id]
    assert b"verify error" not in err, err
    assert ev.reason == "ok", (ev.reason, ev.detail)
    assert ev.peer_id == certs.server_id


def _accept_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    for _ in range(20):
        line = proc.stdout.readline()
        if line.startswith(b"ACCEPT"):
            return int(line.rsplit(b":", 1)[1])
        if not line:
            break
    raise AssertionError(f"s_server did not start: {proc.stderr.read() if proc.stderr else ''}")


class _Drain(threading.Thread):
    """Reads a child's pipe to the end, so the child never blocks on a full pipe."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.data = b""
        self.start()

    def run(self) -> None:
        while chunk := self.pipe.read1(65536):
            self.data += chunk

    def wait_for(self, needle: bytes, timeout: float = IO_TIMEOUT) -> None:
        wait_until(lambda: needle in self.data, timeout, f"{needle!r} from the child")

    def result(self) -> bytes:
        self.join(IO_TIMEOUT)
        return self.data


def _feed(pipe: Any, data: bytes) -> None:
    pipe.write(data)
    pipe.flush()


@pytest.mark.parametrize("chacha20", [False, True], ids=["default", "chacha20"])
def test_chacha20_only_client(chacha20: bool, env: Env, tmp_path: Path) -> None:
    """AES-GCM only by default; TLS_CHACHA20_POLY1305_SHA256 when asked for."""
    certs = ztun_certs(tmp_path)
    ts, events = env.tunnel(certs.server, certs.bundle, chacha20=chacha20)
    lst = ts.listen((LOOPBACK, 0), env.echo.address)
    p = s_client(lst.address, certs, b"", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256")
    (ev,) = events.wait_closes(1, lst.id)
    err = p.stderr.decode(errors="replace")
    if chacha20:
        assert p.returncode == 0, err
        assert "Ciphersuite: TLS_CHACHA20_POLY1305_SHA256" in err
        assert ev.reason == "ok"
    else:
        assert p.returncode != 0
        assert ev.reason == "tls_error"
        assert ev.detail and "no shared cipher" in ev.detail, ev.detail
