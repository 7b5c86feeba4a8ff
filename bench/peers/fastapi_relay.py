"""The hand-rolled alternative: an OpenAI-compatible streaming relay written the way the
FastAPI and openai SDK documentation show it, which is what a team builds when it does not
adopt a gateway. It keeps nothing (no database, no auth, no metrics): what it costs per
stream is the floor of "FastAPI + the openai SDK" relaying a stream.

The benchmark runs it from a venv of its own (bench/stack.py, `ensure_venv`) with
`uvicorn[standard]` (uvloop and httptools, as the gateway), one worker:

    uvicorn fastapi_relay:app --app-dir bench/peers --loop uvloop --http httptools

It is not imported by the harness or the tests, and `make test` type-checks it without
FastAPI installed (pyproject.toml: `ignore_missing_imports` for fastapi).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai import AsyncOpenAI

client = AsyncOpenAI(base_url=os.environ["RELAY_UPSTREAM_URL"], api_key="not-needed")
app = FastAPI()


async def chat_completions(request: Request) -> StreamingResponse:
    body: dict[str, Any] = await request.json()
    stream = await client.chat.completions.create(**body)

    async def events() -> AsyncIterator[str]:
        async with stream:
            async for chunk in stream:
                yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


# Routes added without decorators: mypy --strict sees FastAPI as untyped where it is not
# installed, and an untyped decorator would make the handlers untyped too.
app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
app.add_api_route("/health", health, methods=["GET"])
