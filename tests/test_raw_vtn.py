"""A VTN whose event XML carries timestamps without `Z` (the XSD allows it; openleadr leaves them as strings).

The VTN is openleadr's own, with an aiohttp middleware that rewrites its oadrDistributeEvent XML on the wire,
so the VEN parses exactly the raw bytes a third-party VTN would send.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
from aiohttp import web

from dr_bridge.localvtn import LocalVtn
from tests.test_openadr import Recorder, make_ven, response

UTC = timezone.utc
MIN = timedelta(minutes=1)
_ZULU = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?)Z")


class ZuluStripper:
    """Counts polls and strips every `Z` from the timestamps of distributed events."""

    def __init__(self) -> None:
        self.polls = 0
        self.rewritten = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        resp = await handler(request)
        if request.path.endswith("/OadrPoll"):
            self.polls += 1
        if isinstance(resp, web.Response) and resp.text and "oadrDistributeEvent" in resp.text:
            text, n = _ZULU.subn(r"\1", resp.text)
            if n:
                self.rewritten += 1
                resp.text = text
        return resp


@pytest.fixture
async def stripper() -> ZuluStripper:
    return ZuluStripper()


@pytest.fixture
async def vtn(stripper: ZuluStripper) -> AsyncIterator[LocalVtn]:
    server = LocalVtn(poll_s=0.5)
    server.server.app.middlewares.append(stripper.middleware)  # before start: aiohttp freezes middlewares then
    await server.start()
    yield server
    await server.stop()


async def test_events_without_zulu_are_answered_and_polling_goes_on(vtn: LocalVtn, stripper: ZuluStripper) -> None:
    rec = Recorder()
    ven = make_ven(vtn, rec)
    await asyncio.wait_for(ven.run(), 10)
    try:
        start = (datetime.now(UTC) + 5 * MIN).replace(microsecond=0)
        first = vtn.add_event(ven.ven_id, intervals=[(start, 10 * MIN, 1)])
        event = await vtn.wait_for(lambda: rec.seen(first))
        assert stripper.rewritten >= 1
        # Read as UTC, not as a string and not as local time.
        assert event.start == start and event.start.utcoffset() == timedelta(0)
        assert event.intervals[0].start == start and event.intervals[0].end == start + 10 * MIN
        assert await vtn.wait_for(lambda: response(vtn, first)) == "optIn"

        # openleadr's own VEN stops answering after such a message; ours keeps polling and answering.
        polls = stripper.polls
        second = vtn.add_event(ven.ven_id, intervals=[(start + 20 * MIN, 5 * MIN, 2)])
        assert (await vtn.wait_for(lambda: rec.seen(second))).intervals[0].value == 2.0
        assert await vtn.wait_for(lambda: response(vtn, second)) == "optIn"
        await vtn.wait_for(lambda: stripper.polls >= polls + 3)
    finally:
        await ven.stop()
