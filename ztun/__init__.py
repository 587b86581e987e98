"""ztun: an embeddable zero-trust tunnel.

``from ztun import Tunnel`` gives a Python program mutual-TLS 1.3 tunnels authenticated
with SPIFFE identities and authorized by Istio-style L4 policy, carried by a C engine
that runs in its own threads without the GIL.
"""

from __future__ import annotations

import logging

from ztun._version import __version__
from ztun.ca import CaIdentitySource, CertificateAuthority
from ztun.errors import (
    BpfError,
    ConfigError,
    ConnectError,
    EngineError,
    IdentityError,
    PolicyError,
    SpiffeIdError,
    ZtunError,
)
from ztun.identity import (
    FileIdentitySource,
    IdentitySource,
    SpiffeId,
    Svid,
    TrustBundle,
    TrustDomain,
    verify_svid,
)
from ztun.rotation import IdentityManager, IdentityState, IdentityStatus
from ztun.spire import WorkloadApiSource
from ztun.tunnel import Forward, Listener, Tunnel, TunnelStats

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BpfError",
    "CaIdentitySource",
    "CertificateAuthority",
    "ConfigError",
    "ConnectError",
    "EngineError",
    "FileIdentitySource",
    "Forward",
    "IdentityError",
    "IdentityManager",
    "IdentitySource",
    "IdentityState",
    "IdentityStatus",
    "Listener",
    "PolicyError",
    "SpiffeId",
    "SpiffeIdError",
    "Svid",
    "TrustBundle",
    "TrustDomain",
    "Tunnel",
    "TunnelStats",
    "WorkloadApiSource",
    "ZtunError",
    "__version__",
    "verify_svid",
]
