"""``make demo``: two nodes, three workloads, two ztund daemons, real traffic.

Everything is built from network namespaces on this machine (198.18.0.0/15, the
benchmarking range) and removed at the end, also on failure or Ctrl-C::

    node-a (198.18.0.1)                          node-b (198.18.0.2)
    ├─ br0 198.18.1.1/24                         ├─ br0 198.18.2.1/24
    │  ├─ demo/client  198.18.1.11  ─┐           │  └─ demo/api  198.18.2.11
    │  └─ demo/db      198.18.1.12   │           │
    └─ ztund (one engine per workload, each      └─ ztund
       started inside the workload's namespace)

Each workload is its own namespace behind its node (a veth into the node's bridge; the
nodes route each other's workload subnets). Each ztund serves its local workloads: an
HBONE port 15008 inside every workload, with that workload's own SPIFFE certificate
from an embedded CA shared by the two nodes, and explicit forwards (the client's app
dials ``127.0.0.1:<port>`` in its own namespace). Then:

1. client -> api  (cross-node, HBONE/mTLS)   allowed by demo/api-allow-client
2. client -> db   (same node, HBONE/mTLS)    allowed by demo/db-allow-client
3. api -> db      (cross-node)               denied by demo/deny-api-to-db

The terminal shows each connection live (identities, path, bytes, decision from the
daemons' access logs), then the metrics scraped from both daemons' ``/metrics``.
:class:`Cluster` (the namespaces) and :class:`Ztund` (a daemon as a subprocess) are
also what the daemon tests use.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztun.netns import listen_in_netns, run_in_netns

__all__ = [
    "Cluster",
    "EchoServer",
    "NodeNs",
    "WorkloadNs",
    "Ztund",
    "main",
    "metric_value",
    "node_config",
    "run_demo",
    "socks5_handshake",
    "write_yaml",
]

NETNS_DIR = "/run/netns"
PREFIX = "ztd-"
NODE_NET = "198.18.0.{}"  # node i: 198.18.0.i/24 on the link between nodes
POD_NET = "198.18.{}.{}"  # node i's workloads: 198.18.i.0/24 behind its bridge
ADMIN_PORT = 15000


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove ``ztd-<pid hex>-*`` namespaces whose creating process is gone."""
    from pyroute2 import netns  # type: ignore[import-untyped,unused-ignore]

    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(NETNS_DIR)):
            if not name.startswith(PREFIX):
                continue
            try:
                pid = int(name[len(PREFIX) :].split("-", 1)[0], 16)
            except ValueError:
                continue
            if not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    netns.remove(name)
                    removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------
# Namespaces


@dataclass
class WorkloadNs:
    name: str  # workload name, e.g. "client"
    namespace: str  # its mesh namespace, e.g. "demo"
    ip: str
    netns: str  # netns name (under /run/netns)
    node: NodeNs
    service_account: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return run_in_netns(self.path, fn, *args, **kw)

    def listen(self, port: int, host: str = "0.0.0.0") -> socket.socket:
        return listen_in_netns(self.path, (host, port))

    def connect(self, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
        def make() -> socket.socket:
            return socket.create_connection(addr, timeout=timeout)

        sock: socket.socket = self.run(make, timeout=timeout + 5)
        return sock


@dataclass
class NodeNs:
    name: str  # node name, e.g. "node-a"
    index: int
    netns: str
    workloads: list[WorkloadNs] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)

    @property
    def ip(self) -> str:
        return NODE_NET.format(self.index)

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return run_in_netns(self.path, fn, *args, **kw)


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cluster:
    """Nodes (network namespaces joined by a veth) and workloads behind them.

    Use as a context manager, or call :meth:`close`: everything made is removed, in
    reverse order, also after a failure half-way.
    """

    def __init__(self, tag: str = "") -> None:
        self.base = f"{PREFIX}{os.getpid():x}-{tag or 'c'}{next(_counter)}"
        self.nodes: list[NodeNs] = []
        self._created: list[str] = []
        cleanup_stale()

    def _netns(self, suffix: str) -> str:
        from pyroute2 import netns  # type: ignore[import-untyped,unused-ignore]

        name = f"{self.base}-{suffix}"
        netns.create(name)
        self._created.append(name)
        return name

    def add_nodes(self, *names: str) -> list[NodeNs]:
        """Create nodes joined by one link (two nodes) — enough for the demo and tests."""
        from pyroute2 import NetNS  # type: ignore[import-untyped,unused-ignore]

        if len(names) != 2 or self.nodes:
            raise ValueError("a Cluster has exactly two nodes")
        for i, name in enumerate(names, start=1):
            node = NodeNs(name, i, self._netns(f"n{i}"))
            self.nodes.append(node)
        a, b = self.nodes
        with NetNS(a.netns) as ns:
            ns.link(
                "add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": b.netns}
            )
        for node in self.nodes:
            other = b if node is a else a
            with NetNS(node.netns) as ns:
                lo = ns.link_lookup(ifname="lo")[0]
                ns.link("set", index=lo, state="up")
                eth = ns.link_lookup(ifname="eth0")[0]
                ns.addr("add", index=eth, address=node.ip, prefixlen=24)
                ns.link("set", index=eth, state="up")
                ns.link("add", ifname="br0", kind="bridge")
                br = ns.link_lookup(ifname="br0")[0]
                ns.addr("add", index=br, address=POD_NET.format(node.index, 1), prefixlen=24)
                ns.link("set", index=br, state="up")
                ns.route("add", dst=f"198.18.{other.index}.0/24", gateway=other.ip, oif=eth)
            # A node routes between its workloads and the other node.
            node.run(_write_sysctl, "/proc/sys/net/ipv4/ip_forward", "1")
        return self.nodes

    def add_workload(
        self,
        node: NodeNs,
        name: str,
        *,
        namespace: str = "demo",
        service_account: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> WorkloadNs:
        from pyroute2 import NetNS  # type: ignore[import-untyped,unused-ignore]

        k = len(node.workloads) + 1
        w = WorkloadNs(
            name=name,
            namespace=namespace,
            ip=POD_NET.format(node.index, 10 + k),
            netns=self._netns(f"n{node.index}w{k}"),
            node=node,
            service_account=service_account or name,
            labels=labels if labels is not None else {"app": name},
        )
        veth = f"v{k}"
        with NetNS(node.netns) as ns:
            ns.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": w.netns})
            idx = ns.link_lookup(ifname=veth)[0]
            br = ns.link_lookup(ifname="br0")[0]
            ns.link("set", index=idx, master=br, state="up")
        with NetNS(w.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            eth = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth, address=w.ip, prefixlen=24)
            ns.link("set", index=eth, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=POD_NET.format(node.index, 1))
        node.workloads.append(w)
        return w

    @property
    def workloads(self) -> list[WorkloadNs]:
        return [w for n in self.nodes for w in n.workloads]

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Until every workload can reach every other one (ARP, bridges, routes settled)."""
        deadline = time.monotonic() + timeout
        for src in self.workloads:
            for dst in self.workloads:
                if src is dst:
                    continue
                while not src.run(_can_reach, dst.ip):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{src.key} cannot reach {dst.key} ({dst.ip})")
                    time.sleep(0.05)

    def close(self) -> None:
        from pyroute2 import netns  # type: ignore[import-untyped,unused-ignore]

        errors = []
        for name in reversed(self._created):
            try:
                netns.remove(name)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    errors.append(f"{name}: {e}")
        self._created = []
        if errors:
            raise RuntimeError(f"namespace cleanup failed: {errors}")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _can_reach(ip: str) -> bool:
    """A TCP connect to a closed port: refused (RST) proves the path works."""
    s = socket.socket()
    s.settimeout(0.5)
    try:
        s.connect((ip, 9))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return True


class _Counter:
    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def __next__(self) -> int:
        with self._lock:
            self._n += 1
            return self._n


_counter = _Counter()


# ---------------------------------------------------------------------------------------
# Daemons


def node_config(
    cluster: Cluster,
    node: NodeNs,
    *,
    ca_dir: str,
    state_dir: str,
    policies: Sequence[str] = (),
    forwards: dict[str, list[tuple[int, str]]] | None = None,
    admin: str = f"127.0.0.1:{ADMIN_PORT}",
    drain_timeout: str = "30s",
    trust_domain: str = "cluster.local",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ztund config for ``node`` that knows every workload of the cluster."""
    forwards = forwards or {}
    workloads = []
    for w in cluster.workloads:
        entry: dict[str, Any] = {
            "uid": f"{trust_domain}//v1/Pod/{w.namespace}/{w.name}",
            "name": w.name,
            "namespace": w.namespace,
            "serviceAccount": w.service_account,
            "labels": dict(w.labels),
            "workloadIps": [w.ip],
            "protocol": "HBONE",
            "node": w.node.name,
        }
        if w.node is node:
            entry["netns"] = w.path
            fw = forwards.get(w.key, [])
            if fw:
                entry["forwards"] = [{"port": p, "to": to} for p, to in fw]
        workloads.append(entry)
    cfg: dict[str, Any] = {
        "node": node.name,
        "trustDomain": trust_domain,
        "stateDir": state_dir,
        "identity": {"source": "ca", "ca": {"dir": ca_dir}},
        "listeners": {"admin": admin},
        "drainTimeout": drain_timeout,
        "policies": list(policies),
        "workloads": workloads,
    }
    cfg.update(extra or {})
    return cfg


def write_yaml(path: str | os.PathLike[str], data: Any) -> None:
    import yaml

    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)


class Ztund:
    """``python -m ztun run --config FILE`` started inside a node's namespace.

    Its stderr (JSON log lines) is copied to ``log_path`` and parsed: ``access`` holds
    the access-log records, ``on_log`` (if set) sees every record as it arrives.
    """

    def __init__(
        self,
        node: NodeNs,
        config_path: str | os.PathLike[str],
        *,
        log_path: str | os.PathLike[str],
        admin: tuple[str, int] = ("127.0.0.1", ADMIN_PORT),
        on_log: Callable[[dict[str, Any]], None] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.node = node
        self.config_path = os.fspath(config_path)
        self.log_path = os.fspath(log_path)
        self.admin = admin
        self.on_log = on_log
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    @property
    def access(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r.get("scope") == "ztun.access"]

    def start(self) -> Ztund:
        argv = [
            self.python,
            "-m",
            "ztun",
            "run",
            "--config",
            self.config_path,
            "--log-format",
            "json",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = self.node.run(
            subprocess.Popen,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read, name=f"ztund-log-{self.node.name}", daemon=True
        )
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "ab") as out:
            for raw in self.proc.stderr:
                out.write(raw)
                out.flush()
                try:
                    rec = json.loads(raw)
                except ValueError:
                    rec = {"scope": "stderr", "message": raw.decode(errors="replace").rstrip()}
                with self._lock:
                    self.records.append(rec)
                if self.on_log is not None:
                    with contextlib.suppress(Exception):
                        self.on_log(rec)

    # -- admin -------------------------------------------------------------------------------

    def request(self, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
        url = f"http://{self.admin[0]}:{self.admin[1]}{path}"

        def call() -> tuple[int, bytes]:
            req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        result: tuple[int, bytes] = self.node.run(call, timeout=timeout + 5)
        return result

    def get_json(self, path: str) -> Any:
        status, body = self.request(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def metrics_text(self) -> str:
        status, body = self.request("/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics: HTTP {status}")
        return body.decode()

    def ready(self) -> tuple[bool, str]:
        try:
            status, body = self.request("/healthz/ready", timeout=2.0)
        except (OSError, urllib.error.URLError):
            return False, "admin not answering"
        return status == 200, body.decode(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        why = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"ztund on {self.node.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            ok, why = self.ready()
            if ok:
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"ztund on {self.node.name} not ready after {timeout}s: {why}\n{self.tail()}"
        )

    def tail(self, n: int = 30) -> str:
        with self._lock:
            recs = self.records[-n:]
        return "\n".join(
            f"  {r.get('level', '?')} {r.get('scope', '')}: {r.get('message', '')}"
            + (f" {r.get('error')}" if r.get("error") else "")
            for r in recs
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait for the drain; SIGKILL if it takes longer than ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(10)


# ---------------------------------------------------------------------------------------
# Apps inside the workloads


class EchoServer:
    """A threaded echo server on a listening socket (made inside a workload's namespace)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.address = sock.getsockname()[:2]
        self.accepted = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, name="echo", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            while True:
                data = c.recv(1 << 18)
                if not data:
                    break
                c.sendall(data)
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(c)
            c.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)


def socks5_handshake(sock: socket.socket, ip: str, port: int) -> None:
    """RFC 1928 CONNECT to an IPv4/IPv6 literal, no authentication; OSError on refusal."""
    import ipaddress

    sock.sendall(b"\x05\x01\x00")
    if _recv_exact(sock, 2) != b"\x05\x00":
        raise OSError("SOCKS5: no acceptable method")
    addr = ipaddress.ip_address(ip)
    atyp = b"\x01" if addr.version == 4 else b"\x04"
    sock.sendall(b"\x05\x01\x00" + atyp + addr.packed + port.to_bytes(2, "big"))
    head = _recv_exact(sock, 4)
    if head[1] != 0:
        raise ConnectionRefusedError(f"SOCKS5: CONNECT {ip}:{port} refused (reply {head[1]})")
    _recv_exact(sock, (4 if head[3] == 1 else 16) + 2)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed during SOCKS5 negotiation")
        buf += chunk
    return buf


# ---------------------------------------------------------------------------------------
# The demo

POLICIES = """\
# Who may talk to demo/api: the client only.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: api-allow-client
  namespace: demo
spec:
  selector:
    matchLabels: {app: api}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
---
# Who may talk to demo/db: the client only...
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: db-allow-client
  namespace: demo
spec:
  selector:
    matchLabels: {app: db}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
---
# ...and never the api, whatever else is allowed.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-api-to-db
  namespace: demo
spec:
  selector:
    matchLabels: {app: db}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/api"]
"""

CHUNK = 1 << 20


@dataclass
class DemoConn:
    """One application connection the demo makes, and what the daemons said about it."""

    n: int
    src: WorkloadNs
    dst: WorkloadNs
    port: int  # the forward port inside src's namespace
    dst_port: int
    expect_allowed: bool
    size: int
    sent: int = 0
    received: int = 0
    state: str = "waiting"
    detail: str = ""
    local_port: int = 0
    verified: bool = False
    trace: str | None = None
    src_identity: str | None = None
    dst_identity: str | None = None
    decision: str | None = None
    policy: str | None = None
    error: str | None = None
    inbound_seen: bool = False
    sock: socket.socket | None = None
    started: float = 0.0
    finished: float = 0.0

    @property
    def path(self) -> str:
        if self.src.node is self.dst.node:
            return f"same node\n({self.src.node.name})"
        return f"cross-node\n{self.src.node.name} → {self.dst.node.name}"


def _payload(seed: int, size: int) -> Iterator[bytes]:
    """Deterministic chunks (SHA-256 in counter mode), so both ends can check the bytes."""
    block = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(CHUNK // 32))
    left = size
    i = 0
    while left > 0:
        n = min(CHUNK, left)
        yield block[:n] if i % 2 == 0 else block[::-1][:n]
        left -= n
        i += 1


def _drive(conn: DemoConn) -> None:
    """Send ``size`` bytes through the forward, read the echo, compare SHA-256."""
    conn.state = "connecting"
    conn.started = time.monotonic()
    try:
        sock = conn.src.connect(("127.0.0.1", conn.port))
    except OSError as e:
        conn.state, conn.detail = "failed", f"connect: {e}"
        conn.finished = time.monotonic()
        return
    conn.sock = sock
    conn.local_port = sock.getsockname()[1]
    sock.settimeout(30)
    want = hashlib.sha256()
    got = hashlib.sha256()
    errors: list[str] = []

    def reader() -> None:
        try:
            while True:
                data = sock.recv(1 << 18)
                if not data:
                    return
                got.update(data)
                conn.received += len(data)
        except OSError as e:
            errors.append(f"recv: {e.strerror or e}")

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    conn.state = "streaming"
    try:
        for chunk in _payload(conn.n, conn.size):
            want.update(chunk)
            sock.sendall(chunk)
            conn.sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        errors.append(f"send: {e.strerror or e}")
    rt.join(60)
    sock.close()
    conn.finished = time.monotonic()
    if conn.received == conn.size and got.digest() == want.digest() and not errors:
        conn.verified = True
        conn.state = "verified"
        conn.detail = "echo SHA-256 ok"
    elif conn.received == 0:
        conn.state = "refused"
        conn.detail = errors[0] if errors else "closed without a byte"
    else:
        conn.state = "failed"
        conn.detail = errors[0] if errors else f"echo {conn.received} of {conn.size} bytes"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _short_id(sid: str | None) -> str:
    """``spiffe://cluster.local/ns/demo/sa/api`` -> ``ns/demo/sa/api`` (one trust domain)."""
    if not sid:
        return "-"
    rest = sid.removeprefix("spiffe://")
    return rest.split("/", 1)[1] if "/" in rest else rest


class _Correlator:
    """Matches the daemons' access-log records with the demo's connections."""

    def __init__(self, conns: list[DemoConn]) -> None:
        self.conns = conns
        self.lock = threading.Lock()
        self.pending_inbound: list[dict[str, Any]] = []

    def feed(self, rec: dict[str, Any]) -> None:
        if rec.get("scope") != "ztun.access":
            return
        with self.lock:
            if rec.get("direction") == "outbound":
                for c in self.conns:
                    if (
                        c.local_port
                        and rec.get("src.addr") == f"127.0.0.1:{c.local_port}"
                        and (rec.get("src.workload") == c.src.name)
                    ):
                        c.trace = rec.get("trace")
                        c.src_identity = rec.get("src.identity")
                        c.dst_identity = c.dst_identity or rec.get("dst.identity")
                        if rec.get("error"):
                            c.error = rec["error"]
                        if rec.get("status") == 401:
                            c.decision = c.decision or "deny"
            else:
                self.pending_inbound.append(rec)
            for r in list(self.pending_inbound):
                for c in self.conns:
                    if c.trace and r.get("trace") == c.trace:
                        c.inbound_seen = True
                        c.src_identity = r.get("src.identity") or c.src_identity
                        c.dst_identity = r.get("dst.identity") or c.dst_identity
                        c.decision = r.get("decision") or c.decision
                        c.policy = r.get("policy") or c.policy
                        if r.get("error"):
                            c.error = r["error"]
                        self.pending_inbound.remove(r)
                        break


def _conn_table(conns: list[DemoConn]) -> Any:
    from rich.table import Table

    t = Table(
        title="connections: app → 127.0.0.1:<forward> → ztund ═ HBONE/mTLS ═ ztund → app "
        "(identities: spiffe://cluster.local/…)",
        title_justify="left",
    )
    t.add_column("#", justify="right")
    t.add_column("from → to", no_wrap=True)
    t.add_column("path", no_wrap=True)
    t.add_column("identities (verified)", no_wrap=True)
    t.add_column("sent / echoed", justify="right")
    t.add_column("decision (policy)", no_wrap=True)
    t.add_column("result", no_wrap=True)
    for c in conns:
        ids = "…"
        if c.src_identity or c.dst_identity:
            ids = f"{_short_id(c.src_identity)}\n→ {_short_id(c.dst_identity)}"
        if c.decision == "allow":
            dec = f"[green]ALLOW[/]\n{c.policy or ''}"
        elif c.decision == "deny":
            dec = f"[red]DENY[/]\n{c.policy or ''}"
        else:
            dec = "…" if c.state not in ("verified", "refused", "failed") else "-"
        style = {"verified": "green", "refused": "red", "failed": "bold red"}.get(c.state, "yellow")
        result = f"[{style}]{c.state}[/]"
        if c.detail and c.state in ("verified", "refused", "failed"):
            result += f"\n[dim]{c.detail}[/]"
        t.add_row(
            str(c.n),
            f"{c.src.key}\n→ {c.dst.key}:{c.dst_port}",
            c.path,
            ids,
            f"{_human(c.sent)}\n{_human(c.received)}",
            dec,
            result,
        )
    return t


_METRIC_COLUMNS = ("opened", "closed", "failed", "received", "sent")


def _metrics_rows(text: str, node: str) -> list[list[str]]:
    """One row per label set of the istio_tcp_* families scraped from a daemon."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {
        "istio_tcp_connections_opened_total": "opened",
        "istio_tcp_connections_closed_total": "closed",
        "istio_tcp_connections_failed_total": "failed",
        "istio_tcp_received_bytes_total": "received",
        "istio_tcp_sent_bytes_total": "sent",
    }
    rows: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            col = names.get(smp.name)
            if col is None:
                continue
            lb = smp.labels
            key = (
                lb["reporter"],
                f"{lb['source_workload']} → {lb['destination_workload']}",
                lb["response_flags"],
                "mTLS" if lb["connection_security_policy"] == "mutual_tls" else "plain",
            )
            row = rows.setdefault(key, {})
            row[col] = row.get(col, 0.0) + smp.value
    out = []
    for key, v in sorted(rows.items()):
        cells = [f"{v.get(c, 0):.0f}" for c in _METRIC_COLUMNS[:3]]
        cells += [_human(v.get(c, 0)) for c in _METRIC_COLUMNS[3:]]
        out.append([node, *key, *cells])
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def run_demo(*, size: int = 32 << 20, console: Any = None, workdir: str | None = None) -> int:
    """Build the cluster, run the daemons and the traffic, show it, tear down. Exit code."""
    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table

    from ztun.daemon import policy_supported

    con = console or Console()
    if not con.is_terminal and con.width < 120:
        con = Console(width=120, force_terminal=False)
    if os.geteuid() != 0:
        con.print("[red]The demo creates network namespaces: run it as root (sudo make demo).[/]")
        return 1
    t0 = time.monotonic()
    enforce = policy_supported()
    own_dir = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="ztun-demo-"))
    daemons: list[Ztund] = []
    servers: list[EchoServer] = []
    conns: list[DemoConn] = []
    cluster: Cluster | None = None
    ok = False
    try:
        con.rule("[bold]ztun demo: two nodes, three workloads, two ztund")
        cluster = Cluster("demo")
        a, b = cluster.add_nodes("node-a", "node-b")
        client = cluster.add_workload(a, "client")
        db = cluster.add_workload(a, "db")
        api = cluster.add_workload(b, "api")
        cluster.wait_reachable()
        topo = Table.grid(padding=(0, 2))
        for n in cluster.nodes:
            topo.add_row(
                f"[bold]{n.name}[/] {n.ip}", ", ".join(f"{w.key} {w.ip}" for w in n.workloads)
            )
        con.print(Panel(topo, title="network namespaces (198.18.0.0/15)", expand=False))

        pol_dir = work / "policies"
        pol_dir.mkdir(parents=True, exist_ok=True)
        (pol_dir / "demo.yaml").write_text(POLICIES)
        forwards = {
            client.key: [(9080, "demo/api:8080"), (9081, "demo/db:5432")],
            api.key: [(9082, "demo/db:5432")],
        }
        conns = [
            DemoConn(1, client, api, 9080, 8080, True, size),
            DemoConn(2, client, db, 9081, 5432, True, size),
            DemoConn(3, api, db, 9082, 5432, False, size),
        ]
        corr = _Correlator(conns)
        for node in cluster.nodes:
            path = work / f"{node.name}.yaml"
            write_yaml(
                path,
                node_config(
                    cluster,
                    node,
                    ca_dir=str(work / "ca"),
                    state_dir=str(work / node.name),
                    policies=[str(pol_dir)] if enforce else [],
                    forwards=forwards,
                    drain_timeout="10s",
                ),
            )
            daemons.append(
                Ztund(node, path, log_path=work / f"{node.name}.log", on_log=corr.feed).start()
            )
        if not enforce:
            con.print(
                "[bold yellow]This build cannot enforce policy on HBONE inbound yet: "
                "running without policies (connection 3 will not be denied).[/]"
            )
        for z in daemons:
            z.wait_ready(60)
        con.print(f"ztund ready on both nodes ([dim]configs and logs in {work}[/])")
        servers = [EchoServer(api.listen(8080)), EchoServer(db.listen(5432))]

        threads = [threading.Thread(target=_drive, args=(c,), daemon=True) for c in conns]
        with Live(_conn_table(conns), console=con, refresh_per_second=8) as live:
            for th in threads:
                th.start()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                live.update(_conn_table(conns))
                done = all(not th.is_alive() for th in threads)
                logged = all(c.inbound_seen or c.state == "failed" for c in conns)
                if done and logged:
                    break
                time.sleep(0.1)
            live.update(_conn_table(conns))
        con.print()
        texts = {z.node.name: z.metrics_text() for z in daemons}
        mt = Table(title="metrics scraped from each ztund's /metrics", title_justify="left")
        for col in ("node", "reporter", "source → destination", "flags", "security"):
            mt.add_column(col)
        for col in _METRIC_COLUMNS:
            mt.add_column(col, justify="right")
        for node_name, text in texts.items():
            for row in _metrics_rows(text, node_name):
                mt.add_row(*row)
        con.print(mt)

        problems = _check(conns, texts, enforce)
        for p in problems:
            con.print(f"[bold red]✗ {p}[/]")
        if not problems:
            con.print(
                "[bold green]✓ allowed connections verified end to end (SHA-256), the "
                "denied one refused by policy, metrics equal to the bytes sent[/]"
            )
        ok = not problems
    except KeyboardInterrupt:
        con.print("[yellow]interrupted: tearing down[/]")
    except Exception as e:  # report, then tear down
        con.print(f"[bold red]demo failed: {e}[/]")
        for z in daemons:
            con.print(f"[dim]{z.node.name} log tail:\n{z.tail()}[/]")
    finally:
        # apps first (so an interrupted transfer does not hold the drain), then ztund
        for c in conns:
            if c.sock is not None:
                with contextlib.suppress(OSError):
                    c.sock.close()
        for s in servers:
            s.close()
        codes = []
        for z in daemons:
            with contextlib.suppress(Exception):
                codes.append((z.node.name, z.stop(20)))
        if cluster is not None:
            try:
                cluster.close()
            except Exception as e:
                con.print(f"[red]cleanup: {e}[/]")
                ok = False
        if own_dir and ok:
            shutil.rmtree(work, ignore_errors=True)
        if codes:
            con.print(
                "ztund drained and exited: "
                + ", ".join(f"{n} → {c}" for n, c in codes)
                + f"; namespaces removed; {time.monotonic() - t0:.1f} s in all"
            )
        if any(c != 0 for _, c in codes):
            ok = False
    return 0 if ok else 1


def _check(conns: list[DemoConn], texts: dict[str, str], enforce: bool) -> list[str]:
    problems = []
    for c in conns:
        if c.expect_allowed or not enforce:
            if not c.verified:
                problems.append(
                    f"connection {c.n} ({c.src.key} → {c.dst.key}): {c.state} {c.detail}"
                )
                continue
            # Both reporters count exactly the bytes of the connection.
            for reporter, node in (("source", c.src.node.name), ("destination", c.dst.node.name)):
                labels = {
                    "reporter": reporter,
                    "source_workload": c.src.name,
                    "destination_workload": c.dst.name,
                    "response_flags": "-",
                }
                got = metric_value(texts[node], "istio_tcp_received_bytes_total", **labels)
                sent = metric_value(texts[node], "istio_tcp_sent_bytes_total", **labels)
                if got != c.size or sent != c.size:
                    problems.append(
                        f"connection {c.n}: {node} reporter={reporter} received={got:.0f} "
                        f"sent={sent:.0f}, expected {c.size} each"
                    )
        elif c.state != "refused" or c.decision != "deny":
            problems.append(
                f"connection {c.n} ({c.src.key} → {c.dst.key}) was not denied: "
                f"{c.state} decision={c.decision}"
            )
    if not enforce:
        problems.append("policy enforcement is missing in this build: no connection was denied")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ztun.demo [--size MiB]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ztun.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32, help="MiB sent per connection (default 32)")
    args = ap.parse_args(argv)

    me = os.getpid()

    def on_term(signum: int, _frame: object) -> None:
        # pyroute2 forks helpers (netns.create) and stops them with SIGTERM: a child
        # must not unwind the demo's stack (its finally blocks would tear down our
        # namespaces), it just goes.
        if os.getpid() != me:
            os._exit(0)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    raise SystemExit(run_demo(size=args.size << 20))


if __name__ == "__main__":
    main()
