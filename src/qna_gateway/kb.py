"""The knowledge base: documents from a folder, chunked into PostgreSQL, and searched there."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from .schemas import Source
from .store.pool import Pool

log = logging.getLogger(__name__)

DOCUMENT_SUFFIXES = frozenset({".md", ".markdown", ".txt"})
MAX_DOCUMENT_BYTES = 1_000_000
MAX_CHUNK_CHARS = 900
OVERLAP_CHARS = 150
MAX_QUERY_CHARS = 500
MAX_QUERY_WORDS = 24
SNIPPET_CHARS = 240
# Any constant shared by every replica: pg_advisory_xact_lock serialises their syncs.
SYNC_LOCK_KEY = 0x716E615F6B62  # "qna_kb"

_MD_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
_WORD = re.compile(r"[^\W_]+")


# -- chunking ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    heading: str
    content: str


def _heading_of(line: str, *, plain_text: bool) -> str | None:
    stripped = line.strip()
    match = _MD_HEADING.match(stripped)
    if match:
        return match.group(1).strip()
    # Plain-text documents mark sections with a short line in capitals.
    letters = [c for c in stripped if c.isalpha()]
    if plain_text and letters and len(stripped) <= 80 and all(c.isupper() for c in letters):
        return stripped.rstrip(":").title()
    return None


def _split_long(paragraph: str, limit: int) -> list[str]:
    """A paragraph longer than a chunk, cut at sentence (else word) boundaries."""
    pieces: list[str] = []
    current = ""
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        if current and len(current) + 1 + len(sentence) > limit:
            pieces.append(current)
            current = ""
        while len(sentence) > limit:
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > limit // 2 else limit
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


_SPACE = re.compile(r"\s+")


def _tail(text: str, size: int) -> str:
    """At most the last `size` characters, starting at a word boundary (never half a word,
    which a search would find as a word the document does not have)."""
    if len(text) <= size:
        return text
    tail = text[-size:]
    if text[-size - 1].isspace():
        return tail
    space = _SPACE.search(tail)
    return tail[space.end() :] if space else ""


def chunk_document(
    name: str, text: str, *, max_chars: int = MAX_CHUNK_CHARS, overlap: int = OVERLAP_CHARS
) -> tuple[str, list[Chunk]]:
    """The document's title and its chunks: one section (heading) at a time, paragraphs packed
    up to `max_chars`, each chunk after the first in a section starting with the tail of the
    previous one so a fact cut at a boundary is still found whole."""
    plain = name.lower().endswith(".txt")
    lines = text.replace("\r\n", "\n").strip().split("\n")
    title = Path(name).stem.replace("-", " ").title()
    if lines and lines[0].strip():
        title = _heading_of(lines[0], plain_text=False) or lines[0].strip()
        lines = lines[1:]
    sections: list[tuple[str, list[str]]] = [("", [])]
    paragraph: list[str] = []

    def end_paragraph() -> None:
        if paragraph:
            sections[-1][1].append(" ".join(p.strip() for p in paragraph).strip())
            paragraph.clear()

    for line in lines:
        heading = _heading_of(line, plain_text=plain)
        if heading is not None:
            end_paragraph()
            if sections[-1][0] and not sections[-1][1]:
                # A heading with no text of its own leads the one under it: keep its words.
                heading = f"{sections.pop()[0]} > {heading}"
            sections.append((heading, []))
        elif not line.strip():
            end_paragraph()
        elif line.lstrip().startswith(("- ", "* ", "|")) or re.match(r"\s*\d+[.)] ", line):
            # List items and table rows keep their own lines.
            end_paragraph()
            paragraph.append(line.strip())
            end_paragraph()
        else:
            paragraph.append(line)
    end_paragraph()

    chunks: list[Chunk] = []
    overlap = min(overlap, max_chars // 2)
    # Room for the previous chunk's tail and the " … " that joins it.
    body_limit = max_chars - overlap - len(_JOIN)
    for heading, paragraphs in sections:
        current = ""
        previous = ""
        for para in paragraphs:
            for piece in _split_long(para, body_limit) if len(para) > body_limit else [para]:
                if current and len(current) + 1 + len(piece) > body_limit:
                    chunks.append(Chunk(heading, _with_overlap(previous, current, overlap)))
                    previous, current = current, piece
                else:
                    current = f"{current}\n{piece}" if current else piece
        if current:
            chunks.append(Chunk(heading, _with_overlap(previous, current, overlap)))
        elif heading and not paragraphs:
            chunks.append(Chunk(heading, heading))  # a last heading alone still counts
    return title, chunks


_JOIN = " … "


def _with_overlap(previous: str, current: str, overlap: int) -> str:
    tail = _tail(previous, overlap) if previous and overlap else ""
    return f"{tail}{_JOIN}{current}" if tail else current


# -- reading the folder ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DocumentFile:
    path: str
    text: str
    content_hash: str
    size: int


def read_documents(folder: Path, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> list[DocumentFile]:
    """Every readable document; binary, undecodable or huge files are skipped with a warning."""
    if not folder.is_dir():
        log.warning("knowledge-base folder %s does not exist; the knowledge base is empty", folder)
        return []
    documents: list[DocumentFile] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            # Hidden files and folders; a Kubernetes ConfigMap mount also keeps a dated copy of
            # every file in `..2026_…/`, which would load each document twice.
            continue
        name = relative.as_posix()
        if path.suffix.lower() not in DOCUMENT_SUFFIXES:
            log.warning("skipping knowledge-base file %s: only .md and .txt are read", name)
            continue
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise ValueError(f"{size} bytes is more than the {max_bytes}-byte limit")
            raw = path.read_bytes()
            if b"\x00" in raw:
                raise ValueError("it looks binary")
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("skipping knowledge-base file %s: it is not UTF-8 text", name)
            continue
        except (OSError, ValueError) as exc:
            log.warning("skipping knowledge-base file %s: %s", name, exc)
            continue
        if not text.strip():
            log.warning("skipping knowledge-base file %s: it is empty", name)
            continue
        digest = hashlib.sha256(raw).hexdigest()
        documents.append(DocumentFile(name, text, digest, size))
    return documents


# -- syncing -----------------------------------------------------------------------------------


@dataclass(slots=True)
class SyncReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    chunks_written: int = 0


async def sync_documents(conn: AsyncConnection, documents: list[DocumentFile]) -> SyncReport:
    """Make the tables match `documents`, touching only what changed, in one transaction.

    Replicas syncing at once queue on a transaction-level advisory lock, so each sees the
    previous one's result and none duplicates or loses a chunk.
    """
    report = SyncReport()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SYNC_LOCK_KEY,))
        cur = await conn.execute("SELECT path, content_hash FROM kb_documents")
        stored = {row[0]: row[1] for row in await cur.fetchall()}
        wanted = {doc.path for doc in documents}
        for path in sorted(set(stored) - wanted):
            await conn.execute("DELETE FROM kb_documents WHERE path = %s", (path,))
            report.removed.append(path)
        for doc in documents:
            if stored.get(doc.path) == doc.content_hash:
                report.unchanged += 1
                continue
            title, chunks = chunk_document(doc.path, doc.text)
            await conn.execute(
                "INSERT INTO kb_documents (path, title, content_hash, size_bytes)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (path) DO UPDATE SET title = excluded.title,"
                " content_hash = excluded.content_hash, size_bytes = excluded.size_bytes,"
                " synced_at = now()",
                (doc.path, title, doc.content_hash, doc.size),
            )
            await conn.execute("DELETE FROM kb_chunks WHERE document = %s", (doc.path,))
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO kb_chunks (document, chunk, title, heading, content)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [(doc.path, i, title, c.heading, c.content) for i, c in enumerate(chunks)],
                )
            report.chunks_written += len(chunks)
            (report.changed if doc.path in stored else report.added).append(doc.path)
    return report


# -- searching ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    source: Source
    passage: str


def query_words(query: str) -> list[str]:
    """Letters and digits only: what is left can't be tsquery syntax, whatever was sent."""
    return _WORD.findall(query[:MAX_QUERY_CHARS].lower())[:MAX_QUERY_WORDS]


# Full-text search, any word matching (questions rarely share every word with the answer),
# ranked by ts_rank over the title (A), heading (B) and content (C) weights. The title, which
# every chunk of a document repeats, weighs no more than a heading, and content more than
# PostgreSQL's default: bench/kb_eval.py chose these over ts_rank_cd, the default weights
# and the length normalisations. Chunks matching the whole query as websearch syntax first.
_FULL_TEXT = """
WITH q AS (
    SELECT to_tsquery('english', %(any)s) AS any_word,
           websearch_to_tsquery('english', %(raw)s) AS whole
)
SELECT c.document, c.chunk, c.title, c.heading, c.content,
       ts_rank('{0.1, 0.3, 0.5, 0.5}', c.tsv, q.any_word)
           + CASE WHEN c.tsv @@ q.whole THEN 1 ELSE 0 END AS score,
       ts_headline('english', c.content, q.any_word,
                   'MaxWords=40, MinWords=15, StartSel=**, StopSel=**, MaxFragments=1') AS snippet
FROM kb_chunks c, q
WHERE c.tsv @@ q.any_word
ORDER BY score DESC, c.document, c.chunk
LIMIT %(limit)s
"""

# The fallback for near-misses (typos, words stemming cannot relate): trigram similarity,
# with a document whose title is the near-miss first.
_TRIGRAM = """
SELECT c.document, c.chunk, c.title, c.heading, c.content,
       word_similarity(%(raw)s, c.title || ' ' || c.heading || ' ' || c.content)
           + 0.5 * word_similarity(%(raw)s, c.title) AS score,
       left(c.content, %(snippet)s) AS snippet
FROM kb_chunks c
WHERE %(raw)s <%% (c.title || ' ' || c.heading || ' ' || c.content)
ORDER BY score DESC, c.document, c.chunk
LIMIT %(limit)s
"""


class KnowledgeBase:
    """Search over the chunks in PostgreSQL; `on_search` counts searches for the metrics."""

    def __init__(self, pool: Pool, *, on_search: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._on_search = on_search

    async def sync(self, folder: Path) -> SyncReport:
        documents = await asyncio.to_thread(read_documents, folder)
        async with self._pool.connection() as conn:
            report = await sync_documents(conn, documents)
        log.info(
            "knowledge base synced from %s: %d added, %d changed, %d removed, %d unchanged",
            folder,
            len(report.added),
            len(report.changed),
            len(report.removed),
            report.unchanged,
        )
        return report

    async def search(self, query: str, *, limit: int = 3) -> list[Hit]:
        if self._on_search is not None:
            self._on_search()
        words = query_words(query)
        if not words:
            return []
        raw = " ".join(words)
        params = {"any": " | ".join(words), "raw": raw, "limit": limit, "snippet": SNIPPET_CHARS}
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_FULL_TEXT, params)
            rows = await cur.fetchall()
            if not rows:
                async with conn.transaction():
                    await cur.execute("SET LOCAL pg_trgm.word_similarity_threshold = 0.3")
                    await cur.execute(_TRIGRAM, params)
                    rows = await cur.fetchall()
        return [
            Hit(
                Source(
                    document=row["document"],
                    title=row["title"],
                    chunk=row["chunk"],
                    score=round(float(row["score"]), 4),
                    snippet=" ".join(row["snippet"].split()),
                ),
                f"{row['heading']}: {row['content']}" if row["heading"] else row["content"],
            )
            for row in rows
        ]
