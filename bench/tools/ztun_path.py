#!/usr/bin/env python3
"""One end of a ztun benchmark path, in its own process (so its CPU time and memory are
measured alone). Prints ``READY <port>`` once listening on 127.0.0.1, then serves until
stdin closes or SIGTERM. A line ``stats`` on stdin prints the engine's counters as one JSON
line (the benchmarks read handshake and resumption counts that way).

  ztun_path.py forward     --to H:P
  ztun_path.py mtls-client --to H:P --expect ID --cert C --key K --ca CA [--no-resume]
  ztun_path.py mtls-server --to H:P             --cert C --key K --ca CA [--no-resume]
  ztun_path.py hbone-out   --to H:P --target H:P --expect ID --cert C --key K --ca CA
  ztun_path.py hbone-in    --workload IP        --cert C --key K --ca CA

Every role uses the public ``ztun.Tunnel`` API: ``forward``, ``forward(expect=...)``,
``listen``, ``forward(expect=..., via=HBONE hop)`` (HTTP/2 CONNECT to ``--target`` over
pooled mTLS) and ``serve(workloads=..., deliver=False)`` (the HBONE server dials the CONNECT
authority itself, as a node proxy does). Exit code 3: ztun is not importable.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

TRUST_DOMAIN = "cluster.local"


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "role", choices=["forward", "mtls-client", "mtls-server", "hbone-out", "hbone-in"]
    )
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--to")
    ap.add_argument("--target")
    ap.add_argument("--expect")
    ap.add_argument("--workload", default="127.0.0.1")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--ca")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    try:
        from ztun import Svid, TrustBundle, Tunnel
    except ImportError as e:
        print(f"UNAVAILABLE {e}", flush=True)
        return 3

    listen = _addr(a.listen)
    if a.role == "forward":
        t = Tunnel(workers=a.workers, access_log=False).start()
        port = t.forward(listen=listen, to=_addr(a.to)).address[1]
    else:
        t = Tunnel(
            identity=Svid.from_files(a.cert, a.key),
            trust=TrustBundle.from_file(TRUST_DOMAIN, a.ca),
            workers=a.workers,
            resumption=not a.no_resume,
            access_log=False,
        ).start()
        if a.role == "mtls-client":
            port = t.forward(listen=listen, to=_addr(a.to), expect=[a.expect]).address[1]
        elif a.role == "mtls-server":
            port = t.listen(listen, _addr(a.to)).address[1]
        elif a.role == "hbone-out":
            fwd = t.forward(listen=listen, to=_addr(a.target), expect=[a.expect], via=_addr(a.to))
            port = fwd.address[1]
        else:
            port = t.serve(listen, workloads=[a.workload], deliver=False).address[1]
    stats, closer = (lambda: _tunnel_stats(t)), t.close

    print("READY", port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(stats(), default=str), flush=True)
        stop.set()

    threading.Thread(target=commands, daemon=True).start()
    stop.wait()
    closer()
    return 0


def _tunnel_stats(t: Any) -> dict[str, Any]:
    s = t.stats()
    return {
        "handshakes": s.handshakes,
        "handshakes_resumed": s.handshakes_resumed,
        "connections_opened": s.connections_opened,
        "connections_failed": s.connections_failed,
        "close_reasons": s.close_reasons,
        "buffer_bytes": s.buffer_bytes,
    }


if __name__ == "__main__":
    sys.exit(main())
