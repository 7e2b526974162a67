"""The shortest path through the library: a server, a client, one echo."""

from servercore import PacketSession

from support import poll_until


class Echo(PacketSession):
    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        self.send(packet_id, payload)


class Hello(PacketSession):
    received: list[tuple[int, bytes]] = []

    def on_connected(self) -> None:
        self.send(7, b"hello")

    def on_recv_packet(self, packet_id: int, payload: bytes) -> None:
        Hello.received.append((packet_id, payload))


def test_a_client_packet_is_echoed_back(start_server, start_client):
    server = start_server(Echo)
    client = start_client(Hello, server.port)
    poll_until([server, client], lambda: Hello.received, message="no echo")
    assert Hello.received == [(7, b"hello")]
