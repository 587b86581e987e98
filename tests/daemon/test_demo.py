"""``make demo``'s entry point, run as the user runs it (``python -m ztun.demo``): it exits
0, prints the four outcomes (three connections allowed and verified, one denied by the
policy that decided; the fourth, client -> db through SOCKS5, by the kernel shortcut where
eBPF is available, else over HBONE with the reason) in its table, its verdict lines and
its metrics, and leaves nothing behind (namespaces, its cgroup)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from harness.caps import in_ci, require

from ztun import bpf

pytestmark = [pytest.mark.needs_root, pytest.mark.slow]

SIZE_MIB = 4


def _table_rows(out: str, first_header: str) -> tuple[list[str], list[list[list[str]]]]:
    """The header cells and the rows (each a list of physical lines' cells) of the rich
    table whose header starts with ``first_header``."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("┃") and first_header in ln)
    header = [c.strip() for c in lines[start].strip("┃").split("┃")]
    rows: list[list[list[str]]] = []
    for ln in lines[start + 2 :]:
        if ln.startswith("└"):
            break
        cells = [c.strip() for c in ln.strip("│").split("│")]
        if cells[0] or not rows:  # a row's first line has its first cell set
            rows.append([cells])
        else:
            rows[-1].append(cells)
    return header, rows


def _col(row: list[list[str]], i: int) -> list[str]:
    return [line[i] for line in row if line[i]]


@pytest.mark.timeout(150)
def test_make_demo_entry_point() -> None:
    require("netns")
    # The kernel shortcut is expected wherever the sockmap programs can run; under CI
    # they must (a demo that always fell back would pass otherwise).
    shortcut, why = bpf.available()
    if not shortcut and in_ci():
        pytest.fail(f"sockmap unavailable under CI: {why}")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztun.demo", "--size", str(SIZE_MIB)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, COLUMNS="140"),
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=140)
    finally:
        if proc.poll() is None:  # timed out: SIGTERM tears the demo down, then SIGKILL
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    elapsed = time.monotonic() - t0
    # the demo's namespaces are named after its pid (others may run tests meanwhile)
    mine = f"ztd-{proc.pid:x}-"
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    left = [n for n in names if n.startswith(mine)]
    assert not left, f"namespaces left behind: {left}"
    cg_root = bpf.find_mount("cgroup2")
    if cg_root is not None:
        cg = cg_root / f"ztun-demo-{proc.pid:x}"
        assert not cg.exists(), f"cgroup left behind: {cg}"
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert elapsed < 60, f"the demo took {elapsed:.1f}s"
    assert "✗" not in out and "Traceback" not in r.stderr, out + r.stderr

    # The verdict lines: who talked to whom, which way, what decided.
    size = f"{SIZE_MIB:.1f} MiB"
    for want in (
        rf"✓ 1 demo/client → demo/api:8080 \(cross-node\): ALLOW by demo/api-allow-client; "
        rf"{size} each way, SHA-256 verified",
        rf"✓ 2 demo/client → demo/db:5432 \(same node\): ALLOW by demo/db-allow-client; "
        rf"{size} each way, SHA-256 verified",
        r"✓ 3 demo/api → demo/db:5432 \(cross-node\): DENY by demo/deny-api-to-db; "
        r"CONNECT → 401, 0 B reached demo/db",
        rf"✓ 4 demo/client → demo/db:5432 \(same node, SOCKS5\): ALLOW by "
        rf"demo/db-allow-client; {size} each way, SHA-256 verified\n  "
        + (
            r"judged by node-a's ztund at the source, then app ⇄ app in the kernel"
            if shortcut
            else r"over HBONE \(mTLS\), the kernel shortcut unavailable: "
        ),
    ):
        assert re.search(want, out), f"missing {want!r} in:\n{out}"

    # The connections table: every column filled on every row, with the same outcomes.
    header, rows = _table_rows(out, "connection")
    assert header == [
        "#", "connection", "path", "identities (mTLS)", "bytes ↑ / ↓", "decision", "result",
    ]  # fmt: skip
    assert [row[0][0] for row in rows] == ["1", "2", "3", "4"]
    for row in rows:
        for i, name in enumerate(header):
            assert _col(row, i), f"empty column {name!r} in row {row}"
    expect = [
        ("node-a → node-b", "ns/demo/sa/client", "→ ns/demo/sa/api", "ALLOW",
         "demo/api-allow-client", "verified", f"↑ {size}"),
        ("node-a (same node)", "ns/demo/sa/client", "→ ns/demo/sa/db", "ALLOW",
         "demo/db-allow-client", "verified", f"↑ {size}"),
        ("node-b → node-a", "ns/demo/sa/api", "→ ns/demo/sa/db", "DENY",
         "demo/deny-api-to-db", "refused", "↑ 0 B"),
        ("node-a (same node)", "ns/demo/sa/client", "→ ns/demo/sa/db", "ALLOW",
         "demo/db-allow-client", "verified", f"↑ {size}"),
    ]  # fmt: skip
    for row, (path, src_id, dst_id, decision, policy, result, up) in zip(rows, expect, strict=True):
        assert _col(row, 2)[0] == path
        assert _col(row, 3)[:2] == [src_id, dst_id]
        assert _col(row, 4)[0] == up
        assert _col(row, 5) == [decision, policy]
        assert _col(row, 6)[0] == result
    assert _col(rows[2], 6)[1] == "401 → app reset"
    # Rows 1-3 over HBONE, row 2 the same-node one; row 4 through SOCKS5, by the shortcut.
    for row in rows[:3]:
        assert _col(row, 2)[1].endswith(":15008"), row
        assert len(_col(row, 3)) == 2, row
    assert _col(rows[3], 1)[2] == "via SOCKS5"
    if shortcut:
        assert _col(rows[3], 2)[1:] == ["⇒ kernel shortcut", "(sockmap)"]
        assert _col(rows[3], 3)[2] == "(config, no mTLS)"
    else:
        assert _col(rows[3], 2)[1:] == ["⇒ 198.18.1.12:15008", "(no shortcut)"]

    # The metrics, both reporters of each connection; the denied one closed with DENY.
    _, mrows = _table_rows(out, "source → destination")
    flat = [" | ".join(row[0]) for row in mrows]
    if shortcut:
        # row 4 on its own: the source's ztund only, not mTLS
        db_rows = [
            f"client → db | node-a (source) | mTLS | 1 | 1 | 0 | {size} | {size} | -",
            f"client → db | node-a (destination) | mTLS | 1 | 1 | 0 | {size} | {size} | -",
            f"client → db | node-a (source) | unknown | 1 | 1 | 0 | {size} | {size} | -",
        ]
    else:  # rows 2 and 4 both over HBONE
        two = f"{2 * SIZE_MIB:.1f} MiB"
        db_rows = [
            f"client → db | node-a (source) | mTLS | 2 | 2 | 0 | {two} | {two} | -",
            f"client → db | node-a (destination) | mTLS | 2 | 2 | 0 | {two} | {two} | -",
        ]
    assert flat == [
        f"client → api | node-a (source) | mTLS | 1 | 1 | 0 | {size} | {size} | -",
        f"client → api | node-b (destination) | mTLS | 1 | 1 | 0 | {size} | {size} | -",
        *db_rows[:2],
        "api → db | node-b (source) | mTLS | 1 | 1 | 1 | 0 B | 0 B | DENY",
        "api → db | node-a (destination) | mTLS | 1 | 1 | 1 | 0 B | 0 B | DENY",
        *db_rows[2:],
    ], flat

    # The shortcut's own metrics (node-a's ztun_bpf_*): one pair, bytes through the kernel.
    if shortcut:
        m = re.search(
            r"accelerator_active 1, pairs_total (\d+),\n\s+direct_bytes_total ([\d.]+) (\w+) "
            rf"\(of the {2 * SIZE_MIB:.1f} MiB row 4 moved both ways\), events: "
            r"pair_redirect (\d+)",
            out,
        )
        assert m, out
        assert int(m.group(1)) == 1 and float(m.group(2)) > 0 and int(m.group(4)) > 0, m.group(0)
        assert "3 allowed and verified (1 by the kernel shortcut), 1 denied, metrics match" in out
    else:
        assert "kernel shortcut on node-a: unavailable (" in out
        assert "3 allowed and verified (all over HBONE), 1 denied, metrics match" in out
    assert "node-a → 0, node-b → 0" in out
