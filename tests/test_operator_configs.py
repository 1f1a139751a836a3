"""`dr-bridge run` in its own process on a config as operators write it: comments, warnings, odd but valid
values. Every other end-to-end test builds its config without a warning; these keep one in."""
from __future__ import annotations

from datetime import timedelta

import pytest

from dr_bridge.rig import API_KEY, Rig
from tests.test_restart import CLEAR, LIFT, LIMIT, TARGETS, calls, registered, rig, soon, spawn, until  # noqa: F401


def operators_config(rig: Rig, path, *, extra_http: str = "") -> str:
    """The rig's config as an operator would write it: comments, a [levels] without a rule for level 1 (a
    warning), the page token named but not exported (another), and a station's `group` spelt inline."""
    a, s = rig.station_ids["A"], rig.station_ids["S"]
    path.write_text(f"""\
# dr-bridge for the congestion programme
[bridge]
database_url = "sqlite:///{rig.workdir / 'operator.db'}"   # beside the config

[vtn]
url = "{rig.vtn.url}"
ven_name = "operator-fleet"

[edrv]
base_url = "{rig.sim.base_url}"
api_key_env = "DR_BRIDGE_RIG_KEY"

[http]
host = "127.0.0.1"
port = {rig.http_port}
token_env = "OPERATOR_PAGE_TOKEN_NOT_EXPORTED"   # pages answer 503 until it is exported
{extra_http}
[levels]
# level 1 is left to the utility's judgement: answered optOut (check-config warns)
2 = {{ fraction = 0.5 }}
3 = {{ current = 6 }}

[[chargestations]]
id = "{a}"
resource_id = "A"
max_current = 32.0
phases = 3

[[chargestations]]
id = "{s}"
resource_id = "S"
max_current = 32
""")
    return str(path)


async def test_run_with_config_warnings_still_uses_the_api_key_and_limits(rig, spawn, tmp_path):
    # Each warning of run's start-up log once replaced the eDRV key with the warning's key name: every call
    # answered 401 and the VTN heard optIn for an event the bridge never acted on.
    config = operators_config(rig, tmp_path / "operator.toml")
    bridge = await spawn("run", "--config", config)
    ven_id = await registered(rig, 1, bridge)
    warnings = [line for line in bridge.stderr().splitlines() if " WARNING " in line and "config:" in line]
    assert any("levels" in line for line in warnings) and any("token_env" in line for line in warnings), warnings
    rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=4), 2)], targets=TARGETS)
    await until(lambda: calls(rig, "A") == [LIMIT] and calls(rig, "S") == [LIMIT], 20, bridge,
                "the level-2 limit on A and S")
    assert not [r.path for r in rig.sim.requests if r.status == 401], "the bridge sent another key than its own"
    await until(lambda: calls(rig, "A") == [LIMIT, CLEAR] and calls(rig, "S") == [LIMIT, LIFT], 20, bridge,
                "the restore at the event's end")
    assert API_KEY not in bridge.stderr(), "the API key must never be logged"


@pytest.mark.slow
async def test_every_command_on_an_operators_config_with_warnings(rig, spawn, tmp_path):
    # The rest of the class: each command that reads the API key or the config, run on the same config. The
    # daemon is killed mid-event, so release-all has something to lift without it.
    config = operators_config(rig, tmp_path / "operator.toml")
    check = await spawn("check-config", "--config", config)
    assert await check.wait(60) == 0 and "warning:" in check.stderr(), check.stderr()
    bridge = await spawn("run", "--config", config)
    ven_id = await registered(rig, 1, bridge)
    event_id = rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=120), 2)], targets=TARGETS)
    await until(lambda: calls(rig, "A") == [LIMIT] and calls(rig, "S") == [LIMIT], 20, bridge, "the limits")
    await bridge.sigkill()

    listed = await spawn("events", "list", "--config", config, "--json")
    assert await listed.wait(60) == 0 and event_id in listed.stdout(), listed.stderr()
    release = await spawn("release-all", "--config", config)
    assert await release.wait(60) == 0, release.stderr()
    assert calls(rig, "A") == [LIMIT, CLEAR] and calls(rig, "S") == [LIMIT, LIFT]
    assert not [r.path for r in rig.sim.requests if r.status == 401], "a command sent another key than its own"
    for child in (check, bridge, listed, release):
        assert API_KEY not in child.stderr() + child.stdout()
