"""The OpenAI-compatible answerer: streamed chat completions with a knowledge-base tool loop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import openai

from .answers import (
    Answerer,
    AnswerError,
    AnswerEvent,
    ChatLine,
    Finished,
    TextDelta,
    ToolCalled,
    ToolResult,
    UsageReported,
)
from .extractive import ExtractiveAnswerer
from .kb import KnowledgeBase
from .schemas import Usage
from .settings import Settings
from .tools import SEARCH_TOOL, SEARCH_TOOL_NAME, passages_for_model, run_tool

PREFETCH_NOTE = (
    "Passages from the knowledge base that may answer the question (cite their documents):\n"
)


@dataclass
class _PartialCall:
    """A tool call assembled from streamed deltas (id and name first, arguments in pieces)."""

    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Round:
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage | None = None


class OpenAIAnswerer:
    """Any OpenAI-compatible chat-completions endpoint, through one reused AsyncOpenAI client.

    The client retries connection errors, 408/409/429 and 5xx (with backoff, honouring
    Retry-After) before a stream starts; once text has flowed nothing is retried, since it
    already went out to the clients. With `QNA_KB_MODE=tools` the model gets the search tool
    for up to `QNA_KB_MAX_ROUNDS` rounds; with `prefetch` the passages are found first and
    given to it in the prompt (for models without tool support).
    """

    def __init__(self, settings: Settings, kb: KnowledgeBase) -> None:
        key = settings.openai_api_key.reveal() if settings.openai_api_key else "not-needed"
        self._settings = settings
        self._kb = kb
        self._client = openai.AsyncOpenAI(
            api_key=key,
            base_url=settings.openai_base_url,
            max_retries=settings.llm_max_retries,
            timeout=openai.Timeout(
                settings.llm_read_timeout_seconds,
                connect=settings.llm_connect_timeout_seconds,
            ),
        )

    @property
    def model(self) -> str:
        return self._settings.model

    async def aclose(self) -> None:
        await self._client.close()

    async def answer(self, conversation: Sequence[ChatLine]) -> AsyncIterator[AnswerEvent]:
        messages: list[dict[str, Any]] = [
            {"role": line.role, "content": line.content} for line in conversation
        ]
        mode = self._settings.kb_mode
        if mode == "prefetch" and conversation:
            question = conversation[-1].content
            yield ToolCalled("prefetch", SEARCH_TOOL_NAME, json.dumps({"query": question}))
            hits = await self._kb.search(question, limit=self._settings.kb_top_k)
            yield ToolResult("prefetch", [hit.source for hit in hits])
            messages.insert(
                -1, {"role": "system", "content": PREFETCH_NOTE + passages_for_model(hits)}
            )
        total_in = total_out = 0
        max_rounds = self._settings.kb_max_rounds if mode == "tools" else 0
        for round_number in range(max_rounds + 1):
            # The last round offers no tool, so the model has to answer with what it found.
            offer_tool = round_number < max_rounds
            result = _Round()
            async for event in self._one_round(messages, offer_tool, result):
                yield event
            if result.usage is not None:
                total_in += result.usage.input_tokens
                total_out += result.usage.output_tokens
            calls = [result.calls[i] for i in sorted(result.calls)]
            if not calls:
                if total_in or total_out:
                    yield UsageReported(Usage(input_tokens=total_in, output_tokens=total_out))
                yield Finished(result.finish_reason or "stop")
                return
            messages.append(
                {
                    "role": "assistant",
                    "content": "".join(result.text) or None,
                    "tool_calls": [
                        {
                            "id": call.call_id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": "".join(call.arguments)},
                        }
                        for call in calls
                    ],
                }
            )
            for call in calls:
                arguments = "".join(call.arguments)
                yield ToolCalled(call.call_id, call.name, arguments)
                outcome = await run_tool(
                    self._kb, call.name, arguments, limit=self._settings.kb_top_k
                )
                yield ToolResult(call.call_id, outcome.sources, outcome.error)
                messages.append(
                    {"role": "tool", "tool_call_id": call.call_id, "content": outcome.content}
                )
        raise AnswerError("The model kept calling tools and never answered.")

    async def _one_round(
        self, messages: list[dict[str, Any]], offer_tool: bool, result: _Round
    ) -> AsyncIterator[AnswerEvent]:
        tools_mode = self._settings.kb_mode == "tools"
        try:
            # Once tool messages are in the conversation the tool must stay declared;
            # tool_choice="none" is how the last round forbids another call.
            stream = await self._client.chat.completions.create(
                model=self._settings.model,
                messages=cast(Any, messages),
                stream=True,
                stream_options={"include_usage": True},
                tools=cast(Any, [SEARCH_TOOL]) if tools_mode else openai.omit,
                tool_choice=("auto" if offer_tool else "none") if tools_mode else openai.omit,
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        result.usage = Usage(
                            input_tokens=chunk.usage.prompt_tokens,
                            output_tokens=chunk.usage.completion_tokens,
                        )
                    for choice in chunk.choices:
                        delta = choice.delta
                        if delta.content:
                            result.text.append(delta.content)
                            yield TextDelta(delta.content)
                        for piece in delta.tool_calls or ():
                            call = result.calls.setdefault(piece.index, _PartialCall())
                            if piece.id:
                                call.call_id = piece.id
                            if piece.function is not None:
                                if piece.function.name:
                                    call.name += piece.function.name
                                if piece.function.arguments:
                                    call.arguments.append(piece.function.arguments)
                        if choice.finish_reason is not None:
                            result.finish_reason = choice.finish_reason
        except openai.APITimeoutError:
            raise AnswerError("The LLM did not answer in time.", timeout=True) from None
        except openai.APIStatusError as exc:
            raise AnswerError(
                f"The LLM answered HTTP {exc.status_code}: {_short(exc.message)}"
            ) from None
        except openai.APIConnectionError as exc:
            raise AnswerError(f"The connection to the LLM failed: {_short(str(exc))}") from None
        except openai.APIError as exc:
            raise AnswerError(f"The LLM's stream broke: {_short(str(exc))}") from None
        except ValueError as exc:
            # The openai client lets a malformed chunk's JSONDecodeError through as it is.
            raise AnswerError(f"The LLM sent a malformed chunk: {_short(str(exc))}") from None
        for index, call in result.calls.items():
            call.call_id = call.call_id or f"call_{index}"


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def make_answerer(settings: Settings, kb: KnowledgeBase) -> Answerer:
    if settings.llm_configured:
        return OpenAIAnswerer(settings, kb)
    return ExtractiveAnswerer(kb, top_k=settings.kb_top_k)
