"""The aiohttp-backed transport verifies TLS, and surfaces every failure as the client's typed errors
(real loopback)."""
from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import socket
import ssl

import aiohttp
import httpx
import pytest
from aiohttp import web

from dr_bridge.edrv.client import EdrvClient
from dr_bridge.edrv.errors import EdrvTransportError
from dr_bridge.edrv.simulator import EdrvSimulator
from dr_bridge.edrv.transport import AiohttpTransport
from tests.test_tls import Pki

KEY = "sim-key-transport"


async def test_slow_answer_is_a_timeout_transport_error():
    async with EdrvSimulator(KEY) as sim:
        station = sim.add_station()
        session = sim.start_session(station, send_webhook=False)
        sim.faults.update(latency_s=1.0)
        async with EdrvClient(sim.base_url, KEY, timeout_s=0.2, max_retries=0) as edrv:
            with pytest.raises(EdrvTransportError, match="timeout"):
                await edrv.set_power_limit(session, "current", 10)


async def test_refused_connection_is_a_transport_error_without_the_key():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    async with EdrvClient(f"http://127.0.0.1:{port}/v1.1", KEY, max_retries=0) as edrv:
        with pytest.raises(EdrvTransportError) as info:
            await edrv.get_session("abc")
    message = str(info.value)
    assert "timeout" not in message and "Connect" in message and KEY not in message


async def test_connection_dropped_before_the_answer_is_a_transport_error():
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with EdrvClient(f"http://127.0.0.1:{port}/v1.1", KEY, max_retries=1, backoff_base_s=0.01) as edrv:
            with pytest.raises(EdrvTransportError, match="Disconnected"):
                await edrv.get_session("abc")
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def tls_server(tmp_path):
    """An HTTPS server on loopback with a throw-away certificate that no system CA vouches for."""
    pki = Pki(tmp_path, "edrv")
    cert, key = pki.issue("localhost", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def session(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "result": {"_id": request.match_info["id"], "status": "Started"}})

    app = web.Application()
    app.router.add_get("/v1.1/sessions/{id}", session)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}/v1.1", pki.ca_file
    await runner.cleanup()


async def test_answers_read_as_httpx_reads_them_plain_or_compressed():
    body = '{"ok": true, "result": {"_id": "s1", "note": "é"}}'.encode()

    async def answer(request: web.Request) -> web.Response:
        if request.query.get("gzip"):
            return web.Response(body=gzip.compress(body), content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    app = web.Application()
    app.router.add_get("/answer", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    transport = AiohttpTransport(max_connections=2)
    try:
        for query in ("", "?gzip=1"):
            request = httpx.Request("GET", f"http://127.0.0.1:{port}/answer{query}")
            got = await transport.handle_async_request(request)
            assert (got.content, got.text, got.json(), got.encoding) == (
                body, body.decode(), {"ok": True, "result": {"_id": "s1", "note": "é"}}, "utf-8")
            assert (got.is_closed, got.is_stream_consumed, await got.aread()) == (True, True, body)
            assert got.headers.get("Content-Encoding") == ("gzip" if query else None)
    finally:
        await transport.aclose()
        await runner.cleanup()


async def test_tls_is_verified_and_an_untrusted_certificate_refused(tls_server):
    base_url, ca_file = tls_server
    async with EdrvClient(base_url, KEY, max_retries=0) as edrv:
        with pytest.raises(EdrvTransportError, match="(?i)certificate"):
            await edrv.get_session("abc")
    transport = AiohttpTransport(max_connections=1, verify=ca_file)  # trusting the issuing CA, it connects
    try:
        answer = await transport.handle_async_request(httpx.Request("GET", f"{base_url}/sessions/abc"))
        assert answer.status_code == 200 and answer.json()["result"]["_id"] == "abc"
    finally:
        await transport.aclose()


class ForwardProxy:
    """A plain-HTTP forward proxy on loopback: records each request's target and Proxy-Authorization, then
    passes it on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.url = ""

    async def __aenter__(self) -> "ForwardProxy":
        self._http = aiohttp.ClientSession(auto_decompress=False)

        async def forward(request: web.Request) -> web.Response:
            self.seen.append((str(request.url), request.headers.get("Proxy-Authorization")))
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("proxy-authorization", "proxy-connection", "host")}
            async with self._http.request(request.method, request.url, headers=headers,
                                          data=await request.read()) as answer:
                return web.Response(status=answer.status, body=await answer.read(),
                                    content_type=answer.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._http.close()


async def test_requests_go_through_the_proxy_the_environment_names(monkeypatch, caplog):
    async with EdrvSimulator(KEY) as sim, ForwardProxy() as proxy:
        session = sim.start_session(sim.add_station(), send_webhook=False)
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://ops:s3cret-proxy@127.0.0.1:{proxy.port}")
        caplog.set_level(logging.INFO, logger="dr_bridge.edrv")
        async with EdrvClient(sim.base_url, KEY, max_retries=0) as edrv:
            await edrv.set_power_limit(session, "current", 10)
            await edrv.get_session(session)
        assert [url for url, _ in proxy.seen] == [f"{sim.base_url}/sessions/{session}/set_power_limit",
                                                  f"{sim.base_url}/sessions/{session}"]
        assert {auth for _, auth in proxy.seen} == {"Basic " + base64.b64encode(b"ops:s3cret-proxy").decode()}
        assert [r.json for r in sim.requests if r.method == "POST"] == [{"unit": "current", "limit": 10}]
        assert f"proxy http://127.0.0.1:{proxy.port}" in caplog.text and "s3cret-proxy" not in caplog.text

        proxy.seen.clear()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # exempt: straight to eDRV
        async with EdrvClient(sim.base_url, KEY, max_retries=0) as edrv:
            await edrv.get_session(session)
        assert proxy.seen == [] and sim.requests[-1].path.endswith(session)
