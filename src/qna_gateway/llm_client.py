"""The AsyncOpenAI client the answerer calls through: its HTTP client, requests built from a
template, and a streamed request's first attempt sent straight to the transport."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any, Final
from urllib.parse import urlsplit

import httpx2
import openai
from openai._models import FinalRequestOptions

from .settings import Settings
from .upstream_http import Http11Transport

# Where the openai client goes when OPENAI_BASE_URL is unset.
OPENAI_DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"

# The request options this module knows. A release of the SDK with others may build requests
# from them, so with any other set every request is left to the SDK.
_KNOWN_OPTIONS: Final = frozenset(
    {
        "method",
        "url",
        "params",
        "headers",
        "max_retries",
        "timeout",
        "files",
        "idempotency_key",
        "post_parser",
        "follow_redirects",
        "security",
        "synthesize_event_and_data",
        "stream_mode",
        "content",
        "json_data",
        "extra_json",
    }
)


class TemplatedAsyncOpenAI(openai.AsyncOpenAI):
    """AsyncOpenAI that copies a request carrying nothing of its own but its body from the
    first one the SDK built for the same method, path and retry count.

    The SDK builds every request from scratch (the headers merged into a new Headers twice,
    the URL parsed and joined twice, the options copied): 0.4 ms a call on the benchmark's
    machine, a tenth of an ask's CPU. For a request whose options are all defaults but its
    bytes body, only the body and its Content-Length differ from one to the next: the
    client's key is a fixed string and this SDK sets no idempotency header. Anything else
    (per-call headers, query, timeout, JSON or files) is built by the SDK as usual;
    tests/integration/test_llm_client.py checks the copy against the SDK's own request.
    """

    def __init__(self, *, transport: Http11Transport | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._templates: dict[tuple[str, str, int], httpx2.Request] = {}
        self.templating = (
            set(FinalRequestOptions.model_fields) == _KNOWN_OPTIONS
            and self._idempotency_header is None
            and isinstance(kwargs.get("api_key"), str)
        )
        # `stream`'s shortcut: only where the SDK's path to the transport adds nothing to a
        # templated request (no auth hooks, no provider runtime rewriting requests).
        self._transport = (
            transport
            if self.templating
            and self.custom_auth is None
            and getattr(self, "_provider_runtime", None) is None
            and getattr(self, "_workload_identity_auth", None) is None
            else None
        )
        self._retry_options = FinalRequestOptions.construct(method="post", url="")

    def _build_request(
        self, options: FinalRequestOptions, *, retries_taken: int = 0
    ) -> httpx2.Request:
        body = options.content
        if not (self.templating and isinstance(body, bytes) and _only_a_body(options)):
            return super()._build_request(options, retries_taken=retries_taken)
        key = (options.method, options.url, retries_taken)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = super()._build_request(
                options, retries_taken=retries_taken
            )
        return _copy(template, body)

    async def stream(self, path: str, body: bytes) -> httpx2.Response:
        """POST `body` to `path` for a streamed response: what `post(path, content=body,
        cast_to=httpx2.Response, stream=True)` returns or raises.

        Once the SDK has built such a request, the first attempt of the next ones is copied
        from it and handed to the transport directly. The SDK's way there (its options, its
        retry loop, httpx2's client) took ~0.3 ms of the time from an ask to its LLM request,
        a quarter of what the gateway adds to the first token. A failed first attempt is
        dealt with as the SDK deals with one: an error status it does not retry raises its
        error; a failure it retries goes to it after its back-off, with a retry fewer (its
        retries then say `x-stainless-retry-count` 0 and 1, not 1 and 2).
        """
        template = self._templates.get(("post", path, 0))
        transport = self._transport
        if template is None or transport is None:
            return await self._sdk_stream(path, body, self.max_retries)
        request = _copy(template, body)
        retries = self.max_retries
        try:
            response = await transport.handle_async_request(request)
        except Exception as exc:  # what the SDK retries, or raises as a connection error
            if retries == 0:
                if isinstance(exc, httpx2.TimeoutException):
                    raise openai.APITimeoutError(request=request) from exc
                raise openai.APIConnectionError(request=request) from exc
            await asyncio.sleep(self._calculate_retry_timeout(retries, self._retry_options))
            return await self._sdk_stream(path, body, retries - 1)
        response.request = request
        status = response.status_code
        if 200 <= status < 300:
            return response
        if status < 400:  # a redirect, which the SDK's client follows: left to it
            await response.aclose()
            return await self._sdk_stream(path, body, retries)
        if retries > 0 and self._should_retry(response):
            await response.aclose()
            delay = self._calculate_retry_timeout(retries, self._retry_options, response.headers)
            await asyncio.sleep(delay)
            return await self._sdk_stream(path, body, retries - 1)
        await response.aread()
        raise self._make_status_error_from_response(response)

    async def _sdk_stream(self, path: str, body: bytes, retries: int) -> httpx2.Response:
        return await self.post(
            path,
            cast_to=httpx2.Response,
            content=body,
            stream=True,
            options={"max_retries": retries},
        )


def _copy(template: httpx2.Request, body: bytes) -> httpx2.Request:
    """`template` with `body` instead of its own."""
    headers = template.headers.copy()
    headers["Content-Length"] = str(len(body))
    return httpx2.Request(
        template.method,
        template.url,
        headers=headers,
        content=body,
        extensions=dict(template.extensions),
    )


_DEFAULT_SECURITY: Final = FinalRequestOptions.model_fields["security"].default


def _only_a_body(options: FinalRequestOptions) -> bool:
    return (
        not options.params
        and isinstance(options.headers, openai.NotGiven)
        and isinstance(options.timeout, openai.NotGiven)
        and options.files is None
        and options.json_data is None
        and options.extra_json is None
        and options.security == _DEFAULT_SECURITY
    )


def make_client(settings: Settings) -> TemplatedAsyncOpenAI:
    """The LLM's client: retries connection errors, 408/409/429 and 5xx before a stream
    starts (with backoff, honouring Retry-After)."""
    key = settings.openai_api_key.reveal() if settings.openai_api_key else "not-needed"
    # A proxy named by the environment is left to httpx2's own transport (no `transport`).
    # Ours keeps one connection ready: the next ask's request need not wait for a connect.
    proxied = proxy_for(settings.openai_base_url or OPENAI_DEFAULT_BASE_URL)
    transport = None if proxied else Http11Transport(max_idle=100, spare=1)
    return TemplatedAsyncOpenAI(
        api_key=key,
        transport=transport,
        http_client=_http_client(transport),
        base_url=settings.openai_base_url,
        max_retries=settings.llm_max_retries,
        # The first-token and idle limits are enforced per chunk by the answerer, each with
        # its own reason; the client's read timeout is only a backstop behind them.
        timeout=openai.Timeout(
            max(settings.llm_first_token_timeout_seconds, settings.llm_idle_timeout_seconds) + 5,
            connect=settings.llm_connect_timeout_seconds,
        ),
    )


def _http_client(transport: Http11Transport | None) -> httpx2.AsyncClient:
    """On `transport`, or without one on httpx2's own (HTTP CONNECT, SOCKS): either way as
    many connections as answers run, a hundred kept idle."""
    if transport is None:
        return openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=100)
        )
    return openai.DefaultAsyncHttpxClient(transport=transport)


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (`HTTPS_PROXY`, `ALL_PROXY`…), unless
    `NO_PROXY` leaves it out."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxy
