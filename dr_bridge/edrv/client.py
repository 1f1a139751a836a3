"""Async client for the eDRV REST API v1.1 (the smart-charging subset the bridge needs).

Requests and responses are httpx's, sent through one transport (transport.py: aiohttp's connection pool),
so every call shares one pool; a semaphore bounds the calls in flight. The client builds each
httpx.Request itself and hands it to the transport rather than going through httpx.AsyncClient: the
client's per-request URL merging, cookie jar and auth and redirect machinery cost more CPU than the
request itself at dispatch rates, and the bridge needs none of it (a fixed bearer key, no cookies, and
eDRV's API does not redirect). bench/ measures both ways.
Retries use tenacity because its stop/wait/retry predicates express "only 429, 5xx and transport errors,
Retry-After or exponential backoff with jitter" declaratively and are already a dependency.
"""
from __future__ import annotations

import asyncio
import email.utils
import json as jsonlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity import wait_exponential_jitter

from dr_bridge.edrv.errors import (EdrvAuthError, EdrvError, EdrvNotFound, EdrvRateLimited, EdrvRejected,
                                   EdrvServerError, EdrvTransportError)
from dr_bridge.edrv.models import Action, Chargestation, Session
from dr_bridge.edrv.transport import AiohttpTransport

log = logging.getLogger("dr_bridge.edrv")

OnCall = Callable[[str, float, str], None]
_RETRYABLE = (EdrvRateLimited, EdrvServerError, EdrvTransportError)
_MAX_PAGES = 1000  # a server that ignores paginate_page must not keep us looping forever


def _outcome(exc: BaseException | None) -> str:
    return {None: "ok", EdrvAuthError: "auth_error", EdrvNotFound: "not_found", EdrvRejected: "rejected",
            EdrvRateLimited: "rate_limited", EdrvServerError: "server_error",
            EdrvTransportError: "transport_error"}.get(type(exc) if exc else None, "error")


def _retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# Characters a path segment may hold as they are (RFC 3986 unreserved, bar "." for dot segments that
# parsing would resolve), %-escapes, and the "/" between segments: what quote(..., safe="") and our own
# path literals produce.
_PLAIN_PATH = re.compile(r"(?:[A-Za-z0-9_~-]|%[0-9A-F]{2})+(?:/(?:[A-Za-z0-9_~-]|%[0-9A-F]{2})+)*")
_JSON = jsonlib.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)  # as httpx encodes


def _wire_number(value: float) -> int | float:
    """16.0 goes out as 16: integral limits as JSON integers, like eDRV's own examples."""
    value = float(value)
    return int(value) if value.is_integer() else value


class EdrvClient:
    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 10.0, max_concurrency: int = 32,
                 max_retries: int = 3, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 on_call: OnCall | None = None, page_size: int = 1000) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.page_size = page_size
        self._api_key = api_key
        self._on_call = on_call
        self._sem = asyncio.Semaphore(max_concurrency)
        self._transport = AiohttpTransport(max_connections=max_concurrency)
        self._timeout = {"timeout": httpx.Timeout(timeout_s).as_dict()}
        self._headers = httpx.Headers({"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                                       "User-Agent": "dr-bridge"})
        # The headers httpx.Request would add itself (Host, and Content-Type and -Length for a body) given
        # up front: it looks each one up first, a KeyError raised and caught per header and request, a
        # measurable share of dispatch's CPU.
        base = httpx.URL(self.base_url)
        self._headers["Host"] = base.netloc.decode("ascii")
        # What _url() appends a path to; None (another httpx's URL internals) parses every URL instead.
        self._base_ref = getattr(base, "_uri_reference", None)
        self._base_path = base.path.rstrip("/")
        self._json_headers = httpx.Headers([*self._headers.raw, (b"Content-Type", b"application/json")])

    def __repr__(self) -> str:
        return f"EdrvClient(base_url={self.base_url!r}, api_key='***')"

    async def __aenter__(self) -> EdrvClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    # --- public API -------------------------------------------------------------------------------

    async def list_chargestations(self) -> list[Chargestation]:
        items = await self._paginate("list_chargestations", "chargestations", {})
        return [Chargestation.from_json(obj) for obj in items]

    async def get_chargestation(self, chargestation_id: str) -> Chargestation:
        obj = await self._request("get_chargestation", "GET", f"chargestations/{quote(chargestation_id, safe='')}")
        return Chargestation.from_json(self._object(obj, "get_chargestation"))

    async def list_running_sessions(self, chargestation_ids: Iterable[str] | None = None) -> list[Session]:
        """Running sessions, optionally only on these stations.

        Filters are sent to eDRV and applied again here, since it is not documented that eDRV honours them.
        """
        wanted = None if chargestation_ids is None else set(chargestation_ids)
        if wanted is None:
            queries: list[dict[str, str]] = [{"status": "Started"}]
        else:
            queries = [{"status": "Started", "chargestation": cs} for cs in sorted(wanted)]
        pages = await asyncio.gather(*(self._paginate("list_running_sessions", "sessions", q) for q in queries))
        seen: dict[str, Session] = {}
        for items in pages:
            for obj in items:
                session = Session.from_json(obj)
                if session.running and (wanted is None or session.chargestation_id in wanted):
                    seen.setdefault(session.id, session)
        return list(seen.values())

    async def get_session(self, session_id: str) -> Session:
        obj = await self._request("get_session", "GET", f"sessions/{quote(session_id, safe='')}")
        return Session.from_json(self._object(obj, "get_session"))

    async def set_power_limit(self, session_id: str, unit: str, limit: float, *,
                              max_retries: int | None = None) -> Action:
        if unit not in ("current", "power"):
            raise ValueError(f"unit must be 'current' or 'power', not {unit!r}")
        body = {"unit": unit, "limit": _wire_number(limit)}
        obj = await self._request("set_power_limit", "POST", f"sessions/{quote(session_id, safe='')}/set_power_limit",
                                  json=body, max_retries=max_retries)
        return Action.from_json(self._object(obj, "set_power_limit"))

    async def clear_power_limit(self, session_id: str, *, max_retries: int | None = None) -> Action:
        obj = await self._request("clear_power_limit", "POST",
                                  f"sessions/{quote(session_id, safe='')}/clear_power_limit",
                                  json={}, max_retries=max_retries)
        return Action.from_json(self._object(obj, "clear_power_limit"))

    # --- plumbing ---------------------------------------------------------------------------------

    @staticmethod
    def _object(result: Any, op: str) -> dict[str, Any]:
        if not isinstance(result, dict):
            raise EdrvError(f"{op}: expected an object in result, got {type(result).__name__}", op=op)
        return result

    async def _paginate(self, op: str, path: str, query: dict[str, str]) -> list[dict[str, Any]]:
        """Every item, page after page, for as long as eDRV says there is more. eDRV may cap the page size
        below the one asked for, so a short page alone does not end the listing: its hasNext does, and
        where it sends none, an empty page or one shorter than an earlier one."""
        items: list[dict[str, Any]] = []
        ids: set[str] = set()
        longest = 0  # the page size eDRV actually serves, as far as seen
        for page in range(1, _MAX_PAGES + 1):
            params = {**query, "paginate_limit": str(self.page_size), "paginate_page": str(page)}
            result, body = await self._request(op, "GET", path, params=params, whole=True)
            if not isinstance(result, list):
                raise EdrvError(f"{op}: expected a list in result, got {type(result).__name__}", op=op)
            fresh = [o for o in result if isinstance(o, dict) and str(o.get("_id")) not in ids]
            ids.update(str(o.get("_id")) for o in fresh)
            items.extend(fresh)
            more = body.get("hasNext")
            if not fresh or more is False:  # fresh: a server that ignores paginate_page repeats itself
                break
            if more is not True and len(result) < longest:  # no hasNext: a shorter page is the last
                break
            longest = max(longest, len(result))
        else:
            log.warning("eDRV %s: still more after %d pages; the listing stops there", op, _MAX_PAGES)
        return items

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, EdrvRateLimited) and exc.retry_after is not None:
            return min(exc.retry_after, self.backoff_max_s)
        return wait_exponential_jitter(initial=self.backoff_base_s, max=self.backoff_max_s,
                                       jitter=self.backoff_base_s)(state)

    async def _request(self, op: str, method: str, path: str, *, params: dict[str, str] | None = None,
                       json: Any = None, max_retries: int | None = None, whole: bool = False) -> Any:
        retries = self.max_retries if max_retries is None else max_retries
        if retries == 0:  # dispatch retries on its own terms; no retry loop to build per call
            body = await self._once(op, method, path, params, json)
        else:
            def log_retry(state: RetryCallState) -> None:
                exc = state.outcome.exception() if state.outcome else None
                status = getattr(exc, "status_code", None) or _outcome(exc)
                wait = state.next_action.sleep if state.next_action else 0.0
                log.warning("eDRV %s: %s, retry %d/%d in %.2fs", op, status, state.attempt_number, retries, wait)

            retrying = AsyncRetrying(stop=stop_after_attempt(retries + 1), wait=self._wait,
                                     retry=retry_if_exception_type(_RETRYABLE), before_sleep=log_retry, reraise=True)
            async for attempt in retrying:
                with attempt:
                    body = await self._once(op, method, path, params, json)
        result = body.get("result")
        return (result, body) if whole else result

    async def _once(self, op: str, method: str, path: str, params: dict[str, str] | None, json: Any) -> dict:
        started = time.monotonic()
        error: EdrvError | None = None
        try:
            if json is None:
                request = httpx.Request(method, self._url(path, params), headers=self._headers,
                                        extensions=self._timeout)
            else:
                request = self._with_body(method, self._url(path, params), _JSON.encode(json).encode())
            async with self._sem:  # held for the exchange only
                try:
                    response = await self._transport.handle_async_request(request)
                except (httpx.TransportError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise self._transport_error(op, exc) from None
            return self._check(op, response)
        except EdrvError as exc:
            error = exc
            raise
        finally:
            self._report(op, time.monotonic() - started, _outcome(error))

    def _with_body(self, method: str, url: httpx.URL, content: bytes) -> httpx.Request:
        """The request httpx.Request(content=...) would make, headers in the same order, built the short way:
        given content, httpx normalises the headers, works out their encoding (decoding each one), adds the
        content headers and builds them all again, and the transport decodes them once more: about 15 µs of a
        limit call's CPU. A stream leaves the headers as given; ours are copied with their encoding known."""
        headers = httpx.Headers(self._json_headers, encoding=self._json_headers.encoding)  # worked out once
        headers["Content-Length"] = str(len(content))
        request = httpx.Request(method, url, stream=httpx.ByteStream(content), extensions=self._timeout)
        request.headers = headers
        request.read()  # .content, as a request made with content= has it
        return request

    def _url(self, path: str, params: dict[str, str] | None) -> httpx.URL:
        """The base URL with `path` (its ids already quoted) appended. Parsing a URL string is a third of
        the client's CPU per call (httpx checks every character of it), so the usual case, a path of plain
        characters and %-escapes without a query, is built from the base URL's parsed form instead: the same
        URL that parsing would give (tests/test_edrv_client.py checks that), without the parse."""
        if params is None and self._base_ref is not None and _PLAIN_PATH.fullmatch(path):
            url = httpx.URL.__new__(httpx.URL)
            url._uri_reference = self._base_ref._replace(path=f"{self._base_path}/{path}")
            return url
        return httpx.URL(f"{self.base_url}/{path}", params=params)

    def _transport_error(self, op: str, exc: BaseException) -> EdrvTransportError:
        # name the aiohttp error underneath ("ClientConnectorError ... refused", "ServerDisconnectedError")
        cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
        if isinstance(cause, (httpx.TimeoutException, asyncio.TimeoutError)):
            return EdrvTransportError(f"{op}: timeout ({cause.__class__.__name__})", op=op)
        return EdrvTransportError(f"{op}: {cause.__class__.__name__}: {self._scrub(str(cause))}", op=op)

    def _check(self, op: str, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        message = self._scrub(str(body.get("message") or "") if isinstance(body, dict) else response.text[:200])
        text = f"{op}: HTTP {status}" + (f": {message}" if message else "")
        if status == 429:
            raise EdrvRateLimited(text, retry_after=_retry_after(response.headers.get("Retry-After")), op=op)
        if status >= 500:
            raise EdrvServerError(text, status_code=status, op=op)
        if status in (401, 403):
            raise EdrvAuthError(text, status_code=status, op=op)
        if status == 404:
            raise EdrvNotFound(text, status_code=status, op=op)
        if status >= 400 or (isinstance(body, dict) and body.get("ok") is False):
            raise EdrvRejected(text, status_code=status, op=op)
        if not isinstance(body, dict):
            raise EdrvRejected(f"{op}: HTTP {status} without a JSON envelope", status_code=status, op=op)
        return body

    def _scrub(self, text: str) -> str:
        # eDRV has no reason to echo the key, but a proxy's error page might
        return text.replace(self._api_key, "***") if self._api_key else text

    def _report(self, op: str, latency_s: float, outcome: str) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(op, latency_s, outcome)
        except Exception:  # a broken metrics hook must not break eDRV calls
            log.exception("eDRV on_call hook failed for %s", op)
