"""Group commit for the dispatcher's writes to the event log.

Every write still waits for its commit (a session is marked limited before its limit is sent, an action is
recorded before the call), but the writes of all the calls in flight share one transaction, run in a worker
thread. One commit per batch instead of three per call, and none of it on the event loop: with 32 calls in
flight the event log no longer sets the pace of dispatch.
"""
from __future__ import annotations

import asyncio
from typing import Any

from dr_bridge.store import Store

Write = tuple[str, Any, dict[str, Any]]


class Journal:
    def __init__(self, store: Store, max_batch: int = 500):
        self.store = store
        self.max_batch = max_batch
        self._queue: list[tuple[list[Write], asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def write(self, *writes: Write) -> list[Any]:
        """Commit these writes (together, in order, with whatever else is queued); their rows."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((list(writes), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="journal")
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            flat = [w for writes, _ in batch for w in writes]
            try:
                rows = await asyncio.to_thread(self.store.write_batch, flat)
            except Exception:
                # One bad write must not fail the others' (and with the database away each hears so itself).
                for writes, future in batch:
                    try:
                        result = await asyncio.to_thread(self.store.write_batch, writes)
                    except Exception as exc:
                        _settle(future, exc=exc)
                    else:
                        _settle(future, result)
                continue
            i = 0
            for writes, future in batch:
                _settle(future, rows[i:i + len(writes)])
                i += len(writes)

    async def flush(self) -> None:
        """Wait until everything queued is committed (or has failed)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # its caller was cancelled; the write went through all the same
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
