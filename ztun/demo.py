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
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztun.netns import listen_in_netns, run_in_netns

__all__ = [
    "Cluster",
    "EchoServer",
    "NodeNs",
    "WorkloadNs",
    "Ztund",
    "node_config",
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
        argv = [self.python, "-m", "ztun", "run", "--config", self.config_path,
                "--log-format", "json"]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = self.node.run(
            subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name=f"ztund-log-{self.node.name}",
                                        daemon=True)  # fmt: skip
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
