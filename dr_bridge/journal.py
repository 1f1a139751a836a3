"""Group commit for the event log's high-volume writes: the dispatcher's, and eDRV's webhooks.

Every write still waits for its commit (a session is marked limited before its limit is sent, an action is
recorded before the call, a webhook is stored before eDRV hears 200), but the writes of everything in flight
share one transaction, run in a worker thread: one commit per batch instead of several per call, and none
of it on the event loop. With 32 calls in flight, or hundreds of energy reports a second, the event log no
longer sets the pace.

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
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from dr_bridge.store import ActionRow, ReadingRow, SessionState, Store, WebhookRow, utcnow

log = logging.getLogger("dr_bridge.journal")

Write = tuple[str, Any, dict[str, Any]]
_ROW_IDENTITY = {"state", "update_action", "webhook_processed"}  # kinds whose key names an existing row


class Journal:
    def __init__(self, store: Store, max_batch: int = 500, first_batch: int = 32):
        self.store = store
        self.max_batch = max_batch
        self.first_batch = min(first_batch, max_batch)
        self._queue: list[tuple[list[Write], asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self._statements: dict[tuple[str, tuple[str, ...]], Any] = {}

    async def write(self, *writes: Write) -> list[Any]:
        """Commit these writes (together, in order, with whatever else is queued); their results."""
        return await self._enqueue(writes)

    def submit(self, *writes: Write) -> asyncio.Future:
        """Queue these writes without waiting (a failure is logged); the future settles once committed.
        For what may lag its cause by a few ms (a reading, a webhook marked processed, a charger's answer)
        but must not cost the event loop a commit."""
        future = self._enqueue(writes)
        future.add_done_callback(_log_failure)
        return future

    def _enqueue(self, writes: tuple[Write, ...]) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((list(writes), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="journal")
        return future

    async def _drain(self) -> None:
        # The first batch is small and each one after doubles: at an interval start every session's first
        # write arrives at once, and no call can go out before its write is committed. A whole batch of
        # 500 first held the first call back some 30 ms; 32 (the calls eDRV gets in flight) let it go at once.
        size = self.first_batch
        while self._queue:
            batch, self._queue = self._queue[:size], self._queue[size:]
            size = min(self.max_batch, 2 * size)
            flat = [w for writes, _ in batch for w in writes]
            try:
                results = await asyncio.to_thread(self.write_batch, flat)
            except Exception:
                # One bad write must not fail the others' (and with the database away each hears so itself).
                for writes, future in batch:
                    try:
                        result = await asyncio.to_thread(self.write_batch, writes)
                    except Exception as exc:
                        _settle(future, exc=exc)
                    else:
                        _settle(future, result)
                continue
            i = 0
            for writes, future in batch:
                _settle(future, results[i:i + len(writes)])
                i += len(writes)

    async def flush(self) -> None:
        """Wait until everything queued is committed (or has failed)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    def write_batch(self, writes: list[Write]) -> list[Any]:
        """The writes in one transaction, one executemany per kind of write (and set of columns): plain SQL
        rather than the ORM, whose per-row SELECTs and change tracking, holding the GIL the event loop
        needs, cost many times the writes themselves. Returns each write's result."""
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
                statement = (kind, tuple(key) if isinstance(key, dict) else tuple(fields))
                runs.setdefault((statement, i) if one_by_one else statement, []).append((i, params))
            for run, items in runs.items():
                (kind, columns) = run[0] if one_by_one else run
                result = conn.execute(self._statement(kind, columns), [params for _, params in items])
                if kind == "add_action":
                    for (i, _), new_id in zip(items, result.scalars(), strict=True):
                        out[i] = new_id
        return out

    def _known_webhooks(self, conn: sa.Connection, writes: list[Write]) -> set[str]:
        ids = [key["id"] for kind, key, _ in writes if kind == "webhook"]
        if not ids:
            return set()
        t = WebhookRow.__table__
        q = sa.select(t.c.id).where(t.c.bridge == self.store.bridge, t.c.id.in_(ids))
        return set(conn.execute(q).scalars())

    def _statement(self, kind: str, columns: tuple[str, ...]) -> Any:
        """The statement for this kind of write and set of columns, built once."""
        cached = self._statements.get((kind, columns))
        if cached is not None:
            return cached
        dialect = postgresql if self.store.engine.dialect.name == "postgresql" else sqlite
        if kind == "state":
            t = SessionState.__table__
            insert = dialect.insert(t)
            # Only the columns given change on an existing row.
            statement = insert.on_conflict_do_update(
                index_elements=[t.c.bridge, t.c.session_id],
                set_={c: insert.excluded[c] for c in (*columns, "updated_at")})
        elif kind == "add_action":
            t = ActionRow.__table__
            statement = sa.insert(t).returning(t.c.id, sort_by_parameter_order=True)  # ids in the writes' order
        elif kind == "update_action":
            t = ActionRow.__table__
            statement = (sa.update(t).where(t.c.id == sa.bindparam("w_id"), t.c.bridge == sa.bindparam("w_bridge"))
                         .values({c: sa.bindparam(f"v_{c}") for c in (*columns, "updated_at")}))
        elif kind == "webhook":
            # Another process of this bridge may have stored it meanwhile: a duplicate, not an error.
            statement = dialect.insert(WebhookRow.__table__).on_conflict_do_nothing()
        elif kind == "webhook_processed":
            t = WebhookRow.__table__
            statement = (sa.update(t).where(t.c.id == sa.bindparam("w_id"), t.c.bridge == sa.bindparam("w_bridge"))
                         .values(processed=True))
        else:
            statement = sa.insert(ReadingRow.__table__)
        self._statements[(kind, columns)] = statement
        return statement


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # its caller was cancelled; the write went through all the same
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("writing to the event log failed: %s", future.exception())
