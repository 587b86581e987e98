"""SVIDs from the SPIFFE Workload API (a SPIRE agent), through the ``spiffe`` package.

Optional: ``pip install 'ztun[spire]'``. This module imports without ``spiffe``; only
constructing :class:`WorkloadApiSource` needs it. The agent streams X.509 contexts (SVIDs
and bundles, federated ones included) and pushes a new one on every rotation; the source
keeps the latest and reports through :meth:`poll` that something changed, so the
:class:`~ztun.rotation.IdentityManager` picks it up within a poll interval.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from cryptography import x509

from ztun import _x509
from ztun.errors import IdentityError
from ztun.identity import SpiffeId, Svid, TrustBundle

if TYPE_CHECKING:
    from spiffe import WorkloadApiClient
    from spiffe.workloadapi.workload_api_client import StreamCancelHandler
    from spiffe.workloadapi.x509_context import X509Context

__all__ = ["WorkloadApiSource"]

log = logging.getLogger(__name__)

# After the spiffe client gives up on a stream (it does on unexpected errors), reopen it
# after this long, doubling up to the cap.
_RESTART_INITIAL = 1.0
_RESTART_MAX = 30.0


def _endpoint(socket_path: str | None) -> str | None:
    if socket_path is None:
        return None  # the client reads SPIFFE_ENDPOINT_SOCKET
    if socket_path.startswith("/"):
        return "unix://" + socket_path
    return socket_path


class WorkloadApiSource:
    """An :class:`~ztun.identity.IdentitySource` backed by the SPIFFE Workload API.

    ``socket_path``: ``unix:///run/spire/agent.sock``, a plain absolute path, or None for
    ``$SPIFFE_ENDPOINT_SOCKET``. The constructor waits up to ``timeout`` seconds for the
    first X.509 context and raises IdentityError if none comes.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float = 10.0) -> None:
        try:
            from spiffe import WorkloadApiClient
        except ImportError as e:
            raise IdentityError(
                "the Workload API source needs the 'spiffe' package: pip install 'ztun[spire]'"
            ) from e
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._svids: dict[SpiffeId, Svid] = {}
        self._default: SpiffeId | None = None
        self._bundle = TrustBundle()
        self._changed = False
        self._closed = False
        self._last_error: str | None = None
        self._restart_delay = _RESTART_INITIAL
        self._timer: threading.Timer | None = None
        try:
            self._client: WorkloadApiClient = WorkloadApiClient(_endpoint(socket_path))
        except Exception as e:
            raise IdentityError(f"Workload API: {e}") from None
        self.endpoint = self._client.get_spiffe_endpoint_socket()
        self._handle: StreamCancelHandler | None = None
        self._open_stream()
        if not self._first.wait(timeout):
            err = self._last_error or "no answer"
            self.close()
            raise IdentityError(
                f"Workload API at {self.endpoint}: no X.509 SVID within {timeout:g} s ({err})"
            )

    # -- stream -----------------------------------------------------------------------------

    def _open_stream(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._handle = self._client.stream_x509_contexts(
                on_success=self._on_context, on_error=self._on_error, retry_connect=True
            )

    def _on_context(self, ctx: X509Context) -> None:
        # Runs on the spiffe client's thread: never let an exception escape (it would end
        # the stream), keep the previous material when the new one is unusable.
        try:
            svids: dict[SpiffeId, Svid] = {}
            for s in ctx.x509_svids:
                key = _x509.as_private_key(s.private_key)
                svid = Svid(list(s.cert_chain), key)
                svids.setdefault(svid.spiffe_id, svid)
            roots: dict[str, list[x509.Certificate]] = {
                str(b.trust_domain): list(b.x509_authorities) for b in ctx.x509_bundle_set.bundles
            }
            bundle = TrustBundle(roots)
            default = Svid(
                list(ctx.default_svid.cert_chain),
                _x509.as_private_key(ctx.default_svid.private_key),
            ).spiffe_id
        except Exception as e:
            self._last_error = f"unusable X.509 context: {e}"
            log.warning("Workload API at %s: ignoring update: %s", self.endpoint, e)
            return
        with self._lock:
            self._svids = svids
            self._bundle = bundle
            self._default = default
            self._changed = True
            self._restart_delay = _RESTART_INITIAL
        log.info(
            "Workload API at %s: %s",
            self.endpoint,
            ", ".join(f"{sid} serial {s.serial}" for sid, s in svids.items()),
        )
        self._first.set()

    def _on_error(self, err: Exception) -> None:
        self._last_error = str(err)
        with self._lock:
            if self._closed:
                return
            delay = self._restart_delay
            self._restart_delay = min(delay * 2, _RESTART_MAX)
            self._timer = threading.Timer(delay, self._open_stream)
            self._timer.daemon = True
            self._timer.start()
        log.warning(
            "Workload API at %s: stream failed: %s; reopening in %.0f s", self.endpoint, err, delay
        )

    # -- IdentitySource ---------------------------------------------------------------------

    @property
    def default_id(self) -> SpiffeId | None:
        """The Workload API's default identity (its first SVID)."""
        with self._lock:
            return self._default

    def fetch(self, spiffe_id: SpiffeId | str) -> Svid:
        sid = SpiffeId.parse(spiffe_id)
        with self._lock:
            svid = self._svids.get(sid)
            have = ", ".join(str(i) for i in self._svids) or "none"
        if svid is None:
            raise IdentityError(
                f"Workload API at {self.endpoint} has no SVID for {sid} (it offers: {have})"
            )
        return svid

    def bundle(self) -> TrustBundle:
        with self._lock:
            return self._bundle

    def poll(self) -> bool:
        with self._lock:
            changed, self._changed = self._changed, False
        return changed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handle, timer = self._handle, self._timer
        if timer is not None:
            timer.cancel()
        if handle is not None:
            handle.cancel()
        self._client.close()

    def __repr__(self) -> str:
        return f"WorkloadApiSource({self.endpoint!r})"
