"""eDRV objects as the bridge needs them, parsed leniently.

eDRV's documented examples disagree with each other (status case, units, numbers sent as strings), so
every parser here tolerates missing fields and odd types instead of failing a whole listing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def _id(value: Any) -> str | None:
    """An id field may be a plain id or, with include_* flags, an expanded object."""
    if isinstance(value, dict):
        value = value.get("_id")
    return str(value) if value is not None else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 (with `Z` or an offset) to an aware UTC datetime; None when unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _power_kw(obj: Any) -> float | None:
    if not isinstance(obj, dict):
        return _num(obj)  # a bare number: eDRV documents power in kW
    value = _num(obj.get("value"))
    if value is None:
        return None
    unit = str(obj.get("unit") or "kW").strip().lower()
    if unit == "w":
        return value / 1000.0
    if unit == "mw":
        return value * 1000.0
    return value


def _current_a(obj: Any) -> float | None:
    if not isinstance(obj, dict):
        return _num(obj)
    value = _num(obj.get("value"))
    if value is None:
        return None
    if str(obj.get("unit") or "A").strip().lower() == "ma":
        return value / 1000.0
    return value


def parse_energy_report(obj: Any) -> tuple[float | None, float | None, datetime | None]:
    """(power kW, current A, timestamp) from a session's `energy_report`; None for what is missing."""
    if not isinstance(obj, dict):
        return None, None, None
    return _power_kw(obj.get("power")), _current_a(obj.get("current")), parse_time(obj.get("timestamp"))


@dataclass(frozen=True)
class Connector:
    id: str
    power_kw: float | None = None
    power_type: str | None = None
    status: str | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Connector:
        return cls(id=_id(obj.get("_id")) or "", power_kw=_num(obj.get("power")),
                   power_type=obj.get("power_type"), status=obj.get("status"))


@dataclass(frozen=True)
class Chargestation:
    id: str
    is_simulator: bool | None = None  # None: eDRV did not say
    online: bool = False
    protocol: str | None = None
    connectors: tuple[Connector, ...] = ()

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Chargestation:
        sim = obj.get("is_simulator")
        connectors = tuple(Connector.from_json(c) for c in obj.get("connectors") or [] if isinstance(c, dict))
        return cls(id=_id(obj.get("_id")) or "", is_simulator=sim if isinstance(sim, bool) else None,
                   online=obj.get("online") is True, protocol=obj.get("protocol"), connectors=connectors)


@dataclass(frozen=True)
class Session:
    id: str
    chargestation_id: str | None
    connector_id: str | None
    status: str  # raw, as eDRV sent it ("Started", "started", "Ended", ...)
    power_kw: float | None = None
    current_a: float | None = None
    energy_report_at: datetime | None = None
    target_energy_kwh: float | None = None
    energy_kwh: float | None = None  # charged so far (metrics.energyConsumed, Wh)

    @property
    def running(self) -> bool:
        return self.status.lower() == "started"

    @property
    def energy_need_kwh(self) -> float | None:
        """Energy still wanted when the driver set an energy target; None when there is none."""
        if self.target_energy_kwh is None or self.target_energy_kwh <= 0:
            return None
        return max(0.0, self.target_energy_kwh - (self.energy_kwh or 0.0))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Session:
        power, current, at = parse_energy_report(obj.get("energy_report"))
        target = obj.get("target")
        metrics = obj.get("metrics")
        consumed_wh = _num(metrics.get("energyConsumed")) if isinstance(metrics, dict) else None
        return cls(id=_id(obj.get("_id")) or "", chargestation_id=_id(obj.get("chargestation")),
                   connector_id=_id(obj.get("connector")), status=str(obj.get("status") or ""),
                   power_kw=power, current_a=current, energy_report_at=at,
                   target_energy_kwh=_num(target.get("energy")) if isinstance(target, dict) else None,
                   energy_kwh=consumed_wh / 1000.0 if consumed_wh is not None else None)


@dataclass(frozen=True)
class Action:
    id: str
    type: str | None = None
    status: str | None = None
    session_id: str | None = None
    chargestation_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Action:
        data = obj.get("data")
        return cls(id=_id(obj.get("_id")) or "", type=obj.get("type"), status=obj.get("status"),
                   session_id=_id(obj.get("session")), chargestation_id=_id(obj.get("chargestation")),
                   data=dict(data) if isinstance(data, dict) else {})
