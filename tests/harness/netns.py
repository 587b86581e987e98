"""Test nodes as network namespaces (pyroute2), joined by veth links.

Two nodes are joined by one veth pair; three or more by veths into a bridge that lives in
its own hub namespace. Node ``i`` (1-based) gets 198.18.0.i/24 and fd00:198:18::i/64 on its
``zt0`` interface (IPv6 without duplicate address detection, so it is usable at once) and
``lo`` up. Namespace names are ``ztt-<pid hex>-<counter>...``: unique per process and per
test, so parallel runs never collide, and :func:`cleanup_stale` can remove what a killed run
left (its pid is gone).

Code runs inside a node on a thread that entered the namespace with setns(CLONE_NEWNET)
(ctypes: Python 3.11 has no os.setns). A socket keeps the namespace it was created in, so
``node.socket()``/``node.listen()``/``node.connect()`` return ordinary sockets usable from any
thread. ``node.popen()`` forks from such a thread, so the child starts inside the namespace
without ``ip netns exec`` (which remounts /sys and hides cgroup2 and bpffs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
Addr = tuple[str, int]

PREFIX = "ztt-"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02
SUBNET4 = "198.18.0.{}"
SUBNET6 = "fd00:198:18::{}"
IFNAME = "zt0"

_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count(1)
_counter_lock = threading.Lock()


def unique_name(tag: str = "") -> str:
    """``ztt-<pid hex>-<n>[-tag]``: unique within this process, and across processes."""
    with _counter_lock:
        n = next(_counter)
    return f"{PREFIX}{os.getpid():x}-{n}" + (f"-{tag}" if tag else "")


def owner_pid(name: str) -> int | None:
    """The pid encoded in a ``ztt-<pid hex>-...`` name, or None if it is not one of ours."""
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX) :].split("-", 1)[0], 16)
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setns_net(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({path}): {os.strerror(e)}")
    finally:
        os.close(fd)


def ns_inode(path: str) -> int:
    return os.stat(path).st_ino


class NodeThread:
    """A function running on its own thread inside a node; ``join()`` returns its result."""

    def __init__(
        self, path: str, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]
    ):
        self._fut: Future[Any] = Future()

        def body() -> None:
            try:
                setns_net(path)
                self._fut.set_result(fn(*args, **kw))
            except BaseException as e:
                self._fut.set_exception(e)

        self.thread = threading.Thread(target=body, daemon=True, name=f"netns-{fn.__name__}")
        self.thread.start()

    def join(self, timeout: float | None = 60.0) -> Any:
        return self._fut.result(timeout)

    def done(self) -> bool:
        return self._fut.done()


class Node:
    """One test node: a network namespace with ``lo`` and ``zt0`` up and addresses."""

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.ip4 = SUBNET4.format(index)
        self.ip6 = SUBNET6.format(index)
        self.ifname = IFNAME
        self.path = os.path.join(NETNS_DIR, name)
        self._exec: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[Any]] = []
        self._socks: list[socket.socket] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"Node({self.name!r}, ip4={self.ip4}, ip6={self.ip6})"

    @property
    def inode(self) -> int:
        """Inode of the namespace (compare with os.stat('/proc/<pid>/ns/net').st_ino)."""
        return ns_inode(self.path)

    def addr(self, family: int = socket.AF_INET) -> str:
        return self.ip6 if family == socket.AF_INET6 else self.ip4

    # ---------------------------------------------------------------- running code inside
    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if self._exec is None:
                self._exec = ThreadPoolExecutor(
                    max_workers=1,
                    thread_name_prefix=f"ns-{self.name}",
                    initializer=setns_net,
                    initargs=(self.path,),
                )
            return self._exec

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a short ``fn`` on this node's own (persistent, setns'd) thread."""
        return self._executor().submit(fn, *args, **kw).result(60)

    def run_in(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0, **kw: Any) -> T:
        """Run ``fn(*args, **kw)`` on a fresh thread inside the node; return its result."""
        return NodeThread(self.path, fn, args, kw).join(timeout)  # type: ignore[no-any-return]

    def spawn(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> NodeThread:
        """Start ``fn`` on a background thread inside the node (``.join()`` for the result)."""
        return NodeThread(self.path, fn, args, kw)

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A socket in this node's namespace (closed at teardown if still open)."""
        s = self.call(socket.socket, family, type, proto)
        with self._lock:
            self._socks.append(s)
        return s

    def listen(
        self,
        host: str | None = None,
        port: int = 0,
        *,
        family: int | None = None,
        backlog: int = 1024,
    ) -> socket.socket:
        """A listening TCP socket in the node (default: its IPv4 address, any port)."""
        if host is None:
            host = self.ip6 if family == socket.AF_INET6 else self.ip4
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = self.socket(fam)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
        return s

    def connect(self, addr: Addr, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from inside the node (usable as an integrity ``connect``)."""
        fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        s = self.socket(fam)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except OSError:
            s.close()
            raise
        return s

    def argv(self, argv: Sequence[str]) -> list[str]:
        """A command line that runs ``argv`` inside the node via nsenter (keeps /sys intact)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside the node; it is killed at teardown if still running."""
        p: subprocess.Popen[Any] = self.call(subprocess.Popen, list(argv), **kw)
        with self._lock:
            self._procs.append(p)
        return p

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node to completion; text stdout/stderr captured."""
        p = self.popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        cp = subprocess.CompletedProcess(list(argv), p.returncode, out, err)
        if check:
            cp.check_returncode()
        return cp

    def close(self) -> None:
        """Kill processes started here, close sockets made here, stop the node's thread."""
        with self._lock:
            self._closed = True
            procs, self._procs = self._procs, []
            socks, self._socks = self._socks, []
            ex, self._exec = self._exec, None
        for p in procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for s in socks:
            s.close()
        if ex is not None:
            ex.shutdown(wait=True)


def _remove_netns(name: str) -> None:
    from pyroute2 import netns

    try:
        netns.remove(name)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    except Exception as e:  # pyroute2 may wrap errors
        if os.path.exists(os.path.join(NETNS_DIR, name)):
            raise RuntimeError(f"cannot remove netns {name}: {e!r}") from e


class Topology:
    """``n`` nodes on one IPv4 + IPv6 subnet. A context manager; ``close()`` removes it all."""

    def __init__(self, n: int = 2, tag: str = "") -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        if n > 250:
            raise ValueError("at most 250 nodes on one subnet")
        self.base = unique_name(tag)
        self.nodes: list[Node] = []
        self.hub: str | None = None
        self._created: list[str] = []
        try:
            self._build(n)
        except BaseException:
            self.close()
            raise

    def _build(self, n: int) -> None:
        from pyroute2 import NetNS, netns

        names = [f"{self.base}-{chr(ord('a') + i) if n <= 26 else i}" for i in range(n)]
        for i, name in enumerate(names):
            netns.create(name)
            self._created.append(name)
            self.nodes.append(Node(name, i + 1))
        if n == 2:
            with NetNS(names[0]) as ns:
                ns.link(
                    "add",
                    ifname=IFNAME,
                    kind="veth",
                    peer={"ifname": IFNAME, "net_ns_fd": names[1]},
                )
        elif n > 2:
            self.hub = f"{self.base}-hub"
            netns.create(self.hub)
            self._created.append(self.hub)
            with NetNS(self.hub) as hub:
                hub.link("add", ifname="br0", kind="bridge")
                br = hub.link_lookup(ifname="br0")[0]
                hub.link("set", index=br, state="up")
                for i, name in enumerate(names):
                    port = f"p{i + 1}"
                    hub.link(
                        "add", ifname=port, kind="veth", peer={"ifname": IFNAME, "net_ns_fd": name}
                    )
                    idx = hub.link_lookup(ifname=port)[0]
                    hub.link("set", index=idx, master=br, state="up")
        for node in self.nodes:
            with NetNS(node.name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                if n == 1:
                    continue
                idx = ns.link_lookup(ifname=IFNAME)[0]
                ns.addr("add", index=idx, address=node.ip4, prefixlen=24)
                ns.addr("add", index=idx, address=node.ip6, prefixlen=64, flags=IFA_F_NODAD)
                ns.link("set", index=idx, state="up")
        if n > 1:
            self._wait_carrier()

    def _wait_carrier(self, timeout: float = 5.0) -> None:
        from pyroute2 import NetNS

        end = time.monotonic() + timeout
        for node in self.nodes:
            with NetNS(node.name) as ns:
                while True:
                    link = ns.get_links(ns.link_lookup(ifname=IFNAME)[0])[0]
                    if link.get_attr("IFLA_OPERSTATE") == "UP" or time.monotonic() > end:
                        break
                    time.sleep(0.01)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        errors = []
        for name in reversed(self._created):
            try:
                _remove_netns(name)
            except Exception as e:
                errors.append(e)
        self._created = []
        if errors:
            raise RuntimeError(f"netns cleanup failed: {errors}")

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)


def list_ours() -> list[str]:
    """Namespaces named like ours (ztt-*)."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def cleanup_stale() -> list[str]:
    """Remove ``ztt-*`` namespaces (and root-namespace ``ztt*`` links) of dead processes."""
    removed = []
    for name in list_ours():
        pid = owner_pid(name)
        if pid is not None and not pid_alive(pid):
            with contextlib.suppress(Exception):
                _remove_netns(name)
                removed.append(name)
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for link in ipr.get_links():
                ifname = link.get_attr("IFLA_IFNAME") or ""
                if ifname.startswith("ztt"):
                    pid = owner_pid(PREFIX + ifname[3:].lstrip("-"))
                    if pid is not None and not pid_alive(pid):
                        ipr.link("del", index=link["index"])
                        removed.append(ifname)
    except Exception as e:
        log.warning("stale link cleanup: %r", e)
    if removed:
        log.warning("removed stale test namespaces/links: %s", removed)
    return removed
