"""Group commit for the event log's high-volume writes: the dispatcher's, and eDRV's webhooks.

What must be durable before the bridge acts waits for its commit (write(): a session is marked limited
before its limit is sent, an action is recorded before the call, a webhook is stored before eDRV hears
200); what may lag its cause goes with a later commit (submit(): a call's answer, a reading). The writes
of everything in flight share one transaction, run in a worker thread: one commit per batch instead of
several per call, and none of it on the event loop. With 32 calls in flight, or hundreds of energy reports
a second, the event log no longer sets the pace.

Writes, as (kind, key, fields):
    ("state", session_id, fields)          upsert the session's durable state (only the fields given)
    ("add_action", column values, {})      a new action row; its result is the new id
    ("update_action", action_id, changes)
    ("webhook", column values, {})         a received webhook; its result is False for a duplicate delivery
    ("webhook_processed", webhook_id, {})
    ("reading", column values, {})         a power/current reading
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from dr_bridge.health import Readiness, Reason
from dr_bridge.store import ActionRow, ReadingRow, SessionState, Store, WebhookRow, utcnow

log = logging.getLogger("dr_bridge.journal")

Write = tuple[str, Any, dict[str, Any]]
_ROW_IDENTITY = {"state", "update_action", "webhook_processed"}  # kinds whose key names an existing row
SQLITE_ROWS_PER_INSERT = 500  # the journal's largest batch
LAG_S = 0.05  # how long a submitted write may wait for others to share its commit
KEEP_S = 60.0  # how long a submitted write is kept through a database outage before it is given up (and logged)
RETRY_S = (0.5, 8.0)  # the first and the longest wait between attempts while the database is away


class Journal:
    def __init__(self, store: Store, max_batch: int = 500, first_batch: int = 32, lag_s: float = LAG_S,
                 readiness: Readiness | None = None):
        self.store = store
        self.readiness = readiness or Readiness()
        self.max_batch = max_batch
        self.first_batch = min(first_batch, max_batch)
        self.lag_s = lag_s
        # (writes, their future, submitted: nobody awaits them, so they are kept through an outage)
        self._queue: list[tuple[list[Write], asyncio.Future, bool]] = []
        self._give_up_at: dict[asyncio.Future, float] = {}  # submitted writes that failed once
        self._writer: asyncio.Task | None = None
        self._lag: asyncio.TimerHandle | None = None
        self._statements: dict[tuple[str, tuple[str, ...]], _Prepared] = {}

    async def write(self, *writes: Write) -> list[Any]:
        """Commit these writes (together, in order, with whatever else is queued) now; their results."""
        future = self._enqueue(writes, submitted=False)
        self._start()
        return await future

    def submit(self, *writes: Write) -> asyncio.Future:
        """Queue these writes without waiting (a failure is logged); the future settles once committed.
        For what may lag its cause (a reading, a webhook marked processed, a call's or a charger's answer)
        but must not cost the event loop a commit: they go with the next write() or commit already under
        way, or after lag_s at the latest. Each commit costs its fsync and a batch's own work, and with 20 ms
        per eDRV call the answers trickle in one by one: committed at once, that was a commit per call."""
        future = self._enqueue(writes, submitted=True)
        if self._lag is None and (self._writer is None or self._writer.done()):
            self._lag = asyncio.get_running_loop().call_later(self.lag_s, self._start)
        future.add_done_callback(lambda f: _log_failure(f, writes))
        return future

    def _enqueue(self, writes: tuple[Write, ...], submitted: bool) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((list(writes), future, submitted))
        return future

    def _start(self) -> None:
        """Commit what is queued now (a commit under way takes it next)."""
        if self._lag is not None:
            self._lag.cancel()
            self._lag = None
        if self._queue and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._drain(), name="journal")

    async def _drain(self) -> None:
        # The first batch is small and each one after doubles: at an interval start every session's first
        # write arrives at once, and no call can go out before its write is committed. A whole batch of
        # 500 first held the first call back some 30 ms; 32 (the calls eDRV gets in flight) let it go at once.
        size = self.first_batch
        wait = RETRY_S[0]
        while self._queue:
            batch, self._queue = self._queue[:size], self._queue[size:]
            size = min(self.max_batch, 2 * size)
            flat = [w for writes, _, _ in batch for w in writes]
            try:
                results = await asyncio.to_thread(self.write_batch, flat)
            except Exception:
                # One bad write must not fail the others' (and with the database away each hears so itself).
                kept = []
                for entry in batch:
                    writes, future, submitted = entry
                    try:
                        result = await asyncio.to_thread(self.write_batch, writes)
                    except Exception as exc:
                        if database_away(exc):
                            self.away(exc)
                        if submitted and self._keep(future, exc):
                            kept.append(entry)
                        else:
                            self._give_up_at.pop(future, None)
                            _settle(future, exc=exc)
                    else:
                        self._give_up_at.pop(future, None)
                        _settle(future, result)
                if kept:
                    # A submitted write has nobody to tell: a call's answer, a charger's, a session marked
                    # limited again. Lost, the event log could not show what eDRV did. It goes first again,
                    # ahead of anything queued since, so that rows keep their order, once the database is back.
                    log.warning("the event log is unavailable: %d write(s) kept, next attempt in %.1f s",
                                sum(len(w) for w, _, _ in kept), wait)
                    self._queue[:0] = kept
                    await asyncio.sleep(wait)
                    wait = min(RETRY_S[1], 2 * wait)
                continue
            wait = RETRY_S[0]
            self.answers()
            i = 0
            for writes, future, _ in batch:
                _settle(future, results[i:i + len(writes)])
                i += len(writes)
            if self._give_up_at:  # kept writes that got through at last
                for _, future, _ in batch:
                    self._give_up_at.pop(future, None)

    def away(self, exc: Exception) -> None:
        """The database refused or lost a write: not ready until it takes one again."""
        self.readiness.raise_(Reason.DATABASE_UNREACHABLE, (
            f"the event log's database does not answer ({str(exc).splitlines()[0][:200]}): limits and restores "
            f"go on, and what was not written is kept for {KEEP_S:g} s and then logged; check the server "
            f"bridge.database_url names"))

    def answers(self) -> None:
        self.readiness.clear(Reason.DATABASE_UNREACHABLE, "the event log's database answers again")

    def _keep(self, future: asyncio.Future, exc: Exception) -> bool:
        """Whether to try a failed submitted write again: while the database is away, for KEEP_S."""
        if future.done() or not database_away(exc):
            return False
        now = asyncio.get_running_loop().time()
        return now < self._give_up_at.setdefault(future, now + KEEP_S)

    async def flush(self) -> None:
        """Commit everything queued, and wait until it is committed (or has failed)."""
        self._start()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    def write_batch(self, writes: list[Write]) -> list[Any]:
        """The writes in one transaction, one executemany per kind of write (and set of columns), straight to
        the database driver: SQLAlchemy compiles each statement once (_Prepared), but its per-row work (bind
        processing, defaults, one statement per row for ordered ids on SQLite), holding the GIL the event
        loop needs, cost several times the writes themselves. Returns each write's result."""
        bridge, now = self.store.bridge, utcnow()
        out: list[Any] = [None] * len(writes)
        runs: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
        # Grouping reorders writes of different kinds or columns: safe while no row is written twice in one
        # batch. A writer awaits each write before its next, so it hardly ever is; if it is, the batch's
        # writes go one statement each, in their order.
        rows = [(kind, key) for kind, key, _ in writes if kind in _ROW_IDENTITY]
        one_by_one = len(rows) != len(set(rows))
        with self.store.engine.begin() as conn:
            duplicates = self._known_webhooks(conn, writes)
            for i, (kind, key, fields) in enumerate(writes):
                if kind == "state":
                    params = {"chargestation_id": "", "resource_id": "", **fields, "bridge": bridge,
                              "session_id": key, "updated_at": now}
                elif kind in ("add_action", "reading", "webhook"):
                    params = {**key, "bridge": bridge}  # the other columns: their defaults
                    if kind == "add_action":
                        params = {"at": now, **params, "updated_at": now}
                    elif kind == "webhook":
                        params = {"received_at": now, **params}
                        out[i] = key["id"] not in duplicates
                        if not out[i]:
                            continue
                        duplicates.add(key["id"])  # a second delivery in this very batch
                elif kind == "update_action":
                    params = {**{f"v_{k}": v for k, v in fields.items()}, "v_updated_at": now, "w_id": key,
                              "w_bridge": bridge}
                elif kind == "webhook_processed":
                    params = {"w_id": key, "w_bridge": bridge}
                else:
                    raise ValueError(f"unknown write {kind!r}")
                statement = (kind, tuple(fields) if kind in ("state", "update_action") else ())
                runs.setdefault((statement, i) if one_by_one else statement, []).append((i, params))
            bound_now: dict[Any, Any] = {}  # `now`, as each converter gives it: worked out once a batch
            for run, items in runs.items():
                (kind, columns) = run[0] if one_by_one else run
                prepared = self._prepared(kind, columns)
                values = [prepared.values(params, now, bound_now) for _, params in items]
                if kind == "add_action":
                    for (i, _), new_id in zip(items, prepared.insert_ids(conn, values), strict=True):
                        out[i] = new_id
                else:
                    conn.exec_driver_sql(prepared.sql, values)
        return out

    def _known_webhooks(self, conn: sa.Connection, writes: list[Write]) -> set[str]:
        ids = [key["id"] for kind, key, _ in writes if kind == "webhook"]
        if not ids:
            return set()
        t = WebhookRow.__table__
        q = sa.select(t.c.id).where(t.c.bridge == self.store.bridge, t.c.id.in_(ids))
        return set(conn.execute(q).scalars())

    def _prepared(self, kind: str, columns: tuple[str, ...]) -> _Prepared:
        """The statement for this kind of write and set of columns, compiled once."""
        cached = self._statements.get((kind, columns))
        if cached is not None:
            return cached
        dialect = self.store.engine.dialect
        insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        binds: dict[str, sa.Column] = {}  # bind name -> the column it writes or matches

        def bind(column: sa.Column, name: str | None = None) -> sa.BindParameter:
            binds[name or column.name] = column
            return sa.bindparam(name or column.name, type_=column.type)

        if kind in ("state", "add_action", "webhook", "reading"):
            t = {"state": SessionState, "add_action": ActionRow, "webhook": WebhookRow,
                 "reading": ReadingRow}[kind].__table__
            # Every column but a generated id: the ones a write leaves out get their defaults (_Prepared).
            statement = insert(t).values({c.name: bind(c) for c in t.c if c is not t.autoincrement_column})
            if kind == "state":  # only the columns given change on an existing row
                statement = statement.on_conflict_do_update(
                    index_elements=[t.c.bridge, t.c.session_id],
                    set_={c: statement.excluded[c] for c in (*columns, "updated_at")})
            elif kind == "webhook":  # another process of this bridge may have stored it meanwhile
                statement = statement.on_conflict_do_nothing()
            elif kind == "add_action" and dialect.name == "postgresql":  # SQLite's ids: _Prepared.insert_ids
                statement = statement.returning(t.c.id)
        else:
            t = ActionRow.__table__ if kind == "update_action" else WebhookRow.__table__
            changes = ({c: bind(t.c[c], f"v_{c}") for c in (*columns, "updated_at")} if kind == "update_action"
                       else {"processed": sa.true()})
            statement = (sa.update(t).where(t.c.id == bind(t.c.id, "w_id"), t.c.bridge == bind(t.c.bridge, "w_bridge"))
                         .values(changes))
        prepared = self._statements[(kind, columns)] = _Prepared.compile(statement, binds, dialect)
        return prepared


@dataclass(frozen=True)
class _Prepared:
    """One statement as the driver takes it, and how a write's fields become the driver's values."""

    sql: str
    names: tuple[str, ...]  # the bind names, in the order of the statement's placeholders
    named: bool  # the driver takes each row as a dict (psycopg's %(name)s) rather than a tuple (sqlite3's ?)
    defaults: tuple[Any, ...]  # each bind's column default, for a write that leaves it out (None: none)
    converters: tuple[tuple[int, Callable[[Any], Any]], ...]  # (bind's index, its column type's conversion)
    postgresql: bool

    @classmethod
    def compile(cls, statement: Any, binds: dict[str, sa.Column], dialect: sa.Dialect) -> _Prepared:
        compiled = statement.compile(dialect=dialect)
        names = tuple(compiled.positiontup) if compiled.positiontup is not None else tuple(compiled.binds)
        if getattr(compiled, "escaped_bind_names", None) or set(names) - set(binds):
            raise RuntimeError(f"unexpected bind names in {compiled.string!r}")  # a SQLAlchemy change; not data
        columns = [binds[name] for name in names]
        defaults = tuple(c.default.arg if c.default is not None and c.default.is_scalar else None for c in columns)
        # What SQLAlchemy itself applies: the dialect's form of each type (UTC datetimes as SQLite's text).
        converters = tuple((i, conv) for i, c in enumerate(columns)
                           if (conv := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None)
        return cls(compiled.string, names, compiled.positiontup is None, defaults, converters,
                   dialect.name == "postgresql")

    def sqlite_rows(self, n: int) -> str:
        """This single-row SQLite insert as one statement inserting n rows."""
        head, values, row = self.sql.rpartition(" VALUES ")
        if not values or row != "(" + ", ".join("?" * len(self.names)) + ")":
            raise RuntimeError(f"unexpected insert {self.sql!r}")  # a SQLAlchemy change; not data
        return f"{head} VALUES {', '.join([row] * n)}"

    def values(self, params: dict[str, Any], now: Any, bound_now: dict[Any, Any]) -> tuple | dict:
        """A write's fields as the driver's values; `now` converted once a batch (bound_now holds it)."""
        row = [params.get(name, default) for name, default in zip(self.names, self.defaults)]
        for i, convert in self.converters:
            value = row[i]
            if value is now:
                if convert not in bound_now:
                    bound_now[convert] = convert(now)
                row[i] = bound_now[convert]
            elif value is not None:
                row[i] = convert(value)
        return dict(zip(self.names, row)) if self.named else tuple(row)

    def insert_ids(self, conn: sa.Connection, values: list) -> list[int]:
        """Insert these rows; their new ids, in order."""
        cursor = conn.connection.cursor()
        try:
            if self.postgresql:  # one round trip, the ids in the rows' order (psycopg's pipeline)
                cursor.executemany(self.sql, values, returning=True)
                ids = []
                while True:
                    ids.append(cursor.fetchone()[0])
                    if not cursor.nextset():
                        return ids
            # SQLite: many rows a statement, their ids worked out from the last one's. Its multi-row RETURNING
            # does not promise the rows' order; row by row cost this thread 10 µs a row against 6, and gave up
            # and took back the GIL the event loop needs at every row. A statement holds the database's write
            # lock, so nothing else inserts between its rows, and SQLite gives each new row one more than the
            # table's largest id (a rowid alias; it picks at random only once the largest possible id is taken).
            per = max(1, min(SQLITE_ROWS_PER_INSERT, cursor.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                             // len(self.names)))
            ids = []
            for k in range(0, len(values), per):
                chunk = values[k:k + per]
                cursor.execute(self.sqlite_rows(len(chunk)), [v for row in chunk for v in row])
                ids.extend(range(cursor.lastrowid - len(chunk) + 1, cursor.lastrowid + 1))
            return ids
        finally:
            cursor.close()


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # its caller was cancelled; the write went through all the same
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def database_away(exc: Exception) -> bool:
    """A lost or refused connection, or a locked SQLite file: worth another try, unlike a bad write."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or \
        getattr(exc, "connection_invalidated", False)


def _log_failure(future: asyncio.Future, writes: tuple[Write, ...]) -> None:
    if not future.cancelled() and future.exception() is not None:
        # What was not written goes to the log instead, so the operator can still tell what happened.
        lost = "; ".join(f"{kind} {str(key)[:120]} {fields}"[:300] for kind, key, fields in writes)
        log.error("writing to the event log failed (%s); not recorded: %s",
                  str(future.exception()).splitlines()[0][:200], lost)
