"""Chunking knowledge-base documents, and reading them from a folder (`qna_gateway.kb`)."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qna_gateway.kb import (
    MAX_CHUNK_CHARS,
    OVERLAP_CHARS,
    Chunk,
    chunk_document,
    read_documents,
)

KB_DIR = Path(__file__).resolve().parents[2] / "kb"
KB_FILES = sorted(p.name for p in KB_DIR.iterdir() if p.is_file())

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def sentence(count: int, start: int = 0) -> str:
    """`count` distinct numbered words, capitalised and ended like a sentence."""
    return " ".join(f"word{i:04d}" for i in range(start, start + count)).capitalize() + "."


def overlap_length(previous: str, following: str) -> int:
    """How long a tail of `previous` `following` begins with (the longest one)."""
    return max(
        (k for k in range(1, len(previous) + 1) if following.startswith(previous[-k:])),
        default=0,
    )


def searchable_words(title: str, chunks: list[Chunk]) -> set[str]:
    """What a search can match: the title, and each chunk's heading and content."""
    found = set(words(title))
    for chunk in chunks:
        found.update(words(chunk.heading))
        found.update(words(chunk.content))
    return found


# -- titles and sections -----------------------------------------------------------------------


def test_a_markdown_title_comes_from_its_first_heading() -> None:
    title, chunks = chunk_document(
        "refunds.md", "# Refund Policy\n\nRefunds take 5-7 business days.\n"
    )

    assert title == "Refund Policy"
    assert [c.content for c in chunks] == ["Refunds take 5-7 business days."]
    assert "# Refund Policy" not in chunks[0].content


def test_a_plain_text_title_is_its_first_line() -> None:
    title, chunks = chunk_document(
        "price-match.txt", "Price Match Guarantee\n\nWe match prices for 14 days.\n"
    )

    assert title == "Price Match Guarantee"
    assert [c.content for c in chunks] == ["We match prices for 14 days."]


def test_leading_blank_lines_do_not_hide_the_title() -> None:
    title, _ = chunk_document("faq.md", "\n\n  \n# Questions\n\nAsk us anything.\n")

    assert title == "Questions"


def test_markdown_sections_follow_the_headings() -> None:
    text = (
        "# Shipping\n\nWe ship from Portland.\n\n"
        "## Costs\n\nStandard shipping is $5.95.\n\n"
        "## Delivery times\n\nStandard delivery takes 3-5 days.\n"
    )

    _, chunks = chunk_document("shipping.md", text)

    assert chunks == [
        Chunk("", "We ship from Portland."),
        Chunk("Costs", "Standard shipping is $5.95."),
        Chunk("Delivery times", "Standard delivery takes 3-5 days."),
    ]


@pytest.mark.parametrize("name", ["price-match.txt", "nested/PRICE-MATCH.TXT"])
def test_plain_text_sections_follow_uppercase_lines(name: str) -> None:
    text = (
        "Price Match\n\nWe match lower prices.\n\n"
        "WHAT QUALIFIES\n\nIdentical items in stock.\n\n"
        "LIMITS:\nOne match per item.\n"
    )

    _, chunks = chunk_document(name, text)

    assert chunks == [
        Chunk("", "We match lower prices."),
        Chunk("What Qualifies", "Identical items in stock."),
        Chunk("Limits", "One match per item."),
    ]


def test_uppercase_lines_in_markdown_are_text_not_headings() -> None:
    _, chunks = chunk_document("notes.md", "# Notes\n\nIMPORTANT\nRead this first.\n")

    assert chunks == [Chunk("", "IMPORTANT Read this first.")]


def test_wrapped_paragraph_lines_are_joined() -> None:
    _, chunks = chunk_document(
        "wrap.md", "# Wrap\n\nA paragraph written\nacross three\nlines.\n\nAnother.\n"
    )

    assert [c.content for c in chunks] == ["A paragraph written across three lines.\nAnother."]


def test_windows_line_endings_read_like_unix_ones() -> None:
    unix = "# T\n\n## Part\n\nSome text\nwrapped.\n\n- an item\n"

    assert chunk_document("d.md", unix.replace("\n", "\r\n")) == chunk_document("d.md", unix)


def test_list_items_and_table_rows_keep_their_own_lines() -> None:
    text = (
        "# Prices\n\n## Repairs\n\nWhat we charge:\n"
        "- Zipper slider: $25\n* Patch: $12\n1. Seam: $35\n2) Pole: $20\n\n"
        "| Repair | Price |\n|---|---|\n| Buckle | $15 |\n"
    )

    _, chunks = chunk_document("prices.md", text)

    assert len(chunks) == 1
    assert chunks[0].heading == "Repairs"
    assert chunks[0].content.split("\n") == [
        "What we charge:",
        "- Zipper slider: $25",
        "* Patch: $12",
        "1. Seam: $35",
        "2) Pole: $20",
        "| Repair | Price |",
        "|---|---|",
        "| Buckle | $15 |",
    ]


# -- size, splitting and overlap ---------------------------------------------------------------

SIZES = [
    pytest.param(MAX_CHUNK_CHARS, OVERLAP_CHARS, id="defaults"),
    pytest.param(400, 80, id="400-80"),
    pytest.param(200, 40, id="200-40"),
    pytest.param(300, 150, id="300-150"),
]


def many_paragraphs(count: int = 30) -> str:
    return "# Long\n\n## Only section\n\n" + "\n\n".join(
        sentence(8, start=8 * i) + " " + sentence(6, start=1000 + 6 * i) for i in range(count)
    )


@pytest.mark.parametrize(("max_chars", "overlap"), SIZES)
def test_no_chunk_is_over_the_size_bound(max_chars: int, overlap: int) -> None:
    _, chunks = chunk_document("long.md", many_paragraphs(), max_chars=max_chars, overlap=overlap)

    assert len(chunks) > 1
    assert max(len(c.content) for c in chunks) <= max_chars


@pytest.mark.parametrize(("max_chars", "overlap"), SIZES)
def test_a_long_sentence_after_a_short_one_stays_within_the_bound(
    max_chars: int, overlap: int
) -> None:
    # A sentence that fits, then one too long for a chunk: the first must not be glued onto
    # the first piece of the second.
    first = sentence(max_chars // 12)
    second = " ".join(f"long{i:04d}" for i in range(max_chars // 4))

    _, chunks = chunk_document(
        "one-paragraph.md", f"# P\n\n{first} {second}", max_chars=max_chars, overlap=overlap
    )

    assert max(len(c.content) for c in chunks) <= max_chars
    assert set(words(first + second)) <= searchable_words("P", chunks)


def test_a_long_paragraph_is_split_at_sentence_ends() -> None:
    paragraph = " ".join(sentence(6, start=6 * i) for i in range(60))

    _, chunks = chunk_document("sentences.md", f"# S\n\n{paragraph}\n")

    assert len(chunks) > 2
    assert all(c.content.endswith(".") for c in chunks)
    assert all(len(c.content) <= MAX_CHUNK_CHARS for c in chunks)


def test_a_long_sentence_is_split_between_words() -> None:
    vocabulary = [f"token{i:04d}" for i in range(600)]

    _, chunks = chunk_document("one-sentence.md", "# W\n\n" + " ".join(vocabulary))

    assert len(chunks) > 2
    for chunk in chunks:
        # No word cut in two: every token of every chunk is a whole word of the document.
        assert set(words(chunk.content)) <= set(vocabulary)
    assert set(vocabulary) <= searchable_words("W", chunks)


@pytest.mark.parametrize(("max_chars", "overlap"), SIZES)
def test_each_later_chunk_of_a_section_begins_with_the_previous_ones_tail(
    max_chars: int, overlap: int
) -> None:
    _, chunks = chunk_document("long.md", many_paragraphs(), max_chars=max_chars, overlap=overlap)

    assert len(chunks) > 2
    for previous, following in itertools.pairwise(chunks):
        shared = overlap_length(previous.content, following.content)
        assert shared > 0, (previous, following)
        assert shared <= overlap, (previous, following)
        # The tail starts at a word, not in the middle of one.
        assert shared == len(previous.content) or previous.content[-shared - 1].isspace()


def test_the_first_chunk_of_a_section_has_no_overlap() -> None:
    body = "\n\n".join(sentence(10, start=10 * i) for i in range(20))

    _, chunks = chunk_document("two.md", f"# Two\n\n## First\n\n{body}\n\n## Second\n\nFresh.")

    assert chunks[-1] == Chunk("Second", "Fresh.")
    assert chunks[0].heading == "First"
    assert chunks[0].content.startswith("Word0000")


# -- nothing is lost ---------------------------------------------------------------------------

_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_phrase = st.lists(_words, min_size=1, max_size=8).map(" ".join)
_sentence = _phrase.map(lambda p: p.capitalize() + ".")
_paragraph = st.lists(_sentence, min_size=1, max_size=30).map(" ".join)
_wrapped = st.lists(_phrase, min_size=2, max_size=5).map("\n".join)
_list = st.lists(
    st.tuples(st.sampled_from(["- ", "* ", "1. ", "2) "]), _phrase).map("".join),
    min_size=1,
    max_size=6,
).map("\n".join)
_table = st.lists(
    st.lists(_phrase, min_size=2, max_size=3).map(lambda cells: "| " + " | ".join(cells) + " |"),
    min_size=1,
    max_size=5,
).map("\n".join)
_text_block = st.one_of(_paragraph, _wrapped, _list, _table)
# Each heading has some text of its own (test_a_heading_without_text_of_its_own_is_kept
# covers the other case).
_section = st.tuples(st.sampled_from(["## ", "### "]), _phrase, _text_block).map(
    lambda s: f"{s[0]}{s[1]}\n\n{s[2]}"
)
_block = st.one_of(_text_block, _section)
_markdown = st.tuples(_phrase, st.lists(_block, max_size=15)).map(
    lambda doc: "# " + doc[0] + "\n\n" + "\n\n".join(doc[1]) + "\n"
)


@settings(max_examples=200, deadline=None)
@given(text=_markdown, max_chars=st.integers(min_value=160, max_value=1200))
# Found by CI: the overlap's tail started mid-word when its first space was a newline.
@example(
    text="# 0\n\n0. 0. 0. 0. 0. 0. 0 0 0 0 0. 0 0 00 000 0000 000000000 0000000000 00000000000."
    " 0 0 0000 00000000.\n\n00000000000 0000 0000000.\n\n0.\n",
    max_chars=160,
)
def test_every_word_of_a_document_is_in_its_title_or_a_chunk(text: str, max_chars: int) -> None:
    title, chunks = chunk_document(
        "generated.md", text, max_chars=max_chars, overlap=max_chars // 5
    )

    assert set(words(text)) <= searchable_words(title, chunks)
    # ...and nothing is made up or cut in two.
    assert searchable_words(title, chunks) <= set(words(text))
    assert all(c.content.strip() for c in chunks)


@settings(max_examples=200, deadline=None)
@given(text=_markdown, max_chars=st.integers(min_value=160, max_value=1200))
def test_no_generated_chunk_is_over_the_size_bound(text: str, max_chars: int) -> None:
    _, chunks = chunk_document("generated.md", text, max_chars=max_chars, overlap=max_chars // 5)

    assert all(len(c.content) <= max_chars for c in chunks)


def test_a_heading_without_text_of_its_own_is_kept() -> None:
    # A section heading directly followed by a sub-heading: its words must stay searchable.
    text = "# Returns\n\n## Exchanges\n\n### In a store\n\nBring the receipt.\n"

    title, chunks = chunk_document("returns.md", text)

    assert set(words(text)) <= searchable_words(title, chunks)


# -- the real knowledge base -------------------------------------------------------------------


def test_the_default_knowledge_base_has_markdown_and_plain_text() -> None:
    assert len(KB_FILES) >= 8
    assert {Path(name).suffix for name in KB_FILES} >= {".md", ".txt"}


@pytest.mark.parametrize("name", KB_FILES)
def test_each_default_document_chunks_into_several_nonempty_chunks(name: str) -> None:
    text = (KB_DIR / name).read_text(encoding="utf-8")

    title, chunks = chunk_document(name, text)

    assert title.strip()
    assert len(chunks) >= 3
    assert all(c.content.strip() for c in chunks)
    assert all(len(c.content) <= MAX_CHUNK_CHARS for c in chunks)
    assert len({c.heading for c in chunks}) >= 3
    assert set(words(text)) <= searchable_words(title, chunks)


# -- reading the folder ------------------------------------------------------------------------


def warnings_naming(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("qna_gateway") and name in r.message
    ]


def test_good_files_are_read_with_their_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\nAlpha.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("B\n\nBravo.\n", encoding="utf-8")
    (tmp_path / "c.markdown").write_text("# C\n\nCharlie: café, 20 €.\n", encoding="utf-8")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "d.md").write_text("# D\n\nDelta.\n", encoding="utf-8")

    documents = read_documents(tmp_path)

    assert [d.path for d in documents] == ["a.md", "b.txt", "c.markdown", "deep/er/d.md"]
    by_path = {d.path: d for d in documents}
    assert by_path["c.markdown"].text == "# C\n\nCharlie: café, 20 €.\n"
    assert by_path["c.markdown"].size == len("# C\n\nCharlie: café, 20 €.\n".encode())
    assert len({d.content_hash for d in documents}) == 4
    assert all(re.fullmatch(r"[0-9a-f]{64}", d.content_hash) for d in documents)


def test_the_hash_follows_the_content_not_the_name(tmp_path: Path) -> None:
    (tmp_path / "one.md").write_text("# Same\n\nText.\n", encoding="utf-8")
    (tmp_path / "two.md").write_text("# Same\n\nText.\n", encoding="utf-8")
    before = read_documents(tmp_path)

    (tmp_path / "two.md").write_text("# Same\n\nText!\n", encoding="utf-8")
    after = read_documents(tmp_path)

    assert before[0].content_hash == before[1].content_hash
    assert after[0].content_hash == before[0].content_hash
    assert after[1].content_hash != before[1].content_hash


BAD_FILES = [
    pytest.param("binary.md", b"# Binary\n\x00\x01\x02\xff", id="binary"),
    pytest.param("latin1.txt", "Caf\xe9 cr\xe8me\n".encode("latin-1"), id="not-utf8"),
    pytest.param("huge.md", b"# Huge\n\n" + b"big words " * 200, id="over-max-bytes"),
    pytest.param("empty.md", b"", id="empty"),
    pytest.param("blank.txt", b"  \n\n\t\n", id="blank"),
    pytest.param("prices.csv", b"item,price\ntent,199\n", id="other-suffix"),
    pytest.param("sub/folder/binary.txt", b"\x00" * 10, id="nested-binary"),
]


@pytest.mark.parametrize(("name", "content"), BAD_FILES)
def test_a_bad_file_is_skipped_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, content: bytes
) -> None:
    (tmp_path / "good.md").write_text("# Good\n\nFine.\n", encoding="utf-8")
    bad = tmp_path / name
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(content)
    caplog.set_level(logging.WARNING)

    documents = read_documents(tmp_path, max_bytes=1000)

    assert [d.path for d in documents] == ["good.md"]
    assert warnings_naming(caplog, name), [r.message for r in caplog.records]
    assert not warnings_naming(caplog, "good.md")


def test_hidden_files_and_folders_are_not_documents(tmp_path: Path) -> None:
    (tmp_path / "visible.md").write_text("# Visible\n\nShown.\n", encoding="utf-8")
    (tmp_path / ".draft.md").write_text("# Draft\n\nNot yet.\n", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.md").write_text("# Notes\n\nInternal.\n", encoding="utf-8")
    # A Kubernetes ConfigMap mount keeps a dated copy of every file.
    (tmp_path / "..2026_01_01_00_00_00.000").mkdir()
    (tmp_path / "..2026_01_01_00_00_00.000" / "visible.md").write_text(
        "# Visible\n\nShown.\n", encoding="utf-8"
    )

    assert [d.path for d in read_documents(tmp_path)] == ["visible.md"]


def test_a_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    content = b"# Edge\n\n" + b"x" * 92
    (tmp_path / "edge.md").write_bytes(content)

    assert [d.size for d in read_documents(tmp_path, max_bytes=100)] == [100]


def test_a_missing_folder_is_an_empty_knowledge_base_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    assert read_documents(tmp_path / "nowhere") == []
    assert warnings_naming(caplog, "nowhere")
