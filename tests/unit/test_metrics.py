"""Collectors read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from qna_gateway.metrics import create_metrics


def test_services_brought_up_again_replace_what_they_watched() -> None:
    """A start retried after its pool was already watched (the database went away during
    start-up) watches the new pool and listener, once each, not the old ones beside them."""
    registry = CollectorRegistry()
    metrics = create_metrics(registry)
    metrics.watch_pool(lambda: {"pool_max": 5})
    metrics.watch_event_listener(lambda: False)
    metrics.watch_pool(lambda: {"pool_max": 7})
    metrics.watch_event_listener(lambda: True)
    text = generate_latest(registry).decode()
    assert 'db_pool_connections{state="max"} 7.0' in text
    assert 'db_pool_connections{state="max"} 5.0' not in text
    assert "db_event_listener_up 1.0" in text
    assert len(metrics.extra_collectors) == 2
