"""The openIMIS side: one pooled client per upstream, its own login, allowlisted headers both ways.

openIMIS as it really is (see README "openIMIS facts"): `POST {base}login/` returns {"token","exp"};
resource paths need a trailing slash; it answers 415/406 to application/fhir+json, so we always speak
application/json to it and application/fhir+json to clients that ask for it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from mediator.config.models import UpstreamConfig
from mediator.errors import MediatorError
from mediator.fhir import FHIR_JSON, PLAIN_JSON, BaseUrlRewriter, operation_outcome_response, wants_fhir_json
from mediator.logs import JsonEvent
from mediator.request_view import RequestView

log = logging.getLogger("mediator.upstream")

# Request headers passed to openIMIS (lower case). Everything else is dropped: Authorization and Cookie
# belong to the caller's session with us, not with openIMIS; hop-by-hop headers (RFC 9110 §7.6.1) end here.
REQUEST_HEADERS_TO_KEEP = frozenset({
    "accept-language",      # RFC 9110 §12.5.4
    "if-match",             # FHIR versioned update, RFC 9110 §13.1.1
    "if-none-match",        # FHIR conditional read, RFC 9110 §13.1.2
    "if-modified-since",    # RFC 9110 §13.1.3
    "prefer",               # FHIR return preference, hl7.org/fhir/R4/http.html#ops
})
# Response headers passed back to the caller. Content-Length and Transfer-Encoding are recomputed by aiohttp.
RESPONSE_HEADERS_TO_KEEP = frozenset({
    "etag", "last-modified", "content-language", "cache-control", "expires", "vary",
    "retry-after",
})

MAX_UPSTREAM_BODY = 64 * 1_048_576
MAX_LOGGED_ERROR_BYTES = 4096
"""How much of an openIMIS error answer the log keeps."""


def upstream_error_text(status: int) -> tuple[str, str]:
    """(reason code, diagnostics) for an error answer of openIMIS: per status, naming nothing of openIMIS
    (no URL, host, code, id or text of its own)."""
    if status == 401:
        return "upstream.refused", "openIMIS refused the mediator's own login"
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    if status < 500:
        return "upstream.refused", f"openIMIS refused the request ({status} {phrase})"
    return "upstream.error", f"openIMIS could not process the request ({status} {phrase})"


OPENIMIS_NOT_FOUND = web.ResponseKey("openimis_not_found", bool)
"""Set on openIMIS's error answers: True when openIMIS said the resource does not exist."""
_NOT_FOUND_TEXTS = ("failed to retrieve", "does not exist", "not found", "invalid page")


def is_not_found(status: int, document: Any) -> bool:
    """openIMIS's ways of saying "no such resource": a 404 OperationOutcome, or a 500 "failed to retrieve
    ... matching query does not exist" (how its retrievers fail, README "openIMIS facts")."""
    if not isinstance(document, dict) or document.get("resourceType") != "OperationOutcome":
        return False
    if status == 404:
        return True
    texts = [f"{(issue.get('details') or {}).get('text', '')} {issue.get('diagnostics', '')}".lower()
             for issue in document.get("issue") or () if isinstance(issue, dict)]
    return status == 500 and any(marker in text for text in texts for marker in _NOT_FOUND_TEXTS)


class UpstreamUnavailable(MediatorError):
    """openIMIS could not be reached or did not answer properly: 502."""

    reason = "upstream.unavailable"
    status = 502
    public_message = "openIMIS is not reachable"
    log_level = logging.WARNING


class UpstreamTimeout(MediatorError):
    """openIMIS did not answer within the channel's timeout: 504."""

    reason = "upstream.timeout"
    status = 504
    public_message = "openIMIS did not answer in time"
    log_level = logging.DEBUG


class UpstreamLoginFailed(UpstreamUnavailable):
    pass


class UpstreamInvalidAnswer(UpstreamUnavailable):
    """openIMIS answered something that is not JSON (or not parseable): 502, never passed on as FHIR."""

    reason = "upstream.invalid_answer"
    public_message = "openIMIS answered something that is not FHIR JSON"


class ParsedResponse(web.Response):
    """An answer with the JSON document its body carries: parsed once, where openIMIS's answer is received
    (`OpenImisUpstream.answer`) or where the mediator built it (facility-scoped searches), and read from
    here by the response steps (link_rewrite rewrites it in place), the batch splitter and facility-scoped
    searches instead of parsing the body again. `body` is always `document` serialised."""

    def __init__(self, document: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.document = document


def response_document(response: web.StreamResponse) -> Any:
    """The JSON document of an answer: the one parsed on receipt, else the buffered body's (None if none)."""
    if isinstance(response, ParsedResponse):
        return response.document
    body = response.body if isinstance(response, web.Response) and isinstance(response.body, bytes) else b""
    try:
        return json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None


class Guard(Protocol):
    """What guards a request to openIMIS (mediator.bulkhead.UpstreamGuard: breaker + bulkhead)."""

    async def call(self, priority: int, send: Callable[[], Awaitable[UpstreamReply]],
                   kind: str | None = "") -> UpstreamReply: ...


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a search as openIMIS answered it (`OpenImisUpstream.pages`)."""

    number: int
    status: int
    document: Any
    """The parsed JSON answer (None: empty body)."""

    @property
    def bundle(self) -> dict[str, Any] | None:
        """The answer if it is a 200 Bundle, else None."""
        if self.status == 200 and isinstance(self.document, dict) and self.document.get("resourceType") == "Bundle":
            return self.document
        return None

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        """The page's entries' resources of `resource_type` (anything else in the Bundle is left out)."""
        bundle = self.bundle or {}
        found = (entry.get("resource") if isinstance(entry, dict) else None for entry in bundle.get("entry") or ())
        return [r for r in found if isinstance(r, dict) and r.get("resourceType") == resource_type]

    @property
    def has_next(self) -> bool:
        bundle = self.bundle
        return bundle is not None and any(isinstance(link, dict) and link.get("relation") == "next"
                                          for link in bundle.get("link") or ())


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    content_type: str


def _token_expiry(token: str, exp: Any, now: float) -> float:
    """openIMIS answers exp as epoch seconds; fall back to the JWT's own exp, then to one hour."""
    if isinstance(exp, int | float) and exp > now:
        return float(exp)
    if isinstance(exp, str):
        try:
            return datetime.fromisoformat(exp).timestamp()
        except ValueError:
            pass
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        # Read only to schedule our own re-login; openIMIS verifies its token, we do not rely on it.
        if isinstance(claims.get("exp"), int | float):
            return float(claims["exp"])
    except (IndexError, ValueError, UnicodeDecodeError):
        pass
    return now + 3600


class OpenImisUpstream:
    """A pooled connection to one openIMIS FHIR base, logged in as the mediator's own service user.

    Created and closed inside the app's cleanup context; safe for concurrent use by many requests.
    """

    def __init__(self, name: str, config: UpstreamConfig, public_base_url: str,
                 environ: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.config = config
        self.base = URL(config.base_url)
        self.public_base_url = public_base_url
        public = urlsplit(public_base_url)
        self._forwarded_host = public.netloc
        self._forwarded_proto = public.scheme
        self.rewriter = BaseUrlRewriter(self.base.path, public_base_url)
        self._environ = environ if environ is not None else os.environ
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._token: str | None = None
        self._token_expires = 0.0
        self._login_lock = asyncio.Lock()
        self._last_credentials_error = -1e9
        self.in_flight = 0
        """Requests being forwarded now; a reload closes a removed upstream only once this is 0."""
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pool_limit(self) -> int:
        return self.config.pool_size

    async def drained(self) -> None:
        """Wait until no request is being forwarded through this upstream."""
        await self._idle.wait()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.pool_size, keepalive_timeout=30,
                                         enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                              cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream not started")
        return self._session

    def _credentials(self) -> tuple[str, str]:
        login = self.config.login
        assert login is not None
        username = login.username if login.username is not None else self._environ.get(login.username_env or "")
        password = self._environ.get(login.password_env)
        if not username or password is None:
            variable = login.password_env if username else login.username_env
            message = (f"upstream {self.name}: environment variable {variable} is not set (channels.yaml "
                       f"upstreams.{self.name}.login); cannot log in to openIMIS")
            now = time.monotonic()
            if now - self._last_credentials_error > 60:   # one line a minute, not one per request
                self._last_credentials_error = now
                log.error(JsonEvent.of("upstream.credentials_missing", upstream=self.name, variable=variable,
                                         setting=f"upstreams.{self.name}.login"))
            raise UpstreamLoginFailed(message)
        return username, password

    async def token(self, *, force: bool = False) -> str | None:
        if self.config.login is None:
            return None
        margin = self.config.token_refresh_margin_s
        if not force and self._token and time.time() < self._token_expires - margin:
            return self._token
        stale = self._token
        async with self._login_lock:
            # Another request may have logged in while we waited for the lock.
            if self._token and self._token != stale and time.time() < self._token_expires - margin:
                return self._token
            self._token, self._token_expires = await self._login()
            return self._token

    async def _login(self) -> tuple[str, float]:
        username, password = self._credentials()
        timeout = aiohttp.ClientTimeout(total=max(self.config.connect_timeout_s * 2, 10),
                                        sock_connect=self.config.connect_timeout_s)
        try:
            async with self.session.post(self.base / "login/", json={"username": username, "password": password},
                                         timeout=timeout, headers={"Accept": PLAIN_JSON}) as resp:
                if resp.status != 200:
                    raise UpstreamLoginFailed(f"upstream {self.name}: login answered {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamLoginFailed(f"upstream {self.name}: login failed: {type(exc).__name__}") from exc
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamLoginFailed(f"upstream {self.name}: login answer has no token")
        log.info(JsonEvent.of("upstream.logged_in", upstream=self.name))
        return token, _token_expiry(token, data.get("exp"), time.time())

    def upstream_url(self, relative_path: str, raw_query: str) -> URL:
        # openIMIS (Django APPEND_SLASH) answers 500 to a POST without the trailing slash.
        path = relative_path.strip("/")
        url = str(self.base) + (path + "/" if path else "")
        if raw_query:
            url += "?" + raw_query
        return URL(url, encoded=True)

    def _headers(self, request: RequestView, client_ip: str, request_id: str, has_body: bool) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS_TO_KEEP}
        headers.update(self.service_headers(client_ip, request_id, has_body))
        return headers

    def service_headers(self, client_ip: str, request_id: str, has_body: bool) -> dict[str, str]:
        """What the mediator itself always sends (also for the queued deliveries, which have no request);
        `call` adds the Authorization of the mediator's own login."""
        headers = {"Accept": PLAIN_JSON}
        if has_body:
            headers["Content-Type"] = PLAIN_JSON
        headers["X-Forwarded-For"] = client_ip
        headers["X-Forwarded-Host"] = self._forwarded_host
        headers["X-Forwarded-Proto"] = self._forwarded_proto
        headers["X-Request-ID"] = request_id
        return headers

    async def send(self, method: str, url: URL, headers: dict[str, str], body: bytes | None,
                   timeout_s: float) -> UpstreamReply:
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:   # one per channel timeout (a handful), not one per request
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(
                total=timeout_s, sock_connect=self.config.connect_timeout_s)
        try:
            async with self.session.request(method, url, headers=headers, data=body, timeout=timeout,
                                            allow_redirects=False) as resp:
                if resp.content_length is not None and resp.content_length > MAX_UPSTREAM_BODY:
                    raise UpstreamUnavailable("upstream answer too large")
                # Read to the end: StreamReader.read(n) returns whatever is buffered, which silently cut
                # bodies that arrive in several segments; iter_any raises on a truncated or reset body.
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > MAX_UPSTREAM_BODY:
                        raise UpstreamUnavailable("upstream answer too large")
                    chunks.append(chunk)
                return UpstreamReply(resp.status, resp.headers.copy(), b"".join(chunks), resp.content_type)
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(type(exc).__name__) from exc

    async def call(self, method: str, url: URL, headers: dict[str, str], body: bytes | None,
                   timeout_s: float, guard: Guard | None = None, priority: int = 0,
                   kind: str | None = "") -> UpstreamReply:
        """One request as the mediator's own openIMIS user: the one re-login rule. A 401 (token revoked,
        openIMIS restarted with new keys) means openIMIS processed nothing, so it is sent again once with a
        fresh login; repeating even a POST cannot submit twice. Sets `headers["Authorization"]`. `guard`:
        the upstream's bulkhead + breaker, around both attempts (one slot); `kind`: the sort of request, for
        the adaptive limit's baselines (bounded: never an id)."""
        async def attempts() -> UpstreamReply:
            reply: UpstreamReply | None = None
            for attempt in (0, 1):
                token = await self.token(force=attempt == 1)
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                reply = await self.send(method, url, headers, body, timeout_s)
                if reply.status != 401 or self.config.login is None:
                    break
            assert reply is not None
            return reply

        return await (guard.call(priority, attempts, kind) if guard is not None else attempts())

    async def get_document(self, relative_path: str, query: str, timeout_s: float,
                           request_id: str, guard: Guard | None = None, priority: int = 0,
                           kind: str | None = "") -> tuple[int, Any]:
        """GET a FHIR path as the mediator's own user: (status, the parsed JSON document, or None when the
        answer is empty or not JSON: the caller judges the status). Raises UpstreamTimeout/Unavailable."""
        url = self.upstream_url(relative_path, query)
        reply = await self.call("GET", url, {"Accept": PLAIN_JSON, "X-Request-ID": request_id}, None, timeout_s,
                                guard, priority, kind)
        try:
            return reply.status, json.loads(reply.body) if reply.body else None
        except (ValueError, RecursionError):
            return reply.status, None

    async def pages(self, resource_type: str, params: Mapping[str, str], page_size: int, timeout_s: float,
                    request_id: str, max_pages: int, guard: Guard | None = None,
                    priority: int = 0, kind: str | None = "") -> AsyncGenerator[Page, None]:
        """The one page iterator: `_count` and `page-offset` pages of a search, as the mediator's own user.
        Stops after a page without a `next` link or any answer that is not a 200 Bundle (yielded, for the
        caller to judge); raises UpstreamInvalidAnswer past `max_pages`. SECURITY: openIMIS's `next` URLs
        are never followed (a wrong host there would receive our token); they only say another page exists.
        `guard`: each page's request waits for a slot of the upstream's bulkhead."""
        for number in range(1, max_pages + 1):
            # Only values the mediator builds (never a caller's), so they are sent as they are.
            query = "&".join(f"{k}={v}" for k, v in {"_count": str(page_size), "page-offset": str(number),
                                                      **params}.items())
            status, document = await self.get_document(resource_type, query, timeout_s, request_id, guard, priority,
                                                       kind)
            page = Page(number, status, document)
            yield page
            if not page.has_next:
                return
        raise UpstreamInvalidAnswer(f"{resource_type}: more than {max_pages} pages")

    async def forward(self, request: RequestView, relative_path: str, body: bytes | None,
                      client_ip: str, request_id: str, timeout_s: float, *, method: str | None = None,
                      raw_query: str | None = None) -> web.Response:
        """`method`/`raw_query` default to the request's; a batch entry gives its own (POST, none)."""
        self.in_flight += 1
        self._idle.clear()
        try:
            return await self._forward(request, relative_path, body, client_ip, request_id, timeout_s,
                                       method or request.method,
                                       request.raw_query_string if raw_query is None else raw_query)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _forward(self, request: RequestView, relative_path: str, body: bytes | None,
                       client_ip: str, request_id: str, timeout_s: float, method: str,
                       raw_query: str) -> web.Response:
        url = self.upstream_url(relative_path, raw_query)
        headers = self._headers(request, client_ip, request_id, body is not None)
        return self.to_client(request, await self.call(method, url, headers, body, timeout_s))

    def to_client(self, request: RequestView, reply: UpstreamReply) -> web.Response:
        return self.answer(reply, wants_fhir_json(request))

    def answer(self, reply: UpstreamReply, fhir_json: bool) -> web.Response:
        """openIMIS's reply as the client gets it: JSON checked (parsed once), headers allowlisted, Location
        rewritten to the public base. Bundle links and fullUrls are the `link_rewrite` response step's
        (mediator.link_rewrite), which reads the document parsed here."""
        headers = {k: v for k, v in reply.headers.items() if k.lower() in RESPONSE_HEADERS_TO_KEEP}
        location = reply.headers.get("Location")
        if location:
            headers["Location"] = self.rewriter.rewrite_url(location)
        body = reply.body
        is_json = reply.content_type in (PLAIN_JSON, FHIR_JSON)
        if body and not is_json:
            # openIMIS's FHIR API speaks JSON only; HTML error pages and the like are not FHIR.
            raise UpstreamInvalidAnswer(f"answer {reply.status} is {reply.content_type or 'untyped'}, not JSON")
        document: Any = None
        if body:
            try:
                document = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise UpstreamInvalidAnswer(f"answer {reply.status} is not valid JSON") from exc
        if reply.status >= 400:
            response = self._error_to_client(reply, headers)
            # Whether openIMIS said "no such resource" (its words are gone from the answer): what
            # mediator.fhir_answers needs to answer a search that found nothing with an empty searchset.
            response[OPENIMIS_NOT_FOUND] = is_not_found(reply.status, document)
            return response
        if is_json:
            content_type = FHIR_JSON if fhir_json else PLAIN_JSON
        else:
            content_type = reply.content_type or "application/octet-stream"
        return ParsedResponse(document, status=reply.status, body=body, headers=headers, content_type=content_type,
                              charset="utf-8" if is_json else None)

    def _error_to_client(self, reply: UpstreamReply, headers: dict[str, str]) -> web.Response:
        """openIMIS's error answers, passed on without openIMIS's words: its texts carry its internal base
        URL and host:port, and facts of other facilities ("Claim with code 'X' already exists" is an
        existence oracle for another facility's claim). The caller gets the status and a generic, stable
        OperationOutcome; the log keeps what openIMIS said (its body never holds our token)."""
        log.info(JsonEvent.of("upstream.error", upstream=self.name, status=reply.status,
                              body=reply.body[:MAX_LOGGED_ERROR_BYTES].decode("utf-8", "replace")))
        reason, message = upstream_error_text(reply.status)
        # A 401 (after one fresh login) is about the mediator's credentials, not the caller's: passed on as
        # 401 it would send the client re-authenticating with us for nothing. It is a gateway failure.
        status = 502 if reply.status == 401 else reply.status
        return operation_outcome_response(status, reason, message, headers)

    async def probe(self, timeout_s: float = 3.0) -> bool:
        """Readiness: openIMIS answers one small real request now (`GET Organization?_count=1`, one row:
        the web server, its database and our login all work), with the token we would use for a request
        (logged in again once if openIMIS refuses it). A cached token alone proves nothing."""
        url = self.upstream_url("Organization", "_count=1")
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self.call("GET", url, {"Accept": PLAIN_JSON, "X-Request-ID": "readiness-probe"}, None,
                                        timeout_s)
        except (UpstreamUnavailable, UpstreamTimeout, TimeoutError) as exc:
            log.warning(JsonEvent.of("upstream.probe_failed", upstream=self.name, error=type(exc).__name__))
            return False
        if reply.status != 200:
            log.warning(JsonEvent.of("upstream.probe_refused", upstream=self.name, status=reply.status))
        return reply.status == 200
