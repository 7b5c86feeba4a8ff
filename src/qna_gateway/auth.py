"""Who is asking: API keys (hashed, compared in constant time), JWTs, and stream tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import jwt

from .errors import ProblemError
from .settings import Settings

ANONYMOUS = "anonymous"
STREAM_TOKEN_SECONDS = 3600


class Unauthorized(ProblemError):
    """No credentials, or credentials that are not valid."""

    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="qna-gateway"'})


class Forbidden(ProblemError):
    """Valid credentials without the scope the endpoint needs."""

    status = 403
    title = "Forbidden"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def is_loopback(host: str) -> bool:
    if host in {"localhost", ""}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Authenticator:
    """Built once from settings; only SHA-256 hashes of the keys are kept."""

    enabled: bool
    key_hashes: tuple[tuple[str, bytes], ...] = field(repr=False)
    admins: frozenset[str]
    jwt_key: Any = field(repr=False)
    jwt_algorithms: tuple[str, ...]
    jwks: jwt.PyJWKClient | None
    jwt_audience: str | None
    jwt_issuer: str | None
    stream_key: bytes = field(repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        keys = settings.api_keys.reveal() if settings.api_keys else ""
        pairs: list[tuple[str, bytes]] = []
        for item in filter(None, (part.strip() for part in keys.split(","))):
            name, _, key = item.partition(":")
            pairs.append((name.strip(), _digest(key.strip())))
        jwt_secret = settings.jwt_secret.reveal() if settings.jwt_secret else None
        # Stream tokens must verify on every replica: the key derives from shared config.
        material = (
            settings.stream_token_secret.reveal()
            if settings.stream_token_secret
            else "|".join([*(h.hex() for _, h in sorted(pairs)), jwt_secret or ""])
        )
        return cls(
            enabled=settings.auth_enabled,
            key_hashes=tuple(pairs),
            admins=frozenset(settings.admin_principals),
            jwt_key=jwt_secret,
            jwt_algorithms=("HS256", "HS384", "HS512") if jwt_secret else ("RS256", "ES256"),
            jwks=jwt.PyJWKClient(settings.jwt_jwks_url) if settings.jwt_jwks_url else None,
            jwt_audience=settings.jwt_audience,
            jwt_issuer=settings.jwt_issuer,
            stream_key=hashlib.sha256(b"qna-stream-token|" + material.encode()).digest(),
        )

    # -- principals -------------------------------------------------------------------------

    def principal_of(self, headers: Mapping[str, str]) -> str:
        if not self.enabled:
            return ANONYMOUS
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Send an API key or token as 'Authorization: Bearer <key>'.")
        token = token.strip()
        principal = self._key_principal(token)
        if principal is not None:
            return principal
        if self.jwt_key is not None or self.jwks is not None:
            return self._jwt_principal(token)
        raise Unauthorized("The API key is not valid.")

    def _key_principal(self, token: str) -> str | None:
        offered = _digest(token)
        found: str | None = None
        # Every key is compared, so the time taken says nothing about which one matched.
        for name, expected in self.key_hashes:
            if hmac.compare_digest(offered, expected):
                found = name
        return found

    def _jwt_principal(self, token: str) -> str:
        try:
            key = self.jwt_key
            if self.jwks is not None:
                key = self.jwks.get_signing_key_from_jwt(token).key
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.jwt_algorithms),
                audience=self.jwt_audience,
                issuer=self.jwt_issuer,
                options={"require": ["sub", "exp"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"The token is not valid: {exc}.") from None
        subject = str(claims["sub"])
        if not subject or len(subject) > 200:
            raise Unauthorized("The token's subject is not usable as a principal.")
        return subject

    def require_admin(self, principal: str) -> None:
        if self.enabled and principal not in self.admins:
            raise Forbidden(f"{principal} may not use admin endpoints (see QNA_ADMIN_PRINCIPALS).")

    # -- stream tokens ----------------------------------------------------------------------

    def stream_token(self, principal: str, message_id: UUID, *, now: float | None = None) -> str:
        """A token for one message's stream (EventSource cannot send headers)."""
        expires = int((now or time.time()) + STREAM_TOKEN_SECONDS)
        body = f"{message_id.hex}.{expires}.{principal}".encode()
        signature = hmac.new(self.stream_key, body, hashlib.sha256).digest()[:18]
        return _b64(body) + "." + _b64(signature)

    def stream_principal(self, token: str, message_id: UUID) -> str:
        try:
            body_part, signature_part = token.split(".", 1)
            body = _unb64(body_part)
            signature = _unb64(signature_part)
            expected = hmac.new(self.stream_key, body, hashlib.sha256).digest()[:18]
            if not hmac.compare_digest(signature, expected):
                raise ValueError("signature")
            message_hex, expires, principal = body.decode().split(".", 2)
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized("The stream token is not valid.") from None
        if message_hex != message_id.hex:
            raise Unauthorized("The stream token belongs to another message.")
        if int(expires) < time.time():
            raise Unauthorized("The stream token has expired; ask for the message again.")
        return principal


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
