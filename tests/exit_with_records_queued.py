"""Run by tests/test_stop.py: the interpreter exits while the engine's log
records are still queued behind a slow handler and a server still runs."""

import logging
import socket
import struct
import sys
import time

from servercore import PacketSession, Server


class Slow(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        time.sleep(0.05)
        sys.stderr.write("LOG " + record.getMessage() + "\n")


logging.getLogger("servercore").addHandler(Slow(level=logging.WARNING))
server = Server(PacketSession, "127.0.0.1", 0)
server.start()
for _ in range(30):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(struct.pack("<HH", 2, 1))  # a size below the header's own 4 bytes
deadline = time.monotonic() + 5
while server.stats()["disconnects"]["INVALID_HEADER"] < 30 and time.monotonic() < deadline:
    server.poll(0.05)
print("exiting", flush=True)
