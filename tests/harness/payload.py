"""Deterministic test payload streams, cheap to generate and to check.

A stream of ``size`` bytes for a ``seed`` is a sequence of 1 MiB blocks, each a slice of one
shared random pool at an offset derived from (seed, block index). Content depends only on
(seed, position), never on how it is written or read, so any prefix can be regenerated and
received bytes can be compared in place with ``bytes.startswith(view, offset)`` (a memcmp, no
copies) and counted exactly when they differ.
"""

from __future__ import annotations

import hashlib
import random
import struct

BLOCK = 1 << 20
POOL_SIZE = 8 << 20
# One pool per process, from a fixed seed: every process that imports this module (client,
# server, relay helpers) produces the same streams.
_POOL = random.Random(0x7A74756E).randbytes(POOL_SIZE + BLOCK)
_POOL_MV = memoryview(_POOL)


def _block_offset(seed: int, k: int) -> int:
    d = hashlib.blake2b(struct.pack("<QQ", seed & (2**64 - 1), k), digest_size=8).digest()
    return int.from_bytes(d, "little") % (POOL_SIZE + 1)


class Stream:
    """The ``size``-byte stream for ``seed``: views, prefix hashes and in-place comparison."""

    __slots__ = ("_cache_k", "_cache_off", "seed", "size")

    def __init__(self, seed: int, size: int) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.seed = seed
        self.size = size
        self._cache_k = -1
        self._cache_off = 0

    def _off(self, k: int) -> int:
        if k != self._cache_k:
            self._cache_k = k
            self._cache_off = _block_offset(self.seed, k)
        return self._cache_off

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """(pool offset, length) pieces covering stream range [start, end)."""
        end = min(end, self.size)
        out: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            k, within = divmod(pos, BLOCK)
            n = min(BLOCK - within, end - pos)
            out.append((self._off(k) + within, n))
            pos += n
        return out

    def views(self, start: int, end: int) -> list[memoryview]:
        return [_POOL_MV[o : o + n] for o, n in self.pieces(start, end)]

    def sha256(self, n: int | None = None) -> str:
        """Hex SHA-256 of the first ``n`` bytes (all by default)."""
        h = hashlib.sha256()
        for v in self.views(0, self.size if n is None else min(n, self.size)):
            h.update(v)
        return h.hexdigest()

    def mismatches(self, data: memoryview, start: int) -> tuple[int, int | None]:
        """Compare ``data`` with the stream at ``start``.

        Returns (number of differing byte positions, stream offset of the first difference).
        Bytes past the end of the stream all count as differing.
        """
        bad = 0
        first: int | None = None
        pos = 0
        for off, n in self.pieces(start, start + len(data)):
            piece = data[pos : pos + n]
            if not _POOL.startswith(piece, off):
                b, f = _count_diff(piece, off)
                bad += b
                if first is None:
                    first = start + pos + f
            pos += n
        extra = len(data) - pos
        if extra > 0:
            bad += extra
            if first is None:
                first = start + pos
        return bad, first


_SUB = 4096


def _count_diff(piece: memoryview, off: int) -> tuple[int, int]:
    """Differing positions between ``piece`` and the pool at ``off``; and the first one."""
    bad = 0
    first = -1
    for s in range(0, len(piece), _SUB):
        sub = piece[s : s + _SUB]
        if _POOL.startswith(sub, off + s):
            continue
        ref = _POOL_MV[off + s : off + s + len(sub)]
        for i, (x, y) in enumerate(zip(sub, ref, strict=True)):
            if x != y:
                bad += 1
                if first < 0:
                    first = s + i
    return bad, first


# ---------------------------------------------------------------- integrity protocol header
# client -> server, before the client's own stream:
#   magic, version, order (0 client FIN first, 1 server FIN first), rst (0 none, 1 client,
#   2 server), pad, conn_id, seed, up_size, down_size, rst_after, hold_up, hold_down
HEADER = struct.Struct("<4sBBBBQQQQQQQ")
MAGIC = b"ZTI1"
ORDERS = ("client_fin", "server_fin")
RSTS = ("none", "client", "server")


def up_seed(seed: int) -> int:
    return (seed * 2) & (2**64 - 1)


def down_seed(seed: int) -> int:
    return (seed * 2 + 1) & (2**64 - 1)
