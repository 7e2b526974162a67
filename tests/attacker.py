"""A hostile machine, run as its own process by tests/test_attacks.py.

    python tests/attacker.py silent PORT SOURCE COUNT HOLD
        opens COUNT connections from SOURCE as fast as it can and sends
        nothing; holds them HOLD seconds.
    python tests/attacker.py churn PORT SOURCE SECONDS
        for SECONDS, connects, sends a bad header and resets, as fast as it can.

Prints one JSON line: what it did and how long it took.
"""

from __future__ import annotations

import errno
import json
import resource
import selectors
import socket
import struct
import sys
import time

LINGER_RESET = struct.pack("ii", 1, 0)
BAD_HEADER = struct.pack("<HH", 2, 1)  # a size below the header's own 4 bytes


def silent(port: int, source: str, count: int, hold: float) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sockets = []
    started = time.monotonic()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            continue
        sockets.append(sock)
    opened = time.monotonic() - started
    # Wait for the handshakes (a full backlog makes the kernel retry SYNs).
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_WRITE)
    established = 0
    deadline = time.monotonic() + hold
    pending = len(sockets)
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            selector.unregister(key.fileobj)
            pending -= 1
            if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                established += 1
    time.sleep(max(0.0, deadline - time.monotonic()))
    # Still open at the end: the server kept these (the others it closed or never took).
    still_open = 0
    for sock in sockets:
        try:
            if sock.recv(1) == b"":
                pass
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        sock.close()
    return {"sockets": len(sockets), "opened_in": opened, "established": established, "still_open": still_open}


def churn(port: int, source: str, seconds: float) -> dict:
    made = refused = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.send(BAD_HEADER)
            made += 1
        except OSError:
            refused += 1
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.close()
    took = time.monotonic() - started
    return {"connections": made, "failed": refused, "seconds": took, "per_second": made / took}


if __name__ == "__main__":
    mode, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "silent":
        result = silent(port, source, int(sys.argv[4]), float(sys.argv[5]))
    else:
        result = churn(port, source, float(sys.argv[4]))
    print(json.dumps(result), flush=True)
