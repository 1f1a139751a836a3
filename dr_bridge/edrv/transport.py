"""httpx's transport interface over one aiohttp connection pool, for the eDRV client.

httpx's own pool slows sharply as calls in flight rise (encode/httpx#3215), which is exactly dispatch's
load at an interval start. aiohttp's pool does not, so the bridge keeps httpx's request, response, timeout
and error types and sends through aiohttp. The two aiohttp transports on PyPI were measured too (bench/):
this one reads each (small, JSON) answer whole instead of streaming it, and maps every aiohttp failure to
httpx's own error types, keeping the aiohttp error as the cause so the log can name it ("refused", "server
disconnected") rather than the catch-all "ConnectTimeout" of httpx-aiohttp.

As httpx's own transport does, it sends through the proxy that HTTP_PROXY, HTTPS_PROXY or ALL_PROXY name,
unless NO_PROXY exempts the host: read once per host rather than per request, which is what aiohttp's own
trust_env would do (and it would also take ~/.netrc credentials, which must not replace eDRV's key).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.request

import aiohttp
import httpx
from yarl import URL

log = logging.getLogger("dr_bridge.edrv")
_HTTP11 = {"http_version": b"HTTP/1.1"}


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_connections: int, verify: bool | str | ssl.SSLContext = True,
                 keepalive_expiry_s: float = 15.0) -> None:
        if isinstance(verify, ssl.SSLContext):
            self._ssl: ssl.SSLContext | bool = verify
        elif verify is False:
            self._ssl = False
        else:  # True: the system's CAs; a string: a CA bundle to trust instead
            self._ssl = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        self._max_connections = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple, aiohttp.ClientTimeout] = {}
        self._proxies: dict[tuple[str, str], tuple[URL | None, aiohttp.BasicAuth | None]] = {}

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running event loop that will use it.
        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl,
                                         keepalive_timeout=self._keepalive_expiry_s)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def _timeout(self, t: dict | None) -> aiohttp.ClientTimeout:
        """httpx's four timeouts as aiohttp's: pool wait + connect, connect, and read (per socket read)."""
        key = tuple(sorted((t or {}).items()))
        timeout = self._timeouts.get(key)
        if timeout is None:
            t = t or {}
            pool, connect = t.get("pool"), t.get("connect")
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, connect=None if pool is None or connect is None else pool + connect,
                sock_connect=connect, sock_read=t.get("read"))
        return timeout

    def _proxy(self, url: httpx.URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        key = (url.scheme, url.host)
        found = self._proxies.get(key)
        if found is None:
            found = self._proxies[key] = _env_proxy(*key)
            if found[0] is not None:
                log.info("requests to %s go through the proxy %s (from the environment)", url.host, found[0])
        return found

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        body = request.content or None  # the client sends bytes, never a stream
        proxy, proxy_auth = self._proxy(request.url)
        try:
            async with session.request(request.method, URL(str(request.url), encoded=True),
                                       headers=request.headers.multi_items(), data=body, allow_redirects=False,
                                       proxy=proxy, proxy_auth=proxy_auth,
                                       timeout=self._timeout(request.extensions.get("timeout"))) as answer:
                content = await answer.read()
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc, request) from exc
        except asyncio.TimeoutError as exc:  # the pool wait plus connect ran out
            raise httpx.PoolTimeout("timed out waiting for a connection", request=request) from exc
        if answer.headers.get("Content-Encoding", "identity") != "identity":
            # httpx decodes it itself, as with its own transport
            return httpx.Response(answer.status, headers=answer.raw_headers, content=content, request=request,
                                  extensions=_HTTP11)
        # Unencoded, the body is already what httpx's decoding would make of it: handed over as read, as
        # Response.read() leaves it, without the decoder pipeline that is most of building a Response
        # (~20 µs of a call's CPU). tests/test_edrv_transport.py holds both ways to the same response.
        response = httpx.Response(answer.status, headers=answer.raw_headers, stream=httpx.ByteStream(content),
                                  request=request, extensions=_HTTP11)
        response._content = content
        response.is_stream_consumed = response.is_closed = True
        return response

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _env_proxy(scheme: str, host: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy the environment names for this scheme and host, its credentials apart (so that the URL
    can be logged); (None, None) for none or when NO_PROXY exempts the host."""
    if urllib.request.proxy_bypass_environment(host):
        return None, None
    proxies = urllib.request.getproxies_environment()
    named = proxies.get(scheme) or proxies.get("all")
    if not named:
        return None, None
    url = URL(named if "://" in named else f"http://{named}")
    auth = aiohttp.BasicAuth(url.user or "", url.password or "") if url.user else None
    return url.with_user(None), auth


def _httpx_error(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    text = f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text, request=request)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(text, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, DNS, TLS verification
        return httpx.ConnectError(text, request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(text, request=request)
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientResponseError)):
        return httpx.RemoteProtocolError(text, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(text, request=request)
    return httpx.NetworkError(text, request=request)
