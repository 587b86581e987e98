#!/usr/bin/env python3
"""One ztun end of the engine sockmap benchmark, in its own process (so its CPU time is
measured alone), with or without ``Tunnel(accelerate=True)``. Prints ``READY <port>`` once
listening on 127.0.0.1; a line ``stats`` on stdin prints the engine's counters as one JSON
line; stdin closed or SIGTERM ends it.

  ztun_accel_path.py forward     --to H:P                         [--accelerate]
  ztun_accel_path.py mtls-client --to H:P --expect ID --cert C --key K --ca CA [--accelerate]
  ztun_accel_path.py mtls-server --to H:P             --cert C --key K --ca CA [--accelerate]

The process accelerates on its own cgroup (the benchmark starts it inside the variant's
cgroup, with the apps). Exit code 3: ztun is not importable.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

TRUST_DOMAIN = "example.org"


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["forward", "mtls-client", "mtls-server"])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--to", required=True)
    ap.add_argument("--expect")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--ca")
    ap.add_argument("--accelerate", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    try:
        from ztun import Svid, TrustBundle, Tunnel
    except ImportError as e:
        print(f"UNAVAILABLE {e}", flush=True)
        return 3

    listen, to = _addr(a.listen), _addr(a.to)
    if a.role == "forward":
        t = Tunnel(workers=a.workers, access_log=False, accelerate=a.accelerate).start()
        port = t.forward(listen=listen, to=to).address[1]
    else:
        t = Tunnel(
            identity=Svid.from_files(a.cert, a.key),
            trust=TrustBundle.from_file(TRUST_DOMAIN, a.ca),
            workers=a.workers,
            access_log=False,
            accelerate=a.accelerate,
        ).start()
        if a.role == "mtls-client":
            port = t.forward(listen=listen, to=to, expect=[a.expect]).address[1]
        else:
            port = t.listen(listen, to).address[1]

    print("READY", port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "stats":
                s = t.stats()
                out = {
                    "bytes_sent": s.bytes_sent,
                    "bytes_received": s.bytes_received,
                    "connections_closed": s.connections_closed,
                    "bpf_pairs": s.bpf_pairs,
                    "bpf_direct_bytes": s.bpf_direct_bytes,
                    "accelerated": t.accelerated,
                }
                print(json.dumps(out), flush=True)
        stop.set()

    threading.Thread(target=commands, daemon=True).start()
    stop.wait()
    t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
