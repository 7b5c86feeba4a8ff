"""Frozen settings read from the environment, a `.env` file and `*_FILE` secrets."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import psycopg
from dotenv import dotenv_values
from psycopg.conninfo import conninfo_to_dict

T = TypeVar("T")

LogFormat = Literal["json", "console"]
KbMode = Literal["tools", "prefetch"]
AuthMode = Literal["auto", "disabled"]

DEFAULT_SYSTEM_PROMPT = (
    "You are the customer-support assistant of the company whose knowledge base you can search. "
    "Answer from the knowledge base; when it does not cover the question, say so plainly. "
    "Be concise."
)


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A value that must never reach a log line, a repr or an error message."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the gateway reads from its environment, validated once at start-up."""

    # Storage: None means "start an embedded PostgreSQL in data_dir".
    database_url: Secret | None = None
    data_dir: Path = Path(".qna-data")
    db_pool_min: int = 1
    db_pool_max: int = 10
    db_pool_timeout_seconds: float = 5.0

    # The LLM: neither key nor base URL means extractive mode (no LLM at all).
    openai_api_key: Secret | None = None
    openai_base_url: str | None = None
    model: str = "gpt-4o-mini"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    llm_connect_timeout_seconds: float = 10.0
    llm_first_token_timeout_seconds: float = 60.0
    llm_idle_timeout_seconds: float = 30.0
    llm_total_timeout_seconds: float = 600.0
    llm_max_retries: int = 2
    llm_breaker_failures: int = 5
    llm_breaker_seconds: float = 30.0

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 262_144
    max_header_bytes: int = 32_768

    # Knowledge base: "tools" lets the model search; "prefetch" searches before the call.
    kb_dir: Path = Path("kb")
    kb_mode: KbMode = "tools"
    kb_max_rounds: int = 3
    kb_top_k: int = 4

    # Turns and streams.
    batch_interval_ms: int = 100
    batch_max_chars: int = 512
    history_budget_chars: int = 24_000
    # Call the LLM while the question is being stored, when this process knows the history
    # the ask will read (a chat it created or answered last); see histories.py.
    early_llm_start: bool = True
    sse_ping_seconds: float = 15.0
    sse_retry_ms: int = 2_000
    drain_seconds: float = 25.0
    orphan_seconds: float = 60.0

    # Who may ask. Keys are `name:key` pairs; each name is a principal owning its chats.
    api_keys: Secret | None = None
    admin_principals: tuple[str, ...] = ()
    auth: AuthMode = "auto"
    jwt_secret: Secret | None = None
    jwt_jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    stream_token_secret: Secret | None = None

    # Limits and backpressure (per process).
    rate_limit_per_minute: int = 120
    token_limit_per_minute: int = 0
    max_turns_per_principal: int = 4
    max_turns: int = 256
    max_streams_per_principal: int = 32
    max_streams: int = 4096
    sse_send_timeout_seconds: float = 30.0
    root_path: str = ""

    # Logs.
    log_format: LogFormat | None = None
    log_level: str = "INFO"
    # Questions and answers are personal data: they reach the logs only when asked for.
    log_content: bool = False

    @property
    def auth_enabled(self) -> bool:
        """Credentials are configured and not switched off. Without them every caller is the
        one principal `anonymous`, and per-principal limits do not apply."""
        has_credentials = bool(self.api_keys or self.jwt_secret or self.jwt_jwks_url)
        return has_credentials and self.auth != "disabled"

    @property
    def llm_configured(self) -> bool:
        return self.openai_api_key is not None or self.openai_base_url is not None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, env_file: Path | None = Path(".env")
    ) -> Settings:
        """Build settings: the process environment wins over `.env`, which wins over defaults."""
        merged: dict[str, str] = {}
        if env_file is not None and env_file.is_file():
            merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        merged.update(os.environ if environ is None else environ)
        return _read(_Env(merged))


class _Env:
    """Typed access to the merged variables; every failure names its variable."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def raw(self, name: str) -> str | None:
        value = self._values.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def secret(self, name: str) -> Secret | None:
        direct = self.raw(name)
        file_name = self.raw(f"{name}_FILE")
        if direct is not None and file_name is not None:
            raise SettingsError(f"{name} and {name}_FILE are both set; set only one")
        if file_name is None:
            return None if direct is None else Secret(direct)
        try:
            text = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"{name}_FILE: cannot read {file_name}: {exc.strerror}") from None
        if not text:
            raise SettingsError(f"{name}_FILE: {file_name} is empty")
        return Secret(text)

    def get(self, name: str, parse: Callable[[str], T], default: T, *, what: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except (ValueError, TypeError):
            raise SettingsError(f"{name}={value!r} is not {what}") from None

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.get(name, float, default, what="a number")
        if not minimum <= value <= maximum:
            raise SettingsError(f"{name}={value} is outside {minimum}..{maximum}")
        return value

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.get(name, int, default, what="an integer")
        if not minimum <= value <= maximum:
            raise SettingsError(f"{name}={value} is outside {minimum}..{maximum}")
        return value


def normalise_database_url(url: str) -> str:
    """Accept libpq URLs and SQLAlchemy-style ones (`postgresql+asyncpg://`), return libpq's form.

    libpq's `key=value` form is accepted as it is. The error never repeats the URL: it may hold
    a password.
    """
    if "://" not in url:
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            raise SettingsError("DATABASE_URL is neither a URL nor a libpq conninfo") from None
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        raise SettingsError("DATABASE_URL is not a valid URL") from None
    scheme = parts.scheme.lower()
    driver_schemes = {"postgresql+asyncpg", "postgresql+psycopg", "postgresql+psycopg2"}
    if scheme in driver_schemes or scheme == "postgres":
        scheme = "postgresql"
    if scheme != "postgresql":
        raise SettingsError(
            "DATABASE_URL must start with postgresql://, postgres://, "
            "postgresql+asyncpg:// or postgresql+psycopg://"
        )
    # asyncpg spells libpq's sslmode as `ssl`; translate so copied URLs keep working.
    # quote (not quote_plus): libpq reads `+` literally, so a space must stay %20.
    query = urlencode(
        [("sslmode" if k == "ssl" else k, v) for k, v in parse_qsl(parts.query)], quote_via=quote
    )
    # Built by hand: urlunsplit drops the `//` of a host-less URL (`postgresql:///db`).
    normalised = f"{scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    try:
        conninfo_to_dict(normalised)
    except psycopg.ProgrammingError:
        # libpq's message can quote the part it choked on, password included: not repeated.
        raise SettingsError(
            "DATABASE_URL is not a valid PostgreSQL URL (check its percent-encoding and its "
            "query parameters)"
        ) from None
    return normalised


def _one_of(kind: Any) -> Callable[[str], Any]:
    """A parser for one of a Literal's values (anything else is a ValueError)."""
    allowed = get_args(kind)

    def parse(value: str) -> Any:
        if value not in allowed:
            raise ValueError(value)
        return value

    return parse


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _api_keys(secret: Secret | None) -> Secret | None:
    if secret is None:
        return None
    for item in secret.reveal().split(","):
        name, colon, key = item.strip().partition(":")
        if item.strip() and (not colon or not name.strip() or len(key.strip()) < 16):
            raise SettingsError(
                "QNA_API_KEYS must be comma-separated name:key pairs, each key at least 16 "
                "characters"
            )
    return secret


def _root_path(value: str) -> str:
    if not value.startswith("/") or value.endswith("/") or "//" in value:
        raise ValueError(value)
    return value


def _boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(value)


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(value)
    return level


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(value)
    return value.rstrip("/")


def _read(env: _Env) -> Settings:
    defaults = Settings()
    database_url = env.secret("DATABASE_URL")
    if database_url is not None:
        database_url = Secret(normalise_database_url(database_url.reveal()))
    return Settings(
        database_url=database_url,
        data_dir=env.get("QNA_DATA_DIR", Path, defaults.data_dir, what="a path"),
        db_pool_min=env.integer("QNA_DB_POOL_MIN", defaults.db_pool_min, minimum=0, maximum=100),
        db_pool_max=env.integer("QNA_DB_POOL_MAX", defaults.db_pool_max, minimum=1, maximum=500),
        db_pool_timeout_seconds=env.number(
            "QNA_DB_POOL_TIMEOUT_SECONDS", defaults.db_pool_timeout_seconds, minimum=0.1, maximum=60
        ),
        openai_api_key=env.secret("OPENAI_API_KEY"),
        openai_base_url=env.get("OPENAI_BASE_URL", _base_url, None, what="an http(s) URL"),
        model=env.raw("QNA_MODEL") or defaults.model,
        system_prompt=env.raw("QNA_SYSTEM_PROMPT") or defaults.system_prompt,
        llm_connect_timeout_seconds=env.number(
            "QNA_LLM_CONNECT_TIMEOUT_SECONDS",
            defaults.llm_connect_timeout_seconds,
            minimum=0.1,
            maximum=300,
        ),
        llm_first_token_timeout_seconds=env.number(
            "QNA_LLM_FIRST_TOKEN_TIMEOUT_SECONDS",
            defaults.llm_first_token_timeout_seconds,
            minimum=0.1,
            maximum=3600,
        ),
        llm_idle_timeout_seconds=env.number(
            "QNA_LLM_IDLE_TIMEOUT_SECONDS",
            defaults.llm_idle_timeout_seconds,
            minimum=0.1,
            maximum=3600,
        ),
        llm_total_timeout_seconds=env.number(
            "QNA_LLM_TOTAL_TIMEOUT_SECONDS",
            defaults.llm_total_timeout_seconds,
            minimum=0.1,
            maximum=86_400,
        ),
        llm_breaker_failures=env.integer(
            "QNA_LLM_BREAKER_FAILURES", defaults.llm_breaker_failures, minimum=0, maximum=1000
        ),
        llm_breaker_seconds=env.number(
            "QNA_LLM_BREAKER_SECONDS", defaults.llm_breaker_seconds, minimum=0.1, maximum=3600
        ),
        llm_max_retries=env.integer(
            "QNA_LLM_MAX_RETRIES", defaults.llm_max_retries, minimum=0, maximum=10
        ),
        host=env.raw("QNA_HOST") or defaults.host,
        port=env.integer("QNA_PORT", defaults.port, minimum=0, maximum=65535),
        max_body_bytes=env.integer(
            "QNA_MAX_BODY_BYTES", defaults.max_body_bytes, minimum=1024, maximum=64 * 1024 * 1024
        ),
        max_header_bytes=env.integer(
            "QNA_MAX_HEADER_BYTES", defaults.max_header_bytes, minimum=1024, maximum=1024 * 1024
        ),
        kb_dir=env.get("QNA_KB_DIR", Path, defaults.kb_dir, what="a path"),
        kb_mode=env.get("QNA_KB_MODE", _one_of(KbMode), defaults.kb_mode, what="tools or prefetch"),
        kb_max_rounds=env.integer(
            "QNA_KB_MAX_ROUNDS", defaults.kb_max_rounds, minimum=0, maximum=10
        ),
        kb_top_k=env.integer("QNA_KB_TOP_K", defaults.kb_top_k, minimum=1, maximum=20),
        batch_interval_ms=env.integer(
            "QNA_BATCH_INTERVAL_MS", defaults.batch_interval_ms, minimum=1, maximum=10_000
        ),
        batch_max_chars=env.integer(
            "QNA_BATCH_MAX_CHARS", defaults.batch_max_chars, minimum=1, maximum=1_000_000
        ),
        history_budget_chars=env.integer(
            "QNA_HISTORY_BUDGET_CHARS",
            defaults.history_budget_chars,
            minimum=0,
            maximum=10_000_000,
        ),
        early_llm_start=env.get(
            "QNA_EARLY_LLM_START", _boolean, defaults.early_llm_start, what="true or false"
        ),
        sse_ping_seconds=env.number(
            "QNA_SSE_PING_SECONDS", defaults.sse_ping_seconds, minimum=0.05, maximum=3600
        ),
        sse_retry_ms=env.integer(
            "QNA_SSE_RETRY_MS", defaults.sse_retry_ms, minimum=0, maximum=600_000
        ),
        drain_seconds=env.number(
            "QNA_DRAIN_SECONDS", defaults.drain_seconds, minimum=0, maximum=3600
        ),
        orphan_seconds=env.number(
            "QNA_ORPHAN_SECONDS", defaults.orphan_seconds, minimum=0.05, maximum=86_400
        ),
        api_keys=_api_keys(env.secret("QNA_API_KEYS")),
        admin_principals=env.get("QNA_ADMIN_PRINCIPALS", _names, (), what="names"),
        auth=env.get("QNA_AUTH", _one_of(AuthMode), defaults.auth, what="auto or disabled"),
        jwt_secret=env.secret("QNA_JWT_SECRET"),
        jwt_jwks_url=env.get("QNA_JWT_JWKS_URL", _base_url, None, what="an http(s) URL"),
        jwt_audience=env.raw("QNA_JWT_AUDIENCE"),
        jwt_issuer=env.raw("QNA_JWT_ISSUER"),
        stream_token_secret=env.secret("QNA_STREAM_TOKEN_SECRET"),
        rate_limit_per_minute=env.integer(
            "QNA_RATE_LIMIT_PER_MINUTE", defaults.rate_limit_per_minute, minimum=0, maximum=10**6
        ),
        token_limit_per_minute=env.integer(
            "QNA_TOKEN_LIMIT_PER_MINUTE", defaults.token_limit_per_minute, minimum=0, maximum=10**9
        ),
        max_turns_per_principal=env.integer(
            "QNA_MAX_TURNS_PER_PRINCIPAL",
            defaults.max_turns_per_principal,
            minimum=1,
            maximum=10**5,
        ),
        max_turns=env.integer("QNA_MAX_TURNS", defaults.max_turns, minimum=1, maximum=10**6),
        max_streams_per_principal=env.integer(
            "QNA_MAX_STREAMS_PER_PRINCIPAL",
            defaults.max_streams_per_principal,
            minimum=1,
            maximum=10**6,
        ),
        max_streams=env.integer("QNA_MAX_STREAMS", defaults.max_streams, minimum=1, maximum=10**6),
        sse_send_timeout_seconds=env.number(
            "QNA_SSE_SEND_TIMEOUT_SECONDS",
            defaults.sse_send_timeout_seconds,
            minimum=0.1,
            maximum=3600,
        ),
        root_path=env.get("QNA_ROOT_PATH", _root_path, "", what="a path like /qna"),
        log_format=env.get("QNA_LOG_FORMAT", _one_of(LogFormat), None, what="json or console"),
        log_level=env.get("QNA_LOG_LEVEL", _log_level, defaults.log_level, what="a log level"),
        log_content=env.get(
            "QNA_LOG_CONTENT", _boolean, defaults.log_content, what="true or false"
        ),
    )
