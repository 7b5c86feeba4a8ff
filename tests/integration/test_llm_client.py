"""The LLM client and the answerer's reading of its streams, against the fake upstream."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from bench.fake_upstream import FakeUpstream, answer_text
from qna_gateway.answers import ChatLine, Finished
from qna_gateway.kb import KnowledgeBase
from qna_gateway.llm import OpenAIAnswerer
from qna_gateway.llm_client import TemplatedAsyncOpenAI, make_client
from qna_gateway.settings import Secret, Settings
from qna_gateway.store.pool import make_pool
from qna_gateway.telemetry import create_telemetry
from tests.conftest import base_settings

KEY = "sk-test-key"


@pytest.fixture
def settings(database_url: str, upstream: FakeUpstream) -> Settings:
    return base_settings(
        database_url,
        openai_base_url=upstream.base_url,
        openai_api_key=Secret(KEY),
        model="fake-model",
        kb_mode="tools",
    )


@contextlib.asynccontextmanager
async def client_of(settings: Settings) -> AsyncIterator[TemplatedAsyncOpenAI]:
    client = make_client(settings)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TemplatedAsyncOpenAI]:
    async with client_of(settings) as client:
        yield client


@pytest.fixture
async def answerer(settings: Settings, database_url: str) -> AsyncIterator[OpenAIAnswerer]:
    async with make_pool(database_url, min_size=1, max_size=2, timeout=10) as pool:
        answerer = OpenAIAnswerer(settings, KnowledgeBase(pool), create_telemetry({}))
        yield answerer
        await answerer.aclose()


def options(body: bytes, **extra: Any) -> FinalRequestOptions:
    return FinalRequestOptions.construct(
        method="post", url="/chat/completions", content=body, **extra
    )


def sdk_request(
    client: TemplatedAsyncOpenAI, opts: FinalRequestOptions, retries: int
) -> httpx2.Request:
    """The request the SDK itself builds for `opts`, as if there were no template."""
    return openai.AsyncOpenAI._build_request(client, opts, retries_taken=retries)


def same_request(ours: httpx2.Request, sdk: httpx2.Request) -> None:
    assert (ours.method, ours.url) == (sdk.method, sdk.url)
    assert ours.headers.multi_items() == sdk.headers.multi_items()
    assert ours.read() == sdk.read()
    assert ours.extensions == sdk.extensions


@pytest.mark.parametrize("retries", [0, 2])
def test_a_request_copied_from_the_template_is_the_one_the_sdk_builds(
    client: TemplatedAsyncOpenAI, retries: int
) -> None:
    assert client.templating  # this SDK's options are the known ones: the copy is in use
    first, second = b'{"model":"m","messages":[]}', b'{"model":"m","messages":[{"a":"longer"}]}'
    same_request(
        client._build_request(options(first), retries_taken=retries),
        sdk_request(client, options(first), retries),
    )
    copied = client._build_request(options(second), retries_taken=retries)
    same_request(copied, sdk_request(client, options(second), retries))
    assert copied.headers["authorization"] == f"Bearer {KEY}"
    assert copied.headers["content-length"] == str(len(second))
    assert copied.headers["x-stainless-retry-count"] == str(retries)


def test_requests_with_options_of_their_own_are_built_by_the_sdk(
    client: TemplatedAsyncOpenAI,
) -> None:
    body = b'{"model":"m"}'
    client._build_request(options(body))  # the plain template exists
    for extra in ({"headers": {"X-Extra": "1"}}, {"params": {"q": "1"}}, {"timeout": 3.0}):
        request = client._build_request(options(body, **extra))
        same_request(request, sdk_request(client, options(body, **extra), 0))
    assert client._build_request(options(body, headers={"X-Extra": "1"})).headers["x-extra"] == "1"


PATH = "/chat/completions"
BODY = b'{"model":"fake-model","messages":[{"role":"user","content":"Hi"}],"stream":true}'


def sdk_sends(caplog: pytest.LogCaptureFixture) -> int:
    """Requests the SDK itself sent since the last `caplog.clear()` (its debug log)."""
    return sum(r.getMessage().startswith("Sending HTTP Request") for r in caplog.records)


async def drained(response: httpx2.Response) -> bytes:
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def test_a_streamed_request_past_the_sdk_is_the_one_the_sdk_sends(
    client: TemplatedAsyncOpenAI, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="openai._base_client")
    await drained(await client.stream(PATH, BODY))  # the SDK sends it, and keeps the template
    assert sdk_sends(caplog) == 1
    sdk_headers = upstream.stats()["last_headers"]
    caplog.clear()
    longer = BODY.replace(b'"Hi"', b'"Hi, and a longer question"')
    body = await drained(await client.stream(PATH, longer))
    assert sdk_sends(caplog) == 0  # straight to the transport
    assert b"data: [DONE]" in body
    assert upstream.last_request()["messages"][0]["content"] == "Hi, and a longer question"
    headers = upstream.stats()["last_headers"]
    assert headers.pop("content-length") == str(len(longer))
    assert sdk_headers.pop("content-length") == str(len(BODY))
    assert headers == sdk_headers


async def test_a_first_attempt_past_the_sdk_is_retried_as_the_sdk_retries(
    settings: Settings, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    async with client_of(replace(settings, llm_max_retries=2)) as client:
        caplog.set_level(logging.DEBUG, logger="openai._base_client")
        await drained(await client.stream(PATH, BODY))
        before = upstream.stats()["requests"]
        caplog.clear()
        upstream.set_scenario(fault="http_429", fault_times=1)
        assert b"data: [DONE]" in await drained(await client.stream(PATH, BODY))
        assert upstream.stats()["faults"]["http_429"] == 1
        assert upstream.stats()["requests"] == before + 2
        assert sdk_sends(caplog) == 1  # the retry, after the SDK's back-off
        # Failing every time: as many attempts in all as the SDK makes (1 + max_retries),
        # and its error at the end.
        upstream.set_scenario(fault="http_500")
        before = upstream.stats()["requests"]
        with pytest.raises(openai.InternalServerError, match="server had an error"):
            await client.stream(PATH, BODY)
        assert upstream.stats()["requests"] == before + 3


@pytest.mark.parametrize("status", [400, 500])
async def test_an_error_status_past_the_sdk_raises_the_sdk_s_error(
    settings: Settings, upstream: FakeUpstream, status: int
) -> None:
    async with client_of(replace(settings, llm_max_retries=0)) as client:
        await drained(await client.stream(PATH, BODY))
        if status == 400:
            body = b"not json"
        else:
            body = BODY
            upstream.set_scenario(fault="http_500")
        with pytest.raises(openai.APIStatusError) as ours:
            await client.stream(PATH, body)
        with pytest.raises(openai.APIStatusError) as sdk:
            await client.post(PATH, cast_to=httpx2.Response, content=body, stream=True)
        assert type(ours.value) is type(sdk.value)
        assert ours.value.status_code == status
        assert (ours.value.message, ours.value.body) == (sdk.value.message, sdk.value.body)


async def test_a_connection_refused_past_the_sdk_is_the_sdk_s_connection_error(
    settings: Settings,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = replace(settings, openai_base_url=f"http://127.0.0.1:{port}/v1", llm_max_retries=0)
    async with client_of(closed) as client:
        with pytest.raises(openai.APIConnectionError) as sdk:
            await client.stream(PATH, BODY)  # the SDK's attempt, which leaves the template
        with pytest.raises(openai.APIConnectionError) as ours:
            await client.stream(PATH, BODY)
        assert type(ours.value) is type(sdk.value)
        assert type(ours.value.__cause__) is httpx2.ConnectError


async def test_consecutive_answers_send_each_its_own_conversation(
    answerer: OpenAIAnswerer, upstream: FakeUpstream
) -> None:
    for question in ("What is the deposit?", "And how long does a refund take, exactly?"):
        conversation = [ChatLine("system", "Be brief."), ChatLine("user", question)]
        texts: list[str] = []
        events = [event async for event in answerer.answer(conversation, texts.append)]
        assert isinstance(events[-1], Finished)
        assert "".join(texts) == answer_text(upstream.scenario)
        sent = upstream.last_request()
        assert sent["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
        ]
        headers = upstream.stats()["last_headers"]
        assert headers["authorization"] == f"Bearer {KEY}"
        assert headers["content-type"] == "application/json"


async def test_an_error_in_the_text_sink_is_not_blamed_on_the_llm(
    settings: Settings, database_url: str
) -> None:
    """The sink is the gateway's own code: its failure is a bug that goes up as itself (the
    turn logs it and ends the answer with an internal error), not "a malformed chunk", and the
    circuit breaker does not hold it against the LLM."""

    def broken_sink(text: str) -> None:
        raise ValueError("the sink broke")

    telemetry = create_telemetry({})
    async with make_pool(database_url, min_size=1, max_size=2, timeout=10) as pool:
        answerer = OpenAIAnswerer(
            replace(settings, llm_breaker_failures=1), KnowledgeBase(pool), telemetry
        )
        try:
            with pytest.raises(ValueError, match="the sink broke"):
                async for _ in answerer.answer([ChatLine("user", "Hello?")], broken_sink):
                    pass
            # One failure would open a breaker that counted it: the next answer would fail.
            texts: list[str] = []
            events = [e async for e in answerer.answer([ChatLine("user", "Hi")], texts.append)]
            assert isinstance(events[-1], Finished)
            assert texts
        finally:
            await answerer.aclose()
    registry = telemetry.metrics.registry
    assert registry.get_sample_value("llm_calls_total", {"status": "error"}) == 1
    assert registry.get_sample_value("llm_calls_total", {"status": "success"}) == 1


async def test_a_malformed_chunk_is_still_the_llm_s_fault(
    answerer: OpenAIAnswerer, upstream: FakeUpstream
) -> None:
    from qna_gateway.answers import AnswerError

    upstream.set_scenario(fault="malformed", fault_after=2)
    texts: list[str] = []
    with pytest.raises(AnswerError, match="malformed chunk") as caught:
        async for _ in answerer.answer([ChatLine("user", "Hello?")], texts.append):
            pass
    assert caught.value.kind == "malformed_chunk"
    assert len(texts) == 2
