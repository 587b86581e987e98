"""Compile a PolicySet into the flat table that src/core/policy.c evaluates.

Format, version 1 (all integers little-endian u32 unless noted; every section starts at
an 8-byte-aligned offset so the C side reads records in place from its aligned copy):

    header (16 bytes)   magic "ZTPB", u16 version = 1, u16 header_size, u32 total_size,
                        u32 n_sections = 13
    directory           13 x {u32 offset, u32 count, u32 entry_size}; section i is:
     0 POLICIES  (20)   key (off, len) "namespace/name"; u8 action (0 ALLOW, 1 DENY),
                        u8 flags (1 = dry run), u8 scope (0 global, 1 namespace,
                        2 selector; informative), u8 0; rules (first, count)
     1 RULES      (8)   clauses (first, count)
     2 CLAUSES    (8)   matches (first, count)
     3 MATCHES   (96)   12 x (first, count): principals, not_principals, namespaces,
                        not_namespaces [-> STRMATCH], service_accounts, not_… [-> SAMATCH],
                        source_ips, not_…, destination_ips, not_… [-> CIDRS],
                        destination_ports, not_… [-> PORTS]
     4 STRMATCH  (12)   u8 kind (0 exact, 1 prefix, 2 suffix, 3 presence), 3 x u8 0, str
     5 SAMATCH   (16)   namespace str, service account str
     6 CIDRS     (20)   16-byte address (IPv4 as ::ffff:a.b.c.d), u8 prefix (IPv4: 96 + n),
                        u8 family (4 or 6), u16 0
     7 PORTS      (4)   port
     8 GROUPS    (16)   first (into GROUP_IDX), n_deny, n_allow, n_dry: the policies of a
                        group, enforced DENY first, then enforced ALLOW, then dry run, each
                        part in key order
     9 GROUP_IDX  (4)   policy index
    10 WORKLOADS (24)   key str, groups[3] (namespace, mesh-wide, selector; 0xffffffff =
                        none), u32 flags (1 = the default workload); the LAST entry is the
                        default workload (unknown destinations)
    11 IPMAP     (20)   16-byte address, workload index; sorted by address, unique
    12 STRINGS    (1)   bytes; every string is followed by a NUL

A string is (u32 offset into STRINGS, u32 length). Policies are sorted by key (bytes),
which the C loader checks: it makes names unique and lets counters be carried across a
swap with a linear merge. Scope and labels are resolved here, so C never sees a label:
each workload just names up to three shared groups.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING

from ztun.errors import PolicyError

if TYPE_CHECKING:
    from ztun.policy import AuthorizationPolicy, IPNetwork, Match, PolicySet, Workload

MAGIC = b"ZTPB"
VERSION = 1
N_SECTIONS = 13
HEADER = struct.Struct("<4sHHII")
SECTION = struct.Struct("<III")
HEADER_SIZE = HEADER.size + N_SECTIONS * SECTION.size
GROUP_NONE = 0xFFFFFFFF
WL_DEFAULT = 0x1

(
    SEC_POLICIES,
    SEC_RULES,
    SEC_CLAUSES,
    SEC_MATCHES,
    SEC_STRMATCH,
    SEC_SAMATCH,
    SEC_CIDRS,
    SEC_PORTS,
    SEC_GROUPS,
    SEC_GROUP_IDX,
    SEC_WORKLOADS,
    SEC_IPMAP,
    SEC_STRINGS,
) = range(N_SECTIONS)

ENTRY_SIZES = (20, 8, 8, 96, 12, 16, 20, 4, 16, 4, 24, 20, 1)

_POLICY = struct.Struct("<IIBBBBII")
_RANGE = struct.Struct("<II")
_MATCH = struct.Struct("<" + "II" * 12)
_STRM = struct.Struct("<B3xII")
_SAM = struct.Struct("<IIII")
_CIDR = struct.Struct("<16sBB2x")
_U32 = struct.Struct("<I")
_GROUP = struct.Struct("<IIII")
_WORKLOAD = struct.Struct("<IIIIII")
_IPMAP = struct.Struct("<16sI")

_STRM_KIND = {"exact": 0, "prefix": 1, "suffix": 2, "presence": 3}
_SCOPE = {"global": 0, "namespace": 1, "workload_selector": 2}
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def ip16(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """16-byte form used by the C side: IPv4 as ::ffff:a.b.c.d."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _V4_MAPPED + ip.packed
    return ip.packed


class _Builder:
    def __init__(self) -> None:
        self.sections: list[bytearray] = [bytearray() for _ in range(N_SECTIONS)]
        self.counts = [0] * N_SECTIONS
        self.strings: dict[bytes, int] = {}

    def add(self, sec: int, record: bytes) -> int:
        idx = self.counts[sec]
        self.sections[sec] += record
        self.counts[sec] += 1
        return idx

    def string(self, s: str) -> tuple[int, int]:
        raw = s.encode("utf-8", "surrogatepass")
        off = self.strings.get(raw)
        if off is None:
            off = len(self.sections[SEC_STRINGS])
            self.sections[SEC_STRINGS] += raw + b"\0"
            self.counts[SEC_STRINGS] = len(self.sections[SEC_STRINGS])
            self.strings[raw] = off
        return off, len(raw)

    def cidr(self, net: IPNetwork) -> bytes:
        if isinstance(net, ipaddress.IPv4Network):
            return _CIDR.pack(ip16(net.network_address), 96 + net.prefixlen, 4)
        return _CIDR.pack(net.network_address.packed, net.prefixlen, 6)

    def match(self, m: Match) -> bytes:
        ranges: list[int] = []
        for field_list, sec in (
            (m.principals, SEC_STRMATCH),
            (m.not_principals, SEC_STRMATCH),
            (m.namespaces, SEC_STRMATCH),
            (m.not_namespaces, SEC_STRMATCH),
            (m.service_accounts, SEC_SAMATCH),
            (m.not_service_accounts, SEC_SAMATCH),
            (m.source_ips, SEC_CIDRS),
            (m.not_source_ips, SEC_CIDRS),
            (m.destination_ips, SEC_CIDRS),
            (m.not_destination_ips, SEC_CIDRS),
            (m.destination_ports, SEC_PORTS),
            (m.not_destination_ports, SEC_PORTS),
        ):
            first = self.counts[sec]
            for item in field_list:
                if sec == SEC_STRMATCH:
                    off, ln = self.string(item.value)  # type: ignore[union-attr]
                    self.add(sec, _STRM.pack(_STRM_KIND[item.kind], off, ln))  # type: ignore[union-attr]
                elif sec == SEC_SAMATCH:
                    ns = self.string(item.namespace)  # type: ignore[union-attr]
                    sa = self.string(item.service_account)  # type: ignore[union-attr]
                    self.add(sec, _SAM.pack(*ns, *sa))
                elif sec == SEC_CIDRS:
                    self.add(sec, self.cidr(item))  # type: ignore[arg-type]
                else:
                    self.add(sec, _U32.pack(item))
            ranges += (first, len(field_list))
        return _MATCH.pack(*ranges)

    def policy(self, p: AuthorizationPolicy, scope: str) -> None:
        rule_first = self.counts[SEC_RULES]
        # rules, clauses and matches are laid out in order; reserve indices as we go
        for r in p.rules:
            clause_first = self.counts[SEC_CLAUSES] + 0
            clause_records: list[bytes] = []
            for c in r:
                match_first = self.counts[SEC_MATCHES]
                for m in c:
                    self.add(SEC_MATCHES, self.match(m))
                clause_records.append(_RANGE.pack(match_first, len(c)))
            clause_first = self.counts[SEC_CLAUSES]
            for rec in clause_records:
                self.add(SEC_CLAUSES, rec)
            self.add(SEC_RULES, _RANGE.pack(clause_first, len(r)))
        key = self.string(p.key)
        action = 1 if p.action.value == "DENY" else 0
        self.add(
            SEC_POLICIES,
            _POLICY.pack(
                *key, action, 1 if p.dry_run else 0, _SCOPE[scope], 0, rule_first, len(p.rules)
            ),
        )

    def blob(self) -> bytes:
        out = bytearray(HEADER_SIZE)
        directory: list[tuple[int, int, int]] = []
        for sec in range(N_SECTIONS):
            while len(out) % 8:
                out.append(0)
            directory.append((len(out), self.counts[sec], ENTRY_SIZES[sec]))
            out += self.sections[sec]
        HEADER.pack_into(out, 0, MAGIC, VERSION, HEADER_SIZE, len(out), N_SECTIONS)
        for i, d in enumerate(directory):
            SECTION.pack_into(out, HEADER.size + i * SECTION.size, *d)
        return bytes(out)


def compile_set(
    pset: PolicySet, workloads: tuple[Workload, ...], default: Workload | None
) -> bytes:
    b = _Builder()
    index = {}
    for i, p in enumerate(pset.policies):
        b.policy(p, pset.scope(p).value)
        index[p.key] = i

    groups: dict[tuple[int, ...], int] = {}

    def group(policies: tuple[AuthorizationPolicy, ...]) -> int:
        if not policies:
            return GROUP_NONE
        deny = [index[p.key] for p in policies if p.action.value == "DENY" and not p.dry_run]
        allow = [index[p.key] for p in policies if p.action.value == "ALLOW" and not p.dry_run]
        dry = [index[p.key] for p in policies if p.dry_run]
        members = (*deny, *allow, *dry)
        key = (len(deny), len(allow), *members)
        if key not in groups:
            first = b.counts[SEC_GROUP_IDX]
            for m in members:
                b.add(SEC_GROUP_IDX, _U32.pack(m))
            groups[key] = b.add(SEC_GROUPS, _GROUP.pack(first, len(deny), len(allow), len(dry)))
        return groups[key]

    def workload(w: Workload | None, flags: int) -> int:
        g = pset._groups(w)
        key = b.string(w.key if w is not None else "")
        return b.add(
            SEC_WORKLOADS,
            _WORKLOAD.pack(*key, group(g.namespace), group(g.mesh), group(g.selector), flags),
        )

    seen: dict[str, int] = {}
    owners: dict[bytes, Workload] = {}
    for w in workloads:
        if w.key in seen:
            raise PolicyError(f"workload {w.key} given twice")
        seen[w.key] = workload(w, 0)
        for ip in w.ips:
            raw = ip16(ip)
            if raw in owners and owners[raw].key != w.key:
                raise PolicyError(f"IP {ip} belongs to both {owners[raw].key} and {w.key}")
            owners[raw] = w
    workload(default, WL_DEFAULT)
    for raw in sorted(owners):
        b.add(SEC_IPMAP, _IPMAP.pack(raw, seen[owners[raw].key]))
    if not b.sections[SEC_STRINGS]:  # pragma: no cover - the default key is always there
        b.string("")
    return b.blob()
