"""Answerers behind one small Protocol: the OpenAI-compatible LLM, and extractive mode."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import openai
from openai.types.chat import ChatCompletionMessageParam

from .kb import KnowledgeBase
from .schemas import Source, Usage
from .settings import Settings


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class SourcesFound:
    sources: list[Source]


@dataclass(frozen=True, slots=True)
class UsageReported:
    usage: Usage


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str


AnswerEvent = TextDelta | SourcesFound | UsageReported | Finished


@dataclass(frozen=True, slots=True)
class ChatLine:
    """One line of the conversation the answerer sees."""

    role: Literal["system", "user", "assistant"]
    content: str


class AnswerError(Exception):
    """The answer could not be produced; `timeout` ends the message `interrupted`, else `failed`."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class Answerer(Protocol):
    """Streams the answer to a conversation whose last line is the question."""

    @property
    def model(self) -> str: ...

    def answer(self, conversation: Sequence[ChatLine]) -> AsyncIterator[AnswerEvent]: ...

    async def aclose(self) -> None: ...


class OpenAIAnswerer:
    """Any OpenAI-compatible chat-completions endpoint, through one reused AsyncOpenAI client.

    The client retries connection errors, 408/409/429 and 5xx (with backoff, honouring
    Retry-After) before the stream starts; once text has flowed nothing is retried, since the
    text already went out to the clients.
    """

    def __init__(self, settings: Settings) -> None:
        key = settings.openai_api_key.reveal() if settings.openai_api_key else "not-needed"
        self._model = settings.model
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
        return self._model

    async def aclose(self) -> None:
        await self._client.close()

    async def answer(self, conversation: Sequence[ChatLine]) -> AsyncIterator[AnswerEvent]:
        messages: list[ChatCompletionMessageParam] = [_message_param(line) for line in conversation]
        try:
            stream = await self._client.chat.completions.create(
                model=self._model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        yield UsageReported(
                            Usage(
                                input_tokens=chunk.usage.prompt_tokens,
                                output_tokens=chunk.usage.completion_tokens,
                            )
                        )
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield TextDelta(choice.delta.content)
                        if choice.finish_reason is not None:
                            yield Finished(choice.finish_reason)
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


def _message_param(line: ChatLine) -> ChatCompletionMessageParam:
    if line.role == "system":
        return {"role": "system", "content": line.content}
    if line.role == "assistant":
        return {"role": "assistant", "content": line.content}
    return {"role": "user", "content": line.content}


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_PIECE = re.compile(r"\s*\S+")


class ExtractiveAnswerer:
    """No LLM: answer with the knowledge-base passages that best match the question."""

    def __init__(self, kb: KnowledgeBase, *, top_k: int = 3) -> None:
        self._kb = kb
        self._top_k = top_k

    @property
    def model(self) -> str:
        return "extractive"

    async def aclose(self) -> None:
        return None

    async def answer(self, conversation: Sequence[ChatLine]) -> AsyncIterator[AnswerEvent]:
        question = conversation[-1].content if conversation else ""
        hits = await self._kb.search(question, limit=self._top_k)
        if not hits:
            text = (
                "I found nothing in the knowledge base about that. "
                "Try other words, or ask about a policy by name."
            )
        else:
            yield SourcesFound([hit.source for hit in hits])
            parts = ["Here is what the knowledge base says:"]
            for hit in hits:
                parts.append(f"\n\n**{hit.source.title}** ({hit.source.document}):\n{hit.passage}")
            text = "".join(parts)
        # Word-sized pieces, so extractive answers stream like an LLM's.
        for piece in _PIECE.findall(text):
            yield TextDelta(piece)
        yield Finished("stop")


def make_answerer(settings: Settings, kb: KnowledgeBase) -> Answerer:
    if settings.llm_configured:
        return OpenAIAnswerer(settings)
    return ExtractiveAnswerer(kb)
