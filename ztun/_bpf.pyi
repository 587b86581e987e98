# Stub of the cffi module built from ztun/_bpf_build.py (declarations: src/include/ztun/bpf.h).
from typing import Any

ffi: Any
lib: Any
