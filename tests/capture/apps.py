"""Unmodified programs for the capture tests: plain sockets, no ztun import.

    python apps.py sha-server PORT              # [::]:PORT, both families; per connection:
                                                # read to EOF, answer "<bytes> <sha256>\\n"
    python apps.py sha-client HOST PORT BYTES [SEED]   # send BYTES, check the answer
    python apps.py probe HOST PORT [SEND]       # connect (and send/recv once), report
    python apps.py hold HOST PORT               # connect, print READY, read until EOF/reset

Every role prints one JSON line; sha-server prints READY first. Exit status 0 = success.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, type(e).__name__)


def sha_server(port: int) -> int:
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(128)
    print("READY", flush=True)

    def serve(c: socket.socket, peer: tuple[str, int]) -> None:
        h = hashlib.sha256()
        n = 0
        buf = bytearray(CHUNK)
        with c:
            try:
                while True:
                    k = c.recv_into(buf)
                    if not k:
                        break
                    h.update(memoryview(buf)[:k])
                    n += k
                ip = peer[0].removeprefix("::ffff:")  # dual-stack socket, IPv4 client
                c.sendall(f"{n} {h.hexdigest()} {ip}\n".encode())
            except OSError:
                pass

    while True:
        c, peer = ls.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()


def sha_client(host: str, port: int, total: int, seed: int) -> int:
    rng = random.Random(seed)
    block = rng.randbytes(CHUNK)  # one random block, varied per chunk by a counter prefix
    h = hashlib.sha256()
    t0 = time.monotonic()
    out: dict[str, object] = {}
    try:
        s = socket.create_connection((host, port), timeout=30)
        out["peer"] = list(s.getpeername()[:2])
        out["local"] = list(s.getsockname()[:2])  # loopback when captured (sent to ztun)
        sent = 0
        i = 0
        while sent < total:
            chunk = (i.to_bytes(8, "big") + block[8:])[: total - sent]
            s.sendall(chunk)
            h.update(chunk)
            sent += len(chunk)
            i += 1
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            d = s.recv(4096)
            if not d:
                break
            reply += d
        s.close()
    except OSError as e:
        out.update(ok=False, error=_err(e))
        print(json.dumps(out), flush=True)
        return 1
    n, digest, seen_from = reply.decode().split()
    out.update(
        ok=int(n) == total and digest == h.hexdigest(),
        bytes=int(n),
        sha256=digest,
        expected=h.hexdigest(),
        server_saw=seen_from,
        seconds=round(time.monotonic() - t0, 3),
    )
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


def probe(host: str, port: int, send: str | None) -> int:
    t0 = time.monotonic()
    out: dict[str, object] = {}
    try:
        s = socket.create_connection((host, port), timeout=10)
        out["peer"] = list(s.getpeername()[:2])
        out["local"] = list(s.getsockname()[:2])
        if send is not None:
            s.sendall(send.encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
            out["reply"] = data.decode(errors="replace")
        s.close()
        out["ok"] = True
    except OSError as e:
        out.update(ok=False, error=_err(e))
    out["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


def hold(host: str, port: int) -> int:
    s = socket.create_connection((host, port), timeout=10)
    print("READY", flush=True)
    s.settimeout(60)
    try:
        while s.recv(65536):
            pass
        print(json.dumps({"ended": "eof"}), flush=True)
    except OSError as e:
        print(json.dumps({"ended": _err(e)}), flush=True)
    return 0


def main(argv: list[str]) -> int:
    role = argv[1]
    if role == "sha-server":
        return sha_server(int(argv[2]))
    if role == "sha-client":
        return sha_client(argv[2], int(argv[3]), int(argv[4]), int(argv[5]) if len(argv) > 5 else 1)
    if role == "probe":
        return probe(argv[2], int(argv[3]), argv[4] if len(argv) > 4 else None)
    if role == "hold":
        return hold(argv[2], int(argv[3]))
    print(f"unknown role {role}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
