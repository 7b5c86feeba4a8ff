"""Which LLM base URLs go through a proxy: the usual environment variables decide."""

from __future__ import annotations

import pytest

from qna_gateway.llm_client import proxy_for

PROXY_VARIABLES = ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"]


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_no_proxy_variables_means_a_direct_connection() -> None:
    assert proxy_for("https://api.openai.com/v1") is None


def test_the_proxy_for_the_scheme_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert proxy_for("https://api.openai.com/v1") == "http://proxy.internal:3128"
    assert proxy_for("http://vllm.internal:8000/v1") is None  # no HTTP_PROXY


def test_all_proxy_covers_every_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://proxy.internal:1080")
    assert proxy_for("http://vllm.internal:8000/v1") == "socks5://proxy.internal:1080"


def test_no_proxy_leaves_hosts_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    assert proxy_for("http://vllm.internal:8000/v1") is None
    assert proxy_for("https://api.openai.com/v1") == "http://proxy.internal:3128"
