"""Several processes behind one scrape: prometheus-client's multiprocess mode adds them up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServeProcess


def total(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return 0.0


async def test_counters_add_up_across_processes(
    serve_factory: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    first = serve_factory(PROMETHEUS_MULTIPROC_DIR=str(shared))
    second = serve_factory(PROMETHEUS_MULTIPROC_DIR=str(shared))
    async with (
        httpx.AsyncClient(base_url=first.base_url) as a,
        httpx.AsyncClient(base_url=second.base_url) as b,
    ):
        for _ in range(2):
            assert (await a.post("/v1/chats", json={})).status_code == 201
        for _ in range(3):
            assert (await b.post("/v1/chats", json={})).status_code == 201
        scraped_a = (await a.get("/metrics")).text
        scraped_b = (await b.get("/metrics")).text
    # Either process reports the sum of both.
    assert total(scraped_a, "chat_sessions_total") == 5
    assert total(scraped_b, "chat_sessions_total") == 5
    assert "db_pool_connections" in scraped_a
