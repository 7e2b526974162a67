"""Prometheus metrics for a running server (prometheus_client).

    from servercore.metrics import serve_metrics

    server = Server(Game, port=7777)
    server.start()
    serve_metrics(server, port=9100)       # http://host:9100/metrics
    server.run_forever()

Every figure of ``server.stats()`` is exported at scrape time (nothing is
counted twice): counters as ``servercore_<name>_total``, gauges as
``servercore_<name>``, disconnects by reason as
``servercore_disconnects_total{reason="INVALID_HEADER"}``, refusals at accept
by cause. Poll lag, how late the polling thread runs what is due, is measured
by a probe timer on that thread (``servercore_poll_lag_seconds``, a
histogram): a game whose callbacks are too slow shows it here first.
Every open Bus of the process is exported too, labelled by its node: its
state as ``servercore_bus_connected`` and its counters (published,
publish_failed, received, delivered, malformed, reconnects).

``servercore serve --metrics-port`` runs one of these in every worker and
serves them together from the supervisor, each series labelled with its
worker (servercore.workers).

Needs the ``prometheus-client`` package (``pip install servercore[metrics]``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Histogram, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "servercore.metrics needs prometheus-client: pip install 'servercore[metrics]'"
    ) from error

from servercore._core import Server, _bus_stats

__all__ = ["BusCollector", "MetricsEndpoint", "ServerCollector", "serve_metrics"]

# stats() keys that only grow; the others are levels.
COUNTERS = {
    "accepted": "connections accepted",
    "connected": "connections a client made",
    "connect_failed": "connection attempts of a client that failed",
    "bytes_in": "bytes received",
    "bytes_out": "bytes sent",
    "packets_in": "packets received",
    "packets_out": "packets sent",
    "packets_discarded": "packets received for sessions that had ended",
    "unsent_bytes_dropped": "bytes still queued when their session ended",
    "pool_buffers_encoded": "packets encoded into the send buffer pool",
    "pool_bytes_encoded": "bytes encoded into the send buffer pool",
}
GAUGES = {
    "sessions": "open sessions",
    "pending_events": "events waiting for the polling thread",
    "pending_recv_bytes": "received bytes waiting for the polling thread",
    "send_queue_bytes": "bytes queued to send, all sessions",
    "pool_chunks": "send buffer pool chunks",
    "pool_chunks_in_use": "send buffer pool chunks holding packets",
    "pool_chunk_size": "bytes per send buffer pool chunk",
}
REFUSALS = {"rejected": "max_sessions", "rejected_per_address": "max_sessions_per_address",
            "rejected_rate": "max_accepts_per_second"}

PROBE_INTERVAL = 0.25
"""How often the poll-lag probe is due (seconds)."""

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerCollector(Collector):
    """``server.stats()`` as Prometheus metrics, read at each scrape."""

    def __init__(self, server: Server, prefix: str = "servercore") -> None:
        self.server = server
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        stats = self.server.stats()
        p = self.prefix
        for key, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"{p}_{key}", help_text, value=stats[key])
        for key, help_text in GAUGES.items():
            yield GaugeMetricFamily(f"{p}_{key}", help_text, value=stats[key])
        refused = CounterMetricFamily(f"{p}_refused", "connections refused at accept, by the limit that refused them",
                                      labels=["limit"])
        for key, limit in REFUSALS.items():
            refused.add_metric([limit], stats[key])
        yield refused
        disconnects = CounterMetricFamily(f"{p}_disconnects", "sessions ended, by DisconnectReason",
                                          labels=["reason"])
        for reason, count in stats["disconnects"].items():
            disconnects.add_metric([reason], count)
        yield disconnects


BUS_COUNTERS = {
    "published": "packets published to Redis",
    "publish_failed": "publishes that failed (Redis unreachable, or lost with the connection)",
    "received": "messages received from Redis",
    "delivered": "packets the bus queued on local sessions",
    "malformed": "messages from Redis that were not one packet for a known channel",
    "reconnects": "times a connection to Redis was made again",
}

class BusCollector(Collector):
    """Every open bus's state and counters, labelled by node."""

    def collect(self) -> Iterator[Any]:
        buses = _bus_stats()
        connected = GaugeMetricFamily("servercore_bus_connected", "whether Redis is reachable now", labels=["node"])
        families = {key: CounterMetricFamily(f"servercore_bus_{key}", text, labels=["node"])
                    for key, text in BUS_COUNTERS.items()}
        for stats in buses:
            node = str(stats["node"])
            connected.add_metric([node], 1.0 if stats["connected"] else 0.0)
            for key, family in families.items():
                family.add_metric([node], float(stats[key]))
        yield connected
        yield from families.values()


class PollLagProbe:
    """A timer on the polling thread that notes how late it runs."""

    def __init__(self, server: Server, registry: CollectorRegistry, interval: float = PROBE_INTERVAL) -> None:
        self.histogram = Histogram("servercore_poll_lag_seconds",
                                   "how late the polling thread ran a timer that was due",
                                   buckets=LAG_BUCKETS, registry=registry)
        self.interval = interval
        self.due = time.monotonic() + interval
        self.timer = server.call_every(interval, self.tick)

    def tick(self) -> None:
        now = time.monotonic()
        self.histogram.observe(max(0.0, now - self.due))
        # Fixed rate: a late tick is followed by the next one on schedule.
        while self.due <= now:
            self.due += self.interval


class MetricsEndpoint:
    """A running metrics endpoint: ``port``, ``url``, ``close()`` (also as a
    context manager)."""

    def __init__(self, httpd: Any, probe: PollLagProbe) -> None:
        self._httpd = httpd
        self._probe = probe
        self.port = int(httpd.server_port)
        self.url = f"http://{httpd.server_address[0]}:{self.port}/metrics"

    def close(self) -> None:
        self._probe.timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(server: Server, port: int = 0, host: str = "127.0.0.1",
                  registry: CollectorRegistry | None = None) -> MetricsEndpoint:
    """Serves ``server``'s metrics on http://host:port/metrics from a daemon
    thread (``port=0`` picks a free one: see ``.port``). The server must be
    started: the poll-lag probe is one of its timers."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(ServerCollector(server))
    registry.register(BusCollector())
    probe = PollLagProbe(server, registry)
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(httpd, probe)
