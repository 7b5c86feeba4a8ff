"""The knowledge base: documents from `kb/` split into passages, and a ranked keyword search."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .schemas import Source

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 2_000_000
DOCUMENT_SUFFIXES = {".md", ".txt"}
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "have",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "its",
        "my",
        "of",
        "on",
        "or",
        "our",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "this",
        "to",
        "was",
        "we",
        "what",
        "when",
        "where",
        "which",
        "who",
        "will",
        "with",
        "you",
        "your",
    ]
)


@dataclass(frozen=True, slots=True)
class Passage:
    document: str
    title: str
    chunk: int
    text: str


@dataclass(frozen=True, slots=True)
class Hit:
    source: Source
    passage: str


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def split_document(name: str, text: str) -> list[Passage]:
    """Split on blank lines, keeping each heading with the paragraph under it."""
    lines = text.strip().splitlines()
    title = lines[0].lstrip("# ").strip() if lines else name
    passages: list[Passage] = []
    heading = ""
    for block in re.split(r"\n\s*\n", text.strip()):
        block = block.strip()
        if not block:
            continue
        if block.startswith("#") and "\n" not in block:
            heading = block.lstrip("# ").strip()
            continue
        body = f"{heading}: {block}" if heading and not block.startswith("#") else block
        passages.append(Passage(name, title, len(passages), body.lstrip("# ")))
    return passages


class KnowledgeBase:
    """An in-memory BM25 index over the passages of the documents in one folder."""

    def __init__(self, passages: list[Passage]) -> None:
        self._passages = passages
        self._terms = [Counter(words(p.title + " " + p.text)) for p in passages]
        self._lengths = [sum(t.values()) for t in self._terms]
        self._avg_length = (sum(self._lengths) / len(passages)) if passages else 1.0
        document_frequency: Counter[str] = Counter()
        for terms in self._terms:
            document_frequency.update(terms.keys())
        n = len(passages)
        self._idf = {
            term: math.log(1 + (n - df + 0.5) / (df + 0.5))
            for term, df in document_frequency.items()
        }

    @classmethod
    def load(cls, folder: Path) -> KnowledgeBase:
        """Read every document; a file that is not text is skipped with a warning naming it."""
        passages: list[Passage] = []
        if not folder.is_dir():
            log.warning(
                "knowledge-base folder %s does not exist; the knowledge base is empty", folder
            )
            return cls([])
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in DOCUMENT_SUFFIXES:
                continue
            name = path.relative_to(folder).as_posix()
            try:
                if path.stat().st_size > MAX_DOCUMENT_BYTES:
                    raise ValueError(f"larger than {MAX_DOCUMENT_BYTES} bytes")
                raw = path.read_bytes()
                if b"\x00" in raw:
                    raise ValueError("binary content")
                text = raw.decode("utf-8")
            except (OSError, ValueError) as exc:
                log.warning("skipping knowledge-base file %s: %s", name, exc)
                continue
            passages.extend(split_document(name, text))
        log.info("knowledge base: %d passages from %s", len(passages), folder)
        return cls(passages)

    @property
    def size(self) -> int:
        return len(self._passages)

    async def search(self, query: str, *, limit: int = 3) -> list[Hit]:
        terms = set(words(query))
        scored: list[tuple[float, int]] = []
        k1, b = 1.2, 0.75
        for index, counts in enumerate(self._terms):
            score = 0.0
            for term in terms:
                tf = counts.get(term, 0)
                if tf:
                    norm = tf + k1 * (1 - b + b * self._lengths[index] / self._avg_length)
                    score += self._idf[term] * tf * (k1 + 1) / norm
            if score > 0:
                scored.append((score, index))
        scored.sort(key=lambda item: (-item[0], item[1]))
        hits: list[Hit] = []
        for score, index in scored[:limit]:
            passage = self._passages[index]
            source = Source(
                document=passage.document,
                title=passage.title,
                chunk=passage.chunk,
                score=round(score, 4),
                snippet=passage.text[:240],
            )
            hits.append(Hit(source, passage.text))
        return hits
