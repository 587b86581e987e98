#!/usr/bin/env python3
"""The ztun plaintext forward as a benchmark path, in its own process (so that its CPU time
is measured alone): ``ztun_forward.py --to HOST:PORT`` prints "READY <port>" and runs until
stdin closes or SIGTERM. Exit code 3: ztun.Tunnel is not importable yet."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--to", required=True)
    a = ap.parse_args()
    try:
        from ztun import Tunnel  # type: ignore[attr-defined]
    except ImportError as e:
        print(f"UNAVAILABLE {e}", flush=True)
        return 3
    lh, _, lp = a.listen.rpartition(":")
    th, _, tp = a.to.rpartition(":")
    t = Tunnel()
    t.start()
    try:
        fwd = t.forward(listen=(lh.strip("[]"), int(lp)), to=(th.strip("[]"), int(tp)))
        print("READY", fwd.address[1], flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        stop.wait()
    finally:
        t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
