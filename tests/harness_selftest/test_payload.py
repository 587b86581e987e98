from __future__ import annotations

import hashlib

from harness.payload import BLOCK, Stream


def test_stream_is_deterministic_and_position_based():
    a, b = Stream(7, 3 * BLOCK + 123), Stream(7, 3 * BLOCK + 123)
    whole = b"".join(bytes(v) for v in a.views(0, a.size))
    assert len(whole) == a.size
    # any split gives the same bytes
    parts = b"".join(bytes(v) for s in range(0, b.size, 77_777) for v in b.views(s, s + 77_777))
    assert parts == whole
    assert a.sha256() == hashlib.sha256(whole).hexdigest()
    assert a.sha256(1000) == hashlib.sha256(whole[:1000]).hexdigest()
    assert Stream(8, 1000).sha256() != Stream(7, 1000).sha256()


def test_mismatch_counting_is_exact():
    s = Stream(1, 2 * BLOCK)
    data = bytearray(b"".join(bytes(v) for v in s.views(BLOCK - 10, BLOCK + 5000)))
    assert s.mismatches(memoryview(data), BLOCK - 10) == (0, None)
    data[3] ^= 1
    data[4000] ^= 0xFF
    assert s.mismatches(memoryview(data), BLOCK - 10) == (2, BLOCK - 10 + 3)
    # bytes past the end of the stream count as mismatched
    tail = bytes(s.views(2 * BLOCK - 4, 2 * BLOCK)[0]) + b"xyz"
    assert s.mismatches(memoryview(tail), 2 * BLOCK - 4) == (3, 2 * BLOCK)
