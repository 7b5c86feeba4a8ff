"""Tokens per principal per minute: an ask after the budget is spent gets 429."""

from __future__ import annotations

from bench.fake_upstream import FakeUpstream
from qna_gateway.settings import Secret
from tests.conftest import GatewayFactory

ALICE, BOB = "a" * 20, "b" * 20


async def test_an_ask_over_the_token_budget_is_refused(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url,
        model="fake-model",
        api_keys=Secret(f"alice:{ALICE},bob:{BOB}"),
        token_limit_per_minute=10,
        kb_mode="prefetch",
    )
    upstream.set_scenario(tokens=12)
    alice = {"Authorization": f"Bearer {ALICE}"}
    bob = {"Authorization": f"Bearer {BOB}"}
    chat = (await gw.client.post("/v1/chats", json={}, headers=alice)).json()["id"]
    first = await gw.client.post(f"/v1/chats/{chat}/messages", json={"content": "Q"}, headers=alice)
    assert first.json()["usage"]["output_tokens"] == 12
    refused = await gw.client.post(
        f"/v1/chats/{chat}/messages", json={"content": "Q"}, headers=alice
    )
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert "tokens" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-limit"] == "10"
    assert refused.headers["ratelimit-remaining"] == "0"
    # Bob's budget is his own.
    other = (await gw.client.post("/v1/chats", json={}, headers=bob)).json()["id"]
    answered = await gw.client.post(
        f"/v1/chats/{other}/messages", json={"content": "Q"}, headers=bob
    )
    assert answered.json()["status"] == "completed"
