"""Prometheus metrics (python/servercore/metrics.py), scraped over HTTP on
loopback while a real load runs: every stats() figure is there with the
value the server reports, disconnect reasons and refusals as labels, and the
poll-lag histogram fills as the polling thread runs. `servercore serve
--metrics-port` serves every worker's metrics at once (tests/test_workers.py
starts it; here it is scraped during a load)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from servercore import PacketSession
from servercore.metrics import serve_metrics

from support import connect, exchange, header, packet, poll_for, poll_until, send_ignoring_close


class Echo(PacketSession):
    def on_recv_packet(self, packet_id, payload):
        self.send(packet_id, payload)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_during_load_shows_what_stats_says(start_server, raw_peers):
    server = start_server(Echo)
    with serve_metrics(server) as endpoint:
        peers = connect(server, raw_peers, 5)
        for round_ in range(20):
            for peer in peers:
                assert exchange(server, peer, packet(7, bytes([round_]))) == (7, bytes([round_]))
        bad = raw_peers(server.port)
        send_ignoring_close(bad, header(2, 1))
        poll_until(server, lambda: server.stats()["disconnects"]["INVALID_HEADER"] == 1)
        poll_for(server, 0.6)  # the poll-lag probe ticks every 0.25 s
        metrics = scrape(endpoint.url)
        stats = server.stats()
    assert metrics[("servercore_sessions", ())] == 5
    assert metrics[("servercore_packets_in_total", ())] == stats["packets_in"] == 100
    assert metrics[("servercore_packets_out_total", ())] == stats["packets_out"]
    assert metrics[("servercore_accepted_total", ())] == stats["accepted"] == 6
    assert metrics[("servercore_disconnects_total", (("reason", "INVALID_HEADER"),))] == 1
    assert metrics[("servercore_disconnects_total", (("reason", "CLOSED_BY_PEER"),))] == 0
    assert metrics[("servercore_refused_total", (("limit", "max_sessions_per_address"),))] == 0
    assert metrics[("servercore_poll_lag_seconds_count", ())] >= 2
    assert metrics[("servercore_send_queue_bytes", ())] == stats["send_queue_bytes"]


def test_closing_the_endpoint_frees_its_port(start_server):
    server = start_server(Echo)
    endpoint = serve_metrics(server)
    port = endpoint.port
    endpoint.close()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    except OSError:
        pass
    else:
        raise AssertionError("the endpoint still answers after close()")
