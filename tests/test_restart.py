"""The daemon as an operator runs it: `dr-bridge run` in its own process, killed, stopped and restarted.

The test process hosts the openleadr VTN and the eDRV simulator on its own event loop, so they keep serving
while the child runs; the children are started with asyncio subprocesses for that reason. Every child's
stderr goes to a file next to the test's database and is printed at teardown, which pytest shows only when
the test fails.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

from dr_bridge.localvtn import LocalVtn
from dr_bridge.rig import API_KEY, Rig, StationSpec

pytestmark = pytest.mark.slow

KEY_VAR = "DR_BRIDGE_RIG_KEY"  # the rig config's edrv.api_key_env
LIMIT = ("set_power_limit", {"unit": "current", "limit": 16})  # level 2 = half of 32 A, one session each
CLEAR = ("clear_power_limit", {})  # restore on a physical station
LIFT = ("set_power_limit", {"unit": "current", "limit": 32})  # restore on a simulator station: max_current
TARGETS = [{"resource_id": "A"}, {"resource_id": "S"}]


def _executable() -> str:
    """The console script of the interpreter running the tests, else whatever `dr-bridge` is on PATH."""
    local = Path(sys.executable).with_name("dr-bridge")
    if local.exists():
        return str(local)
    found = shutil.which("dr-bridge")
    if found is None:
        pytest.fail("the dr-bridge console command is not installed (pip install -e .)")
    return found


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


def now() -> datetime:
    return datetime.now(timezone.utc)


class Child:
    """One dr-bridge process, its output in files."""

    def __init__(self, name: str, args: tuple[str, ...], proc: asyncio.subprocess.Process, stdout: Path,
                 stderr: Path) -> None:
        self.name, self.args, self.proc = name, args, proc
        self.stdout_path, self.stderr_path = stdout, stderr

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"{self.name} did not exit within {timeout} s")

    async def sigkill(self) -> None:
        self.proc.kill()
        assert await self.wait(10) == -signal.SIGKILL

    async def ensure_dead(self) -> None:
        if self.alive:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()


@pytest.fixture
async def spawn(tmp_path):
    """spawn(*args, api_key=True) starts `dr-bridge ARGS` with the rig's key in the environment (or none)."""
    children: list[Child] = []

    async def _spawn(*args: str, api_key: bool = True) -> Child:
        name = f"dr-bridge-{len(children) + 1}-{args[0]}"
        # No terminal width from the runner's shell: the child sees what a service manager gives it.
        env = {k: v for k, v in os.environ.items() if k not in (KEY_VAR, "COLUMNS", "LINES")}
        env["PYTHONUNBUFFERED"] = "1"
        if api_key:
            env[KEY_VAR] = API_KEY
        out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = await asyncio.create_subprocess_exec(_executable(), *args, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=fo, stderr=fe, env=env, cwd=tmp_path)
        child = Child(name, args, proc, out, err)
        children.append(child)
        return child

    try:
        yield _spawn
    finally:
        for child in children:
            await child.ensure_dead()
        for child in children:  # captured: pytest shows it only for a failing test
            print(f"===== {child.name} ({' '.join(child.args)}), exit {child.proc.returncode} =====")
            print("--- stderr ---\n" + child.stderr())
            if child.stdout().strip():
                print("--- stdout ---\n" + child.stdout())


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("A"), StationSpec("S", simulator=True)])
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
def config(rig, tmp_path) -> Path:
    return rig.write_config(tmp_path / "dr-bridge.toml")


async def until(predicate: Callable[[], Any], timeout: float, child: Child | None = None,
                what: str = "") -> Any:
    """Poll predicate until truthy; fail early (with the exit code) when the child it depends on dies."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if child is not None and not child.alive:
            pytest.fail(f"{child.name} exited with {child.proc.returncode} while waiting for {what or predicate}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.1)


def calls(rig: Rig, resource: str, since: int = 0) -> list[tuple[str, Any]]:
    """(kind, body) of every set/clear call eDRV received for the resource's sessions, from call #since."""
    sessions = set(rig.sessions[resource])
    return [(kind, body) for sid, kind, body in rig.sim.limit_calls()[since:] if sid in sessions]


def session_ids(rig: Rig) -> list[str]:
    return rig.sessions["A"] + rig.sessions["S"]


async def registered(rig: Rig, count: int, child: Child, timeout: float = 30) -> str:
    """The VEN id of the count-th registration the VTN accepted."""
    await until(lambda: len(rig.vtn.registrations) >= count, timeout, child, f"VTN registration #{count}")
    return rig.vtn.registrations[count - 1]["ven_id"]


async def limited(rig: Rig, child: Child, since: int = 0, timeout: float = 20) -> None:
    await until(lambda: calls(rig, "A", since) == [LIMIT] and calls(rig, "S", since) == [LIMIT], timeout, child,
                "the level-2 limit on the sessions of A and S")
    await until(lambda: all(rig.sim.session_limit(s) == 16 for s in session_ids(rig)), 5, child,
                "the EVs to obey the limit")


def restored(rig: Rig, since: int) -> bool:
    return CLEAR in calls(rig, "A", since) and LIFT in calls(rig, "S", since)


async def test_sigkill_mid_event_then_restart_holds_the_limit_and_restores_at_the_end(rig, config, spawn):
    first = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, first)
    start, length = soon(2), 12
    end = start + timedelta(seconds=length)
    rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)], targets=TARGETS)
    await limited(rig, first)

    await first.sigkill()
    mark = len(rig.sim.limit_calls())
    second = await spawn("run", "--config", str(config))
    assert await registered(rig, 2, second) == ven_id
    assert {r["ven_id"] for r in rig.vtn.registrations} == {ven_id}, "the restart must reuse the VEN id"
    assert now() < end - timedelta(seconds=3), "the restart took too long for this test to show anything"

    # While the event runs, the restarted bridge holds the limit: it may re-send it once, never lift it.
    while now() < end - timedelta(milliseconds=500):
        assert second.alive, f"the restarted bridge exited with {second.proc.returncode}"
        for resource in ("A", "S"):
            assert calls(rig, resource, mark) in ([], [LIMIT]), f"{resource} was lifted before the event ended"
        assert all(rig.sim.session_limit(s) == 16 for s in session_ids(rig))
        await asyncio.sleep(0.2)

    await until(lambda: restored(rig, mark), 20, second, "the restore at the end of the event")
    assert [c for c in calls(rig, "A", mark) if c != LIMIT] == [CLEAR]
    assert [c for c in calls(rig, "S", mark) if c != LIMIT] == [LIFT]
    await until(lambda: rig.sim.session_limit(rig.sessions["A"][0]) is None
                and rig.sim.session_limit(rig.sessions["S"][0]) == 32, 5, second, "the EVs to be unlimited")


async def test_sigkill_then_restart_after_the_event_ended_restores_at_start(rig, config, spawn):
    first = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, first)
    start, length = soon(2), 4
    end = start + timedelta(seconds=length)
    rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)], targets=TARGETS)
    await limited(rig, first)
    await first.sigkill()
    mark = len(rig.sim.limit_calls())
    assert calls(rig, "A") == [LIMIT], "the event must still have been running at the kill"

    await asyncio.sleep(max(0.0, (end - now()).total_seconds()) + 1)
    second = await spawn("run", "--config", str(config))
    await until(lambda: restored(rig, mark), 20, second, "the restore at start")
    await asyncio.sleep(1)  # nothing else may follow: no limit re-sent for an event that is over
    assert calls(rig, "A", mark) == [CLEAR]
    assert calls(rig, "S", mark) == [LIFT]


async def test_vtn_down_at_start_then_up_the_event_still_arrives_and_is_acted_on(rig, spawn, tmp_path):
    await rig.vtn.stop()
    rig.vtn = LocalVtn(poll_s=1)  # its port is chosen now, so the config can point at it while it is down
    config = rig.write_config(tmp_path / "late-vtn.toml")
    bridge = await spawn("run", "--config", str(config))

    await asyncio.sleep(10)
    assert bridge.alive, "the bridge must keep running while the VTN is unreachable"
    assert "registration attempt" in bridge.stderr(), "a failed registration should be logged"
    await rig.vtn.start()

    ven_id = await registered(rig, 1, bridge, timeout=40)
    start, length = soon(2), 3
    rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)], targets=TARGETS)
    await limited(rig, bridge)
    await until(lambda: restored(rig, 0), 15, bridge, "the restore at the end of the event")


async def _sigterm_mid_event(rig: Rig, config: Path, spawn, *flags: str) -> tuple[Child, int, float]:
    """Start the bridge, limit A and S with a long event, SIGTERM it; (child, calls before, seconds to exit)."""
    bridge = await spawn("run", "--config", str(config), *flags)
    ven_id = await registered(rig, 1, bridge)
    start = soon(2)
    rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=120), 2)], targets=TARGETS)
    await limited(rig, bridge)
    mark = len(rig.sim.limit_calls())
    t0 = time.monotonic()
    bridge.signal(signal.SIGTERM)
    assert await bridge.wait(10) == 0
    return bridge, mark, time.monotonic() - t0


async def test_sigterm_mid_event_exits_0_and_leaves_the_limit_in_force(rig, config, spawn):
    bridge, mark, took = await _sigterm_mid_event(rig, config, spawn)
    assert took < 10
    assert calls(rig, "A", mark) == [] and calls(rig, "S", mark) == [], "a plain stop must not restore"
    assert all(rig.sim.session_limit(s) == 16 for s in session_ids(rig))
    lines = bridge.stderr().splitlines()
    assert any(all(s in line for s in session_ids(rig)) for line in lines), \
        "the still-limited session ids should be logged on stop"


async def test_sigterm_with_restore_on_exit_restores_before_exiting(rig, config, spawn):
    bridge, mark, took = await _sigterm_mid_event(rig, config, spawn, "--restore-on-exit")
    assert took < 10
    # Checked at once: the calls must have reached eDRV before the process was gone.
    assert calls(rig, "A", mark) == [CLEAR]
    assert calls(rig, "S", mark) == [LIFT]


async def test_run_without_the_api_key_variable_exits_2_with_one_line(rig, config, spawn):
    bridge = await spawn("run", "--config", str(config), api_key=False)
    assert await bridge.wait(20) == 2
    lines = [line for line in bridge.stderr().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert KEY_VAR in lines[0]
    assert rig.vtn.registrations == []


async def test_release_all_after_sigkill_restores_every_limited_session_without_the_vtn(rig, config, spawn):
    bridge = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, bridge)
    rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=120), 2)], targets=TARGETS)
    await limited(rig, bridge)
    await bridge.sigkill()
    await rig.vtn.stop()
    mark = len(rig.sim.limit_calls())

    release = await spawn("release-all", "--config", str(config))
    assert await release.wait(60) == 0
    assert calls(rig, "A", mark) == [CLEAR]
    assert calls(rig, "S", mark) == [LIFT]
    await until(lambda: rig.sim.session_limit(rig.sessions["A"][0]) is None
                and rig.sim.session_limit(rig.sessions["S"][0]) == 32, 5, None, "the EVs to be unlimited")

    again = await spawn("release-all", "--config", str(config))
    assert await again.wait(60) == 0, "nothing left to restore is not an error"
    assert len(rig.sim.limit_calls()) == mark + 2, "a second release-all must not call eDRV again"


async def test_one_instance_per_bridge_a_second_is_refused_and_retire_waits_for_it(tmp_path, db_url, spawn):
    """Two instances of one bridge would send every limit and restore twice: a second `dr-bridge run` exits 2
    before it talks to anyone, `retire` is refused while one runs, and a killed instance leaves no lock behind."""
    rig = Rig(tmp_path, [StationSpec("A")], bridge_options={"database_url": db_url})
    await rig.start()
    try:
        path = rig.write_config(tmp_path / "dr-bridge.toml")
        first = await spawn("run", "--config", str(path))
        await registered(rig, 1, first)

        second = await spawn("run", "--config", str(path))
        assert await second.wait(60) == 2
        lines = second.stderr().strip().splitlines()
        assert len(lines) == 1 and "'dr-bridge-rig' is already running" in lines[0], lines
        retire = await spawn("retire", "--config", str(path), api_key=False)
        assert await retire.wait(60) == 1 and "'dr-bridge-rig' is running" in retire.stderr(), retire.stderr()
        assert len(rig.vtn.registrations) == 1 and first.alive  # the first went on, alone

        await first.sigkill()
        third = await spawn("run", "--config", str(path))
        await registered(rig, 2, third)
        third.signal(signal.SIGTERM)
        assert await third.wait(30) == 0
        retire = await spawn("retire", "--config", str(path), api_key=False)
        assert await retire.wait(60) == 0, retire.stderr()
        assert f"released 1 station(s) ({rig.station_ids['A']})" in " ".join(retire.stdout().split())
    finally:
        await rig.stop()


async def test_an_instance_whose_lock_was_taken_while_its_database_was_away_stops_without_restoring(
        tmp_path, pg_url, spawn):
    """PostgreSQL drops the lock with its connection. If another instance took it meanwhile, this one stops
    (exit 1) and leaves the sessions limited for that one to carry on, even with --restore-on-exit."""
    from dr_bridge.instance import InstanceLock
    from tests.conftest import PG_ADMIN_URL
    from tests.test_instance import _terminate

    rig = Rig(tmp_path, [StationSpec("A"), StationSpec("S", simulator=True)], bridge_options={"database_url": pg_url})
    await rig.start()
    other = InstanceLock(pg_url, "dr-bridge-rig")
    try:
        config = rig.write_config(tmp_path / "dr-bridge.toml")
        bridge = await spawn("run", "--config", str(config), "--restore-on-exit")
        ven_id = await registered(rig, 1, bridge)
        rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=120), 2)], targets=TARGETS)
        await limited(rig, bridge)
        mark = len(rig.sim.limit_calls())

        assert _terminate(PG_ADMIN_URL, "dr-bridge-rig") == 1
        deadline = time.monotonic() + 20
        while not other.acquire(wait_s=1):  # as a second instance starting at that moment would
            # the bridge's next check took it back first, as it should: cut it again
            assert time.monotonic() < deadline, "could not take the lock from the bridge"
            _terminate(PG_ADMIN_URL, "dr-bridge-rig")
        assert await bridge.wait(30) == 1
        assert "another instance of this bridge took its lock" in bridge.stderr()
        assert calls(rig, "A", mark) == [] and calls(rig, "S", mark) == [], "it must leave the sessions alone"
    finally:
        other.release()
        await rig.stop()
