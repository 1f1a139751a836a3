"""The aiohttp-backed transport still surfaces every failure as the client's typed errors (real loopback)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from dr_bridge.edrv.client import EdrvClient
from dr_bridge.edrv.errors import EdrvTransportError
from dr_bridge.edrv.simulator import EdrvSimulator

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
