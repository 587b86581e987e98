"""A ztun process for the crash test: a Tunnel and a pinned Capture of one workload, until
killed. ``python holder.py NETNS CGROUP PIN_DIR`` prints READY once capturing.

Nothing is in the mesh here (an empty directory): captured connections pass through.
"""

from __future__ import annotations

import sys
import time

from ztun import Tunnel
from ztun.capture import Capture
from ztun.netns import run_in_netns
from ztun.testing import SpiffeCA


def main(netns: str, cgroup: str, pin_dir: str) -> None:
    ca = SpiffeCA("cluster.local")
    t = Tunnel(
        identity=ca.issue_svid("spiffe://cluster.local/ns/demo/sa/held"),
        trust=ca.bundle,
        workers=1,
        access_log=False,
    )
    run_in_netns(netns, t.start)
    t.set_directory([])
    Capture(t, cgroup=cgroup, netns=netns, name="held", pin_dir=pin_dir, inbound=False)
    print("READY", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:4])
