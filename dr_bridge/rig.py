"""A local rehearsal rig: the openleadr VTN, the eDRV simulator and a bridge config pointing at both.

The demo runs on it, and so do the end-to-end tests, so what the tests prove is what an operator sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dr_bridge.config import Config, config_from_dict
from dr_bridge.daemon import Bridge
from dr_bridge.edrv.simulator import EdrvSimulator
from dr_bridge.localvtn import LocalVtn, reserve_port

API_KEY = "rig-api-key"
WEBHOOK_SECRET_ENV = "DR_BRIDGE_RIG_WEBHOOK_SECRET"


@dataclass
class StationSpec:
    resource_id: str
    max_current: float = 32
    phases: int = 3
    voltage: float = 230
    limit_unit: str | None = None  # the config's; None leaves the unit to the signal
    simulator: bool = False
    sessions: int = 1
    refuse: str | None = None
    naming: str = "accepted"
    group: str | None = None
    configured_simulator: bool | None = None  # what the bridge's config says; None leaves it to eDRV


@dataclass
class Rig:
    workdir: Path
    stations: list[StationSpec]
    bridge_options: dict[str, Any] = field(default_factory=dict)
    edrv_options: dict[str, Any] = field(default_factory=dict)
    vtn_options: dict[str, Any] = field(default_factory=dict)  # extra [vtn] config keys
    ev_delay_s: float = 0.5
    report_interval_s: float = 1.0  # how often the simulator reports each session's power
    sim_options: dict[str, Any] = field(default_factory=dict)  # EdrvSimulator's, e.g. page_size_max
    telemetry_s: float | None = None  # the sampling interval the VTN asks for; None: it asks for no telemetry
    webhook_secret: str | None = None  # signs webhooks; the config then names WEBHOOK_SECRET_ENV
    vtn: LocalVtn | None = None
    sim: EdrvSimulator | None = None
    station_ids: dict[str, str] = field(default_factory=dict)  # resource_id -> eDRV station id
    sessions: dict[str, list[str]] = field(default_factory=dict)  # resource_id -> running session ids

    async def start(self, webhooks: bool = False, http_port: int = 0) -> None:
        self.vtn = LocalVtn(poll_s=1, telemetry_s=self.telemetry_s)
        await self.vtn.start()
        self.http_port = http_port or reserve_port("127.0.0.1")
        webhook_url = f"http://127.0.0.1:{self.http_port}/edrv/webhooks" if webhooks else None
        self.sim = EdrvSimulator(API_KEY, webhook_url=webhook_url, ev_delay_s=self.ev_delay_s,
                                 report_interval_s=self.report_interval_s, seed=7, webhook_secret=self.webhook_secret,
                                 **self.sim_options)
        await self.sim.start()
        for spec in self.stations:
            sid = self.sim.add_station(simulator=spec.simulator, max_current=spec.max_current, phases=spec.phases,
                                       voltage=spec.voltage,
                                       refuse=spec.refuse, naming=spec.naming, connectors=max(2, spec.sessions + 2))
            self.station_ids[spec.resource_id] = sid
            # Running before the bridge starts: the bridge finds them by listing, as after its own restart.
            self.sessions[spec.resource_id] = [self.sim.start_session(sid, send_webhook=False)
                                               for _ in range(spec.sessions)]

    async def stop(self) -> None:
        if self.sim is not None:
            await self.sim.stop()
        if self.vtn is not None:
            await self.vtn.stop()

    async def started_bridge(self, *, vtn_backoff_s: float = 0.2, register_within_s: float = 15,
                             **options: Any) -> Bridge:
        """A bridge on this rig's config, started and registered with the VTN (stopped again if it does not
        register in time)."""
        bridge = Bridge(self.config(), API_KEY, vtn_backoff_s=vtn_backoff_s, **options)
        await bridge.start()
        try:
            await wait_for(lambda: bridge.ven.registered, register_within_s)
        except BaseException:
            await bridge.stop()
            raise
        return bridge

    def config_dict(self) -> dict[str, Any]:
        return {
            "bridge": {"database_url": f"sqlite:///{self.workdir / 'dr-bridge.db'}", **self.bridge_options},
            "vtn": {"url": self.vtn.url, "ven_name": "dr-bridge-rig", **self.vtn_options},
            "edrv": {"base_url": self.sim.base_url, "api_key_env": "DR_BRIDGE_RIG_KEY",
                     # the simulator signs only with a secret; without one the rig says so in its config
                     **({"webhook_secret_env": WEBHOOK_SECRET_ENV} if self.webhook_secret
                        else {"allow_unsigned_webhooks": True}),
                     **self.edrv_options},
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "levels": {"1": {"fraction": 0.75}, "2": {"fraction": 0.5}, "3": {"current": 6}},
            "chargestations": [
                {"id": self.station_ids[s.resource_id], "resource_id": s.resource_id, "max_current": s.max_current,
                 "phases": s.phases, **({"group": s.group} if s.group else {}),
                 **({"voltage": s.voltage} if s.voltage != 230 else {}),
                 **({"limit_unit": s.limit_unit} if s.limit_unit else {}),
                 **({"simulator": s.configured_simulator} if s.configured_simulator is not None else {})}
                for s in self.stations],
        }

    def config(self) -> Config:
        return config_from_dict(self.config_dict(), source="rig")

    def write_config(self, path: Path, d: dict[str, Any] | None = None) -> Path:
        """The config as a TOML file: the rig's own, or `d` (a changed config_dict())."""
        import json

        def toml_value(v: Any) -> str:
            if isinstance(v, dict):
                return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
            return json.dumps(v)

        d = d or self.config_dict()
        lines = []
        for section in ("bridge", "vtn", "edrv", "http"):
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in d[section].items()]
        lines.append("[levels]")
        lines += [f"{k} = {toml_value(v)}" for k, v in d["levels"].items()]
        for st in d["chargestations"]:
            lines.append("[[chargestations]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in st.items()]
        path.write_text("\n".join(lines) + "\n")
        return path


# One polling helper for tests and the demo: the local VTN's.
wait_for = LocalVtn.wait_for
