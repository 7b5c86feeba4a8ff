"""Extractive mode: no LLM; the answer is the best knowledge-base passages, with sources."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence

from .answers import (
    AnswerEvent,
    ChatLine,
    EarlyCall,
    Finished,
    TextSink,
    ToolCalled,
    ToolResult,
)
from .kb import KnowledgeBase
from .telemetry import Telemetry
from .tools import SEARCH_TOOL_NAME, traced_tool_run

_PIECE = re.compile(r"\s*\S+")


class ExtractiveAnswerer:
    """Searches with the question itself (the same search the model's tool uses)."""

    def __init__(self, kb: KnowledgeBase, telemetry: Telemetry, *, top_k: int = 3) -> None:
        self._kb = kb
        self._telemetry = telemetry
        self._top_k = top_k

    @property
    def model(self) -> str:
        return "extractive"

    async def aclose(self) -> None:
        return None

    def start_early(self, conversation: Sequence[ChatLine]) -> EarlyCall | None:
        return None  # nothing to send: the search is the answer

    async def answer(
        self, conversation: Sequence[ChatLine], on_text: TextSink, early: EarlyCall | None = None
    ) -> AsyncIterator[AnswerEvent]:
        question = conversation[-1].content if conversation else ""
        arguments = json.dumps({"query": question})
        yield ToolCalled("search-1", SEARCH_TOOL_NAME, arguments)
        outcome = await traced_tool_run(
            self._telemetry, self._kb, "search-1", SEARCH_TOOL_NAME, arguments, limit=self._top_k
        )
        yield ToolResult("search-1", outcome.sources)
        hits = outcome.hits
        if not hits:
            text = (
                "I found nothing in the knowledge base about that. "
                "Try other words, or ask about a policy by name."
            )
        else:
            parts = ["Here is what the knowledge base says:"]
            for hit in hits:
                parts.append(f"\n\n**{hit.source.title}** ({hit.source.document}):\n{hit.passage}")
            text = "".join(parts)
        # Word-sized pieces, so extractive answers stream like an LLM's.
        for piece in _PIECE.findall(text):
            on_text(piece)
        yield Finished("stop")
