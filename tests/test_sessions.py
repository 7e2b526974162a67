"""The sessions a server holds: `sessions`, `len()` and `max_sessions`.

`sessions` is a snapshot of the session objects whose on_connected has run,
oldest first; `len(server)` counts them. Beyond `max_sessions`, a connection is
closed at once and never becomes a session.
"""

from __future__ import annotations

from support import exchange, local_port, packet, poll_until, recorder


def test_sessions_is_a_snapshot_of_the_session_objects_oldest_first(start_server, raw_peers):
    Recorder = recorder()
    server = start_server(Recorder)
    peers = []
    for _ in range(3):
        peers.append(raw_peers(server.port))
        poll_until(server, lambda: len(Recorder.sessions) == len(peers))
    assert len(server) == 3
    snapshot = server.sessions
    assert isinstance(snapshot, list)
    assert [s is c for s, c in zip(snapshot, Recorder.sessions)] == [True, True, True]
    assert all(isinstance(s, Recorder) for s in snapshot)
    assert len({s.id for s in snapshot}) == 3
    assert [s.peer for s in snapshot] == [("127.0.0.1", local_port(p)) for p in peers]
    assert all(s.connected for s in snapshot)

    snapshot[0].disconnect()
    assert snapshot[0].connected is False
    poll_until(server, lambda: len(server) == 2)
    assert len(snapshot) == 3, "the snapshot changed under the caller"
    assert server.sessions == snapshot[1:]

    peers[1].close()
    poll_until(server, lambda: len(server) == 1)
    assert snapshot[1].connected is False
    assert server.sessions == [snapshot[2]]


def test_max_sessions_rejects_the_connection_over_the_limit(start_server, raw_peers):
    Echo = recorder(echo=True)
    server = start_server(Echo, max_sessions=3)
    peers = [raw_peers(server.port) for _ in range(3)]
    poll_until(server, lambda: len(server) == 3)
    # Sessions that have spoken are never evicted for a newcomer (a silent
    # one would be: tests/test_hostile.py).
    for n, peer in enumerate(peers):
        assert exchange(server, peer, packet(8, bytes([n]))) == (8, bytes([n]))
    extra = raw_peers(server.port)
    closed = extra.wait_closed(2)
    server.poll(0.1)
    assert closed, "the 4th connection was not closed"
    assert server.stats()["rejected"] == 1
    assert local_port(extra) not in Echo.ids_by_port
    assert len(server) == 3
    for n, peer in enumerate(peers):
        assert exchange(server, peer, packet(8, bytes([n]))) == (8, bytes([n]))
