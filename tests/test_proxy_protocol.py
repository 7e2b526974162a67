"""The PROXY protocol from trusted load balancers (rust/proxy_header.rs; SECURITY.md).

Behind a TCP load balancer every connection comes from the balancer. A server
given `trusted_proxies` reads the PROXY header (v1 text or v2 binary) that
such a balancer writes first, and from then on the session's `peer`, its log
lines and every per-address defence are the real client's. Nobody else may
name a client: a PROXY header from an address not in `trusted_proxies`, a
malformed one, or none from a trusted proxy closes the connection with
PROXY_HEADER and one log line naming the address, before any Python runs for
it. Here 127.0.0.5 plays the balancer and other 127.0.0.x addresses other
machines; the headers are built by hand.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time

import pytest

from servercore import DisconnectReason, PacketSession

from support import exchange, local_port, packet, poll_until, send_ignoring_close

PROXY = "127.0.0.5"
ECHO_ID = 7
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client: str, client_port: int, server_port: int) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client} {server} {client_port} {server_port}\r\n".encode()


def v2(client: str | None, client_port: int = 0, server_port: int = 0, tlvs: bytes = b"") -> bytes:
    """A v2 PROXY header for `client`; None makes a LOCAL one (the balancer's
    own health check)."""
    if client is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    address = ipaddress.ip_address(client)
    if address.version == 4:
        family, server = 0x11, ipaddress.ip_address("127.0.0.1")
    else:
        family, server = 0x21, ipaddress.ip_address("::1")
    body = address.packed + server.packed + struct.pack("!HH", client_port, server_port) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class Echo(PacketSession):
    peers: list[tuple[str, int]] = []
    received: list[bytes] = []

    def on_connected(self):
        Echo.peers.append(self.peer)

    def on_recv_packet(self, packet_id, payload):
        Echo.received.append(bytes(payload))
        self.send(packet_id, payload)


@pytest.fixture
def proxied(start_server, raw_peers):
    """`proxied(**options)` -> (server, connect): connect(header, source=PROXY)
    opens a connection and sends `header` first."""
    Echo.peers = []
    Echo.received = []

    def start(**options):
        options.setdefault("trusted_proxies", [PROXY])
        server = start_server(Echo, **options)

        def connect(header: bytes, source: str = PROXY, then: bytes = b""):
            peer = raw_peers(server.port, source=source)
            peer.send(header + then)
            return peer

        return server, connect

    return start


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_trusted_proxy_names_the_client_the_session_sees(proxied, version):
    server, connect = proxied()
    header = (v1 if version == "v1" else v2)("203.0.113.7", 51000, server.port)
    # The balancer's header and the client's first packet often share a segment.
    peer = connect(header, then=packet(ECHO_ID, b"first"))
    poll_until(server, lambda: Echo.received == [b"first"], message=lambda: f"{Echo.peers} {Echo.received}")
    assert Echo.peers == [("203.0.113.7", 51000)]
    assert peer.recv_packet() == (ECHO_ID, b"first")
    assert exchange(server, peer, packet(ECHO_ID, b"second")) == (ECHO_ID, b"second")
    assert [s.peer for s in server.sessions] == [("203.0.113.7", 51000)]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_ipv6_client_behind_an_ipv4_proxy(proxied, version):
    server, connect = proxied()
    header = (v1 if version == "v1" else v2)("2001:db8::7", 40000, server.port)
    peer = connect(header)
    assert exchange(server, peer, packet(ECHO_ID, b"hi")) == (ECHO_ID, b"hi")
    assert Echo.peers == [("2001:db8::7", 40000)]


def test_a_v2_header_with_tlvs_and_one_that_arrives_in_pieces(proxied):
    server, connect = proxied()
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP
    peer = connect(b"")
    header = v2("198.51.100.9", 1234, server.port, tlvs=tlv)
    for piece in (header[:5], header[5:20], header[20:]):
        peer.send(piece)
        time.sleep(0.05)
    assert exchange(server, peer, packet(ECHO_ID, b"ok")) == (ECHO_ID, b"ok")
    assert Echo.peers == [("198.51.100.9", 1234)]


def test_a_local_header_is_the_balancers_own_connection(proxied):
    server, connect = proxied()
    peer = connect(v2(None))
    assert exchange(server, peer, packet(ECHO_ID, b"health")) == (ECHO_ID, b"health")
    assert Echo.peers == [(PROXY, local_port(peer))]


def test_per_address_limits_apply_to_the_real_client(proxied):
    """max_sessions_per_address counts clients, not the balancer: a third
    connection of one client is refused, another client is not."""
    server, connect = proxied(max_sessions_per_address=2)
    for port in (1001, 1002):
        connect(v1("203.0.113.7", port, server.port))
    poll_until(server, lambda: len(server) == 2)
    third = connect(v1("203.0.113.7", 1003, server.port))
    assert third.wait_closed(5), "the client's third connection was kept"
    other = connect(v1("198.51.100.9", 2001, server.port))
    assert exchange(server, other, packet(ECHO_ID, b"x")) == (ECHO_ID, b"x")
    assert server.stats()["rejected_per_address"] == 1
    assert sorted(p[0] for p in Echo.peers) == ["198.51.100.9", "203.0.113.7", "203.0.113.7"]


def test_a_full_server_behind_a_proxy_evicts_a_silent_connection(proxied):
    """As for direct connections: at max_sessions the connection that has
    sent nothing for longest makes room for the newcomer (EVICTED)."""
    server, connect = proxied(max_sessions=2)
    silent = connect(v1("203.0.113.7", 1001, server.port))
    talker = connect(v1("198.51.100.9", 2001, server.port))
    assert exchange(server, talker, packet(ECHO_ID, b"here")) == (ECHO_ID, b"here")
    poll_until(server, lambda: len(server) == 2)
    newcomer = connect(v1("192.0.2.44", 3001, server.port))
    assert silent.wait_closed(5), "the silent connection kept its slot"
    assert exchange(server, newcomer, packet(ECHO_ID, b"in")) == (ECHO_ID, b"in")
    poll_until(server, lambda: server.stats()["disconnects"]["EVICTED"] == 1)
    assert server.stats()["rejected"] == 0


def test_the_accept_rate_applies_to_the_real_client(proxied):
    server, connect = proxied(max_accepts_per_second=1)
    peers = [connect(v1("203.0.113.7", 1000 + n, server.port)) for n in range(4)]
    # A burst of twice the rate, then refusals (the headers are read
    # concurrently, so which two is up to the scheduler).
    closed = [peer.wait_closed(0.5) for peer in peers]
    assert sorted(closed) == [False, False, True, True], closed
    assert server.stats()["rejected_rate"] == 2


@pytest.mark.parametrize(
    "header, says",
    [
        (b"PROXY TCP4 203.0.113.999 127.0.0.1 1 2\r\n", "malformed PROXY v1 header"),
        (b"PROXY TCP9 203.0.113.7 127.0.0.1 1 2\r\n", "malformed PROXY v1 header"),
        (V2_SIGNATURE + bytes([0x21, 0x11, 0x00, 0x02, 1, 2]), "malformed PROXY v2 header"),
        (V2_SIGNATURE + bytes([0x21, 0x11, 0x10, 0x00]), "over the 1024 read"),
        (packet(ECHO_ID, b"no header"), "no PROXY header where one was required"),
    ],
    ids=["bad-address", "bad-protocol", "short-v2", "oversized-v2", "missing"],
)
def test_a_trusted_proxy_with_a_bad_header_is_closed_with_a_reason(proxied, caplog, header, says):
    server, connect = proxied()
    with caplog.at_level(logging.WARNING, logger="servercore"):
        peer = connect(header)
        assert peer.wait_closed(5), "the connection was kept"
        poll_until(server, lambda: server.stats()["disconnects"].get("PROXY_HEADER", 0) == 1)
        poll_until(server, lambda: any("PROXY_HEADER" in r.getMessage() for r in caplog.records))
    (line,) = [r.getMessage() for r in caplog.records if "PROXY_HEADER" in r.getMessage()]
    assert line.startswith(f"{PROXY}:{local_port(peer)}: closed before it was a session: PROXY_HEADER"), line
    assert says in line, line
    assert Echo.peers == [], "a session was announced"


def test_a_proxy_header_from_an_untrusted_address_is_refused(proxied, caplog):
    server, connect = proxied()
    with caplog.at_level(logging.WARNING, logger="servercore"):
        for header in (v1("203.0.113.7", 1, server.port), v2("203.0.113.7", 1, server.port)):
            peer = connect(header, source="127.0.0.6", then=packet(ECHO_ID, b"spoofed"))
            assert peer.wait_closed(5), "a spoofed client was believed"
        poll_until(server, lambda: server.stats()["disconnects"].get("PROXY_HEADER", 0) == 2)
        poll_until(server, lambda: len([r for r in caplog.records if "PROXY_HEADER" in r.getMessage()]) == 2)
    lines = [r.getMessage() for r in caplog.records if "PROXY_HEADER" in r.getMessage()]
    assert all("127.0.0.6 is not in trusted_proxies" in line for line in lines), lines
    assert ("203.0.113.7", 1) not in Echo.peers


def test_without_trusted_proxies_a_proxy_header_is_refused_the_same_way(proxied):
    server, connect = proxied(trusted_proxies=[])
    peer = connect(v1("203.0.113.7", 1, server.port), then=packet(ECHO_ID, b"x"))
    assert peer.wait_closed(5)
    poll_until(server, lambda: server.stats()["disconnects"].get("PROXY_HEADER", 0) == 1)


def test_a_trusted_proxy_that_never_finishes_its_header_is_closed(proxied):
    """The balancer writes the header at once; a connection that has not
    within 5 s holds a socket for nothing."""
    server, connect = proxied()
    honest = connect(v1("198.51.100.9", 2001, server.port))
    started = time.monotonic()
    stalled = connect(b"PROXY TCP4 203.0.113.7 ")
    assert stalled.wait_closed(8), "the stalled header was kept"
    took = time.monotonic() - started
    assert 4.5 <= took <= 7, took
    assert exchange(server, honest, packet(ECHO_ID, b"fine")) == (ECHO_ID, b"fine")
    poll_until(server, lambda: server.stats()["disconnects"].get("PROXY_HEADER", 0) == 1)


def test_a_trusted_proxy_is_a_server_option(start_client):
    from servercore import Client

    with pytest.raises(TypeError, match="trusted_proxies is a Server option"):
        Client(PacketSession, "127.0.0.1", 1, trusted_proxies=[PROXY])


def test_trusted_proxies_must_be_addresses(start_server):
    with pytest.raises(ValueError, match='trusted_proxies: "balancer" is not an IP address'):
        start_server(Echo, trusted_proxies=["balancer"])
