"""Migrations: replicas starting together on an empty database apply each one exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from qna_gateway.store.migrations import apply_migrations, bundled_migrations
from tests.fixtures.cli import finish, migrations_applied, start_gateway
from tests.fixtures.databases import applied_migrations, empty_database, table_names


@pytest.fixture
def empty_database_url(postgres_server: str) -> Iterator[str]:
    with empty_database(postgres_server) as url:
        yield url


def expected_rows() -> list[tuple[int, str]]:
    return [(m.version, m.name) for m in bundled_migrations()]


def test_migrations_are_bundled_in_order() -> None:
    versions = [m.version for m in bundled_migrations()]

    assert versions
    assert versions == sorted(set(versions))
    assert all(m.sql.strip() for m in bundled_migrations())


async def test_concurrent_apply_migrations_apply_each_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(apply_migrations(empty_database_url) for _ in range(6)))

    # Whichever task won the lock did all the work; the others found nothing left to do.
    applied = sorted(version for result in results for version in result)
    assert applied == [version for version, _ in expected_rows()]
    assert sum(bool(result) for result in results) == 1
    assert await asyncio.to_thread(applied_migrations, empty_database_url) == expected_rows()
    assert {"chats", "messages"} <= await asyncio.to_thread(table_names, empty_database_url)


async def test_apply_migrations_on_a_migrated_database_does_nothing(
    empty_database_url: str,
) -> None:
    await apply_migrations(empty_database_url)

    assert await apply_migrations(empty_database_url) == []
    assert await asyncio.to_thread(applied_migrations, empty_database_url) == expected_rows()


def test_concurrent_migrate_commands_apply_each_once(
    tmp_path: Path, empty_database_url: str
) -> None:
    processes = [
        start_gateway("migrate", cwd=tmp_path, env={"DATABASE_URL": empty_database_url})
        for _ in range(3)
    ]
    results = [finish(process) for process in processes]

    for result in results:
        assert result.returncode == 0, result.stderr
    counts = [migrations_applied(result.stdout) for result in results]
    assert sorted(counts) == [0, 0, len(expected_rows())]
    assert applied_migrations(empty_database_url) == expected_rows()
    assert {"chats", "messages"} <= table_names(empty_database_url)
