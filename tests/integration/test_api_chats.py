"""The chats resource and the probes over real HTTP: what they return, and every refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg

from tests.conftest import Gateway, GatewayFactory

PROBLEM_JSON = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, *mentions: str) -> dict[str, Any]:
    """An RFC 9457 problem with this status whose `detail` names each of `mentions`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0].strip() == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert body["title"]
    detail = body["detail"]
    assert isinstance(detail, str)
    for mention in mentions:
        assert mention.lower() in detail.lower(), f"{mention!r} not named in {detail!r}"
    return body


def assert_utc_time(value: Any) -> datetime:
    assert isinstance(value, str)
    parsed = datetime.fromisoformat(value)
    offset = parsed.utcoffset()
    assert offset is not None, f"{value!r} has no UTC offset"
    assert offset.total_seconds() == 0, f"{value!r} is not in UTC"
    return parsed


async def ask_and_wait(gateway: Gateway, chat_id: str, content: str) -> dict[str, Any]:
    """Ask in waiting mode; the completed assistant message."""
    response = await gateway.client.post(f"/v1/chats/{chat_id}/messages", json={"content": content})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["status"] == "completed", answer
    return answer


async def all_pages(gateway: Gateway, url: str, *, limit: int) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following `next_cursor` until it is null."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    for _ in range(1000):  # a bound, in case next_cursor never ends
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await gateway.client.get(url, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"data", "next_cursor"}
        pages.append(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(page["data"]) == limit, "a page short of the limit must be the last"
    raise AssertionError("next_cursor never became null")


async def post_raw(gateway: Gateway, path: str, body: bytes) -> httpx.Response:
    return await gateway.client.post(
        path, content=body, headers={"content-type": "application/json"}
    )


# -- probes ------------------------------------------------------------------------------------


async def test_health_is_ok(gateway: Gateway) -> None:
    response = await gateway.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_reports_its_checks(gateway: Gateway) -> None:
    response = await gateway.client.get("/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["draining"] == "ok"


# -- create ------------------------------------------------------------------------------------


async def test_create_chat_with_title_and_metadata(gateway: Gateway) -> None:
    metadata = {"team": "support", "priority": 2, "ratio": 0.5, "vip": True, "note": None}
    response = await gateway.client.post(
        "/v1/chats", json={"title": "Tent rental", "metadata": metadata}
    )
    assert response.status_code == 201, response.text
    chat = response.json()
    assert set(chat) == {"id", "title", "metadata", "created_at", "updated_at"}
    UUID(chat["id"])
    assert chat["title"] == "Tent rental"
    assert chat["metadata"] == metadata
    assert assert_utc_time(chat["created_at"]) <= assert_utc_time(chat["updated_at"])

    fetched = await gateway.client.get(f"/v1/chats/{chat['id']}")
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == chat


async def test_create_chat_with_an_empty_body_object(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/chats", json={})
    assert response.status_code == 201, response.text
    chat = response.json()
    assert chat["title"] is None
    assert chat["metadata"] == {}
    assert_utc_time(chat["created_at"])


async def test_create_chat_at_the_limits(gateway: Gateway) -> None:
    metadata = {f"k{i:02d}".ljust(64, "x"): "v" * 1000 for i in range(32)}
    response = await gateway.client.post(
        "/v1/chats", json={"title": "t" * 200, "metadata": metadata}
    )
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "t" * 200
    assert response.json()["metadata"] == metadata


async def test_each_chat_gets_its_own_id(gateway: Gateway) -> None:
    first = await gateway.create_chat()
    second = await gateway.create_chat()
    assert first != second


# -- create: refusals --------------------------------------------------------------------------


async def test_malformed_json_is_400(gateway: Gateway) -> None:
    for body in (b"{title: 1}", b"\xff\xfe", b'{"title": "x",}'):
        response = await post_raw(gateway, "/v1/chats", body)
        assert_problem(response, 400, "JSON")


async def test_truncated_json_is_400_naming_json(gateway: Gateway) -> None:
    response = await post_raw(gateway, "/v1/chats", b'{"title": "cut short"')
    assert_problem(response, 400, "JSON")


async def test_body_that_is_not_an_object_is_400(gateway: Gateway) -> None:
    for body in (b"[]", b'"a title"', b"42", b"null"):
        response = await post_raw(gateway, "/v1/chats", body)
        assert_problem(response, 400, "object")


async def test_unknown_field_is_400_naming_it(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/chats", json={"title": "x", "colour": "blue"})
    assert_problem(response, 400, "colour")


async def test_title_over_200_chars_is_400(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/chats", json={"title": "t" * 201})
    assert_problem(response, 400, "title")


async def test_title_of_the_wrong_type_is_400(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/chats", json={"title": 12})
    assert_problem(response, 400, "title")


async def test_metadata_with_too_many_keys_is_400(gateway: Gateway) -> None:
    metadata = {f"key{i}": i for i in range(33)}
    response = await gateway.client.post("/v1/chats", json={"metadata": metadata})
    assert_problem(response, 400, "metadata")


async def test_metadata_key_too_long_is_400(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/chats", json={"metadata": {"k" * 65: 1}})
    assert_problem(response, 400, "metadata")


async def test_metadata_value_too_long_is_400(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/chats", json={"metadata": {"k": "v" * 1001}})
    assert_problem(response, 400, "metadata")


async def test_metadata_nested_values_are_400(gateway: Gateway) -> None:
    for value in ({"inner": 1}, [1, 2]):
        response = await gateway.client.post("/v1/chats", json={"metadata": {"k": value}})
        assert_problem(response, 400, "metadata")


async def test_metadata_that_is_not_an_object_is_400(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/chats", json={"metadata": ["a", "b"]})
    assert_problem(response, 400, "metadata")


async def test_nul_characters_are_400_not_500(gateway: Gateway) -> None:
    """PostgreSQL text and jsonb cannot hold U+0000; that is the client's mistake, not ours."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"title": "tent\u0000rental"}, "title"),
        ({"metadata": {"note": "a\u0000b"}}, "metadata"),
        ({"metadata": {"no\u0000te": 1}}, "metadata"),
    ]
    for body, named in cases:
        assert_problem(await gateway.client.post("/v1/chats", json=body), 400, named)


async def test_body_over_the_limit_is_413(gateway_factory: GatewayFactory) -> None:
    small = await gateway_factory(max_body_bytes=2048)
    response = await small.client.post("/v1/chats", json={"title": "t" * 3000})
    assert_problem(response, 413, "2048")
    # Under the limit the same gateway answers as usual.
    assert (await small.client.post("/v1/chats", json={"title": "t" * 100})).status_code == 201


async def test_chunked_body_over_the_limit_is_413(gateway_factory: GatewayFactory) -> None:
    """Without a Content-Length the limit holds too: the body is counted as it arrives."""
    small = await gateway_factory(max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"title": "'
        for _ in range(30):
            yield b"t" * 100
        yield b'"}'

    response = await small.client.post(
        "/v1/chats", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "2048")


# -- get ---------------------------------------------------------------------------------------


async def test_get_chat_with_a_malformed_id_is_400(gateway: Gateway) -> None:
    response = await gateway.client.get("/v1/chats/not-a-uuid")
    assert_problem(response, 400, "not-a-uuid", "uuid")


async def test_get_unknown_chat_is_404(gateway: Gateway) -> None:
    unknown = uuid4()
    response = await gateway.client.get(f"/v1/chats/{unknown}")
    assert_problem(response, 404, str(unknown))


# -- list --------------------------------------------------------------------------------------


async def test_list_pages_through_every_chat_newest_first(
    gateway: Gateway, db: psycopg.AsyncConnection
) -> None:
    created = [await gateway.create_chat(title=f"page {i}") for i in range(5)]

    pages = await all_pages(gateway, "/v1/chats", limit=2)
    seen = [chat["id"] for page in pages for chat in page]

    # Newest first: the five just created lead the list, last created first.
    assert seen[:5] == created[::-1]
    assert len(seen) == len(set(seen)), "a chat was listed twice"
    assert pages[-1], "the last page is not empty"
    # Nothing missing: every chat in the database was listed, in creation order reversed.
    cur = await db.execute("SELECT id FROM chats WHERE principal = 'anonymous' ORDER BY seq DESC")
    assert seen == [str(row[0]) for row in await cur.fetchall()]


async def test_list_default_page(gateway: Gateway) -> None:
    newest = await gateway.create_chat(title="newest")
    response = await gateway.client.get("/v1/chats")
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["data"][0]["id"] == newest
    assert page["data"][0]["title"] == "newest"
    assert len(page["data"]) <= 20


async def test_list_with_a_garbage_cursor_is_400(gateway: Gateway) -> None:
    for cursor in ("garbage!", "czpub3RhbnVtYmVy", "x" * 65):  # the middle one is b64 "s:not..."
        response = await gateway.client.get("/v1/chats", params={"cursor": cursor})
        assert_problem(response, 400, "cursor")


async def test_list_with_limit_out_of_range_is_400(gateway: Gateway) -> None:
    for limit in ("0", "101", "-1", "lots"):
        response = await gateway.client.get("/v1/chats", params={"limit": limit})
        assert_problem(response, 400, "limit")


async def test_list_limit_bounds_are_accepted(gateway: Gateway) -> None:
    for limit in (1, 100):
        response = await gateway.client.get("/v1/chats", params={"limit": limit})
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) <= limit


# -- delete ------------------------------------------------------------------------------------


async def test_delete_chat_removes_it_and_its_messages(
    gateway: Gateway, db: psycopg.AsyncConnection
) -> None:
    chat_id = await gateway.create_chat(title="to delete")
    answer = await ask_and_wait(gateway, chat_id, "How do I return a tent?")
    cur = await db.execute("SELECT count(*) FROM messages WHERE chat_id = %s", (chat_id,))
    assert await cur.fetchone() == (2,)

    response = await gateway.client.delete(f"/v1/chats/{chat_id}")
    assert response.status_code == 204
    assert response.content == b""

    assert_problem(await gateway.client.get(f"/v1/chats/{chat_id}"), 404, chat_id)
    assert_problem(await gateway.client.get(f"/v1/chats/{chat_id}/messages"), 404, chat_id)
    assert_problem(await gateway.client.get(f"/v1/chats/{chat_id}/messages/{answer['id']}"), 404)
    cur = await db.execute("SELECT count(*) FROM messages WHERE chat_id = %s", (chat_id,))
    assert await cur.fetchone() == (0,)
    listed = (await gateway.client.get("/v1/chats", params={"limit": 100})).json()["data"]
    assert chat_id not in {chat["id"] for chat in listed}


async def test_delete_twice_is_404(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    assert (await gateway.client.delete(f"/v1/chats/{chat_id}")).status_code == 204
    assert_problem(await gateway.client.delete(f"/v1/chats/{chat_id}"), 404, chat_id)


async def test_delete_with_a_malformed_id_is_400(gateway: Gateway) -> None:
    assert_problem(await gateway.client.delete("/v1/chats/12345"), 400, "12345")


# -- routing -----------------------------------------------------------------------------------


async def test_unknown_route_is_a_404_problem(gateway: Gateway) -> None:
    response = await gateway.client.get("/v1/nothing-here")
    assert_problem(response, 404, "/v1/nothing-here")


async def test_wrong_method_is_a_405_problem(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    for method, path in (("PUT", f"/v1/chats/{chat_id}"), ("PATCH", "/v1/chats")):
        response = await gateway.client.request(method, path, json={})
        allowed = {m.strip() for m in response.headers.get("allow", "").split(",")}
        assert "GET" in allowed, f"405 without a useful Allow header: {response.headers}"
        assert_problem(response, 405, method)
