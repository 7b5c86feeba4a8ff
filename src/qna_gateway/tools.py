"""The knowledge-base search tool the model can call, and running it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from .kb import Hit, KnowledgeBase
from .schemas import Source
from .telemetry import GenAI, Telemetry

SEARCH_TOOL_NAME = "search_knowledge_base"
MAX_PASSAGE_CHARS = 1_500

SEARCH_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": SEARCH_TOOL_NAME,
        "description": (
            "Search the company's knowledge base (policies, help articles) and return the most "
            "relevant passages with their document names. Use it for any question about the "
            "company's products, orders, policies or accounts; cite the documents you use."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": "What to look for, in plain words (a question or keywords).",
                }
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What the model is told (`content`) and what the answer cites (`sources`)."""

    content: str
    sources: list[Source]
    error: str | None = None
    hits: list[Hit] = field(default_factory=list)


def passages_for_model(hits: list[Hit]) -> str:
    if not hits:
        return json.dumps({"results": [], "note": "Nothing in the knowledge base matched."})
    return json.dumps(
        {
            "results": [
                {
                    "document": hit.source.document,
                    "title": hit.source.title,
                    "passage": hit.passage[:MAX_PASSAGE_CHARS],
                }
                for hit in hits
            ]
        }
    )


def search_query_of(arguments: str) -> str:
    """The `query` argument; ValueError (naming the problem) when the arguments are unusable."""
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"the arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("query"), str):
        raise ValueError('the arguments must be an object with a string "query"')
    query: str = parsed["query"]
    if not query.strip():
        raise ValueError("the query is empty")
    return query


async def run_tool(kb: KnowledgeBase, name: str, arguments: str, *, limit: int) -> ToolOutcome:
    """Run one tool call; a bad call becomes an error result the model can correct."""
    if name != SEARCH_TOOL_NAME:
        error = f"there is no tool named {name!r}; use {SEARCH_TOOL_NAME}"
        return ToolOutcome(json.dumps({"error": error}), [], error)
    try:
        query = search_query_of(arguments)
    except ValueError as exc:
        return ToolOutcome(json.dumps({"error": str(exc)}), [], str(exc))
    hits = await kb.search(query, limit=limit)
    return ToolOutcome(passages_for_model(hits), [hit.source for hit in hits], hits=hits)


async def traced_tool_run(
    telemetry: Telemetry,
    kb: KnowledgeBase,
    call_id: str,
    name: str,
    arguments: str,
    *,
    limit: int,
) -> ToolOutcome:
    """`run_tool` in an `execute_tool` span; its DB statements are the span's children."""
    with telemetry.tracer.start_as_current_span(
        f"execute_tool {name}",
        attributes={
            GenAI.OPERATION: "execute_tool",
            GenAI.TOOL_NAME: name,
            GenAI.TOOL_CALL_ID: call_id,
        },
    ) as span:
        outcome = await run_tool(kb, name, arguments, limit=limit)
        span.set_attribute("qna.kb.results", len(outcome.sources))
        if outcome.error is not None:
            span.set_attribute(GenAI.ERROR_TYPE, "invalid_arguments")
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error))
        return outcome
