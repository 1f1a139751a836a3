"""Bare client loops: the same set_power_limit requests the bridge sends, with nothing around them.

    python -m bench._baseline \
        aiohttp|httpx|httpx-aiohttp|httpx-aiohttptransport|httpx-own-transport|edrv-client|sequential \
        --target FILE [--concurrency 32] [--max-requests N] [--max-seconds S]

`httpx` is plain httpx (its own pool); `httpx-aiohttp` and `httpx-aiohttptransport` are httpx.AsyncClient on
the two aiohttp transports on PyPI, `httpx-own-transport` on the bridge's (dr_bridge/edrv/transport.py);
`edrv-client` is the bridge's own EdrvClient (httpx requests straight to that transport, semaphore, error
mapping) without the engine or the event log; `sequential` is plain httpx, one request at a time.

Run as a subprocess so it never shares an event loop with the bridge. Prints one JSON line:
{"client", "sent", "ok", "seconds", "rps", "cpu_us_per_request"} (the process's CPU time over the loop).
Both the count and the time are bounded: a slow client stops issuing requests after --max-seconds, and
its rate is what it managed until then.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import time
from pathlib import Path

import aiohttp
import httpx

BODY = {"unit": "current", "limit": 16}


def _httpx_client(kind: str, base: str, headers: dict, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if kind == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 transport=AiohttpTransport(limits=limits))
    if kind == "httpx-own-transport":
        from dr_bridge.edrv.transport import AiohttpTransport as OwnTransport

        return httpx.AsyncClient(base_url=base, headers=headers, transport=OwnTransport(max_connections=concurrency))
    if kind == "httpx-aiohttptransport":
        from httpx_aiohttp_transport import create_aiohttp_backed_httpx_client

        return create_aiohttp_backed_httpx_client(base_url=base, headers=headers, max_connections=concurrency)
    return httpx.AsyncClient(base_url=base, headers=headers, limits=limits)


async def run(kind: str, target: dict, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    if kind == "sequential":
        concurrency = 1
    todo = iter(target["sessions"][:max_requests])
    sent = ok = 0

    async def worker(post) -> None:
        nonlocal sent, ok
        for session_id in todo:  # a shared iterator: each request is sent once, by whichever worker is free
            if time.monotonic() > deadline:
                return
            sent += 1
            if 200 <= await post(f"sessions/{session_id}/set_power_limit", session_id) < 300:
                ok += 1

    async with contextlib.AsyncExitStack() as stack:
        # Each client is made before the clock starts, as the bridge's is made at its start-up: building an
        # SSL context alone costs tens of milliseconds, which would count against 1,000 requests.
        post = await _open(kind, target, concurrency, stack)
        cpu_started = cpu_seconds()
        started = time.monotonic()
        deadline = started + max_seconds
        await asyncio.gather(*(worker(post) for _ in range(concurrency)))
        seconds = time.monotonic() - started
        cpu_s = cpu_seconds() - cpu_started
    return {"client": kind, "sent": sent, "ok": ok, "seconds": round(seconds, 3), "rps": round(ok / seconds, 1),
            "cpu_us_per_request": round(1e6 * cpu_s / max(1, sent))}


async def _open(kind: str, target: dict, concurrency: int, stack: contextlib.AsyncExitStack):
    """The client, closed with the stack; a function that sends one set_power_limit (its path, and its
    session for the eDRV client), its status."""
    base = target["base_url"].rstrip("/") + "/"
    headers = {"Authorization": f"Bearer {target['api_key']}"}
    if kind == "aiohttp":
        connector = aiohttp.TCPConnector(limit=concurrency)
        session = await stack.enter_async_context(aiohttp.ClientSession(base, headers=headers, connector=connector))

        async def post(path: str, _: str) -> int:
            async with session.post(path, json=BODY) as resp:
                await resp.read()
                return resp.status
        return post
    if kind == "edrv-client":
        from dr_bridge.edrv.client import EdrvClient

        edrv = await stack.enter_async_context(EdrvClient(target["base_url"], target["api_key"],
                                                          max_concurrency=concurrency, max_retries=0))

        async def post(_: str, session_id: str) -> int:
            await edrv.set_power_limit(session_id, BODY["unit"], BODY["limit"])  # raises unless 2xx
            return 200
        return post
    client = await stack.enter_async_context(
        _httpx_client("httpx" if kind == "sequential" else kind, base, headers, concurrency))

    async def post(path: str, _: str) -> int:
        return (await client.post(path, json=BODY)).status_code
    return post


def cpu_seconds() -> float:
    """CPU seconds of this process, every thread (the bridge's: its event loop and the event log's worker)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=["aiohttp", "httpx", "httpx-aiohttp", "httpx-aiohttptransport",
                                           "httpx-own-transport", "edrv-client", "sequential"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=10_000)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args()
    target = json.loads(Path(args.target).read_text())
    print(json.dumps(asyncio.run(run(args.client, target, args.concurrency, args.max_requests,
                                     args.max_seconds))))


if __name__ == "__main__":
    main()
