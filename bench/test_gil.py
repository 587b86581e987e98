"""The GIL benchmark of issue 2: a Python thread spinning in pure-Python code while the relay
runs leaves relay throughput at >= 0.8x of what it is without it.

The relay must live in the spinning thread's process for the GIL to matter, so the relays
here run inside the benchmark process: ``ztun`` (a Tunnel forward: C worker threads that
never take the GIL) and ``asyncio`` (the plain asyncio relay of bench/tools/pyrelay.py on
a thread: every byte passes through the GIL). ``direct`` (no relay, the spinner alone) is
the control: on a small machine the spinner also takes a core away from everyone, and that
share of the slowdown is not the GIL's. The client and the destination are zload processes.

Each round measures every relay twice quiet and twice spinning, alternating (which comes
first alternates per round); the figure is ``spin_ratio`` = median Gbit/s spinning / median
Gbit/s quiet, and ``spins_per_s`` shows the spinner really ran. On a 2-core machine the
spinner takes a core the relay's workers, the client and the server would otherwise use:
compare with the ``direct`` row.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import KNOBS, zload_client

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))

RELAYS = ("direct", "ztun", "asyncio")


class Spinner:
    """A thread spinning in pure Python (holds the GIL but for the switch interval)."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="spinner", daemon=True)

    def _run(self) -> None:
        n = 0
        stop = self._stop
        while not stop.is_set():
            for _ in range(1000):
                n += 1
        self.count = n

    def __enter__(self) -> Spinner:
        self.t0 = time.monotonic()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.rate = self.count / (time.monotonic() - self.t0)


@pytest.fixture(scope="module")
def inproc_relays(dest_server: tuple[str, int]) -> Iterator[dict[str, tuple[str, int]]]:
    """Dial addresses of the relays running in this process."""
    from pyrelay import Inbound

    from ztun import Tunnel

    t = Tunnel(access_log=False).start()
    fwd = t.forward(listen=("127.0.0.1", 0), to=dest_server)

    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    def run_loop() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            srv = await loop.create_server(
                lambda: Inbound(dest_server, None, None), "127.0.0.1", 0, backlog=1024
            )
            box["addr"] = srv.sockets[0].getsockname()[:2]
            box["srv"] = srv
            started.set()

        loop.run_until_complete(start())
        loop.run_forever()

    th = threading.Thread(target=run_loop, name="asyncio-relay", daemon=True)
    th.start()
    assert started.wait(10)
    try:
        yield {"direct": dest_server, "ztun": fwd.address, "asyncio": box["addr"]}  # type: ignore[dict-item]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        t.close()


def _tput(dial: tuple[str, int], nbytes: int) -> float:
    return float(zload_client(dial, "tput", nbytes, 1 << 20)["gbps"])


PAIRS = [(r, name) for r in range(KNOBS.rounds) for name in RELAYS]


@pytest.mark.parametrize("rnd,relay", PAIRS, ids=[f"r{r}-{n}" for r, n in PAIRS])
def test_gil_spinner(benchmark, inproc_relays, rnd: int, relay: str, knobs) -> None:
    dial = inproc_relays[relay]
    nbytes = knobs.tput_bytes // 4
    _tput(dial, 32 << 20)  # warm
    quiet_runs: list[float] = []
    spin_runs: list[float] = []
    spins: list[float] = []

    def quiet() -> None:
        quiet_runs.append(_tput(dial, nbytes))

    def spinning() -> None:
        with Spinner() as sp:
            spin_runs.append(_tput(dial, nbytes))
        spins.append(sp.rate)

    pair: list[Callable[[], None]] = [quiet, spinning] if rnd % 2 == 0 else [spinning, quiet]

    def run() -> None:
        for step in pair + pair:
            step()

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.group = "gil"
    res = {
        "gbps_quiet": statistics.median(quiet_runs),
        "gbps_spin": statistics.median(spin_runs),
        "spins_per_s": statistics.median(spins),
    }
    benchmark.extra_info.update(
        {
            "metric": "gil",
            "path": relay,
            "round": rnd,
            "samples": [{"quiet": quiet_runs, "spin": spin_runs}],
            **res,
            "spin_ratio": res["gbps_spin"] / res["gbps_quiet"],
        }
    )
