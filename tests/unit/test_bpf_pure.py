"""Pure-Python parts of ztun.bpf and its cffi builder (no root, no kernel needed)."""

from __future__ import annotations

from pathlib import Path

import cffi
import pytest

from ztun import bpf
from ztun._bpf_build import cdef_from_header

HEADER = Path(__file__).resolve().parents[2] / "src/include/ztun/bpf.h"


def test_cdef_parses_the_whole_header() -> None:
    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header(HEADER.read_text()))
    # The engine's table and the structs Python fills are all there.
    assert ffi.sizeof("struct ztun_bpf_config") == 24
    assert ffi.sizeof("struct ztun_bpf_pair_stats") == 48
    assert ffi.typeof("struct ztun_bpf_api").kind == "struct"
    assert "ZTUN_BPF_F_UNBOUNDED" in cdef_from_header(HEADER.read_text())


def test_cdef_drops_cplusplus_guard_and_keeps_int_defines() -> None:
    src = '#ifdef __cplusplus\nextern "C" {\n#endif\n#define ZTUN_X 0x10u\nint f(void);\n'
    out = cdef_from_header(src)
    assert "extern" not in out and "#define ZTUN_X 0x10" in out and "int f(void);" in out


@pytest.mark.parametrize(
    ("raw", "path"),
    [("/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified"), (r"/mnt/a\040b", "/mnt/a b")],
)
def test_mountinfo_unescape(raw: str, path: str) -> None:
    assert bpf._unescape_mount(raw) == path


@pytest.mark.parametrize(
    ("release", "want"),
    [("6.18.44-fc-v595", (6, 18)), ("5.15.0-91-generic", (5, 15)), ("x", (0, 0))],
)
def test_kernel_tuple(release: str, want: tuple[int, int]) -> None:
    assert bpf._kernel_tuple(release) == want


def test_available_gives_a_reason_either_way() -> None:
    ok, why = bpf.available()
    assert isinstance(ok, bool) and why
