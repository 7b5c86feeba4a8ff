"""The installed `qna-gateway` command: help, configuration errors, `migrate`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qna_gateway.store.migrations import bundled_migrations
from tests.fixtures.cli import migrations_applied, run_gateway
from tests.fixtures.databases import applied_migrations, empty_database, table_names

PASSWORD = "hunter2-db-pw"


@pytest.fixture
def empty_database_url(postgres_server: str) -> Iterator[str]:
    with empty_database(postgres_server) as url:
        yield url


@pytest.mark.parametrize("python_module", [False, True], ids=["console-script", "python-m"])
def test_help_lists_the_commands(tmp_path: Path, python_module: bool) -> None:
    result = run_gateway("--help", cwd=tmp_path, python_module=python_module)

    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout
    assert "migrate" in result.stdout
    assert result.stderr == ""


def test_a_command_is_required(tmp_path: Path) -> None:
    result = run_gateway(cwd=tmp_path)

    assert result.returncode == 2
    assert "usage: qna-gateway" in result.stderr


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("serve", "QNA_PORT", "abc"),
        ("migrate", "QNA_PORT", "70000"),
        ("serve", "QNA_DRAIN_SECONDS", "-1"),
        ("serve", "QNA_LOG_FORMAT", "xml"),
        ("serve", "OPENAI_BASE_URL", "ftp://models.example.com"),
        ("migrate", "DATABASE_URL", f"mysql://app:{PASSWORD}@db/qna"),
        ("migrate", "DATABASE_URL", f"postgresql://app:{PASSWORD}@[::1/qna"),
    ],
)
def test_a_malformed_variable_stops_the_command_naming_it(
    tmp_path: Path, command: str, variable: str, value: str
) -> None:
    result = run_gateway(command, cwd=tmp_path, env={variable: value})

    assert result.returncode == 2, result.stderr
    assert variable in result.stderr
    assert "configuration error" in result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


def test_a_malformed_dotenv_value_stops_the_command(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("QNA_PORT=eighty\n", encoding="utf-8")

    result = run_gateway("migrate", cwd=tmp_path)

    assert result.returncode == 2
    assert "QNA_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_builds_the_schema_once(tmp_path: Path, empty_database_url: str) -> None:
    expected = [(m.version, m.name) for m in bundled_migrations()]

    first = run_gateway("migrate", cwd=tmp_path, env={"DATABASE_URL": empty_database_url})

    assert first.returncode == 0, first.stderr
    assert migrations_applied(first.stdout) == len(expected)
    assert applied_migrations(empty_database_url) == expected
    assert {"schema_migrations", "chats", "messages"} <= table_names(empty_database_url)

    again = run_gateway("migrate", cwd=tmp_path, env={"DATABASE_URL": empty_database_url})

    assert again.returncode == 0, again.stderr
    assert migrations_applied(again.stdout) == 0
    assert applied_migrations(empty_database_url) == expected


def test_migrate_reads_the_url_from_a_file_in_sqlalchemy_form(
    tmp_path: Path, empty_database_url: str
) -> None:
    # What a Kubernetes Secret written for another (SQLAlchemy) service would hold.
    url_file = tmp_path / "database-url"
    url_file.write_text(
        empty_database_url.replace("postgresql://", "postgresql+asyncpg://", 1) + "\n",
        encoding="utf-8",
    )

    result = run_gateway("migrate", cwd=tmp_path, env={"DATABASE_URL_FILE": str(url_file)})

    assert result.returncode == 0, result.stderr
    assert applied_migrations(empty_database_url) == [
        (m.version, m.name) for m in bundled_migrations()
    ]
