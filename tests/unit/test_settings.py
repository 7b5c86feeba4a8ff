"""Settings: defaults, every variable, `.env`, `*_FILE` secrets, URL forms, and failures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from qna_gateway.settings import (
    DEFAULT_SYSTEM_PROMPT,
    Secret,
    Settings,
    SettingsError,
    normalise_database_url,
)
from qna_gateway.store.pool import with_keepalives

PASSWORD = "hunter2-db-pw"
API_KEY = "sk-test-0123456789abcdef"
DB_URL = f"postgresql://app:{PASSWORD}@db.internal:5432/qna"
SECRET_NAMES = ["DATABASE_URL", "OPENAI_API_KEY"]


def from_env(**environ: str) -> Settings:
    """Settings from exactly these variables: no `.env`, no process environment."""
    return Settings.from_env(environ, env_file=None)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults ----------------------------------------------------------------------------------


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    settings = from_env()

    assert settings == Settings()
    assert settings.database_url is None
    assert settings.data_dir == Path(".qna-data")
    assert settings.openai_api_key is None
    assert settings.openai_base_url is None
    assert settings.model == "gpt-4o-mini"
    assert settings.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.kb_dir == Path("kb")
    assert settings.max_body_bytes == 262_144
    assert settings.drain_seconds == 25
    assert settings.orphan_seconds == 60
    assert settings.sse_ping_seconds == 15
    assert settings.batch_interval_ms == 100
    assert settings.batch_max_chars == 512
    assert settings.history_budget_chars == 24_000
    assert settings.log_format is None  # decided at log set-up: console on a terminal
    assert settings.log_level == "INFO"
    assert settings.llm_configured is False


def test_blank_values_count_as_unset() -> None:
    settings = from_env(QNA_PORT="  ", OPENAI_API_KEY="", QNA_MODEL=" ", DATABASE_URL="")

    assert settings == Settings()


def test_settings_are_frozen() -> None:
    settings = from_env()

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


# -- every variable ----------------------------------------------------------------------------

# (variable, raw value, Settings field, parsed value)
VARIABLES: list[tuple[str, str, str, Any]] = [
    (
        "DATABASE_URL",
        DB_URL,
        "database_url",
        Secret(DB_URL),
    ),
    ("QNA_DATA_DIR", "/var/lib/qna", "data_dir", Path("/var/lib/qna")),
    ("QNA_DB_POOL_MIN", "0", "db_pool_min", 0),
    ("QNA_DB_POOL_MAX", "40", "db_pool_max", 40),
    ("QNA_DB_POOL_TIMEOUT_SECONDS", "2.5", "db_pool_timeout_seconds", 2.5),
    ("OPENAI_API_KEY", API_KEY, "openai_api_key", Secret(API_KEY)),
    ("QNA_API_KEYS", "web:" + "w" * 20, "api_keys", Secret("web:" + "w" * 20)),
    ("QNA_ADMIN_PRINCIPALS", "ops, web", "admin_principals", ("ops", "web")),
    ("QNA_AUTH", "disabled", "auth", "disabled"),
    ("QNA_JWT_SECRET", "j" * 32, "jwt_secret", Secret("j" * 32)),
    (
        "QNA_JWT_JWKS_URL",
        "https://idp.example.com/jwks.json",
        "jwt_jwks_url",
        "https://idp.example.com/jwks.json",
    ),
    ("QNA_JWT_AUDIENCE", "qna", "jwt_audience", "qna"),
    ("QNA_JWT_ISSUER", "https://idp.example.com", "jwt_issuer", "https://idp.example.com"),
    ("QNA_STREAM_TOKEN_SECRET", "s" * 32, "stream_token_secret", Secret("s" * 32)),
    ("QNA_RATE_LIMIT_PER_MINUTE", "30", "rate_limit_per_minute", 30),
    ("QNA_TOKEN_LIMIT_PER_MINUTE", "5000", "token_limit_per_minute", 5000),
    ("QNA_MAX_TURNS_PER_PRINCIPAL", "2", "max_turns_per_principal", 2),
    ("QNA_MAX_TURNS", "50", "max_turns", 50),
    ("QNA_MAX_STREAMS_PER_PRINCIPAL", "8", "max_streams_per_principal", 8),
    ("QNA_MAX_STREAMS", "500", "max_streams", 500),
    ("QNA_SSE_SEND_TIMEOUT_SECONDS", "5", "sse_send_timeout_seconds", 5.0),
    ("QNA_ROOT_PATH", "/qna", "root_path", "/qna"),
    ("QNA_MAX_HEADER_BYTES", "8192", "max_header_bytes", 8192),
    ("OPENAI_BASE_URL", "http://127.0.0.1:9999/v1/", "openai_base_url", "http://127.0.0.1:9999/v1"),
    ("QNA_MODEL", "llama-3.1-8b", "model", "llama-3.1-8b"),
    ("QNA_SYSTEM_PROMPT", "Answer in French.", "system_prompt", "Answer in French."),
    ("QNA_LLM_CONNECT_TIMEOUT_SECONDS", "3", "llm_connect_timeout_seconds", 3.0),
    ("QNA_LLM_FIRST_TOKEN_TIMEOUT_SECONDS", "120.5", "llm_first_token_timeout_seconds", 120.5),
    ("QNA_LLM_IDLE_TIMEOUT_SECONDS", "12", "llm_idle_timeout_seconds", 12.0),
    ("QNA_LLM_TOTAL_TIMEOUT_SECONDS", "900", "llm_total_timeout_seconds", 900.0),
    ("QNA_LLM_BREAKER_FAILURES", "0", "llm_breaker_failures", 0),
    ("QNA_LLM_BREAKER_SECONDS", "5", "llm_breaker_seconds", 5.0),
    ("QNA_LLM_MAX_RETRIES", "0", "llm_max_retries", 0),
    ("QNA_HOST", "0.0.0.0", "host", "0.0.0.0"),  # noqa: S104 - a value under test, not a bind
    ("QNA_PORT", "9090", "port", 9090),
    ("QNA_MAX_BODY_BYTES", "1048576", "max_body_bytes", 1_048_576),
    ("QNA_KB_DIR", "/srv/kb", "kb_dir", Path("/srv/kb")),
    ("QNA_KB_MODE", "prefetch", "kb_mode", "prefetch"),
    ("QNA_LOG_CONTENT", "true", "log_content", True),
    ("QNA_KB_MAX_ROUNDS", "5", "kb_max_rounds", 5),
    ("QNA_KB_TOP_K", "6", "kb_top_k", 6),
    ("QNA_BATCH_INTERVAL_MS", "50", "batch_interval_ms", 50),
    ("QNA_BATCH_MAX_CHARS", "2048", "batch_max_chars", 2048),
    ("QNA_HISTORY_BUDGET_CHARS", "8000", "history_budget_chars", 8000),
    ("QNA_EARLY_LLM_START", "false", "early_llm_start", False),
    ("QNA_SSE_PING_SECONDS", "0.5", "sse_ping_seconds", 0.5),
    ("QNA_SSE_RETRY_MS", "3000", "sse_retry_ms", 3000),
    ("QNA_DRAIN_SECONDS", "0", "drain_seconds", 0.0),
    ("QNA_ORPHAN_SECONDS", "120", "orphan_seconds", 120.0),
    ("QNA_LOG_FORMAT", "json", "log_format", "json"),
    ("QNA_LOG_LEVEL", "debug", "log_level", "DEBUG"),
]


@pytest.mark.parametrize(("variable", "raw", "field", "expected"), VARIABLES)
def test_each_variable_sets_its_field(variable: str, raw: str, field: str, expected: Any) -> None:
    settings = from_env(**{variable: raw})

    assert getattr(settings, field) == expected
    # ...and nothing else moves.
    assert dataclasses.replace(settings, **{field: getattr(Settings(), field)}) == Settings()


def test_every_field_has_a_variable_under_test() -> None:
    assert {field for _, _, field, _ in VARIABLES} == {f.name for f in dataclasses.fields(Settings)}


def test_surrounding_whitespace_is_ignored() -> None:
    settings = from_env(QNA_PORT=" 9091\n", QNA_MODEL="  m  ", QNA_LOG_FORMAT=" console ")

    assert (settings.port, settings.model, settings.log_format) == (9091, "m", "console")


@pytest.mark.parametrize("value", ["0", "65535"])
def test_port_bounds_are_accepted(value: str) -> None:
    assert from_env(QNA_PORT=value).port == int(value)


# -- the LLM switch ----------------------------------------------------------------------------


def test_llm_is_not_configured_without_key_or_base_url() -> None:
    assert from_env(QNA_MODEL="gpt-4o").llm_configured is False


def test_an_api_key_alone_configures_the_llm() -> None:
    assert from_env(OPENAI_API_KEY=API_KEY).llm_configured is True


def test_a_base_url_alone_configures_the_llm() -> None:
    # A local OpenAI-compatible server (vLLM, Ollama) often needs no key.
    assert from_env(OPENAI_BASE_URL="http://localhost:11434/v1").llm_configured is True


# -- .env --------------------------------------------------------------------------------------


def test_dotenv_values_are_used(tmp_path: Path) -> None:
    env_file = write(
        tmp_path / ".env",
        "# development settings\n"
        "QNA_PORT=9000\n"
        'QNA_MODEL="from-dotenv"\n'
        "export QNA_LOG_LEVEL=warning\n"
        "QNA_KB_DIR='./docs/kb'\n",
    )

    settings = Settings.from_env({}, env_file=env_file)

    assert settings.port == 9000
    assert settings.model == "from-dotenv"
    assert settings.log_level == "WARNING"
    assert settings.kb_dir == Path("docs/kb")


def test_the_environment_overrides_dotenv(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "QNA_PORT=9000\nQNA_MODEL=from-dotenv\n")

    settings = Settings.from_env({"QNA_PORT": "9100"}, env_file=env_file)

    assert settings.port == 9100
    assert settings.model == "from-dotenv"


def test_a_missing_dotenv_file_is_ignored(tmp_path: Path) -> None:
    assert Settings.from_env({}, env_file=tmp_path / "absent.env") == Settings()


def test_a_malformed_dotenv_value_names_its_variable(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "QNA_SSE_PING_SECONDS=often\n")

    with pytest.raises(SettingsError, match="QNA_SSE_PING_SECONDS"):
        Settings.from_env({}, env_file=env_file)


def test_dotenv_can_point_a_secret_at_a_file(tmp_path: Path) -> None:
    key_file = write(tmp_path / "openai-key", API_KEY + "\n")
    env_file = write(tmp_path / ".env", f"OPENAI_API_KEY_FILE={key_file}\n")

    settings = Settings.from_env({}, env_file=env_file)

    assert settings.openai_api_key == Secret(API_KEY)


# -- *_FILE secrets ----------------------------------------------------------------------------


def test_database_url_is_read_from_its_file(tmp_path: Path) -> None:
    url_file = write(tmp_path / "database-url", DB_URL + "\n")

    settings = from_env(DATABASE_URL_FILE=str(url_file))

    assert settings.database_url == Secret(DB_URL)


def test_a_database_url_file_is_normalised_too(tmp_path: Path) -> None:
    url_file = write(tmp_path / "database-url", f"postgresql+asyncpg://app:{PASSWORD}@h/qna\n")

    settings = from_env(DATABASE_URL_FILE=str(url_file))

    assert settings.database_url == Secret(f"postgresql://app:{PASSWORD}@h/qna")


def test_api_key_is_read_from_its_file(tmp_path: Path) -> None:
    key_file = write(tmp_path / "openai-api-key", f"  {API_KEY}\n\n")

    settings = from_env(OPENAI_API_KEY_FILE=str(key_file))

    assert settings.openai_api_key == Secret(API_KEY)
    assert settings.llm_configured is True


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_secret_and_its_file_together_are_an_error(tmp_path: Path, name: str) -> None:
    value = DB_URL if name == "DATABASE_URL" else API_KEY
    secret_file = write(tmp_path / "secret", value)

    with pytest.raises(SettingsError, match=f"{name} and {name}_FILE") as caught:
        from_env(**{name: value, f"{name}_FILE": str(secret_file)})

    assert PASSWORD not in str(caught.value)
    assert API_KEY not in str(caught.value)


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_missing_secret_file_is_an_error_naming_the_variable(tmp_path: Path, name: str) -> None:
    with pytest.raises(SettingsError, match=f"{name}_FILE"):
        from_env(**{f"{name}_FILE": str(tmp_path / "no-such-file")})


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_an_unreadable_secret_file_is_an_error_naming_the_variable(
    tmp_path: Path, name: str
) -> None:
    # A directory where a file should be: unreadable as text even for root.
    with pytest.raises(SettingsError, match=f"{name}_FILE"):
        from_env(**{f"{name}_FILE": str(tmp_path)})


@pytest.mark.parametrize("name", SECRET_NAMES)
@pytest.mark.parametrize("content", ["", " \n\t\n"])
def test_an_empty_secret_file_is_an_error_naming_the_variable(
    tmp_path: Path, name: str, content: str
) -> None:
    secret_file = write(tmp_path / "secret", content)

    with pytest.raises(SettingsError, match=f"{name}_FILE"):
        from_env(**{f"{name}_FILE": str(secret_file)})


# -- database URL forms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            f"postgresql+asyncpg://u:{PASSWORD}@h:5432/db?ssl=require",
            f"postgresql://u:{PASSWORD}@h:5432/db?sslmode=require",
        ),
        (
            f"postgresql+psycopg://u:{PASSWORD}@h:5432/db",
            f"postgresql://u:{PASSWORD}@h:5432/db",
        ),
        (
            f"postgresql+psycopg2://u:{PASSWORD}@h/db?sslmode=verify-full",
            f"postgresql://u:{PASSWORD}@h/db?sslmode=verify-full",
        ),
        (f"postgres://u:{PASSWORD}@h/db", f"postgresql://u:{PASSWORD}@h/db"),
        (f"postgresql://u:{PASSWORD}@h/db", f"postgresql://u:{PASSWORD}@h/db"),
    ],
)
def test_database_urls_are_normalised_to_libpq_form(given: str, expected: str) -> None:
    assert normalise_database_url(given) == expected
    assert from_env(DATABASE_URL=given).database_url == Secret(expected)


def test_a_libpq_conninfo_string_is_accepted_as_it_is() -> None:
    conninfo = f"host=db.internal port=5432 dbname=qna user=app password={PASSWORD}"

    assert normalise_database_url(conninfo) == conninfo
    assert from_env(DATABASE_URL=conninfo).database_url == Secret(conninfo)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql:///qna", {"dbname": "qna"}),
        (
            "postgresql+psycopg:///qna?host=/var/run/postgresql",
            {"dbname": "qna", "host": "/var/run/postgresql"},
        ),
        (
            "postgresql://app:@/qna?host=%2Ftmp%2Fpg",
            {"user": "app", "dbname": "qna", "host": "/tmp/pg"},
        ),
    ],
)
def test_unix_socket_urls_without_a_host_survive_normalising(
    given: str, expected: dict[str, str]
) -> None:
    # `postgresql:///db` is how a local socket is usually spelled; an empty host is not a typo.
    assert conninfo_to_dict(normalise_database_url(given)) == expected


def test_normalising_keeps_what_libpq_reads_from_the_url() -> None:
    # Percent-encoded spaces must reach libpq as spaces: it does not decode `+` in a query.
    given = (
        "postgresql+asyncpg://u:p%40ss@h:5433/db"
        "?ssl=require&application_name=qna%20gateway&options=-c%20statement_timeout%3D5000"
    )

    parsed = conninfo_to_dict(normalise_database_url(given))

    assert parsed == {
        "user": "u",
        "password": "p@ss",
        "host": "h",
        "port": "5433",
        "dbname": "db",
        "sslmode": "require",
        "application_name": "qna gateway",
        "options": "-c statement_timeout=5000",
    }


# -- malformed values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("QNA_PORT", "abc"),
        ("QNA_PORT", "70000"),
        ("QNA_PORT", "-1"),
        ("QNA_PORT", "80.5"),
        ("QNA_DRAIN_SECONDS", "-1"),
        ("QNA_DRAIN_SECONDS", "soon"),
        ("QNA_ORPHAN_SECONDS", "nan"),
        ("QNA_SSE_PING_SECONDS", "0"),
        ("QNA_SSE_PING_SECONDS", "inf"),
        ("QNA_MAX_BODY_BYTES", "10"),
        ("QNA_MAX_BODY_BYTES", "1MB"),
        ("QNA_BATCH_INTERVAL_MS", "0"),
        ("QNA_BATCH_MAX_CHARS", "1e3"),
        ("QNA_HISTORY_BUDGET_CHARS", "-5"),
        ("QNA_SSE_RETRY_MS", "-1"),
        ("QNA_DB_POOL_MIN", "-1"),
        ("QNA_DB_POOL_MAX", "0"),
        ("QNA_DB_POOL_TIMEOUT_SECONDS", "0"),
        ("QNA_LLM_CONNECT_TIMEOUT_SECONDS", "0"),
        ("QNA_LLM_IDLE_TIMEOUT_SECONDS", "forever"),
        ("QNA_LLM_MAX_RETRIES", "11"),
        ("QNA_LOG_FORMAT", "xml"),
        ("QNA_KB_MODE", "embeddings"),
        ("QNA_API_KEYS", "web-without-a-key"),
        ("QNA_API_KEYS", "web:short"),
        ("QNA_AUTH", "off"),
        ("QNA_ROOT_PATH", "qna/"),
        ("QNA_KB_TOP_K", "0"),
        ("QNA_LOG_FORMAT", "JSON5"),
        ("QNA_LOG_LEVEL", "loud"),
        ("OPENAI_BASE_URL", "ftp://models.example.com/v1"),
        ("OPENAI_BASE_URL", "localhost:8080/v1"),
        ("OPENAI_BASE_URL", "http://"),
        ("OPENAI_BASE_URL", "not a url"),
        ("DATABASE_URL", f"mysql://app:{PASSWORD}@db/qna"),
        ("DATABASE_URL", f"sqlite:///{PASSWORD}.db"),
        ("DATABASE_URL", f"host=db user=app password={PASSWORD} sslmode"),
        ("DATABASE_URL", f"host=db password={PASSWORD} no_such_option=1"),
        ("DATABASE_URL", f"postgresql://app:{PASSWORD}@db/qna?no_such_option=1"),
        ("DATABASE_URL", f"postgresql://app:{PASSWORD}%zz@db/qna"),
        ("DATABASE_URL", f"postgresql://app:{PASSWORD}@[::1/qna"),
    ],
)
def test_a_malformed_value_is_an_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(**{variable: value})

    assert variable in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://app:{PASSWORD}@db/qna",
        f"postgresql://app:{PASSWORD}@db/qna?no_such_option=1",
        f"postgresql://app:{PASSWORD}%zz@db/qna",
        f"postgresql://app:{PASSWORD}@[::1/qna",
    ],
)
def test_a_malformed_database_url_file_never_shows_the_password(tmp_path: Path, url: str) -> None:
    url_file = write(tmp_path / "database-url", url)

    with pytest.raises(SettingsError, match="DATABASE_URL") as caught:
        from_env(DATABASE_URL_FILE=str(url_file))

    assert PASSWORD not in str(caught.value)


# -- secrets stay secret -----------------------------------------------------------------------


def test_secret_hides_its_value_until_revealed() -> None:
    secret = Secret(API_KEY)

    assert secret.reveal() == API_KEY
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert API_KEY not in shown


def test_settings_never_show_the_password_or_api_key(tmp_path: Path) -> None:
    direct = from_env(
        DATABASE_URL=f"postgresql+asyncpg://app:{PASSWORD}@db:5432/qna?ssl=require",
        OPENAI_API_KEY=API_KEY,
    )
    from_files = from_env(
        DATABASE_URL_FILE=str(write(tmp_path / "url", DB_URL)),
        OPENAI_API_KEY_FILE=str(write(tmp_path / "key", API_KEY)),
    )

    for settings in (direct, from_files):
        assert settings.database_url is not None
        assert PASSWORD in settings.database_url.reveal()
        for shown in (repr(settings), str(settings), f"{settings}"):
            assert PASSWORD not in shown
            assert API_KEY not in shown


def test_keepalives_fill_in_what_the_url_leaves_out() -> None:
    """The gateway's keepalive defaults go with every URL; what the URL sets stays its own,
    and nothing else in it changes (the password included)."""
    url = "postgresql://app:s%3Dcret@db.internal:6432/qna?sslmode=require&keepalives_idle=120"
    parsed = conninfo_to_dict(with_keepalives(url))
    assert parsed == {
        "user": "app",
        "password": "s=cret",
        "host": "db.internal",
        "port": "6432",
        "dbname": "qna",
        "sslmode": "require",
        "keepalives": "1",
        "keepalives_idle": "120",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "tcp_user_timeout": "60000",
    }
    every = with_keepalives(with_keepalives(url))
    assert conninfo_to_dict(every) == parsed  # idempotent: nothing left to add
