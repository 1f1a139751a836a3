"""The event log and the bridge's durable state (SQLModel; SQLite by default, PostgreSQL in production).

The database is the source of truth: an event is persisted before it is answered, a session is marked
limited before its limit is sent, and a restart rebuilds everything from here. The schema is owned by
Alembic (migrations/); `Store.open` upgrades it to head.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Session, SQLModel, create_engine, select


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on both SQLite (which drops tzinfo) and PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime reached the store")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


ARMED = "armed: to be sent at its interval start"  # the detail of a call recorded ahead (Dispatcher.arm)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ts(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kw)


def _bridge(primary: bool = False) -> Any:
    """Which bridge (VEN) a row belongs to: several bridges, one per utility program, share one database."""
    if primary:
        return Field(default="", primary_key=True)
    return Field(default="", index=True)


class VenState(SQLModel, table=True):
    __tablename__ = "ven_state"
    bridge: str = _bridge(primary=True)
    ven_id: Optional[str] = None
    registration_id: Optional[str] = None
    vtn_url: Optional[str] = None
    updated_at: datetime = _ts(default_factory=utcnow)


class EventRow(SQLModel, table=True):
    __tablename__ = "events"
    bridge: str = _bridge(primary=True)
    event_id: str = Field(primary_key=True)
    ven_id: Optional[str] = None
    modification_number: int = 0
    status: str = "pending"  # pending | active | completed | cancelled
    opt: Optional[str] = None  # optIn | optOut
    opt_reason: Optional[str] = None
    start: datetime = _ts()
    end: Optional[datetime] = _ts(default=None, nullable=True)
    effective_start: datetime = _ts()
    offset_s: float = 0.0  # randomisation offset, drawn once per event
    test_event: bool = False
    dry_run: bool = False  # planned only: dry-run mode, or a test event in "log" mode
    event_json: str = "{}"  # the normalised domain Event, to rebuild schedules after a restart
    received_at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)


class IntervalRow(SQLModel, table=True):
    __tablename__ = "intervals"
    id: Optional[int] = Field(default=None, primary_key=True)
    bridge: str = _bridge()
    event_id: str = Field(index=True)
    start: datetime = _ts()
    end: Optional[datetime] = _ts(default=None, nullable=True)
    signal_name: str
    signal_type: str
    value: float


class ActionRow(SQLModel, table=True):
    __tablename__ = "actions"
    id: Optional[int] = Field(default=None, primary_key=True)
    bridge: str = _bridge()
    event_id: Optional[str] = Field(default=None, index=True)
    at: datetime = _ts(default_factory=utcnow)
    updated_at: datetime = _ts(default_factory=utcnow)
    session_id: str = Field(index=True)
    chargestation_id: str
    resource_id: str
    kind: str  # set_power_limit | clear_power_limit
    purpose: str  # limit | restore
    unit: Optional[str] = None
    limit: Optional[float] = None
    status: str = "planned"  # see CONTRACT.md's action statuses; "planned" while in flight (and up to 50 ms after)
    attempts: int = 0
    detail: str = ""
    edrv_action_id: Optional[str] = Field(default=None, index=True)


class SessionState(SQLModel, table=True):
    """What the bridge did to one eDRV session: the durable list behind restores and `release-all`."""

    __tablename__ = "session_state"
    bridge: str = _bridge(primary=True)
    session_id: str = Field(primary_key=True)
    chargestation_id: str = Field(index=True)
    resource_id: str
    event_id: Optional[str] = None  # the event whose limit it last got
    limited: bool = False  # a limit may be in force that the bridge has not restored
    unit: Optional[str] = None
    limit: Optional[float] = None
    ended: bool = False
    updated_at: datetime = _ts(default_factory=utcnow)


def is_outage(row: "OptOutRow") -> bool:
    """The bridge's own opt-out for a station that went offline: undone once the station is back online (its
    window_end then says when), and never in the way of the operator's own opt-out of that resource."""
    return row.source == "automatic" and row.opt_reason == "outageRunStatus"


class OptOutRow(SQLModel, table=True):
    __tablename__ = "opt_outs"
    id: Optional[int] = Field(default=None, primary_key=True)
    bridge: str = _bridge()
    at: datetime = _ts(default_factory=utcnow)
    event_id: Optional[str] = Field(default=None, index=True)
    modification_number: Optional[int] = None
    resource_id: Optional[str] = None  # None: the whole event
    window_start: Optional[datetime] = _ts(default=None, nullable=True)
    window_end: Optional[datetime] = _ts(default=None, nullable=True)
    reason: str = ""
    # What the VTN is told (an OpenADR optReason such as overrideStatus or outageRunStatus); None: chosen
    # from the source when sent.
    opt_reason: Optional[str] = None
    source: str = "operator"  # operator | automatic
    applied: bool = False  # the daemon has acted on it (restored the resource)
    sent: bool = False  # sent to the VTN at least once
    acknowledged: bool = False  # the VTN confirmed it
    attempts: int = 0


class PerformanceRow(SQLModel, table=True):
    """Measured reduction of one resource in one interval, computed once the interval is over.

    Kept rather than recomputed on demand: readings are pruned after a while, the proof must stay.
    """

    __tablename__ = "performance"
    id: Optional[int] = Field(default=None, primary_key=True)
    bridge: str = _bridge()
    event_id: str = Field(index=True)
    modification_number: int = 0
    resource_id: str
    signal_name: str
    signal_type: str
    interval_start: datetime = _ts()  # as in the event's intervals (before the randomisation offset)
    window_start: datetime = _ts()  # when the interval was in force: offset applied, cut short by a cancel
    window_end: datetime = _ts()
    baseline_start: Optional[datetime] = _ts(default=None, nullable=True)  # the part covered by readings
    baseline_end: Optional[datetime] = _ts(default=None, nullable=True)
    baseline_kw: Optional[float] = None
    mean_kw: Optional[float] = None
    reduction_kw: Optional[float] = None
    reduction_pct: Optional[float] = None
    requested_kw: Optional[float] = None
    computed_at: datetime = _ts(default_factory=utcnow)


class WebhookRow(SQLModel, table=True):
    """Every eDRV webhook as received, persisted before it is answered; `_id` makes delivery idempotent."""

    __tablename__ = "webhooks"
    bridge: str = _bridge(primary=True)  # every bridge behind one eDRV account gets, and keeps, its own copy
    id: str = Field(primary_key=True)  # the envelope's _id
    type: str
    received_at: datetime = _ts(default_factory=utcnow)
    created_at: Optional[datetime] = _ts(default=None, nullable=True)
    body: str
    processed: bool = False


class ReadingRow(SQLModel, table=True):
    """Power drawn by a session, from eDRV energy reports (kW, whatever unit eDRV used)."""

    __tablename__ = "readings"
    id: Optional[int] = Field(default=None, primary_key=True)
    bridge: str = _bridge()
    at: datetime = _ts(index=True)
    session_id: str = Field(index=True)
    chargestation_id: str = Field(index=True)
    power_kw: Optional[float] = None
    current_a: Optional[float] = None


class StationClaim(SQLModel, table=True):
    """A bridge's claim on a chargestation. Two bridges limiting one station unawares would undo each
    other's limits and restores, so a second claim is refused unless both bridges mark the station shared."""

    __tablename__ = "station_claims"
    chargestation_id: str = Field(primary_key=True)
    bridge: str = Field(primary_key=True)
    resource_id: str = ""
    shared: bool = False
    claimed_at: datetime = _ts(default_factory=utcnow)


class SharedLimit(SQLModel, table=True):
    """What one bridge wants a shared station held to (W, the whole station), until when: the other bridges
    sharing it apply the strictest of these too, and restore only when none is left."""

    __tablename__ = "shared_limits"
    bridge: str = Field(primary_key=True)
    chargestation_id: str = Field(primary_key=True)
    watts: float
    event_id: Optional[str] = None
    until: datetime = _ts()
    updated_at: datetime = _ts(default_factory=utcnow)


SCOPED = (VenState, EventRow, IntervalRow, ActionRow, SessionState, OptOutRow, PerformanceRow, WebhookRow, ReadingRow)


def normalise_url(url: str, base_dir: Path | None = None) -> str:
    """Relative SQLite paths are taken relative to the config file, so any working directory finds one DB."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and base_dir is not None:
        path = url[len(prefix):]
        if path and path != ":memory:" and not Path(path).is_absolute():
            return prefix + str((base_dir / path).resolve())
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def upgrade(url: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


class Store:
    """Small, explicit queries over the tables above. Every method is one short transaction.

    A store is scoped to one bridge (its VEN name): it reads and writes only that bridge's rows, so several
    bridges, one per utility program, can share one PostgreSQL database.
    """

    def __init__(self, engine: sa.Engine, bridge: str = ""):
        self.engine = engine
        self.bridge = bridge

    @classmethod
    def open(cls, url: str, migrate: bool = True, bridge: str = "", vtn_url: str | None = None) -> "Store":
        if migrate:
            upgrade(url)
        connect_args = {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}
        engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            # WAL lets the CLI read the event log while the daemon writes it.
            @sa.event.listens_for(engine, "connect")
            def _wal(dbapi_conn, _record):  # noqa: ANN001
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA busy_timeout=30000")
        store = cls(engine, bridge)
        if bridge:
            store._adopt_unowned(vtn_url)
        return store

    @classmethod
    def for_config(cls, cfg: Any) -> "Store":
        """The store of the bridge a config describes: its database, its VEN's rows."""
        return cls.open(normalise_url(cfg.bridge.database_url), bridge=cfg.vtn.ven_name, vtn_url=cfg.vtn.url)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raises unless the database answers a trivial query."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _adopt_unowned(self, vtn_url: str | None) -> None:
        """Rows written before bridges were told apart belong to the one bridge that used the database then:
        the bridge of the VTN they record, or where they record none, the first named bridge to open it while
        no other has. Taken by another bridge, its sessions would never be restored and its VEN id would be
        presented to the wrong VTN."""
        with self.session() as s:
            legacy = s.get(VenState, "")
            known = legacy.vtn_url.rstrip("/") if legacy is not None and legacy.vtn_url else None
            if known is not None and vtn_url is not None:
                if known != vtn_url.rstrip("/"):
                    return  # another VTN's bridge wrote them
            elif s.exec(select(VenState.bridge).where(VenState.bridge != "")).first() is not None:
                return
            for model in SCOPED:
                s.execute(sa.update(model).where(model.bridge == "").values(bridge=self.bridge))
            s.commit()

    def _add(self, row: Any) -> Any:
        with self.session() as s:
            row.bridge = self.bridge
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    # --- VEN registration -------------------------------------------------------------------------
    def ven_state(self) -> VenState:
        with self.session() as s:
            return s.get(VenState, self.bridge) or VenState(bridge=self.bridge)

    def save_ven_state(self, ven_id: str | None, registration_id: str | None, vtn_url: str | None) -> None:
        with self.session() as s:
            row = s.get(VenState, self.bridge) or VenState(bridge=self.bridge)
            row.ven_id, row.registration_id, row.vtn_url, row.updated_at = ven_id, registration_id, vtn_url, utcnow()
            s.add(row)
            s.commit()

    # --- chargestations: claims and shared limits ---------------------------------------------------------
    def claim_stations(self, claims: Iterable[tuple[str, str, bool]]) -> list[StationClaim]:
        """Claim (chargestation id, resource id, shared) for this bridge, dropping its claims on stations it
        no longer has. Returns the other bridges' claims that conflict (then nothing is claimed): a station
        may be in two bridges only when both mark it shared."""
        claims = list(claims)
        ids = [c[0] for c in claims]
        with self.session() as s:
            if self.engine.dialect.name == "postgresql":
                # Two bridges starting at once must not both find the other's claim missing.
                s.execute(sa.text("SELECT pg_advisory_xact_lock(7403122)"))
            others = list(s.exec(select(StationClaim).where(StationClaim.bridge != self.bridge,
                                                            StationClaim.chargestation_id.in_(ids))))
            shared = {c[0]: c[2] for c in claims}
            conflicts = [o for o in others if not (o.shared and shared[o.chargestation_id])]
            if conflicts:
                s.rollback()
                return sorted(conflicts, key=lambda c: (c.chargestation_id, c.bridge))
            s.execute(sa.delete(StationClaim).where(StationClaim.bridge == self.bridge))
            for station_id, resource_id, is_shared in claims:
                s.add(StationClaim(chargestation_id=station_id, bridge=self.bridge, resource_id=resource_id,
                                   shared=is_shared))
            s.commit()
            return []

    def release_claims(self) -> list[str]:
        """Drop this bridge's station claims and shared-station wishes (it is being retired); the stations
        it had claimed."""
        with self.session() as s:
            released = sorted(s.exec(select(StationClaim.chargestation_id)
                                     .where(StationClaim.bridge == self.bridge)))
            s.execute(sa.delete(StationClaim).where(StationClaim.bridge == self.bridge))
            s.execute(sa.delete(SharedLimit).where(SharedLimit.bridge == self.bridge))
            s.commit()
        return released

    def set_shared_limits(self, limits: dict[str, tuple[float, str | None, datetime]]) -> None:
        """Replace this bridge's wishes for shared stations: station id -> (W, event id, until)."""
        with self.session() as s:
            s.execute(sa.delete(SharedLimit).where(SharedLimit.bridge == self.bridge))
            for station_id, (watts, event_id, until) in limits.items():
                s.add(SharedLimit(bridge=self.bridge, chargestation_id=station_id, watts=watts, event_id=event_id,
                                  until=until))
            s.commit()

    def others_shared_limits(self, station_ids: Iterable[str], now: datetime) -> list[SharedLimit]:
        """The other bridges' wishes for these stations that still hold at `now`."""
        with self.session() as s:
            q = select(SharedLimit).where(SharedLimit.bridge != self.bridge, SharedLimit.until > now,
                                          SharedLimit.chargestation_id.in_(list(station_ids)))
            return list(s.exec(q.order_by(SharedLimit.chargestation_id, SharedLimit.bridge)))

    # --- events -------------------------------------------------------------------------------------
    def get_event(self, event_id: str) -> EventRow | None:
        with self.session() as s:
            return s.get(EventRow, (self.bridge, event_id))

    def save_event(self, row: EventRow, intervals: Iterable[IntervalRow] | None = None) -> None:
        """Upsert an event; given intervals replace the stored ones (a modification replaces the schedule)."""
        with self.session() as s:
            row.bridge, row.updated_at = self.bridge, utcnow()
            s.merge(row)
            if intervals is not None:
                s.execute(sa.delete(IntervalRow).where(IntervalRow.bridge == self.bridge,
                                                       IntervalRow.event_id == row.event_id))
                for iv in intervals:
                    iv.bridge = self.bridge
                    s.add(iv)
            s.commit()

    def set_event_status(self, event_id: str, status: str) -> None:
        with self.session() as s:
            row = s.get(EventRow, (self.bridge, event_id))
            if row is not None and row.status != status:
                row.status, row.updated_at = status, utcnow()
                s.add(row)
                s.commit()

    def events(self, statuses: Iterable[str] | None = None, since: datetime | None = None) -> list[EventRow]:
        with self.session() as s:
            q = select(EventRow).where(EventRow.bridge == self.bridge)
            if statuses is not None:
                q = q.where(EventRow.status.in_(list(statuses)))
            if since is not None:
                q = q.where(sa.or_(EventRow.end.is_(None), EventRow.end >= since))
            return list(s.exec(q.order_by(EventRow.start, EventRow.event_id)))

    def intervals(self, event_id: str) -> list[IntervalRow]:
        with self.session() as s:
            q = select(IntervalRow).where(IntervalRow.bridge == self.bridge, IntervalRow.event_id == event_id)
            return list(s.exec(q.order_by(IntervalRow.start, IntervalRow.id)))

    # --- actions ------------------------------------------------------------------------------------
    def add_action(self, row: ActionRow) -> ActionRow:
        return self._add(row)

    def update_action(self, action_id: int, **changes: Any) -> ActionRow | None:
        with self.session() as s:
            row = self._update_action(s, action_id, changes)
            s.commit()
            return row

    def fail_interrupted_actions(self) -> int:
        """Calls written before they were sent whose outcome the last run did not record (it stopped or was
        killed meanwhile): marked failed, so no row stays 'planned'; the restart sends what is still wanted.
        A call armed ahead of its interval start may never have been sent at all, and says so."""
        t = ActionRow.__table__
        mine = (t.c.bridge == self.bridge, t.c.status == "planned")
        with self.engine.begin() as conn:
            armed = conn.execute(t.update().where(*mine, t.c.detail == ARMED).values(
                status="failed", detail="interrupted: the bridge stopped after this call was recorded ahead of "
                "its interval start, before its outcome was recorded; it may never have been sent",
                updated_at=utcnow())).rowcount
            return armed + conn.execute(t.update().where(*mine).values(
                status="failed", detail="interrupted: the bridge stopped before this call's outcome was recorded",
                updated_at=utcnow())).rowcount

    @staticmethod
    def _update_action(s: Session, action_id: int, changes: dict[str, Any]) -> ActionRow | None:
        row = s.get(ActionRow, action_id)
        if row is not None:
            for k, v in changes.items():
                setattr(row, k, v)
            row.updated_at = utcnow()
            s.add(row)
        return row

    def action_by_edrv_id(self, edrv_action_id: str) -> ActionRow | None:
        with self.session() as s:
            return s.exec(select(ActionRow).where(ActionRow.bridge == self.bridge,
                                                  ActionRow.edrv_action_id == edrv_action_id)).first()

    def actions(self, event_id: str | None = None, session_id: str | None = None) -> list[ActionRow]:
        with self.session() as s:
            q = select(ActionRow).where(ActionRow.bridge == self.bridge)
            if event_id is not None:
                q = q.where(ActionRow.event_id == event_id)
            if session_id is not None:
                q = q.where(ActionRow.session_id == session_id)
            return list(s.exec(q.order_by(ActionRow.at, ActionRow.id)))

    def event_ids_touching(self, resource_id: str) -> set[str]:
        """The events that sent anything to the resource: one small query, not every action row."""
        with self.session() as s:
            q = select(ActionRow.event_id).where(ActionRow.bridge == self.bridge,
                                                 ActionRow.resource_id == resource_id).distinct()
            return {event_id for event_id in s.exec(q) if event_id is not None}

    def unanswered_actions(self, before: datetime) -> list[sa.Row]:
        """Calls eDRV accepted (HTTP 2xx) whose charger has not answered by `before`, as plain rows: when
        webhooks stop during a large event, thousands at once, read on the event loop."""
        t = ActionRow.__table__
        q = (sa.select(t.c.id, t.c.kind, t.c.session_id, t.c.chargestation_id, t.c.event_id, t.c.purpose, t.c.unit,
                       t.c.limit, t.c.updated_at)
             .where(t.c.bridge == self.bridge, t.c.status == "requested", t.c.updated_at < before)
             .order_by(t.c.id))
        with self.engine.connect() as conn:
            return list(conn.execute(q))

    def action_counts(self, event_id: str | None = None) -> dict[str, int]:
        with self.session() as s:
            q = select(ActionRow.status, sa.func.count()).where(ActionRow.bridge == self.bridge)
            if event_id is not None:
                q = q.where(ActionRow.event_id == event_id)
            return {status: n for status, n in s.exec(q.group_by(ActionRow.status))}

    # Read-only views for the event log: plain rows (attribute access like the models) cost a fraction of
    # ORM objects, which matters for an event with 10,000 actions or a chart's worth of readings.
    def action_log(self, event_id: str, limit: int | None = None, offset: int = 0) -> list[sa.Row]:
        t = ActionRow.__table__
        q = (sa.select(t).where(t.c.bridge == self.bridge, t.c.event_id == event_id)
             .order_by(t.c.at, t.c.id).limit(limit).offset(offset))
        with self.engine.connect() as conn:
            return list(conn.execute(q))

    def reading_log(self, station_ids: Iterable[str], start: datetime, end: datetime) -> list[sa.Row]:
        """As readings_between, as plain rows."""
        t = ReadingRow.__table__
        q = sa.select(t).where(t.c.bridge == self.bridge, t.c.chargestation_id.in_(list(station_ids)),
                               t.c.at >= start, t.c.at <= end)
        with self.engine.connect() as conn:
            return list(conn.execute(q.order_by(t.c.at, t.c.id)))

    # --- sessions the bridge limited ------------------------------------------------------------------
    def session_states(self, limited_only: bool = False) -> list[SessionState]:
        with self.session() as s:
            q = select(SessionState).where(SessionState.bridge == self.bridge)
            if limited_only:
                q = q.where(SessionState.limited.is_(True), SessionState.ended.is_(False))
            return list(s.exec(q.order_by(SessionState.session_id)))

    def get_session_state(self, session_id: str) -> SessionState | None:
        with self.session() as s:
            return s.get(SessionState, (self.bridge, session_id))

    def save_session_state(self, session_id: str, **fields: Any) -> None:
        with self.session() as s:
            self._save_session_state(s, session_id, fields)
            s.commit()

    def _save_session_state(self, s: Session, session_id: str, fields: dict[str, Any]) -> None:
        fields = dict(fields)
        row = s.get(SessionState, (self.bridge, session_id))
        if row is None:
            row = SessionState(bridge=self.bridge, session_id=session_id,
                               chargestation_id=fields.pop("chargestation_id", ""),
                               resource_id=fields.pop("resource_id", ""))
        for k, v in fields.items():
            setattr(row, k, v)
        row.updated_at = utcnow()
        s.add(row)

    # --- opt-outs -----------------------------------------------------------------------------------
    def add_opt_out(self, row: OptOutRow) -> OptOutRow:
        return self._add(row)

    def opt_outs(self, event_id: str | None = None, unapplied: bool = False,
                 unacknowledged: bool = False) -> list[OptOutRow]:
        with self.session() as s:
            q = select(OptOutRow).where(OptOutRow.bridge == self.bridge)
            if event_id is not None:
                q = q.where(OptOutRow.event_id == event_id)
            if unapplied:
                q = q.where(OptOutRow.applied.is_(False))
            if unacknowledged:
                q = q.where(OptOutRow.acknowledged.is_(False))
            return list(s.exec(q.order_by(OptOutRow.at, OptOutRow.id)))

    def availability_windows(self, ending_after: datetime) -> list[OptOutRow]:
        """Operator unavailability windows (no event) that end after `ending_after`."""
        with self.session() as s:
            q = select(OptOutRow).where(OptOutRow.bridge == self.bridge, OptOutRow.event_id.is_(None),
                                        OptOutRow.window_start.is_not(None), OptOutRow.window_end > ending_after)
            return list(s.exec(q.order_by(OptOutRow.window_start, OptOutRow.id)))

    def update_opt_out(self, opt_id: int, **changes: Any) -> None:
        with self.session() as s:
            row = s.get(OptOutRow, opt_id)
            if row is not None:
                for k, v in changes.items():
                    setattr(row, k, v)
                s.add(row)
                s.commit()

    # --- webhooks and readings ---------------------------------------------------------------------------
    def add_webhook(self, row: WebhookRow) -> bool:
        """False when a webhook with this _id was already stored (a duplicate delivery)."""
        with self.session() as s:
            if s.get(WebhookRow, (self.bridge, row.id)) is not None:
                return False
            row.bridge = self.bridge
            s.add(row)
            try:
                s.commit()
            except sa.exc.IntegrityError:
                return False
            return True

    def unprocessed_webhooks(self) -> list[WebhookRow]:
        with self.session() as s:
            q = select(WebhookRow).where(WebhookRow.bridge == self.bridge, WebhookRow.processed.is_(False))
            # Webhooks stored in one group commit share received_at: eDRV's createdAt keeps them in order (a
            # station's offline before its online), those without one last.
            return list(s.exec(q.order_by(WebhookRow.received_at, WebhookRow.created_at.is_(None),
                                          WebhookRow.created_at)))

    def add_reading(self, row: ReadingRow) -> None:
        self._add(row)

    def readings(self, chargestation_id: str | None = None, since: datetime | None = None) -> list[ReadingRow]:
        with self.session() as s:
            q = select(ReadingRow).where(ReadingRow.bridge == self.bridge)
            if chargestation_id is not None:
                q = q.where(ReadingRow.chargestation_id == chargestation_id)
            if since is not None:
                q = q.where(ReadingRow.at >= since)
            return list(s.exec(q.order_by(ReadingRow.at)))

    def readings_between(self, station_ids: Iterable[str], start: datetime, end: datetime) -> list[ReadingRow]:
        """The stations' readings with start <= at <= end, oldest first."""
        with self.session() as s:
            q = select(ReadingRow).where(ReadingRow.bridge == self.bridge,
                                         ReadingRow.chargestation_id.in_(list(station_ids)),
                                         ReadingRow.at >= start, ReadingRow.at <= end)
            return list(s.exec(q.order_by(ReadingRow.at, ReadingRow.id)))

    # --- measured reduction ------------------------------------------------------------------------------
    def performance(self, event_id: str) -> list[PerformanceRow]:
        with self.session() as s:
            q = select(PerformanceRow).where(PerformanceRow.bridge == self.bridge, PerformanceRow.event_id == event_id)
            return list(s.exec(q.order_by(PerformanceRow.interval_start, PerformanceRow.resource_id,
                                          PerformanceRow.id)))

    def save_performance(self, event_id: str, rows: Iterable[PerformanceRow]) -> None:
        """Replace the event's rows: a modification may have changed its intervals."""
        with self.session() as s:
            s.execute(sa.delete(PerformanceRow).where(PerformanceRow.bridge == self.bridge,
                                                      PerformanceRow.event_id == event_id))
            for row in rows:
                row.bridge = self.bridge
                s.add(row)
            s.commit()

    def prune(self, before: datetime) -> None:
        """Retention: readings and processed webhooks older than `before` go."""
        with self.session() as s:
            s.execute(sa.delete(ReadingRow).where(ReadingRow.bridge == self.bridge, ReadingRow.at < before))
            s.execute(sa.delete(WebhookRow).where(WebhookRow.bridge == self.bridge, WebhookRow.processed.is_(True),
                                                  WebhookRow.received_at < before))
            s.commit()
