"""In-pod sockets: run code inside a workload's network namespace, as ztunnel does.

ztunnel's in-pod mode serves each pod from inside the pod's own network namespace: the
pod's 15008 and its outbound sockets live there, so the pod's traffic leaves with the
pod's address and no iptables rule on the node is needed. Linux ties the network
namespace to the *thread*, so the trick is to enter the namespace on a short-lived helper
thread (``setns(fd, CLONE_NEWNET)``), make the sockets there, and hand them back: a
socket keeps the namespace it was created in, whichever thread uses it afterwards.

ztund uses it two ways (docs/daemon.md):

* :func:`run_in_netns` runs a function on such a thread. ztund starts each workload's
  engine from one: the engine's worker threads are created by that thread and inherit its
  namespace, so the connections the engine dials (HBONE to peers, the last hop to the
  app) originate inside the workload; listeners added from such a thread are bound there.
* :func:`listen_in_netns` returns a listening socket created inside a namespace, for an
  engine that adopts a listening fd (``Engine.add_listener(fd=...)``).

Python 3.11 has no ``os.setns``: it is called through ctypes. A namespace is named by a
path (``/run/netns/<name>`` as ``ip netns`` makes them, or ``/proc/<pid>/ns/net``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ztun.errors import ZtunError

__all__ = [
    "CLONE_NEWNET",
    "NetnsError",
    "check_netns",
    "current_netns_inode",
    "listen_in_netns",
    "netns_inode",
    "run_in_netns",
    "setns_net",
]

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# How long a helper thread may take: creating sockets or starting an engine takes
# milliseconds; more than this means something is stuck (a wedged namespace mount).
DEFAULT_TIMEOUT = 30.0

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(ZtunError, OSError):
    """A network namespace that cannot be entered (missing, not a netns, no privilege)."""


def setns_net(path: str | os.PathLike[str]) -> None:
    """Move the *calling thread* into the network namespace at ``path``."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(e.errno, f"network namespace {p}: {e.strerror}") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            hint = " (not a network namespace?)" if err == errno.EINVAL else ""
            raise NetnsError(err, f"setns({p}): {os.strerror(err)}{hint}")
    finally:
        os.close(fd)


def netns_inode(path: str | os.PathLike[str]) -> int:
    """The namespace's inode number (equal for two paths naming the same namespace)."""
    return os.stat(path).st_ino


def current_netns_inode() -> int:
    """Inode of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def check_netns(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a usable network namespace, or None when it is.

    Cheap (no thread): exists, and is an nsfs file (a bind-mounted namespace or a
    ``/proc/<pid>/ns/net`` link target). Entering it may still need privileges.
    """
    p = os.fspath(path)
    try:
        here = os.stat(p)
        nsfs = os.stat("/proc/self/ns/net")
    except FileNotFoundError:
        return "no such network namespace"
    except OSError as e:
        return e.strerror or str(e)
    # Every namespace file lives on the one nsfs device: compare with our own.
    if here.st_dev != nsfs.st_dev:
        return "not a network namespace file (not on nsfs)"
    return None


def run_in_netns(
    path: str | os.PathLike[str],
    fn: Callable[..., T],
    *args: Any,
    timeout: float | None = DEFAULT_TIMEOUT,
    name: str = "ztun-netns",
    **kw: Any,
) -> T:
    """Run ``fn(*args, **kw)`` on a new thread inside the namespace; return its result.

    The thread ends when ``fn`` returns; threads ``fn`` starts stay in the namespace.
    Exceptions raised by ``fn`` (or by entering the namespace) are re-raised here.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns_net(path)
            result.append(fn(*args, **kw))
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise NetnsError(errno.ETIMEDOUT, f"{os.fspath(path)}: {name} did not finish in time")
    if error:
        raise error[0]
    return result[0]


def listen_in_netns(
    path: str | os.PathLike[str],
    address: tuple[str, int],
    *,
    backlog: int = socket.SOMAXCONN,
    reuse_port: bool = False,
) -> socket.socket:
    """A listening TCP socket bound to ``address`` inside the namespace at ``path``."""

    def make() -> socket.socket:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(backlog)
        except BaseException:
            s.close()
            raise
        return s

    return run_in_netns(path, make, name="ztun-netns-listen")
