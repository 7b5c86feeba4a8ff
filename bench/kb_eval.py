"""Knowledge-base search relevance: recall@1, recall@3 and MRR over question → document pairs.

Run: `python -m bench.kb_eval` (uses DATABASE_URL's server, else an embedded PostgreSQL; the
evaluation runs in a database of its own that is dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from qna_gateway.kb import KnowledgeBase
from qna_gateway.settings import normalise_database_url
from qna_gateway.store.embedded import EmbeddedPostgres
from qna_gateway.store.migrations import apply_migrations
from qna_gateway.store.pool import make_pool

ROOT = Path(__file__).resolve().parent.parent

# (question as a customer would type it, acceptable documents: the first is the best answer)
EVAL_SET: list[tuple[str, tuple[str, ...]]] = [
    ("how long do i have to send stuff back for my money back?",
     ("refund-policy.md", "returns-and-exchanges.md")),
    ("When will I actually see the refund on my credit card?", ("refund-policy.md",)),
    ("is there a restocking fee if i opened the GPS unit i bought",
     ("refund-policy.md", "trailhead-plus-membership.md")),
    ("I bought christmas presents in early december, whats the last day I can return them?",
     ("refund-policy.md",)),
    ("how long is my RA number good for?", ("returns-and-exchanges.md",)),
    ("can i swap my jacket for a bigger size, and do i have to pay shipping for that?",
     ("returns-and-exchanges.md",)),
    ("Can I bring my online order back to the Denver store?", ("returns-and-exchanges.md",)),
    ("my family tent box weighs like 60 lbs, how do i ship it back??",
     ("returns-and-exchanges.md",)),
    ("whats the cutoff time to get my order shipped same day in the US", ("shipping-policy.md",)),
    ("how much do i need to spend to get free shipping to canada", ("shipping-policy.md",)),
    ("Can you ship bear spray to Hawaii?", ("shipping-policy.md", "international-shipping.txt")),
    ("tracking says delivered but the package isnt here", ("shipping-policy.md",)),
    ("do you ship to the UK?", ("international-shipping.txt",)),
    ("Will I have to pay customs duties or brokerage on my order to Canada?",
     ("international-shipping.txt",)),
    ("I'm in Germany and ordered a \"Ships from USA\" item for 200 euros, will DHL charge me "
     "anything?", ("international-shipping.txt",)),
    ("can I send my order to a package forwarding adress?", ("international-shipping.txt",)),
    ("how long is the warranty on a northwind tent?", ("warranty.md",)),
    ("my Northwind headlamp stopped charging after about 18 months, is that covered?",
     ("warranty.md",)),
    ("mice chewed a hole in my backpack - is that a warranty thing?", ("warranty.md",)),
    ("how much is trailhead plus per year?", ("trailhead-plus-membership.md",)),
    ("if I cancel my membership halfway through the year do I get any money back?",
     ("trailhead-plus-membership.md",)),
    ("is there a free trial for the plus membership? when do i get charged",
     ("trailhead-plus-membership.md",)),
    ("when does my Trail Credit expire?", ("trailhead-plus-membership.md",)),
    ("what are the password requirments", ("account-and-security.md",)),
    ("how do i delete my account, and can i change my mind after?",
     ("account-and-security.md", "payment-methods.md")),
    ("I got locked out after trying my password too many times", ("account-and-security.md",)),
    ("can i pay in installments like klarna?", ("payment-methods.md",)),
    ("my card got declined 3 times and now checkout won't let me pay", ("payment-methods.md",)),
    ("do northwind gift cards expire?", ("payment-methods.md",)),
    ("will you match amazon's price?", ("price-match.txt",)),
    ("I found the same backpack cheaper on another site 3 weeks after I bought it, can I get "
     "the difference back?", ("price-match.txt",)),
    ("you guys dropped the price a week after I bought it - can I get the difference refunded?",
     ("price-match.txt", "trailhead-plus-membership.md")),
    ("how long does a zipper repair take and what does it cost?", ("repairs-and-rentals.md",)),
    ("what's the deposit for renting a tent?", ("repairs-and-rentals.md",)),
    ("What is the security deposit for renting a tent?", ("repairs-and-rentals.md",)),
    ("what happens if i bring my rental back late?", ("repairs-and-rentals.md",)),
]  # fmt: skip


@dataclass(frozen=True)
class Scores:
    recall_at_1: float
    recall_at_3: float
    mrr: float
    misses: list[tuple[str, list[str]]]


async def evaluate(kb: KnowledgeBase) -> Scores:
    at_1 = at_3 = 0
    reciprocal = 0.0
    misses: list[tuple[str, list[str]]] = []
    for question, accepted in EVAL_SET:
        hits = await kb.search(question, limit=10)
        documents: list[str] = []
        for hit in hits:  # rank documents by their best chunk
            if hit.source.document not in documents:
                documents.append(hit.source.document)
        rank = next((i + 1 for i, d in enumerate(documents) if d in accepted), None)
        if rank == 1:
            at_1 += 1
        if rank is not None and rank <= 3:
            at_3 += 1
        if rank is not None:
            reciprocal += 1 / rank
        if rank != 1:
            misses.append((question, documents[:3]))
    n = len(EVAL_SET)
    return Scores(at_1 / n, at_3 / n, reciprocal / n, misses)


async def run(server: str, kb_dir: Path) -> Scores:
    name = f"qna_kb_eval_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    info = {k: v for k, v in conninfo_to_dict(server).items() if v is not None}
    url = make_conninfo("", **{**info, "dbname": name})
    try:
        await apply_migrations(url)
        pool = make_pool(url, min_size=1, max_size=2, timeout=10)
        await pool.open(wait=True)
        try:
            kb = KnowledgeBase(pool)
            await kb.sync(kb_dir)
            return await evaluate(kb)
        finally:
            await pool.close()
    finally:
        async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def main_async(kb_dir: Path) -> Scores:
    if os.environ.get("DATABASE_URL"):
        return await run(normalise_database_url(os.environ["DATABASE_URL"]), kb_dir)
    with tempfile.TemporaryDirectory(prefix="qna-kb-eval-") as folder:
        server = EmbeddedPostgres(Path(folder))
        uri = await server.start()
        try:
            return await run(uri, kb_dir)
        finally:
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kb-dir", type=Path, default=ROOT / "kb")
    args = parser.parse_args()
    scores = asyncio.run(main_async(args.kb_dir))
    print(f"questions: {len(EVAL_SET)}")
    print(f"recall@1:  {scores.recall_at_1:.3f}")
    print(f"recall@3:  {scores.recall_at_3:.3f}")
    print(f"MRR:       {scores.mrr:.3f}")
    for question, top in scores.misses:
        print(f"  not first: {question!r} -> {top}")


if __name__ == "__main__":
    main()
