"""Plain domain types shared by the pure core and the adapters.

No I/O here and no library types: the OpenADR adapter copies openleadr's dicts into these, the config
loader builds Stations from TOML, and policy.py computes Limits from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

Unit = Literal["current", "power"]
BelowMin = Literal["min", "pause"]

# Event statuses as the event log shows them (CONTRACT.md).
PENDING, ACTIVE, COMPLETED, CANCELLED = "pending", "active", "completed", "cancelled"


@dataclass(frozen=True)
class Station:
    """A configured eDRV chargestation and the OpenADR resource that targets it."""

    id: str
    resource_id: str
    max_current: float  # A per phase: the station's whole budget, shared by its sessions
    phases: int = 3
    voltage: float = 230.0
    limit_unit: Unit | None = None  # None: the unit follows the signal (current, or power for power levels)
    group: str | None = None
    priority: int = 0
    simulator: bool | None = None  # None: ask eDRV (is_simulator)
    shared: bool = False  # also configured in another bridge on the same database
    locations: frozenset[str] = frozenset()  # EMIX locations it sits at, "kind:id" (targets.LOCATION_KINDS)

    @property
    def watts_per_amp(self) -> float:
        return self.voltage * self.phases

    @property
    def max_power_w(self) -> float:
        return self.max_current * self.watts_per_amp


@dataclass(frozen=True)
class LevelRule:
    """What a SIMPLE level means for a station: exactly one of the three is set."""

    fraction: float | None = None  # of max_current
    current: float | None = None  # A per phase
    power: float | None = None  # W


@dataclass(frozen=True)
class PolicySettings:
    levels: dict[int, LevelRule]
    min_current: float = 6.0
    below_min: BelowMin = "min"


@dataclass(frozen=True)
class Limit:
    """A limit in the unit it will be sent in. value 0 means paused/off."""

    unit: Unit
    value: float


@dataclass(frozen=True)
class Cap:
    """A power cap shared by every running session on a set of stations (a site or feeder setpoint)."""

    watts: float
    station_ids: frozenset[str]


@dataclass(frozen=True)
class SignalInterval:
    signal_name: str
    signal_type: str
    start: datetime  # UTC
    end: datetime | None  # None: open-ended
    value: float  # setpoints in kW (the VEN adapter converts the signal's item base)


@dataclass
class Event:
    """An OpenADR event, copied out of openleadr's mutable dict and normalised to UTC."""

    event_id: str
    modification_number: int
    start: datetime
    end: datetime | None  # None: open-ended (duration 0)
    intervals: list[SignalInterval]
    # ven_id/resource_id/group_id/party_id/EMIX location kind (targets.py) -> ids; "unreadable" -> kinds
    targets: dict[str, list[str]] = field(default_factory=dict)
    event_status: str = "far"  # as the VTN said: none/far/near/active/completed/cancelled
    test_event: bool = False
    priority: int = 0
    market_context: str | None = None
    start_after: timedelta = timedelta(0)  # randomisation window (tolerance.tolerate.startafter)
    ramp_up: timedelta | None = None
    recovery: timedelta | None = None
    response_required: str = "always"

    @property
    def cancelled(self) -> bool:
        return self.event_status == "cancelled"
