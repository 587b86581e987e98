"""A tiny pcap reader for the wire checks: Ethernet -> IPv4/IPv6 -> TCP, and TLS framing.

tcpdump writes classic pcap (``-w``); only what the capture tests need is parsed: which TCP
ports appear, each direction's payload in sequence order, and whether a byte stream is a
sequence of well-formed TLS records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
TCP = 6
# TLS record content types: change_cipher_spec, alert, handshake, application_data
TLS_TYPES = {20, 21, 22, 23}
TLS_MAX_RECORD = (1 << 14) + 256  # TLSCiphertext.length limit (RFC 8446 5.2)


@dataclass
class Flow:
    """One direction of one TCP connection."""

    src: tuple[str, int]
    dst: tuple[str, int]
    isn: int | None = None  # first sequence number seen (the SYN's when captured)
    segments: dict[int, bytes] = field(default_factory=dict)  # offset from isn -> payload
    packets: int = 0

    def add(self, seq: int, syn: bool, payload: bytes) -> None:
        if self.isn is None:
            self.isn = seq
        off = (seq - self.isn) & 0xFFFFFFFF  # sequence numbers wrap
        if syn:
            off += 1
        if payload:
            self.segments.setdefault(off, payload)

    def runs(self) -> list[bytes]:
        """The payload as contiguous runs in sequence order (more than one: the capture
        missed segments); retransmissions collapse onto their offset."""
        out: list[bytearray] = []
        nxt = None
        for off in sorted(self.segments):
            data = self.segments[off]
            if nxt is not None and off < nxt:
                data = data[nxt - off :]
            if nxt is None or off > nxt:
                out.append(bytearray())
            out[-1] += data
            nxt = max(nxt or 0, off + len(self.segments[off]))
        return [bytes(r) for r in out]

    def stream(self) -> bytes:
        return b"".join(self.runs())


@dataclass
class Capture:
    flows: dict[tuple[tuple[str, int], tuple[str, int]], Flow]
    other: int  # non-TCP frames (ARP, ICMPv6 neighbour discovery, ...)
    truncated: int  # frames cut by the snap length

    def ports(self) -> set[int]:
        return {p for k in self.flows for p in (k[0][1], k[1][1])}

    def payload_bytes(self) -> int:
        return sum(len(f.stream()) for f in self.flows.values())


def _ip(b: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(b))


def read(path: str | Path) -> Capture:
    data = Path(path).read_bytes()
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == 0xA1B2C3D4:
        endian = "<"
    elif magic == 0xD4C3B2A1:
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file (magic {magic:#x})")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet (1)")
    off = 24
    flows: dict[tuple[tuple[str, int], tuple[str, int]], Flow] = {}
    other = truncated = 0
    while off + 16 <= len(data):
        _, _, incl, orig = struct.unpack_from(endian + "IIII", data, off)
        off += 16
        frame = data[off : off + incl]
        off += incl
        if incl < orig:
            truncated += 1
        etype = struct.unpack_from("!H", frame, 12)[0] if len(frame) >= 14 else 0
        ip = frame[14:]
        if etype == ETH_IPV4 and len(ip) >= 20:
            ihl = (ip[0] & 0xF) * 4
            total = struct.unpack_from("!H", ip, 2)[0]
            proto, src, dst = ip[9], _ip(ip[12:16]), _ip(ip[16:20])
            l4 = ip[ihl:total]
        elif etype == ETH_IPV6 and len(ip) >= 40:
            plen = struct.unpack_from("!H", ip, 4)[0]
            proto, src, dst = ip[6], _ip(ip[8:24]), _ip(ip[24:40])
            l4 = ip[40 : 40 + plen]
        else:
            other += 1
            continue
        if proto != TCP or len(l4) < 20:
            other += 1
            continue
        sport, dport, seq = struct.unpack_from("!HHI", l4, 0)
        doff = (l4[12] >> 4) * 4
        syn = bool(l4[13] & 0x02)
        key = ((src, sport), (dst, dport))
        fl = flows.setdefault(key, Flow(key[0], key[1]))
        fl.packets += 1
        fl.add(seq, syn, l4[doff:])
    return Capture(flows, other, truncated)


def tls_records(stream: bytes) -> tuple[int, int]:
    """Walk ``stream`` as TLS records: (records, bytes not covered). Raises ValueError at the
    first byte that cannot start a record (plaintext)."""
    n = off = 0
    while off + 5 <= len(stream):
        ctype, major, minor, length = struct.unpack_from("!BBBH", stream, off)
        if ctype not in TLS_TYPES or major != 3 or minor not in (1, 3) or length > TLS_MAX_RECORD:
            raise ValueError(f"not a TLS record at offset {off}: {stream[off : off + 16]!r}")
        off += 5 + length
        n += 1
    return n, max(0, len(stream) - off)
