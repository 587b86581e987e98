"""``make demo``'s entry point, run as the user runs it (``python -m ztun.demo``): it exits
0, prints the three outcomes (two connections allowed and verified, one denied by the
policy that decided) in its table, its verdict lines and its metrics, and leaves nothing
behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from harness.caps import require

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
    ):
        assert re.search(want, out), f"missing {want!r} in:\n{out}"

    # The connections table: every column filled on every row, with the same outcomes.
    header, rows = _table_rows(out, "connection")
    assert header == [
        "#", "connection", "path", "identities (mTLS)", "bytes ↑ / ↓", "decision", "result",
    ]  # fmt: skip
    assert [row[0][0] for row in rows] == ["1", "2", "3"]
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
    ]  # fmt: skip
    for row, (path, src_id, dst_id, decision, policy, result, up) in zip(rows, expect, strict=True):
        assert _col(row, 2)[0] == path
        assert _col(row, 3) == [src_id, dst_id]
        assert _col(row, 4)[0] == up
        assert _col(row, 5) == [decision, policy]
        assert _col(row, 6)[0] == result
    assert _col(rows[2], 6)[1] == "401 → app reset"

    # The metrics, both reporters of each connection; the denied one closed with DENY.
    _, mrows = _table_rows(out, "source → destination")
    flat = [" | ".join(row[0]) for row in mrows]
    for want in (
        f"client → api | node-a (source) | mTLS | 1 | 1 | 0 | {size} | {size} | -",
        f"client → api | node-b (destination) | mTLS | 1 | 1 | 0 | {size} | {size} | -",
        f"client → db | node-a (destination) | mTLS | 1 | 1 | 0 | {size} | {size} | -",
        "api → db | node-b (source) | mTLS | 1 | 1 | 1 | 0 B | 0 B | DENY",
        "api → db | node-a (destination) | mTLS | 1 | 1 | 1 | 0 B | 0 B | DENY",
    ):
        assert want in flat, f"missing metrics row {want!r} in {flat}"
    assert "node-a → 0, node-b → 0" in out
