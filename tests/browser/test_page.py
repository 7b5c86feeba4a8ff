"""The chat page in a real browser: streaming, resuming, reconnecting, cancelling, escaping.

Every wait is on a DOM condition (playwright's `expect` retries until it holds); answers are
paced by the fake upstream so that "mid-answer" lasts seconds, not milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from playwright.async_api import Locator, Page, Request, expect

from bench.fake_upstream import FakeUpstream
from qna_gateway.settings import Secret
from tests.browser.conftest import OUTPUT, PageProblems, ProxyFactory
from tests.conftest import ROOT, GatewayFactory, ServeProcess

QUESTION = "What is the security deposit for renting a tent?"
ANSWER = (
    "A refundable security deposit is held on your credit card when you pick up a rental "
    "tent: $100 for both the 2-person and the 4-person tent. It is released within 3 "
    "business days after the tent comes back and passes inspection.\n\n"
    "Deposits cannot be paid with a debit card, gift card or Cairn Pay."
)
SEARCH = [{"name": "search_knowledge_base", "arguments": '{"query": "tent rental deposit"}'}]
# Characters outside the Basic Multilingual Plane are one code point (the gateway's unit of
# offsets) but two UTF-16 units (JavaScript's string length): resuming must count the former.
ASTRAL = "Pack the tent 🏕 dry — the 🎒 deposit is $100 ✓ and 👍 returns are easy 🌲. " * 4
SLOW = {"tokens_per_second": 20}
INJECTION = '<img src=x onerror="window.__pwned = 1; alert(1)"> <script>alert(2)</script> &amp;'
STREAM_ID = re.compile(r"^[0-9a-f]{8}\.\d+(\.t\d+)?$")
DOCS_SCREENSHOT = ROOT / "docs" / "page.png"


@dataclass
class Answer:
    item: Locator
    chat_id: str
    message_id: str

    @property
    def content(self) -> Locator:
        return self.item.locator(".message-content")

    async def text(self) -> str:
        return await self.content.text_content() or ""

    @property
    def tag(self) -> str:
        """What event ids of this answer start with."""
        return self.message_id.replace("-", "")[:8]


def eventsource_requests(page: Page) -> list[Request]:
    """Every EventSource request the page makes from now on (reconnects included)."""
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if r.resource_type == "eventsource" else None)
    return seen


async def open_page(page: Page, url: str) -> None:
    response = await page.goto(url)
    assert response is not None
    assert response.status == 200
    await expect(page.get_by_role("heading", name="Chats")).to_be_visible()


async def ask(page: Page, question: str) -> Answer:
    """Ask in the open chat (or a new one); the answer as soon as it is on the page."""
    answers = page.locator("li.message-assistant")
    before = await answers.count()
    await page.get_by_label("Your question").fill(question)
    await page.get_by_role("button", name="Ask", exact=True).click()
    await expect(answers).to_have_count(before + 1)
    return await answer_at(page, before)


async def answer_at(page: Page, index: int) -> Answer:
    item = page.locator("li.message-assistant").nth(index)
    message_id = await item.get_attribute("data-message-id")
    assert message_id is not None
    chat = re.search(r"#chat=([0-9a-f-]{36})$", page.url)
    assert chat is not None, page.url
    return Answer(item, chat[1], message_id)


async def stored(client: httpx.AsyncClient, answer: Answer, prefix: str = "") -> dict[str, Any]:
    response = await client.get(f"{prefix}/v1/chats/{answer.chat_id}/messages/{answer.message_id}")
    assert response.status_code == 200, response.text
    message: dict[str, Any] = response.json()
    return message


async def wait_until_ended(answer: Answer, status: str = "completed") -> None:
    await expect(answer.item).to_have_attribute("data-status", status)


async def check_complete(page: Page, answer: Answer, client: httpx.AsyncClient) -> str:
    """The page shows exactly the stored answer, reached over SSE without any repair."""
    await wait_until_ended(answer)
    message = await stored(client, answer)
    assert message["status"] == "completed"
    assert await answer.text() == message["content"]
    assert await answer.item.get_attribute("data-transport") == "sse"
    assert await page.locator("[data-resynced]").count() == 0
    content: str = message["content"]
    return content


# -- the tests ---------------------------------------------------------------------------------


async def test_ask_streams_the_answer_with_its_sources(
    page: Page, gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    upstream.set_scenario(text=ANSWER, tool_calls=SEARCH, tokens_per_second=40)
    for title in ("Returning opened fuel canisters", "Do gift cards expire?"):
        await gateway.create_chat(title=title)
    streams = eventsource_requests(page)
    response = await page.goto(gateway.base_url + "/")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'none'" in csp

    answer = await ask(page, QUESTION)
    # Deltas are painted as they arrive: part of the answer while it is still streaming.
    await expect(answer.item).to_have_attribute("data-status", "streaming")
    await expect(answer.content).to_have_text(re.compile(r"\S"))
    await expect(answer.item.locator(".message-status")).to_have_text("Answering…")
    assert len(await answer.text()) < len(ANSWER)
    await expect(page.get_by_role("button", name="Stop")).to_be_visible()

    assert await check_complete(page, answer, gateway.client) == ANSWER
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    await expect(page.get_by_role("button", name="Ask", exact=True)).to_be_enabled()
    # The knowledge-base search and the sources it found, as citations.
    await expect(answer.item.locator(".tool-call")).to_contain_text(
        re.compile(r"Searched the knowledge base for tent rental deposit — \d+ passages?")
    )
    citation = answer.item.locator(".source-document").first
    await expect(citation).to_have_text("repairs-and-rentals.md")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=OUTPUT / "page.png")
    if os.environ.get("QNA_UPDATE_DOCS_SCREENSHOT"):  # refreshes the README's picture
        shutil.copyfile(OUTPUT / "page.png", DOCS_SCREENSHOT)
    await answer.item.locator(".source summary").first.click()
    await expect(answer.item.locator(".source-snippet").first).to_be_visible()
    # One stream, closed by the page at the terminal event (no reconnect after the end).
    assert len(streams) == 1
    # The new chat got the question as its title; it is open, and first in the list.
    titles = page.locator(".chat-link .chat-title")
    await expect(titles.first).to_have_text(QUESTION)
    await expect(titles.nth(1)).to_have_text("Do gift cards expire?")
    current = page.locator(".chat-link[aria-current=page] .chat-title")
    await expect(current).to_have_text(QUESTION)
    await expect(page.get_by_role("heading", level=2, name=QUESTION)).to_be_visible()


async def test_reload_mid_answer_resumes_without_duplication(
    page: Page, gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    upstream.set_scenario(text=ASTRAL, **SLOW)
    await open_page(page, gateway.base_url + "/")
    answer = await ask(page, "How should I return a tent?")
    await expect(answer.content).to_have_text(re.compile("🏕.*🏕"))
    streams = eventsource_requests(page)

    await page.reload()
    resumed = await answer_at(page, 0)
    assert resumed.message_id == answer.message_id
    content = await check_complete(page, resumed, gateway.client)
    assert content == ASTRAL

    # The reloaded page asked for the text after what the history already held.
    assert len(streams) == 1
    query = re.search(r"[?&]last_event_id=([^&]+)", streams[0].url)
    assert query is not None, streams[0].url
    tag, offset = query[1].split(".")
    assert tag == answer.tag
    # The offset is in code points, and the stored prefix had astral characters in it.
    assert 0 < int(offset) < len(content)
    assert any(ord(c) > 0xFFFF for c in content[: int(offset)])


async def test_dropped_stream_reconnects_with_last_event_id(
    page: Page,
    gateway_factory: GatewayFactory,
    upstream: FakeUpstream,
    proxy_factory: ProxyFactory,
) -> None:
    """A proxy in front of the gateway drops the SSE connection mid-answer (as a load balancer
    or a network blip would); EventSource reconnects on its own with Last-Event-ID, and the
    gateway replays exactly what the page is missing."""
    gateway = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    proxy = await proxy_factory(gateway.base_url)
    upstream.set_scenario(text=ASTRAL, **SLOW)
    streams = eventsource_requests(page)
    await open_page(page, proxy.base_url + "/")
    answer = await ask(page, "How should I return a tent?")
    await expect(answer.content).to_have_text(re.compile(r"\S"))

    assert proxy.cut_streams() == 1
    content = await check_complete(page, answer, gateway.client)
    assert content == ASTRAL

    assert len(streams) >= 2
    first = await streams[0].all_headers()
    assert "last-event-id" not in first
    again = await streams[1].all_headers()
    assert STREAM_ID.match(again["last-event-id"]), again
    assert again["last-event-id"].startswith(answer.tag + ".")
    # The same header reached the server, on the same URL.
    on_wire = proxy.stream_requests()
    assert on_wire[1].headers["last-event-id"] == again["last-event-id"]
    assert on_wire[1].target == on_wire[0].target


async def test_stop_cancels_and_retry_asks_again(
    page: Page, gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    upstream.set_scenario(tokens=400, **SLOW)
    await open_page(page, gateway.base_url + "/")
    answer = await ask(page, "Tell me everything about rentals.")
    await expect(answer.content).to_have_text(re.compile(r"\S"))

    await page.get_by_role("button", name="Stop").click()
    await wait_until_ended(answer, "cancelled")
    await expect(answer.item.locator(".message-status")).to_contain_text("Cancelled")
    message = await stored(gateway.client, answer)
    assert message["status"] == "cancelled"
    assert await answer.text() == message["content"]
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()

    upstream.set_scenario(text=ANSWER, tokens_per_second=0)
    await answer.item.get_by_role("button", name="Retry").click()
    await expect(page.locator("li.message-assistant")).to_have_count(2)
    retried = await answer_at(page, 1)
    assert await check_complete(page, retried, gateway.client) == ANSWER
    questions = page.locator("li.message-user .message-content")
    await expect(questions).to_have_text(["Tell me everything about rentals."] * 2)


async def test_failed_answer_shows_why_and_retries(
    page: Page, gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    upstream.set_scenario(text=ANSWER, fault="http_500", fault_times=1)
    await open_page(page, gateway.base_url + "/")
    answer = await ask(page, QUESTION)
    await wait_until_ended(answer, "failed")
    await expect(answer.item.locator(".message-status")).to_contain_text("Failed:")
    assert (await stored(gateway.client, answer))["status"] == "failed"

    await answer.item.get_by_role("button", name="Retry").click()
    await expect(page.locator("li.message-assistant")).to_have_count(2)
    assert await check_complete(page, await answer_at(page, 1), gateway.client) == ANSWER


async def test_model_output_is_shown_as_text(
    page: Page, gateway_factory: GatewayFactory, upstream: FakeUpstream, problems: PageProblems
) -> None:
    gateway = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    upstream.set_scenario(text=INJECTION)
    await open_page(page, gateway.base_url + "/")
    await page.get_by_label("Title of a new chat").fill(INJECTION)
    await page.get_by_role("button", name="New chat").click()
    await expect(page.get_by_role("heading", level=2, name=INJECTION)).to_be_visible()
    answer = await ask(page, INJECTION)

    assert await check_complete(page, answer, gateway.client) == INJECTION
    await expect(page.locator("li.message-user .message-content")).to_have_text(INJECTION)
    await expect(page.locator(".chat-link[aria-current=page] .chat-title")).to_have_text(INJECTION)
    assert await page.locator("img").count() == 0
    assert await page.locator("#messages script").count() == 0
    assert await page.evaluate("() => window.__pwned === undefined")
    assert problems.dialogs == []


async def test_api_key_is_asked_for_and_kept_for_the_tab(
    page: Page, gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    key = "k" * 20
    gateway = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", api_keys=Secret("alice:" + key)
    )
    upstream.set_scenario(text=ASTRAL, **SLOW)
    await page.goto(gateway.base_url + "/")
    key_field = page.get_by_label("API key", exact=True)
    await expect(key_field).to_be_visible()
    await expect(page.get_by_role("heading", name="Chats")).to_be_hidden()

    await key_field.fill("not-the-key")
    await page.get_by_role("button", name="Use key").click()
    await expect(page.get_by_role("alert")).to_have_text("That API key was not accepted.")
    await key_field.fill(key)
    await page.get_by_role("button", name="Use key").click()
    await expect(page.get_by_role("heading", name="Chats")).to_be_visible()
    assert await page.evaluate("() => sessionStorage.getItem('qna.apiKey')") == key

    answer = await ask(page, "How should I return a tent?")
    await expect(answer.content).to_have_text(re.compile(r"\S"))
    streams = eventsource_requests(page)
    # A reload keeps the key (session storage) and resumes the stream with its token.
    await page.reload()
    resumed = await answer_at(page, 0)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=headers) as client:
        assert await check_complete(page, resumed, client) == ASTRAL
    assert len(streams) == 1
    assert "token=" in streams[0].url
    assert "last_event_id=" in streams[0].url

    await page.get_by_role("button", name="Forget API key").click()
    await expect(key_field).to_be_visible()
    assert await page.evaluate("() => sessionStorage.getItem('qna.apiKey')") is None


async def test_page_works_under_a_path_prefix(
    page: Page, serve_factory: Callable[..., ServeProcess], proxy_factory: ProxyFactory
) -> None:
    """`qna-gateway serve` with QNA_ROOT_PATH=/qna behind an ingress that strips /qna (the
    proxy answers 404 outside it): the page, its assets, the API and the stream all load."""
    serve = await asyncio.to_thread(serve_factory, QNA_ROOT_PATH="/qna")
    proxy = await proxy_factory(serve.base_url, strip_prefix="/qna")
    streams = eventsource_requests(page)
    await open_page(page, proxy.base_url + "/qna/")
    answer = await ask(page, QUESTION)  # extractive mode: passages with their sources
    await wait_until_ended(answer)
    async with httpx.AsyncClient(base_url=serve.base_url) as client:
        await check_complete(page, answer, client)
    await expect(answer.item.locator(".source-document").first).to_be_visible()

    assert [urlpath(r.url) for r in streams] == [
        f"/qna/v1/chats/{answer.chat_id}/messages/{answer.message_id}/stream"
    ]
    outside = [r.target for r in proxy.requests if not r.path.startswith("/qna/")]
    assert outside == []


def urlpath(url: str) -> str:
    return httpx.URL(url).path
