"""WorkloadApiSource against a real gRPC peer: a small SPIFFE Workload API server.

The server below speaks the Workload API's FetchX509SVID stream over a unix socket with
grpcio and the protobuf stubs the ``spiffe`` package ships, serves SVIDs from our test CA,
enforces the ``workload.spiffe.io: true`` header as SPIRE does, and pushes a new
X509SVIDResponse whenever the test publishes one (what an agent does on rotation).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

if os.environ.get("CI") == "true":
    import grpc  # CI installs the spire extra: a missing package must fail, not skip
    import spiffe
else:
    grpc = pytest.importorskip("grpc")
    spiffe = pytest.importorskip("spiffe")

from spiffe._proto import workload_pb2, workload_pb2_grpc

from ztun import IdentityManager, SpiffeId, Svid, TrustBundle, verify_svid
from ztun.errors import IdentityError
from ztun.spire import WorkloadApiSource
from ztun.testing import SpiffeCA

pytestmark = pytest.mark.timeout(60)

TD = "example.org"
WEB = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
DB = SpiffeId.parse("spiffe://example.org/ns/prod/sa/db")


def der_chain(svid: Svid) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in svid.chain)


def der_key(svid: Svid) -> bytes:
    return svid.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class FakeAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    """Serves the latest published response to every stream, and each new one after."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._version = 0
        self._response: workload_pb2.X509SVIDResponse | None = None
        self.streams = 0
        self.rejected = 0

    def publish(self, response: workload_pb2.X509SVIDResponse) -> None:
        with self._cond:
            self._response = response
            self._version += 1
            self._cond.notify_all()

    def FetchX509SVID(  # noqa: N802 - gRPC method name
        self, request: workload_pb2.X509SVIDRequest, context: grpc.ServicerContext
    ) -> Iterator[workload_pb2.X509SVIDResponse]:
        if ("workload.spiffe.io", "true") not in tuple(context.invocation_metadata()):
            self.rejected += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        self.streams += 1
        seen = 0
        while context.is_active():
            with self._cond:
                self._cond.wait_for(lambda s=seen: self._version != s, timeout=0.1)
                if self._version == seen or self._response is None:
                    continue
                seen, response = self._version, self._response
            yield response


def response(
    ca: SpiffeCA, svids: list[Svid], federated: dict[str, SpiffeCA] | None = None
) -> workload_pb2.X509SVIDResponse:
    root = ca.root.public_bytes(serialization.Encoding.DER)
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(s.spiffe_id),
                x509_svid=der_chain(s),
                x509_svid_key=der_key(s),
                bundle=root,
            )
            for s in svids
        ],
        federated_bundles={
            f"spiffe://{td}": other.root.public_bytes(serialization.Encoding.DER)
            for td, other in (federated or {}).items()
        },
    )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[FakeAgent, str]]:
    sock = tmp_path / "agent.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = FakeAgent()
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        yield servicer, f"unix://{sock}"
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def ca() -> SpiffeCA:
    return SpiffeCA(TD, intermediate=True)


def wait_for(pred: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_fetches_svids_and_bundles(agent: tuple[FakeAgent, str], ca: SpiffeCA) -> None:
    server, endpoint = agent
    other = SpiffeCA("other.test")
    web, db = ca.issue_svid(WEB), ca.issue_svid(DB)
    server.publish(response(ca, [web, db], federated={"other.test": other}))
    src = WorkloadApiSource(endpoint, timeout=5)
    try:
        assert server.streams == 1 and server.rejected == 0  # the client sent the header
        assert src.default_id == WEB
        got = src.fetch(WEB)
        assert got.serial == web.serial and len(got.chain) == 2  # intermediate carried
        assert src.fetch(str(DB)).serial == db.serial
        bundle = src.bundle()
        assert bundle.trust_domains == ["example.org", "other.test"]
        assert bundle.roots("other.test") == [other.root]
        assert verify_svid(got, bundle, trust_domain=TD) == WEB
        assert src.poll() is True and src.poll() is False
        with pytest.raises(IdentityError, match=r"has no SVID for .*/sa/api \(it offers: "):
            src.fetch("spiffe://example.org/ns/prod/sa/api")
    finally:
        src.close()
    src.close()  # idempotent


def test_pushed_rotation_reaches_the_manager(agent: tuple[FakeAgent, str], ca: SpiffeCA) -> None:
    server, endpoint = agent
    server.publish(response(ca, [ca.issue_svid(WEB)]))
    updates: list[str] = []
    src = WorkloadApiSource(endpoint.removeprefix("unix://"), timeout=5)  # plain path accepted
    with IdentityManager(
        src, [WEB], on_update=lambda s, v, b: updates.append(v.serial), poll_interval=0.05
    ) as mgr:
        assert len(updates) == 1
        for _ in range(3):
            new = ca.issue_svid(WEB)
            server.publish(response(ca, [new]))
            assert wait_for(lambda n=new: updates[-1] == n.serial), updates  # type: ignore[misc]
            assert mgr.current(WEB).serial == new.serial
    assert len(updates) == 4


def test_bad_update_keeps_previous_then_recovers(
    agent: tuple[FakeAgent, str], ca: SpiffeCA, caplog: pytest.LogCaptureFixture
) -> None:
    server, endpoint = agent
    first = ca.issue_svid(WEB)
    server.publish(response(ca, [first]))
    src = WorkloadApiSource(endpoint, timeout=5)
    try:
        assert src.poll() is True
        caplog.set_level(logging.WARNING, logger="ztun.spire")
        # A CA certificate posing as an SVID: refused (by spiffe's parser or ours).
        bad = ca.issue_bad("leaf_is_ca", WEB)
        bad_resp = workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=str(WEB),
                    x509_svid=b"".join(
                        c.public_bytes(serialization.Encoding.DER) for c in bad.chain
                    ),
                    x509_svid_key=bad.private_key.private_bytes(
                        serialization.Encoding.DER,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                    bundle=ca.root.public_bytes(serialization.Encoding.DER),
                )
            ]
        )
        server.publish(bad_resp)
        assert wait_for(
            lambda: any(
                r.levelno == logging.WARNING and "Workload API" in r.getMessage()
                for r in caplog.records
            )
        )
        warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert "CA" in warning or "ignoring update" in warning or "stream failed" in warning
        assert src.poll() is False
        assert src.fetch(WEB).serial == first.serial
        # The agent recovers; the source follows (reopening the stream if it had to).
        good = ca.issue_svid(WEB)
        server.publish(response(ca, [good]))
        assert wait_for(lambda: src.poll() or src.fetch(WEB).serial == good.serial)
        assert src.fetch(WEB).serial == good.serial
    finally:
        src.close()


def test_no_agent_or_silent_agent(agent: tuple[FakeAgent, str], tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match=r"does not exist"):
        WorkloadApiSource(f"unix://{tmp_path}/nothing.sock", timeout=1)
    _, endpoint = agent  # nothing published: the stream stays silent
    t0 = time.monotonic()
    with pytest.raises(IdentityError, match=r"no X.509 SVID within 0.5 s"):
        WorkloadApiSource(endpoint, timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_bundle_conversion_is_a_ztun_bundle(agent: tuple[FakeAgent, str], ca: SpiffeCA) -> None:
    server, endpoint = agent
    server.publish(response(ca, [ca.issue_svid(WEB)]))
    src = WorkloadApiSource(endpoint, timeout=5)
    try:
        assert isinstance(src.bundle(), TrustBundle)
        assert src.bundle() == ca.bundle
    finally:
        src.close()
