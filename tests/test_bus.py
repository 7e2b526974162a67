"""The bus (rust/bus.rs, rust/bindings/bus.rs): servers of one cluster
(here two Servers in this process, as two workers would be) share
broadcasts, rooms and a directory of sessions over a real redis-server that
each test starts on a free port (tests/redis_support.py).

What is published is fanned out by each server's engine to its own
sessions, without the server's polling thread: the tests below do not poll
the receiving server at all while its players read. Delivery is at most
once; order holds per publisher. When Redis goes away, local play goes on,
publishing says False at once and counts it, and the bus comes back by
itself, subscribed again to its rooms.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest

from servercore import Bus, PacketSession

from redis_support import RedisServer
from support import connect, exchange, free_port, packet, poll_until

NOTICE = 3
SEQ = struct.Struct("<I")


class Echo(PacketSession):
    def on_recv_packet(self, packet_id, payload):
        self.send(packet_id, payload)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cluster(start_server, raw_peers, redis):
    """`cluster(n)` -> n (server, bus, peers) of 3 announced players each."""
    buses: list[Bus] = []

    def make(count: int = 2, players: int = 3, **bus_options):
        nodes = []
        for index in range(count):
            server = start_server(Echo)
            bus = Bus(server, redis.url, node=f"worker-{index}", **bus_options)
            buses.append(bus)
            peers = connect(server, raw_peers, players)
            for peer in peers:  # announced: broadcasts reach them
                assert exchange(server, peer, packet(7, b"hi")) == (7, b"hi")
            nodes.append((server, bus, peers))
        wait_connected([bus for _, bus, _ in nodes])
        redis.wait_subscribers("servercore:all", count)
        return nodes

    yield make
    for bus in buses:
        bus.close()


def wait_connected(buses, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(bus.connected for bus in buses):
        assert time.monotonic() < deadline, [bus.stats() for bus in buses]
        time.sleep(0.02)


def wait_published(bus: Bus, count: int, timeout: float = 5.0) -> None:
    """A publish is counted when Redis has answered the publisher, which may
    come after the subscribers have the message."""
    deadline = time.monotonic() + timeout
    while bus.stats()["published"] < count:
        assert time.monotonic() < deadline, bus.stats()
        time.sleep(0.01)
    assert bus.stats()["published"] == count


def test_a_cluster_broadcast_reaches_every_player_of_every_server_once(cluster):
    (server_a, bus_a, peers_a), (server_b, bus_b, peers_b) = cluster()
    assert bus_a.broadcast(NOTICE, b"server restarts in 5 minutes") is True
    for peer in peers_a + peers_b:
        assert peer.recv_packet_with_id(NOTICE) == b"server restarts in 5 minutes"
    stats = bus_b.stats()
    assert stats["received"] == 1 and stats["delivered"] == 3 and stats["malformed"] == 0
    wait_published(bus_a, 1)
    # Exactly once: an echo comes next, not a second notice.
    for server, peers in ((server_a, peers_a), (server_b, peers_b)):
        for peer in peers:
            assert exchange(server, peer, packet(7, b"next")) == (7, b"next")


def test_a_room_spans_servers_and_one_publish_reaches_its_members_only(cluster, redis):
    (server_a, bus_a, peers_a), (server_b, bus_b, peers_b) = cluster()
    guild_a, guild_b = bus_a.room("guild"), bus_b.room("guild")
    assert bus_a.room("guild") is guild_a
    sessions_a, sessions_b = list(server_a.sessions), list(server_b.sessions)
    guild_a.add(sessions_a[0])
    guild_b.add(sessions_b[1])
    guild_b.add(sessions_b[2])
    redis.wait_subscribers("servercore:room:guild", 2)
    assert bus_b.publish("guild", NOTICE, b"raid at 8") is True
    members = [peers_a[0], peers_b[1], peers_b[2]]
    for peer in members:
        assert peer.recv_packet_with_id(NOTICE) == b"raid at 8"
    for server, peer in ((server_a, peers_a[1]), (server_a, peers_a[2]), (server_b, peers_b[0])):
        assert exchange(server, peer, packet(7, b"x")) == (7, b"x"), "a non-member got the guild's packet"


def test_a_closed_room_no_longer_receives(cluster, redis):
    (server_a, bus_a, peers_a), (server_b, bus_b, peers_b) = cluster()
    bus_a.room("match-7").add(list(server_a.sessions)[0])
    bus_b.room("match-7").add(list(server_b.sessions)[0])
    redis.wait_subscribers("servercore:room:match-7", 2)
    assert bus_b.close_room("match-7") is True
    assert bus_b.close_room("match-7") is False
    redis.wait_subscribers("servercore:room:match-7", 1)  # B unsubscribed
    assert bus_a.publish("match-7", NOTICE, b"gg") is True
    assert peers_a[0].recv_packet_with_id(NOTICE) == b"gg"
    assert exchange(server_b, peers_b[0], packet(7, b"x")) == (7, b"x"), "a closed room still received"
    assert bus_b.stats()["delivered"] == 0


def test_a_player_on_another_server_is_reached_through_the_directory(cluster):
    (server_a, bus_a, peers_a), (server_b, bus_b, peers_b) = cluster(directory_ttl=1.5)
    alice = list(server_b.sessions)[0]
    assert bus_b.register("alice", alice) is True
    deadline = time.monotonic() + 5
    while (address := bus_a.lookup("alice")) is None:
        assert time.monotonic() < deadline, "alice never appeared in the directory"
        time.sleep(0.02)
    assert address == bus_b.address(alice) == f"worker-1/{alice.id}"
    assert bus_a.send_to(address, NOTICE, b"psst") is True
    assert peers_b[0].recv_packet_with_id(NOTICE) == b"psst"
    assert bus_a.lookup("nobody") is None
    # Alice leaves: the heartbeat (a third of the TTL) takes her name out.
    peers_b[0].close()
    poll_until(server_b, lambda: len(server_b) == 2)
    deadline = time.monotonic() + 5
    while bus_a.lookup("alice") is not None:
        assert time.monotonic() < deadline, "alice stayed in the directory after she left"
        time.sleep(0.05)


def test_a_crashed_servers_directory_entries_expire(cluster, redis):
    (_, bus_a, _), (server_b, bus_b, _) = cluster(directory_ttl=1)
    bob = list(server_b.sessions)[0]
    bus_b.register("bob", bob)
    deadline = time.monotonic() + 5
    while bus_a.lookup("bob") is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    bus_b.close()  # as if its worker were killed: no heartbeat, no cleanup
    time.sleep(1.5)
    assert bus_a.lookup("bob") is None


def test_every_packet_arrives_in_the_order_its_publisher_sent_it(cluster):
    (_, bus_a, _), (_, _, peers_b) = cluster(players=2)
    count = 3000
    for seq in range(count):
        assert bus_a.broadcast(NOTICE, SEQ.pack(seq))
    for peer in peers_b:
        got = [SEQ.unpack(peer.recv_packet_with_id(NOTICE))[0] for _ in range(count)]
        assert got == list(range(count))


def test_when_redis_goes_away_local_play_goes_on_and_the_bus_comes_back(cluster, redis):
    (server_a, bus_a, peers_a), (server_b, bus_b, peers_b) = cluster()
    bus_a.room("guild").add(list(server_a.sessions)[0])
    bus_b.room("guild").add(list(server_b.sessions)[0])
    redis.wait_subscribers("servercore:room:guild", 2)
    redis.stop()
    deadline = time.monotonic() + 10
    while bus_a.connected or bus_b.connected:
        assert time.monotonic() < deadline, "the buses did not notice Redis was gone"
        time.sleep(0.02)
    failed_before = bus_a.stats()["publish_failed"]
    assert bus_a.broadcast(NOTICE, b"lost") is False
    assert bus_a.publish("guild", NOTICE, b"lost") is False
    assert bus_a.stats()["publish_failed"] == failed_before + 2
    # Local play: echoes and the server's own broadcast still work.
    for peer in peers_a:
        assert exchange(server_a, peer, packet(7, b"local")) == (7, b"local")
    assert server_a.broadcast(NOTICE, b"local notice") == 3
    for peer in peers_a:
        assert peer.recv_packet_with_id(NOTICE) == b"local notice"
    redis.start()
    wait_connected([bus_a, bus_b], timeout=15)
    redis.wait_subscribers("servercore:room:guild", 2)  # subscribed again
    assert bus_a.stats()["reconnects"] >= 1
    assert bus_a.publish("guild", NOTICE, b"back") is True
    assert peers_a[0].recv_packet_with_id(NOTICE) == b"back"
    assert peers_b[0].recv_packet_with_id(NOTICE) == b"back"


def test_a_message_that_is_not_a_packet_is_counted_and_dropped(cluster, redis):
    ((server_a, bus_a, peers_a),) = cluster(count=1)
    answer = redis.command("PUBLISH", "servercore:all", "\x01garbage")
    assert answer.startswith(b":1")
    deadline = time.monotonic() + 5
    while bus_a.stats()["malformed"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert bus_a.stats()["delivered"] == 0
    for peer in peers_a:
        assert exchange(server_a, peer, packet(7, b"fine")) == (7, b"fine")


def test_a_wrong_url_is_a_clear_error_and_an_unreachable_one_is_a_disconnected_bus(start_server):
    server = start_server(Echo)
    with pytest.raises(ValueError, match="bus url .*write redis://host:port/db"):
        Bus(server, "http://example")
    bus = Bus(server, f"redis://127.0.0.1:{free_port()}/0")
    try:
        time.sleep(0.3)
        assert bus.connected is False
        assert bus.broadcast(NOTICE, b"x") is False
        with pytest.raises(ConnectionError, match="bus: "):
            bus.lookup("anyone")
    finally:
        bus.close()


def test_a_bus_whose_server_stopped_says_so(start_server, redis):
    server = start_server(Echo)
    bus = Bus(server, redis.url)
    wait_connected([bus])
    server.stop()
    deadline = time.monotonic() + 5
    while bus.connected:
        assert time.monotonic() < deadline, "the bus still says connected after its server stopped"
        time.sleep(0.02)
    assert bus.broadcast(NOTICE, b"x") is False
    with pytest.raises(ConnectionError, match="bus: "):
        bus.lookup("anyone")
    bus.close()


def test_a_bus_needs_a_started_server(start_server, redis):
    from servercore import Server

    server = Server(Echo, "127.0.0.1", 0)
    with pytest.raises(RuntimeError, match="not started"):
        Bus(server, redis.url)
    peer_server = start_server(Echo)
    bus = Bus(peer_server, redis.url)
    with pytest.raises(ValueError, match="bus address"):
        bus.send_to("no-slash", NOTICE, b"")
    bus.close()


def test_every_open_bus_is_in_the_metrics(cluster):
    from servercore.metrics import serve_metrics

    from test_metrics import scrape

    (server_a, bus_a, peers_a), (_, bus_b, _) = cluster()
    bus_b.broadcast(NOTICE, b"to all")
    for peer in peers_a:
        assert peer.recv_packet_with_id(NOTICE) == b"to all"
    wait_published(bus_b, 1)
    with serve_metrics(server_a) as endpoint:
        metrics = scrape(endpoint.url)
    labels = (("node", "worker-0"),)
    assert metrics[("servercore_bus_connected", labels)] == 1
    assert metrics[("servercore_bus_received_total", labels)] == 1
    assert metrics[("servercore_bus_delivered_total", labels)] == 3
    assert metrics[("servercore_bus_published_total", (("node", "worker-1"),))] == 1
    bus_b.close()
    with serve_metrics(server_a) as endpoint:
        metrics = scrape(endpoint.url)
    assert ("servercore_bus_connected", (("node", "worker-1"),)) not in metrics, "a closed bus is still exported"
