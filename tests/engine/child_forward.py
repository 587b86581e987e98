"""A plaintext forward in its own process, for tests that need the engine alone in a process
(file descriptor limits, crashes that must not take pytest down).

    python child_forward.py --to HOST:PORT [--nofile N] [--workers N]

prints ``READY <port> <pid>``; then reads commands from stdin, one per line:
``stats`` prints the stats as one JSON line, ``fds`` prints the number of open fds,
``quit`` (or EOF) closes the tunnel and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--to", required=True)
    ap.add_argument("--nofile", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    if a.nofile:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (a.nofile, hard))
    from ztun import Tunnel

    host, _, port = a.to.rpartition(":")
    t = Tunnel(workers=a.workers, access_log=False).start()
    fwd = t.forward(listen=("127.0.0.1", 0), to=(host.strip("[]"), int(port)))
    print("READY", fwd.address[1], os.getpid(), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            print(json.dumps(dataclasses.asdict(t.stats())), flush=True)
        elif cmd == "fds":
            print(len(os.listdir("/proc/self/fd")) - 1, flush=True)
        elif cmd == "quit":
            break
    t.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
