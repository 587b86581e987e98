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
4. client -> db   (same node, SOCKS5)        allowed by demo/db-allow-client, judged by
   node-a's ztund at the source, then app <-> app in the kernel (the eBPF sockmap
   shortcut, ``engine.accelerate: auto``); where eBPF is not available ztund falls back
   to HBONE and the demo says why

The demo runs in a cgroup v2 of its own (:class:`DemoCgroup`, removed at the end), which
holds the daemons and the apps' sockets: node-a's accelerator attaches there.

The terminal shows each connection live (path, bytes, the identities from the daemons'
``/metrics`` labels while it is open, then identities and the deciding policy from their
access logs), a verdict per connection, then the metrics scraped from both daemons'
``/metrics``. Everything it shows is checked (:func:`_check`); the exit code says so.
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

    def __init__(self, sock: socket.socket, *, timeout: float | None = None) -> None:
        self.sock = sock
        self.address = sock.getsockname()[:2]
        # A timeout makes the accepted sockets poll before each recv(), so a spurious
        # EAGAIN of a socket in a sockmap (docs/sockmap.md §4) is retried, not an error.
        self.timeout = timeout
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
            c.settimeout(self.timeout)
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
HBONE_PORT = 15008
SOCKS5_PORT = 15080  # ztund's SOCKS5 entry inside every local workload
# The apps' transfers take a few seconds; this bounds a stuck one.
TRAFFIC_TIMEOUT = 60.0
# Once the apps are done, how long to wait for the daemons' access-log lines: they are
# written when the engines report the connections' ends, milliseconds later.
LOG_GRACE = 10.0


@dataclass
class DemoConn:
    """One application connection the demo makes, and what the daemons logged about it."""

    n: int
    src: WorkloadNs
    dst: WorkloadNs
    port: int  # the forward port inside src's namespace
    dst_port: int
    expect_allowed: bool
    size: int
    socks: bool = False  # through src's SOCKS5 entry (port) to dst's IP, not a forward
    # A same-node route through the kernel shortcut (engine.accelerate) is expected: None
    # for HBONE; for a SOCKS5 connection to a local workload, known once ztund is up.
    shortcut: bool | None = None
    shortcut_note: str = ""  # why there is no shortcut (when shortcut is False)
    local_port: int = 0  # the app's port, as the source's access log shows it
    sent: int = 0
    received: int = 0
    state: str = "waiting"  # connecting, streaming, verified, refused, failed
    error: str | None = None  # what the app saw go wrong
    verified: bool = False
    sock: socket.socket | None = None
    started: float = 0.0
    finished: float = 0.0
    out_rec: dict[str, Any] | None = None  # access log of the source side (src's node)
    in_rec: dict[str, Any] | None = None  # access log of the destination side
    live: dict[str, Any] | None = None  # from /metrics while open (before the logs)

    @property
    def done(self) -> bool:
        return self.state in ("verified", "refused", "failed")

    @property
    def same_node(self) -> bool:
        return self.src.node is self.dst.node

    @property
    def route(self) -> str:
        route = "same node" if self.same_node else "cross-node"
        return f"{route}, SOCKS5" if self.socks else route

    @property
    def direct(self) -> bool:
        """Carried as a same-node route (judged at the source, app ⇄ app in the kernel)."""
        return bool(self.shortcut)

    @property
    def target(self) -> str:
        return f"{self.dst.key}:{self.dst_port}"

    @property
    def logged(self) -> bool:
        # a same-node route is logged by the source's ztund only (docs/daemon.md)
        if self.direct:
            return self.out_rec is not None
        return self.out_rec is not None and self.in_rec is not None

    def _rec(self, key: str, *order: dict[str, Any] | None) -> Any:
        for r in order:
            if r is not None and r.get(key):
                return r[key]
        return None

    @property
    def src_identity(self) -> str | None:
        # the client certificate, as the destination verified it
        return self._rec("src.identity", self.in_rec, self.out_rec, self.live)  # type: ignore[no-any-return]

    @property
    def dst_identity(self) -> str | None:
        # the server certificate, as the source verified it (the forward's expected ID)
        return self._rec("dst.identity", self.out_rec, self.in_rec, self.live)  # type: ignore[no-any-return]

    @property
    def decision(self) -> str | None:
        return self._rec("decision", self.in_rec, self.out_rec)  # type: ignore[no-any-return]

    @property
    def policy(self) -> str | None:
        # judged by the destination's ztund, or for a same-node route by the source's
        rec = self.out_rec if self.direct else self.in_rec
        return self._rec("policy", rec)  # type: ignore[no-any-return]

    @property
    def status(self) -> int | None:
        return self._rec("status", self.out_rec, self.in_rec)  # type: ignore[no-any-return]

    def tunnel_bytes(self) -> tuple[int, int]:
        """Bytes each way: what ztund delivered (access log) once known, else the app's."""
        rec = self.out_rec if self.direct else self.in_rec
        if rec is not None and self.done:
            return int(rec.get("bytes_sent", 0)), int(rec.get("bytes_recv", 0))
        return self.sent, self.received


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


def _err(where: str, e: OSError) -> str:
    return f"{where}: {e.strerror or e}"


def _drive(conn: DemoConn) -> None:
    """Send ``size`` bytes through the forward, read the echo, compare SHA-256."""
    conn.state = "connecting"
    conn.started = time.monotonic()
    try:
        sock = conn.src.connect(("127.0.0.1", conn.port))
    except (ConnectionResetError, ConnectionAbortedError) as e:
        # ztund accepted the app's connection and reset it before connect() returned
        # (a refusal that came back fast): refused, as the app would see it
        conn.state, conn.error = "refused", _err("connect", e)
        conn.finished = time.monotonic()
        return
    except OSError as e:
        conn.state, conn.error = "failed", _err("connect", e)
        conn.finished = time.monotonic()
        return
    conn.sock = sock
    conn.local_port = sock.getsockname()[1]
    if conn.socks:
        try:
            socks5_handshake(sock, conn.dst.ip, conn.dst_port)
        except OSError as e:
            conn.state = "refused" if isinstance(e, ConnectionError) else "failed"
            conn.error = _err("SOCKS5", e)
            conn.finished = time.monotonic()
            sock.close()
            return
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
            errors.append(_err("recv", e))

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
        errors.append(_err("send", e))
    rt.join(TRAFFIC_TIMEOUT)
    sock.close()
    conn.finished = time.monotonic()
    conn.error = errors[0] if errors else None
    if conn.received == conn.size and got.digest() == want.digest() and not errors:
        conn.verified = True
        conn.state = "verified"
    elif conn.received == 0:
        conn.state = "refused"
        conn.error = conn.error or "closed without a byte"
    else:
        conn.state = "failed"
        conn.error = conn.error or f"echo {conn.received} of {conn.size} bytes"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _short_id(sid: str | None) -> str:
    """``spiffe://cluster.local/ns/demo/sa/api`` -> ``ns/demo/sa/api`` (one trust domain)."""
    if not sid:
        return "…"
    rest = sid.removeprefix("spiffe://")
    return rest.split("/", 1)[1] if "/" in rest else rest


class _AccessLogs:
    """The daemons' access-log records, matched to the demo's connections.

    A record belongs to the connection with its ``src.workload`` and ``dst.workload``;
    ``direction`` says which side wrote it. When two connections join the same workloads
    (client → db through a forward and through SOCKS5), the source's line is the one from
    the app's own port (``src.addr``) and the destination's line the one with the same
    ``trace``. Matching is redone from all records at every refresh, so the order in which
    the two daemons' lines arrive (and when the app's ``connect()`` returned) does not
    matter.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []

    def feed(self, rec: dict[str, Any]) -> None:
        if rec.get("scope") == "ztun.access":
            with self._lock:
                self._records.append(rec)

    def apply(self, conns: list[DemoConn]) -> None:
        with self._lock:
            records = list(self._records)
        pairs = [(c.src.name, c.dst.name) for c in conns]
        for c in conns:
            pair = (c.src.name, c.dst.name)
            mine = [r for r in records if (r.get("src.workload"), r.get("dst.workload")) == pair]
            if pairs.count(pair) > 1:
                if not c.local_port:
                    continue
                app = f"127.0.0.1:{c.local_port}"
                out = [
                    r for r in mine if r.get("direction") == "outbound" and r.get("src.addr") == app
                ]
                if out:
                    trace = out[-1].get("trace")
                    mine = out + [
                        r
                        for r in mine
                        if r.get("direction") == "inbound" and trace and r.get("trace") == trace
                    ]
                else:
                    mine = []
            for r in mine:
                if r.get("direction") == "outbound":
                    c.out_rec = r
                elif r.get("direction") == "inbound":
                    c.in_rec = r


class _MetricsPoller:
    """Scrapes the daemons' /metrics while the traffic runs: the identities of the
    connections still open (their labels), before their access-log lines exist."""

    def __init__(self, daemons: Sequence[Ztund], interval: float = 0.5) -> None:
        self.daemons = list(daemons)
        self.interval = interval
        self._ids: dict[tuple[str, str, bool], dict[str, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-metrics", daemon=True)

    def __enter__(self) -> _MetricsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        while not self._stop.wait(self.interval):
            for z in self.daemons:
                try:
                    text = z.metrics_text()
                except (OSError, RuntimeError):
                    continue
                for fam in text_string_to_metric_families(text):
                    for smp in fam.samples:
                        lb = smp.labels
                        if smp.name != "istio_tcp_connections_opened_total":
                            continue
                        # over HBONE: the destination's view (the client certificate it
                        # verified); a same-node route is seen by the source only
                        mtls = lb.get("connection_security_policy") == "mutual_tls"
                        if lb.get("reporter") != ("destination" if mtls else "source"):
                            continue
                        pair = (lb["source_workload"], lb["destination_workload"], mtls)
                        with self._lock:
                            self._ids[pair] = {
                                "src.identity": lb["source_principal"],
                                "dst.identity": lb["destination_principal"],
                            }

    def apply(self, conns: list[DemoConn]) -> None:
        with self._lock:
            for c in conns:
                c.live = self._ids.get((c.src.name, c.dst.name, not c.direct))


class DemoCgroup:
    """A cgroup v2 of the demo's own, ``<cgroup2 mount>/ztun-demo-<pid hex>``, holding the
    demo process and so the ztund daemons it starts and the apps' sockets it makes: node-a's
    accelerator (``engine.accelerateCgroup``) attaches there, never to the cgroup2 root.
    :meth:`close` moves the demo back where it was and removes the directory."""

    PREFIX = "ztun-demo-"

    def __init__(self) -> None:
        self.path: str | None = None
        self.error = ""  # why there is none
        self._home: str | None = None
        self._root: str | None = None

    def open(self) -> DemoCgroup:
        from ztun import bpf

        root = bpf.find_mount("cgroup2")
        if root is None:
            self.error = "no cgroup2 file system is mounted (engine.accelerate left off)"
            return self
        self._root = str(root)
        self._cleanup_stale()
        try:
            with open("/proc/self/cgroup") as f:
                home = next((ln[3:].strip() for ln in f if ln.startswith("0::")), None)
            if home is None:
                raise OSError("this process has no cgroup v2 membership")
            path = os.path.join(self._root, f"{self.PREFIX}{os.getpid():x}")
            os.mkdir(path)
            self.path = path
            self._home = os.path.join(self._root, home.lstrip("/"))
            _write_sysctl(os.path.join(path, "cgroup.procs"), str(os.getpid()))
        except OSError as e:
            self.error = (
                f"cannot put the demo in a cgroup of its own: {e.strerror or e} "
                "(engine.accelerate left off)"
            )
            self.close()
        return self

    def _cleanup_stale(self) -> None:
        """Empty ``ztun-demo-*`` cgroups of demos that are gone (killed before cleanup)."""
        assert self._root is not None
        with contextlib.suppress(OSError):
            for name in os.listdir(self._root):
                if not name.startswith(self.PREFIX):
                    continue
                with contextlib.suppress(ValueError, OSError):
                    if not _pid_alive(int(name[len(self.PREFIX) :], 16)):
                        os.rmdir(os.path.join(self._root, name))

    def close(self, timeout: float = 10.0) -> None:
        """Back to the demo's own cgroup, then remove ours (once its processes are gone)."""
        path, self.path = self.path, None
        if path is None:
            return
        if self._home is not None:
            with contextlib.suppress(OSError):
                with open(os.path.join(path, "cgroup.procs")) as f:
                    inside = f.read().split()
                if str(os.getpid()) in inside:
                    _write_sysctl(os.path.join(self._home, "cgroup.procs"), str(os.getpid()))
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError:
                # a child that exited leaves the cgroup once it has been reaped
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class _Shortcut:
    """node-a's same-node shortcut (engine.accelerate: auto): whether ztund has it, why
    not, and its ztun_bpf_* metrics."""

    def __init__(self, daemon: Ztund, note: str = "") -> None:
        self.daemon = daemon
        self.asked = not note  # engine.accelerate: auto (else left off, for ``note``)
        self.on = False
        self.state = note
        self.routes: list[str] = []
        self.values: dict[str, float] = {}

    def probe(self) -> _Shortcut:
        if self.state:  # the demo did not even ask (no cgroup of its own)
            return self
        acc = self.daemon.get_json("/config_dump").get("accelerator", {})
        self.state = str(acc.get("state", "unknown"))
        self.routes = list(acc.get("sameNodeRoutes", []))
        self.on = self.state.startswith("on")
        return self

    @property
    def why(self) -> str:
        return self.state.removeprefix("unavailable: ")

    def scrape(self, text: str, workload: str) -> None:
        self.values = {
            "active": metric_value(text, "ztun_bpf_accelerator_active"),
            "pairs": metric_value(text, "ztun_bpf_pairs_total", workload=workload),
            "direct": metric_value(text, "ztun_bpf_direct_bytes_total", workload=workload),
            "pair_redirect": metric_value(text, "ztun_bpf_events_total", event="pair_redirect"),
            "hop_redirect": metric_value(text, "ztun_bpf_events_total", event="hop_redirect"),
        }

    def check(self, conns: list[DemoConn]) -> list[str]:
        v = self.values
        node = self.daemon.node.name
        direct = [c for c in conns if c.direct]
        if not self.on:
            if v.get("active", 0) != 0:
                return [f"{node}: ztun_bpf_accelerator_active=1 but the shortcut is off"]
            return []
        problems = []
        if v.get("active") != 1:
            problems.append(f"{node}: ztun_bpf_accelerator_active={v.get('active', 0):.0f}")
        if direct and (v.get("pairs", 0) < len(direct) or v.get("direct", 0) <= 0):
            problems.append(
                f"{node}: {v.get('pairs', 0):.0f} same-node pairs and "
                f"{v.get('direct', 0):.0f} bytes carried by the kernel, expected "
                f"{len(direct)} and more than 0"
            )
        return problems

    def line(self, conns: list[DemoConn]) -> str:
        node = self.daemon.node.name
        if not self.on:
            how = "engine.accelerate: auto fell back to" if self.asked else "ztund used"
            return (
                f"[yellow]kernel shortcut on {node}: unavailable ({self.why});\n"
                f"  {how} HBONE (mTLS) for the same-node route; "
                f"ztun_bpf_accelerator_active {self.values.get('active', 0):.0f}[/]"
            )
        total = sum(2 * c.size for c in conns if c.direct)
        v = self.values
        return (
            f"kernel shortcut on {node} (ztun_bpf_* from its /metrics): accelerator_active "
            f"{v['active']:.0f}, pairs_total {v['pairs']:.0f},\n"
            f"  direct_bytes_total {_human(v['direct'])} (of the {_human(total)} row 4 moved "
            f"both ways), events: pair_redirect {v['pair_redirect']:.0f}, "
            f"hop_redirect {v['hop_redirect']:.0f}"
        )


_STATE_STYLE = {"verified": "green", "refused": "red", "failed": "bold red"}


def _result_detail(c: DemoConn) -> str:
    if c.state == "verified":
        return "echo SHA-256 ok"
    if c.state == "refused" and c.status:
        return f"{c.status} → app reset"
    return c.error or ""


def _conn_table(conns: list[DemoConn]) -> Any:
    from rich.table import Table

    t = Table(title="connections", title_justify="left", title_style="bold")
    t.add_column("#", justify="right")
    t.add_column("connection", min_width=12)
    t.add_column("path", min_width=14)
    t.add_column("identities (mTLS)", min_width=12)
    t.add_column("bytes ↑ / ↓", justify="right", min_width=10)
    t.add_column("decision", min_width=8)
    t.add_column("result", min_width=8)
    for c in conns:
        nodes = (
            f"{c.src.node.name} (same node)"
            if c.same_node
            else f"{c.src.node.name} → {c.dst.node.name}"
        )
        if c.direct:
            hop = "kernel shortcut\n  (sockmap)"
        elif c.shortcut is False:
            hop = f"{c.dst.ip}:{HBONE_PORT}\n  (no shortcut)"
        else:
            hop = f"{c.dst.ip}:{HBONE_PORT}"
        ids = f"{_short_id(c.src_identity)}\n→ {_short_id(c.dst_identity)}"
        if c.direct:
            ids += "\n[dim](config, no mTLS)[/]"
        up, down = c.tunnel_bytes()
        if c.decision == "allow":
            dec = f"[green]ALLOW[/]\n{c.policy or ''}"
        elif c.decision == "deny":
            dec = f"[bold red]DENY[/]\n{c.policy or ''}"
        else:
            dec = "…" if not c.done else "[yellow]not logged[/]"
        style = _STATE_STYLE.get(c.state, "yellow")
        result = f"[{style}]{c.state}[/]"
        if c.done:
            result += f"\n[dim]{_result_detail(c)}[/]"
        entry = "\n[dim]via SOCKS5[/]" if c.socks else ""
        t.add_row(
            str(c.n),
            f"{c.src.key} →\n{c.target}{entry}",
            f"{nodes}\n⇒ {hop}",
            ids,
            f"↑ {_human(up)}\n↓ {_human(down)}",
            dec,
            result,
        )
    return t


def _verdict(c: DemoConn) -> tuple[bool, str]:
    """Whether the connection ended as the demo expects, and a line saying how."""
    head = f"{c.n} {c.src.key} → {c.target} ({c.route}): "
    if c.expect_allowed:
        ok = c.verified and c.decision == "allow" and c.logged
        route = c.out_rec.get("route") if c.out_rec is not None else None
        if ok and c.direct and (route != "same_node" or c.in_rec is not None):
            return False, (
                f"{head}expected a same-node route (kernel shortcut), the access log says "
                f"route={route}{' and has a destination line' if c.in_rec else ''}"
            )
        if ok and not c.direct and route is not None:
            return False, f"{head}expected HBONE, the access log says route={route}"
        if ok:
            how = ""
            if c.direct:
                how = (
                    f"\n  judged by {c.src.node.name}'s ztund at the source, then app ⇄ app "
                    "in the kernel (sockmap): no TLS, no HBONE, no copy through ztun"
                )
            elif c.shortcut is False:
                how = f"\n  over HBONE (mTLS), the kernel shortcut unavailable: {c.shortcut_note}"
            return True, (
                f"{head}ALLOW by {c.policy}; {_human(c.size)} each way, SHA-256 verified{how}"
            )
        return False, f"{head}expected ALLOW and an intact echo, got {_outcome(c)}"
    ok = c.state == "refused" and c.decision == "deny" and c.received == 0
    if ok:
        up, _ = c.tunnel_bytes()
        return True, (
            f"{head}DENY by {c.policy}; CONNECT → {c.status}, {_human(up)} reached {c.dst.key}"
        )
    return False, f"{head}expected DENY, got {_outcome(c)}"


def _outcome(c: DemoConn) -> str:
    parts = [c.state]
    if c.error:
        parts.append(c.error)
    parts.append(f"decision={c.decision or 'not logged'}")
    if not c.logged:
        missing = [
            side for side, rec in (("source", c.out_rec), ("destination", c.in_rec)) if rec is None
        ]
        parts.append(f"no access-log line from the {' and '.join(missing)} side")
    return ", ".join(parts)


_METRIC_FAMILIES = {
    "istio_tcp_connections_opened_total": "opened",
    "istio_tcp_connections_closed_total": "closed",
    "istio_tcp_connections_failed_total": "failed",
    "istio_tcp_received_bytes_total": "received",
    "istio_tcp_sent_bytes_total": "sent",
}


_RowKey = tuple[str, str, str, str, str]  # src, dst, node, reporter, security


def _security(label: str) -> str:
    """``connection_security_policy`` as the tables show it."""
    return "mTLS" if label == "mutual_tls" else label


def _metrics_rows(
    texts: dict[str, str], order: Sequence[tuple[str, str, str]] = ()
) -> list[list[str]]:
    """One row per (source → destination, node, reporter, security) of the istio_tcp_*
    families scraped from the daemons (``texts``: node name -> /metrics text), the rows
    of one workload pair and security together (in ``order``: source, destination,
    security as shown), source side first. A connection's opening is counted
    under ``response_flags="-"`` and its close under its final flags (ztunnel's way);
    the row merges them and shows the close flags."""
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[_RowKey, dict[str, float]] = {}
    flags: dict[_RowKey, set[str]] = {}
    for node, text in texts.items():
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                col = _METRIC_FAMILIES.get(smp.name)
                if col is None:
                    continue
                lb = smp.labels
                sec = _security(lb["connection_security_policy"])
                key = (
                    lb["source_workload"],
                    lb["destination_workload"],
                    node,
                    lb["reporter"],
                    sec,
                )
                row = rows.setdefault(key, {})
                row[col] = row.get(col, 0.0) + smp.value
                if col == "closed" and smp.value:
                    flags.setdefault(key, set()).add(lb["response_flags"])
    rank: dict[tuple[str, str, str], int] = {}
    for i, group in enumerate(order):
        rank.setdefault(group, i)

    def sort_key(k: _RowKey) -> tuple[Any, ...]:
        return (rank.get((k[0], k[1], k[4]), len(rank)), k[0], k[1], k[4], k[3] != "source", k[2])

    out = []
    for key in sorted(rows, key=sort_key):
        v = rows[key]
        src, dst, node, reporter, sec = key
        shown = sorted(flags.get(key, set()) - {"-"}) or ["-"]
        cells = [f"{v.get(c, 0):.0f}" for c in ("opened", "closed", "failed")]
        cells += [_human(v.get(c, 0)) for c in ("received", "sent")]
        out.append([f"{src} → {dst}", f"{node} ({reporter})", sec, *cells, ",".join(shown)])
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


def _setup_panel(cluster: Cluster) -> Any:
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    for n in cluster.nodes:
        grid.add_row(
            f"[bold]{n.name}[/] {n.ip}",
            ", ".join(f"{w.key} {w.ip}" for w in n.workloads),
        )
    grid.add_row("", "")
    for name, action, target, source in (
        ("demo/api-allow-client", "ALLOW", "app=api", "ns/demo/sa/client"),
        ("demo/db-allow-client", "ALLOW", "app=db", "ns/demo/sa/client"),
        ("demo/deny-api-to-db", "DENY", "app=db", "ns/demo/sa/api"),
    ):
        color = "green" if action == "ALLOW" else "red"
        grid.add_row(f"[{color}]{action}[/] {name}", f"to {target} from {source}")
    return Panel(
        grid,
        title="nodes and workloads (network namespaces), AuthorizationPolicies",
        title_align="left",
        expand=False,
    )


PATH_LEGEND = (
    "[dim]path: the app dials 127.0.0.1:<port> inside its own namespace → its ztund engine "
    "(source workload's certificate)\n"
    "  ═ HBONE: HTTP/2 CONNECT over mTLS 1.3 to the destination workload's IP:15008 ═▶ "
    "its engine (own certificate)\n"
    "  checks the AuthorizationPolicies → dials the app. Identities are "
    "spiffe://cluster.local/…, verified by both ends.\n"
    "  #4: SOCKS5 (127.0.0.1:15080) to db's IP is a same-node route (engine.accelerate: "
    "auto): the source's ztund checks db's\n"
    "  policies, then pairs the two apps' sockets: the kernel moves the bytes app ⇄ app "
    "(eBPF sockmap, sk_msg redirect).[/]"
)


def run_demo(*, size: int = 128 << 20, console: Any = None, workdir: str | None = None) -> int:
    """Build the cluster, run the daemons and the traffic, show it, tear down. Exit code."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from ztun.daemon import policy_supported

    con = console or Console()
    if not con.is_terminal and con.width < 120:
        con = Console(width=120, force_terminal=False)
    if os.geteuid() != 0:
        con.print("[red]The demo creates network namespaces: run it as root (sudo make demo).[/]")
        return 1
    if not policy_supported():
        con.print("[red]This build of ztun cannot enforce policy on HBONE inbound.[/]")
        return 1
    t0 = time.monotonic()
    own_dir = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="ztun-demo-"))
    daemons: list[Ztund] = []
    servers: dict[str, EchoServer] = {}
    conns: list[DemoConn] = []
    cluster: Cluster | None = None
    cgroup = DemoCgroup()
    ok = False
    try:
        con.rule("[bold]ztun demo: two nodes, three workloads, a ztund on each node")
        # First, before anything makes a socket or a process: the accelerator sees only
        # the sockets of processes in its cgroup.
        cgroup.open()
        cluster = Cluster("demo")
        a, b = cluster.add_nodes("node-a", "node-b")
        client = cluster.add_workload(a, "client")
        db = cluster.add_workload(a, "db")
        api = cluster.add_workload(b, "api")
        cluster.wait_reachable()
        con.print(_setup_panel(cluster))

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
            DemoConn(4, client, db, SOCKS5_PORT, 5432, True, size, socks=True),
        ]
        # node-a's same-node routes may take the kernel shortcut, where it can be had
        accel: dict[str, Any] = {}
        if cgroup.path is not None:
            accel = {"engine": {"accelerate": "auto", "accelerateCgroup": cgroup.path}}
        logs = _AccessLogs()
        for node in cluster.nodes:
            path = work / f"{node.name}.yaml"
            write_yaml(
                path,
                node_config(
                    cluster,
                    node,
                    ca_dir=str(work / "ca"),
                    state_dir=str(work / node.name),
                    policies=[str(pol_dir)],
                    forwards=forwards,
                    drain_timeout="10s",
                    extra=accel if node is a else None,
                ),
            )
            daemons.append(
                Ztund(node, path, log_path=work / f"{node.name}.log", on_log=logs.feed).start()
            )
        t_start = time.monotonic()
        for z in daemons:
            z.wait_ready(60)
        con.print(
            f"ztund ready on both nodes in {time.monotonic() - t_start:.1f} s: certificates "
            "issued, :15008 open inside every workload, policies in force"
        )
        shortcut = _Shortcut(daemons[0], cgroup.error if cgroup.path is None else "").probe()
        for c in conns:
            if c.socks and c.same_node:
                c.shortcut, c.shortcut_note = shortcut.on, shortcut.why
        if shortcut.on:
            con.print(
                f"node-a: eBPF sockmap accelerator on (the demo's cgroup "
                f"{os.path.basename(cgroup.path or '')}); same-node routes: "
                + ", ".join(shortcut.routes)
            )
        else:
            con.print(f"[yellow]node-a: kernel shortcut unavailable: {shortcut.why}[/]")
        servers = {
            "api": EchoServer(api.listen(8080), timeout=TRAFFIC_TIMEOUT),
            "db": EchoServer(db.listen(5432), timeout=TRAFFIC_TIMEOUT),
        }
        con.print(PATH_LEGEND)

        threads = [threading.Thread(target=_drive, args=(c,), daemon=True) for c in conns]
        t_traffic = time.monotonic()
        with (
            Live(_conn_table(conns), console=con, refresh_per_second=8) as live,
            _MetricsPoller(daemons) as poller,
        ):
            for th in threads:
                th.start()
            deadline = t_traffic + TRAFFIC_TIMEOUT
            apps_done: float | None = None
            while True:
                poller.apply(conns)
                logs.apply(conns)
                live.update(_conn_table(conns))
                now = time.monotonic()
                if apps_done is None and all(not th.is_alive() for th in threads):
                    apps_done = now
                if apps_done is not None and (
                    all(c.logged for c in conns) or now > apps_done + LOG_GRACE
                ):
                    break
                if now > deadline:
                    break
                time.sleep(0.1)
            logs.apply(conns)
            live.update(_conn_table(conns))
        con.print()
        traffic_s = time.monotonic() - t_traffic
        for c in conns:
            good, line = _verdict(c)
            con.print(f"[green]✓[/] {line}" if good else f"[bold red]✗ {line}[/]")

        texts = {z.node.name: z.metrics_text() for z in daemons}
        mt = Table(
            title="metrics: istio_tcp_* scraped from each ztund's /metrics",
            title_justify="left",
            title_style="bold",
            caption="received: client → server bytes, sent: server → client; "
            "flags: response_flags of the closes;\nsecurity: connection_security_policy "
            "(unknown for a same-node route: no certificate exchanged)",
            caption_justify="left",
        )
        mt.add_column("source → destination")
        mt.add_column("node (reporter)")
        mt.add_column("security")
        for col in ("opened", "closed", "failed", "received", "sent"):
            mt.add_column(col, justify="right")
        mt.add_column("flags")
        order = [(c.src.name, c.dst.name, _security(_series(c)[0][2])) for c in conns]
        for row in _metrics_rows(texts, order):
            mt.add_row(*row)
        con.print(mt)
        shortcut.scrape(texts[shortcut.daemon.node.name], client.key)
        con.print(shortcut.line(conns))

        problems = _check(conns, texts, servers, shortcut)
        for p in problems:
            con.print(f"[bold red]✗ {p}[/]")
        if not problems:
            allowed = sum(1 for c in conns if c.expect_allowed)
            denied = len(conns) - allowed
            n_direct = sum(1 for c in conns if c.direct)
            how = f"{n_direct} by the kernel shortcut" if n_direct else "all over HBONE"
            con.print(
                f"[bold green]✓ as expected: {allowed} allowed and verified ({how}), "
                f"{denied} denied, metrics match the bytes "
                f"(traffic {traffic_s:.1f} s)[/]"
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
        for s in servers.values():
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
        try:
            cgroup.close()
        except OSError as e:
            con.print(f"[red]cleanup: cgroup: {e}[/]")
            ok = False
        if own_dir and ok:
            shutil.rmtree(work, ignore_errors=True)
        elif daemons:
            con.print(f"configs and daemon logs kept in {work}")
        if codes:
            con.print(
                "ztund drained and exited (SIGTERM): "
                + ", ".join(f"{n} → {c}" for n, c in codes)
                + "; namespaces"
                + (" and cgroup" if cgroup.error == "" else "")
                + f" removed; {time.monotonic() - t0:.1f} s in all"
            )
        if any(c != 0 for _, c in codes):
            ok = False
    return 0 if ok else 1


def _series(c: DemoConn) -> list[tuple[str, str, str]]:
    """The (node, reporter, connection_security_policy) series a connection is counted in:
    both sides over HBONE; a same-node route on the source's node only, never mTLS."""
    if c.direct:
        return [(c.src.node.name, "source", "unknown")]
    return [
        (c.src.node.name, "source", "mutual_tls"),
        (c.dst.node.name, "destination", "mutual_tls"),
    ]


def _check(
    conns: list[DemoConn],
    texts: dict[str, str],
    servers: dict[str, EchoServer],
    shortcut: _Shortcut | None = None,
) -> list[str]:
    """Everything the demo claims, checked: outcomes, access logs, metrics, the apps."""
    problems = []
    # What each series should hold: connections closed (by their final flags) and bytes.
    want: dict[tuple[str, str, str, str, str, str], list[int]] = {}
    for c in conns:
        good, line = _verdict(c)
        if not good:
            problems.append(f"connection {line}")
            continue
        flags = "-" if c.expect_allowed else "DENY"
        nbytes = c.size if c.expect_allowed else 0
        for node, reporter, security in _series(c):
            w = want.setdefault((node, reporter, security, c.src.name, c.dst.name, flags), [0, 0])
            w[0] += 1
            w[1] += nbytes
    # Both reporters count each HBONE connection, under its final flags, with its bytes.
    for (node, reporter, security, src, dst, flags), (n, nbytes) in want.items():
        pair = {
            "reporter": reporter,
            "source_workload": src,
            "destination_workload": dst,
            "connection_security_policy": security,
        }
        closed = metric_value(
            texts[node], "istio_tcp_connections_closed_total", response_flags=flags, **pair
        )
        got = metric_value(texts[node], "istio_tcp_received_bytes_total", **pair)
        sent = metric_value(texts[node], "istio_tcp_sent_bytes_total", **pair)
        if closed != n or got != nbytes or sent != nbytes:
            problems.append(
                f"{src} → {dst}: {node} reporter={reporter} security={security}: "
                f"closed{{flags={flags}}}={closed:.0f} received={got:.0f} sent={sent:.0f}, "
                f"expected {n}, {nbytes} and {nbytes}"
            )
    # A same-node route is no connection of the destination's ztund, and never mTLS.
    for c in conns:
        if not c.direct:
            continue
        other = metric_value(
            texts[c.src.node.name],
            "istio_tcp_connections_opened_total",
            source_workload=c.src.name,
            destination_workload=c.dst.name,
            reporter="destination",
        )
        mtls_n = sum(1 for d in conns if (d.src, d.dst) == (c.src, c.dst) and not d.direct)
        if other != mtls_n:
            problems.append(
                f"connection {c.n}: {c.dst.key}'s side counted {other:.0f} connections from "
                f"{c.src.key}, expected {mtls_n} (the HBONE ones only)"
            )
    if shortcut is not None:
        problems += shortcut.check(conns)
    # The denied connection never reached db's app: db accepted the allowed ones only.
    db_conns = sum(1 for c in conns if c.dst.name == "db" and c.expect_allowed)
    if "db" in servers and servers["db"].accepted != db_conns:
        problems.append(
            f"demo/db's app accepted {servers['db'].accepted} connections, expected {db_conns}"
        )
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ztun.demo [--size MiB]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ztun.demo", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--size", type=int, default=128, help="MiB sent each way per connection (default 128)"
    )
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
