"""The browser chat page: static files from the package, under a strict CSP."""

from __future__ import annotations

from importlib import resources

from litestar import Response, get
from litestar.params import FromPath

from ..errors import NotFound

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def _asset(name: str) -> tuple[bytes, str]:
    suffix = name[name.rfind(".") :] if "." in name else ""
    folder = resources.files("qna_gateway") / "static"
    if "/" in name or name.startswith(".") or suffix not in MEDIA_TYPES:
        raise NotFound(f"There is no page asset {name!r}.")
    entry = folder / name
    if not entry.is_file():
        raise NotFound(f"There is no page asset {name!r}.")
    return entry.read_bytes(), MEDIA_TYPES[suffix]


@get("/", include_in_schema=False, sync_to_thread=False)
def page() -> Response[bytes]:
    """The chat page; its links are relative, so it works under any QNA_ROOT_PATH."""
    body, media_type = _asset("index.html")
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


@get("/static/{name:str}", include_in_schema=False, sync_to_thread=False)
def asset(name: FromPath[str]) -> Response[bytes]:
    body, media_type = _asset(name)
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)
