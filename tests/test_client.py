"""Client: N sessions to one server (the lecture's DummyClient)."""

from __future__ import annotations

import pytest

from servercore import Client, PacketSession

from support import free_port, poll_until, recorder


def test_client_count_opens_that_many_sessions(start_server, start_client):
    Recorder = recorder()
    server = start_server(PacketSession)
    client = start_client(Recorder, server.port, count=7)
    assert client.count == 7
    poll_until([server, client], lambda: len(Recorder.sessions) == 7 and len(server) == 7)
    assert len(client) == 7
    assert len(client.sessions) == 7
    assert len({s.id for s in Recorder.sessions}) == 7
    assert {s.peer for s in client.sessions} == {("127.0.0.1", server.port)}


def test_client_to_a_port_where_nothing_listens_raises_connection_refused():
    client = Client(PacketSession, "127.0.0.1", free_port(), count=3)
    try:
        with pytest.raises(ConnectionRefusedError):
            client.start()
    finally:
        client.stop()
