"""cffi builder of ``ztun._bpf`` (out-of-line API mode), run by CMake only.

    python ztun/_bpf_build.py OUT.c path/to/ztun/bpf.h

The declarations are read from the C header itself, so the binding cannot drift from it:
preprocessor lines are dropped except integer ``#define`` constants, and the
``extern "C"`` guard is skipped. CMake compiles the emitted C and links it against
libztun_bpf.so (pyzmq's pattern: setuptools never runs).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import cffi  # type: ignore[import-untyped]

_DEFINE = re.compile(r"#define\s+(ZTUN_\w+)\s+(0x[0-9a-fA-F]+|\d+)u?\b")


def cdef_from_header(text: str) -> str:
    """The parts of a C header that cffi's cdef understands."""
    out: list[str] = []
    skip_depth = 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            if s.startswith("#ifdef __cplusplus"):
                skip_depth += 1
            elif s.startswith("#endif") and skip_depth:
                skip_depth -= 1
            elif not skip_depth and (m := _DEFINE.match(s)):
                out.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        if not skip_depth:
            out.append(line)
    return "\n".join(out)


def make_ffi(header: Path) -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header(header.read_text()))
    ffi.set_source("ztun._bpf", '#include "ztun/bpf.h"\n')
    return ffi


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: _bpf_build.py OUT.c HEADER", file=sys.stderr)
        return 2
    make_ffi(Path(argv[2])).emit_c_code(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
