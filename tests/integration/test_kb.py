"""The knowledge base in PostgreSQL: incremental and concurrent sync, search, `kb sync`, admin."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from qna_gateway.kb import (
    KnowledgeBase,
    SyncReport,
    chunk_document,
    read_documents,
    sync_documents,
)
from qna_gateway.store.migrations import apply_migrations
from qna_gateway.store.pool import make_pool
from tests.conftest import KB_DIR, Gateway, base_settings, running_gateway
from tests.fixtures.cli import run_gateway
from tests.fixtures.databases import empty_database

KB_FILES = sorted(p.name for p in KB_DIR.iterdir() if p.is_file())

# (document, chunk) -> the row's version (xmin and ctid change whenever a row is rewritten)
RowVersions = dict[tuple[str, int], tuple[str, str]]


@pytest.fixture
def empty_database_url(postgres_server: str) -> Iterator[str]:
    with empty_database(postgres_server) as url:
        yield url


@pytest.fixture
async def kb_database_url(empty_database_url: str) -> str:
    """A migrated database of this test's own: the shared one is re-synced by every gateway."""
    await apply_migrations(empty_database_url)
    return empty_database_url


@pytest.fixture
async def kb_db(kb_database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(kb_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def kb_folder(tmp_path: Path) -> Path:
    """A copy of the default knowledge base that a test may change."""
    folder = tmp_path / "kb"
    shutil.copytree(KB_DIR, folder)
    return folder


async def sync_folder(url: str, folder: Path) -> SyncReport:
    """Read `folder` and sync it on a connection of its own, as a replica would."""
    documents = await asyncio.to_thread(read_documents, folder)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return await sync_documents(conn, documents)


async def chunk_versions(conn: psycopg.AsyncConnection) -> RowVersions:
    cur = await conn.execute("SELECT document, chunk, xmin::text, ctid::text FROM kb_chunks")
    return {(doc, chunk): (xmin, ctid) for doc, chunk, xmin, ctid in await cur.fetchall()}


async def document_rows(conn: psycopg.AsyncConnection) -> dict[str, tuple[str, str, str]]:
    """path -> (title, content_hash, row version)."""
    cur = await conn.execute(
        "SELECT path, title, content_hash, xmin::text || ctid::text FROM kb_documents"
    )
    return {path: (title, digest, version) for path, title, digest, version in await cur.fetchall()}


async def stored_chunks(conn: psycopg.AsyncConnection) -> dict[str, list[tuple[str, str, str]]]:
    """document -> its chunks in order, as (title, heading, content)."""
    cur = await conn.execute(
        "SELECT document, chunk, title, heading, content FROM kb_chunks ORDER BY document, chunk"
    )
    stored: dict[str, list[tuple[str, str, str]]] = {}
    for document, chunk, title, heading, content in await cur.fetchall():
        rows = stored.setdefault(document, [])
        assert chunk == len(rows), f"{document}: chunk {chunk} out of sequence"
        rows.append((title, heading, content))
    return stored


def expected_chunks(path: str, text: str) -> list[tuple[str, str, str]]:
    title, chunks = chunk_document(path, text)
    return [(title, c.heading, c.content) for c in chunks]


def expected_folder(folder: Path) -> dict[str, list[tuple[str, str, str]]]:
    return {doc.path: expected_chunks(doc.path, doc.text) for doc in read_documents(folder)}


async def count_chunks(conn: psycopg.AsyncConnection) -> int:
    cur = await conn.execute("SELECT count(*) FROM kb_chunks")
    row = await cur.fetchone()
    assert row is not None
    count: int = row[0]
    return count


def versions_of(versions: RowVersions, document: str) -> RowVersions:
    return {key: value for key, value in versions.items() if key[0] == document}


def versions_except(versions: RowVersions, document: str) -> RowVersions:
    return {key: value for key, value in versions.items() if key[0] != document}


NEW_DOCUMENT = (
    "# Lantern Club\n\n"
    "The Lantern Club is Northwind's night-hiking group.\n\n"
    "## Meetings\n\n"
    "Members meet at the Burlington store every second Thursday at 7:30 pm. "
    "Bring a headlamp with at least 300 lumens; loaner headlamps cost $4 a night.\n"
)


# -- incremental sync --------------------------------------------------------------------------


async def test_a_first_sync_adds_every_document(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    expected = expected_folder(kb_folder)

    report = await sync_folder(kb_database_url, kb_folder)

    assert report.added == KB_FILES
    assert (report.changed, report.removed, report.unchanged) == ([], [], 0)
    assert report.chunks_written == sum(len(chunks) for chunks in expected.values())
    assert await stored_chunks(kb_db) == expected
    documents = await document_rows(kb_db)
    assert sorted(documents) == KB_FILES
    for name in KB_FILES:
        raw = (kb_folder / name).read_bytes()
        title, digest, _ = documents[name]
        assert digest == hashlib.sha256(raw).hexdigest()
        assert title == expected[name][0][0]


async def test_a_second_sync_touches_nothing(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    await sync_folder(kb_database_url, kb_folder)
    chunks_before = await chunk_versions(kb_db)
    documents_before = await document_rows(kb_db)

    report = await sync_folder(kb_database_url, kb_folder)

    assert report == SyncReport(unchanged=len(KB_FILES), chunks_written=0)
    assert await chunk_versions(kb_db) == chunks_before
    assert await document_rows(kb_db) == documents_before


async def test_a_changed_file_alone_is_rewritten(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    await sync_folder(kb_database_url, kb_folder)
    before = await chunk_versions(kb_db)
    documents_before = await document_rows(kb_db)
    changed = kb_folder / "warranty.md"
    changed.write_text(
        changed.read_text(encoding="utf-8") + "\n## Bicycles\n\nBike frames: 7 years.\n",
        encoding="utf-8",
    )
    new_chunks = expected_chunks("warranty.md", changed.read_text(encoding="utf-8"))

    report = await sync_folder(kb_database_url, kb_folder)

    assert report.changed == ["warranty.md"]
    assert (report.added, report.removed) == ([], [])
    assert report.unchanged == len(KB_FILES) - 1
    assert report.chunks_written == len(new_chunks)
    after = await chunk_versions(kb_db)
    assert versions_except(after, "warranty.md") == versions_except(before, "warranty.md")
    rewritten = versions_of(after, "warranty.md")
    assert len(rewritten) == len(new_chunks)
    assert not set(rewritten.values()) & set(versions_of(before, "warranty.md").values())
    assert (await stored_chunks(kb_db))["warranty.md"] == new_chunks
    documents_after = await document_rows(kb_db)
    assert documents_after["warranty.md"][1] == hashlib.sha256(changed.read_bytes()).hexdigest()
    del documents_after["warranty.md"], documents_before["warranty.md"]
    assert documents_after == documents_before


async def test_a_deleted_file_is_removed_with_its_chunks(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    await sync_folder(kb_database_url, kb_folder)
    before = await chunk_versions(kb_db)
    (kb_folder / "price-match.txt").unlink()

    report = await sync_folder(kb_database_url, kb_folder)

    assert report.removed == ["price-match.txt"]
    assert (report.added, report.changed, report.chunks_written) == ([], [], 0)
    assert report.unchanged == len(KB_FILES) - 1
    after = await chunk_versions(kb_db)
    assert versions_of(after, "price-match.txt") == {}
    assert after == versions_except(before, "price-match.txt")
    assert "price-match.txt" not in await document_rows(kb_db)


async def test_an_added_file_is_added_alone(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    await sync_folder(kb_database_url, kb_folder)
    before = await chunk_versions(kb_db)
    (kb_folder / "clubs").mkdir()
    (kb_folder / "clubs" / "lantern-club.md").write_text(NEW_DOCUMENT, encoding="utf-8")

    report = await sync_folder(kb_database_url, kb_folder)

    assert report.added == ["clubs/lantern-club.md"]
    assert (report.changed, report.removed) == ([], [])
    assert report.unchanged == len(KB_FILES)
    new_chunks = expected_chunks("clubs/lantern-club.md", NEW_DOCUMENT)
    assert report.chunks_written == len(new_chunks)
    after = await chunk_versions(kb_db)
    assert versions_except(after, "clubs/lantern-club.md") == before
    assert (await stored_chunks(kb_db))["clubs/lantern-club.md"] == new_chunks


async def test_a_renamed_file_is_removed_and_added(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    await sync_folder(kb_database_url, kb_folder)
    (kb_folder / "warranty.md").rename(kb_folder / "guarantee.md")

    report = await sync_folder(kb_database_url, kb_folder)

    assert (report.added, report.removed, report.changed) == (["guarantee.md"], ["warranty.md"], [])
    assert await stored_chunks(kb_db) == expected_folder(kb_folder)


async def test_an_emptied_folder_removes_everything(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    await sync_folder(kb_database_url, kb_folder)
    for document in read_documents(kb_folder):
        await asyncio.to_thread((kb_folder / document.path).unlink)

    report = await sync_folder(kb_database_url, kb_folder)

    assert report.removed == KB_FILES
    assert await count_chunks(kb_db) == 0
    assert await document_rows(kb_db) == {}


# -- concurrent syncs --------------------------------------------------------------------------


async def test_concurrent_syncs_of_one_folder_write_each_chunk_once(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path
) -> None:
    expected = expected_folder(kb_folder)

    reports = await asyncio.gather(*(sync_folder(kb_database_url, kb_folder) for _ in range(5)))

    # Whichever replica got the lock first loaded everything; the others found it done.
    first = [r for r in reports if r.added]
    assert len(first) == 1
    assert first[0].added == KB_FILES
    assert first[0].chunks_written == sum(len(chunks) for chunks in expected.values())
    others = [r for r in reports if not r.added]
    assert others == [SyncReport(unchanged=len(KB_FILES))] * 4
    assert await count_chunks(kb_db) == sum(len(chunks) for chunks in expected.values())
    assert await stored_chunks(kb_db) == expected


async def test_concurrent_syncs_while_the_folder_changes_stay_consistent(
    kb_database_url: str, kb_db: psycopg.AsyncConnection, kb_folder: Path, tmp_path: Path
) -> None:
    # Every version of every file that ever exists in the folder, by content hash.
    texts: dict[str, str] = {}
    for document in read_documents(kb_folder):
        texts[document.content_hash] = document.text

    def replace_file(name: str, text: str, step: int) -> None:
        # Written beside the folder, then renamed in: a reader sees the old or the new file.
        staged = tmp_path / f"staged-{step}"
        staged.write_bytes(text.encode("utf-8"))
        texts[hashlib.sha256(text.encode("utf-8")).hexdigest()] = text
        os.replace(staged, kb_folder / name)

    def change(step: int) -> None:
        if step == 0:
            replace_file("lantern-club.md", NEW_DOCUMENT, step)
        elif step == 1:
            (kb_folder / "price-match.txt").unlink()
        elif step == 2:
            warranty = (kb_folder / "warranty.md").read_text(encoding="utf-8")
            replace_file("warranty.md", warranty + "\n## Bicycles\n\nBike frames: 7 years.\n", step)
        else:
            replace_file("lantern-club.md", NEW_DOCUMENT.replace("$4", "$5"), step)

    async def change_then_sync(step: int) -> SyncReport:
        await asyncio.to_thread(change, step)
        return await sync_folder(kb_database_url, kb_folder)

    await sync_folder(kb_database_url, kb_folder)
    reports = await asyncio.gather(
        sync_folder(kb_database_url, kb_folder),
        *(change_then_sync(step) for step in range(4)),
    )

    assert len(reports) == 5
    # Every stored document is whole: its chunks are exactly those of the version whose hash
    # is stored, numbered from 0 without a gap or a duplicate.
    stored = await stored_chunks(kb_db)
    documents = await document_rows(kb_db)
    assert set(stored) == set(documents)
    for path, (_, digest, _) in documents.items():
        assert stored[path] == expected_chunks(path, texts[digest]), path
    assert await count_chunks(kb_db) == sum(len(chunks) for chunks in stored.values())

    # One more sync brings the tables to exactly the folder as it ended.
    await sync_folder(kb_database_url, kb_folder)
    assert await stored_chunks(kb_db) == expected_folder(kb_folder)
    final = {d.path: d.content_hash for d in read_documents(kb_folder)}
    assert {path: row[1] for path, row in (await document_rows(kb_db)).items()} == final
    assert await sync_folder(kb_database_url, kb_folder) == SyncReport(unchanged=len(final))


# -- search ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def search_database_url(postgres_server: str) -> Iterator[str]:
    with empty_database(postgres_server) as url:
        yield url


@pytest.fixture(scope="module")
async def knowledge_base(search_database_url: str) -> AsyncIterator[KnowledgeBase]:
    """The default knowledge base, loaded into a database that nothing else syncs."""
    await apply_migrations(search_database_url)
    pool = make_pool(search_database_url, min_size=1, max_size=4, timeout=10)
    await pool.open(wait=True)
    try:
        knowledge_base = KnowledgeBase(pool)
        await knowledge_base.sync(KB_DIR)
        yield knowledge_base
    finally:
        await pool.close()


@pytest.fixture
async def search_db(
    search_database_url: str, knowledge_base: KnowledgeBase
) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(search_database_url, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize(
    ("question", "document"),
    [
        ("What is the security deposit for renting a tent?", "repairs-and-rentals.md"),
        ("Do gift cards expire?", "payment-methods.md"),
        ("How long is the warranty on a Northwind tent?", "warranty.md"),
        ("Do you ship to the UK?", "international-shipping.txt"),
        ("Will you match Amazon's price?", "price-match.txt"),
        ("What are the password requirements?", "account-and-security.md"),
        ("How much does Trailhead Plus cost per year?", "trailhead-plus-membership.md"),
        ("When will I actually see the refund on my credit card?", "refund-policy.md"),
        ("How long is my RA number good for?", "returns-and-exchanges.md"),
        ("What is the same-day shipping cut-off time?", "shipping-policy.md"),
    ],
)
async def test_a_question_finds_its_document_first(
    knowledge_base: KnowledgeBase, question: str, document: str
) -> None:
    hits = await knowledge_base.search(question)

    assert hits
    assert hits[0].source.document == document, [h.source.document for h in hits]


async def test_hits_carry_document_title_chunk_score_and_snippet(
    knowledge_base: KnowledgeBase, search_db: psycopg.AsyncConnection
) -> None:
    hits = await knowledge_base.search("security deposit for a rental tent", limit=5)

    assert 1 <= len(hits) <= 5
    scores = [hit.source.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        source = hit.source
        cur = await search_db.execute(
            "SELECT title, heading, content FROM kb_chunks WHERE document = %s AND chunk = %s",
            (source.document, source.chunk),
        )
        row = await cur.fetchone()
        assert row is not None, source
        title, heading, content = row
        assert source.title == title
        assert isinstance(source.score, float)
        assert source.score > 0
        assert source.snippet.strip()
        # The snippet is taken from the chunk (highlight marks aside).
        snippet_words = source.snippet.replace("**", "").split()
        assert all(word in content for word in snippet_words), (source.snippet, content)
        assert content in hit.passage
        if heading:
            assert hit.passage.startswith(heading)
    assert hits[0].source.document == "repairs-and-rentals.md"
    # Full-text snippets mark the words that matched.
    assert all("**" in hit.source.snippet for hit in hits)


async def test_the_limit_bounds_the_hits(knowledge_base: KnowledgeBase) -> None:
    assert len(await knowledge_base.search("shipping", limit=1)) == 1
    assert len(await knowledge_base.search("shipping", limit=7)) == 7


@pytest.mark.parametrize(
    ("query", "document"),
    [
        ("refnud polcy", "refund-policy.md"),
        ("warrenty", "warranty.md"),
        ("pasword", "account-and-security.md"),
        ("membrship", "trailhead-plus-membership.md"),
    ],
)
async def test_a_misspelt_query_still_finds_its_document(
    knowledge_base: KnowledgeBase, search_db: psycopg.AsyncConnection, query: str, document: str
) -> None:
    # Full-text search alone finds nothing for these...
    cur = await search_db.execute(
        "SELECT count(*) FROM kb_chunks WHERE tsv @@ websearch_to_tsquery('english', %s)"
        " OR tsv @@ to_tsquery('english', %s)",
        (query, " | ".join(query.split())),
    )
    row = await cur.fetchone()
    assert row == (0,)

    hits = await knowledge_base.search(query)

    # ...the trigram fallback does.
    assert hits
    assert hits[0].source.document == document, [h.source.document for h in hits]
    assert all(hit.source.snippet for hit in hits)


HOSTILE_QUERIES = [
    "",
    "   ",
    "\n\t",
    "'; DROP TABLE kb_chunks; --",
    "a & b | !c",
    "(((",
    ")))",
    ":*",
    "refund:*",
    "refund:A",
    "<->",
    "refund <-> policy",
    '"unterminated',
    '"exact phrase" -word or other',
    "<script>alert(1)</script>",
    "🙂🙂",
    "a" * 10_000,
    "refund " * 5_000,
    "\x00",
    "refund\x00policy",
    "%_\\",
    "NOT OR AND",
    "-negated",
    "!!!",
    "\\",
    "$1",
    "%(raw)s",
    "{}",
    "the and of",
    "1.5e10 -3 0x1F",
    "\ud800",
    "Rückerstattung für Zelte",
    "退款政策",
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
async def test_any_query_is_safe(
    knowledge_base: KnowledgeBase, search_db: psycopg.AsyncConnection, query: str
) -> None:
    chunks_before = await count_chunks(search_db)

    hits = await knowledge_base.search(query)

    assert isinstance(hits, list)
    assert len(hits) <= 3
    assert all(hit.source.document in KB_FILES for hit in hits)
    assert await count_chunks(search_db) == chunks_before > 0


async def test_a_query_with_websearch_syntax_still_ranks(knowledge_base: KnowledgeBase) -> None:
    hits = await knowledge_base.search('"security deposit" tent -kayak or rental')

    assert hits
    assert hits[0].source.document == "repairs-and-rentals.md"


async def test_each_search_is_counted(search_database_url: str) -> None:
    pool = make_pool(search_database_url, min_size=1, max_size=1, timeout=10)
    await pool.open(wait=True)
    searches: list[None] = []
    try:
        counted = KnowledgeBase(pool, on_search=lambda: searches.append(None))
        await counted.search("refund")
        await counted.search("")
    finally:
        await pool.close()

    assert len(searches) == 2


# -- `qna-gateway kb sync` ---------------------------------------------------------------------


def test_kb_sync_command_loads_then_finds_everything_unchanged(
    tmp_path: Path, empty_database_url: str, kb_folder: Path
) -> None:
    (kb_folder / "broken.md").write_bytes(b"# Broken\n\x00\x01")
    env = {"DATABASE_URL": empty_database_url, "QNA_KB_DIR": str(kb_folder)}
    total_chunks = sum(len(chunks) for chunks in expected_folder(kb_folder).values())
    workdir = tmp_path / "work"
    workdir.mkdir()

    first = run_gateway("kb", "sync", cwd=workdir, env=env)

    assert first.returncode == 0, first.stderr
    assert (
        f"{len(KB_FILES)} added, 0 changed, 0 removed, 0 unchanged, "
        f"{total_chunks} chunks written" in first.stdout
    ), first.stdout
    assert "broken.md" in first.stderr
    assert "Traceback" not in first.stderr

    second = run_gateway("kb", "sync", cwd=workdir, env=env)

    assert second.returncode == 0, second.stderr
    assert (
        f"0 added, 0 changed, 0 removed, {len(KB_FILES)} unchanged, 0 chunks written"
        in second.stdout
    ), second.stdout
    with psycopg.connect(empty_database_url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT document) FROM kb_chunks").fetchone()
    assert row == (total_chunks, len(KB_FILES))


# -- POST /v1/admin/kb/sync --------------------------------------------------------------------


@pytest.fixture
async def kb_gateway(kb_database_url: str, kb_folder: Path) -> AsyncIterator[Gateway]:
    """A gateway (extractive mode) on its own database and its own copy of the kb folder."""
    settings = base_settings(kb_database_url, kb_dir=kb_folder)
    async with running_gateway(settings) as gateway:
        yield gateway


async def test_admin_sync_adds_a_new_file_whose_answers_cite_it(
    kb_gateway: Gateway, kb_folder: Path
) -> None:
    gateway = kb_gateway
    (kb_folder / "lantern-club.md").write_text(NEW_DOCUMENT, encoding="utf-8")

    response = await gateway.client.post("/v1/admin/kb/sync")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "added": ["lantern-club.md"],
        "changed": [],
        "removed": [],
        "unchanged": len(KB_FILES),
        "chunks_written": len(expected_chunks("lantern-club.md", NEW_DOCUMENT)),
    }

    chat_id = await gateway.create_chat(title="kb")
    answer = await gateway.client.post(
        f"/v1/chats/{chat_id}/messages",
        json={"content": "How much does a loaner headlamp cost at the Lantern Club?"},
    )

    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["status"] == "completed"
    assert body["sources"]
    assert body["sources"][0]["document"] == "lantern-club.md"
    assert "$4" in body["content"]

    again = await gateway.client.post("/v1/admin/kb/sync")

    assert again.status_code == 200, again.text
    assert again.json() == {
        "added": [],
        "changed": [],
        "removed": [],
        "unchanged": len(KB_FILES) + 1,
        "chunks_written": 0,
    }
