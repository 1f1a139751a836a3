"""What a VTN sends that openleadr cannot be trusted with, against the real `dr-bridge run`.

The VTN is the local openleadr one; its answers are rewritten on the wire (LocalVtn.rewrite_answers), so the
bridge parses exactly the bytes a third-party or compromised VTN would send.
"""
from __future__ import annotations

import re
from datetime import timedelta

import pytest

from tests.test_restart import LIMIT, calls, config, registered, rig, soon, spawn, until  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

_DESCRIPTION = re.compile(r"(<ei:responseDescription>)[^<]*")


def with_internal_entity(xml: str) -> str | None:
    """The answer with a DOCTYPE declaring an entity that its response description uses."""
    if "<ei:responseDescription>" not in xml:
        return None
    body = re.sub(r"^<\?xml[^>]*\?>", "", xml.lstrip())
    body = _DESCRIPTION.sub(r"\1&ok;", body, count=1)
    return '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE oadrPayload [<!ENTITY ok "OK">]>\n' + body


async def test_a_message_with_an_xml_entity_is_refused_logged_and_the_bridge_goes_on(rig, config, spawn):  # noqa: F811
    bridge = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, bridge)
    rig.vtn.rewrite_answers(with_internal_entity)
    # With the lxml wheels of today, parsing it killed the process (SIGSEGV, exit -11): no log line, no restore.
    await until(lambda: rig.vtn.rewritten >= 1, 20, bridge, "the VTN to send the message with an entity")

    rig.vtn.add_event(ven_id, intervals=[(soon(3), timedelta(seconds=4), 2)], targets=[{"resource_id": "A"}])
    await until(lambda: calls(rig, "A") == [LIMIT], 30, bridge, "the next event acted on")
    assert bridge.alive
    refused = [line for line in bridge.stderr().splitlines() if "DOCTYPE" in line]
    assert len(refused) == 1, refused


async def test_the_local_vtn_answers_a_message_with_an_entity_400_and_keeps_serving():
    """The demo's VTN parses what VENs send with the same lxml (a regression here crashes the test process)."""
    import aiohttp

    from dr_bridge.localvtn import LocalVtn

    vtn = LocalVtn()
    await vtn.start()
    try:
        poll = ('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE oadrPayload [<!ENTITY v "VEN-1">]>\n'
                '<oadr:oadrPayload xmlns:oadr="http://openadr.org/oadr-2.0b/2012/07"><oadr:oadrSignedObject>'
                '<oadr:oadrPoll ei:schemaVersion="2.0b" xmlns:ei="http://docs.oasis-open.org/ns/energyinterop/201110">'
                '<ei:venID>&v;</ei:venID></oadr:oadrPoll></oadr:oadrSignedObject></oadr:oadrPayload>')
        async with aiohttp.ClientSession(headers={"content-type": "application/xml"}) as session:
            for _ in range(2):  # and again: it is still there
                async with session.post(f"{vtn.url}/OadrPoll", data=poll) as answer:
                    assert answer.status == 400 and "DOCTYPE" in await answer.text()
    finally:
        await vtn.stop()
