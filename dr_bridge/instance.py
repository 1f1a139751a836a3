"""One running instance per bridge. `dr-bridge run` holds a lock named after its bridge (VEN name) on its
database for as long as it runs, so a second instance (a deploy that starts the new one before the old one
stopped, an operator starting it twice) is refused rather than sending a second set of limits and restores.
`retire` takes the same lock, so it never frees the stations of a bridge that runs, and a bridge cannot
start while it is being retired.

PostgreSQL: a session-level advisory lock on a connection of its own; the server drops it with the
connection, so a bridge that is killed never leaves it behind. SQLite: an exclusive flock on a file beside
the database, which the operating system drops with the process.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from dr_bridge.store import normalise_url

log = logging.getLogger("dr_bridge.instance")


class InstanceLock:
    def __init__(self, url: str, bridge: str) -> None:
        self.bridge = bridge
        parsed = make_url(url)
        self._path = _lock_path(parsed, bridge)  # SQLite on a file: the lock file
        self._dsn = (parsed.set(drivername="postgresql").render_as_string(hide_password=False)
                     if parsed.get_backend_name() == "postgresql" else None)  # PostgreSQL, as libpq reads it
        # 64 bits of the name: the advisory-lock key space is shared with whatever else uses the database
        digest = hashlib.blake2b(f"dr-bridge instance {bridge}".encode(), digest_size=8).digest()
        self._key = int.from_bytes(digest, "big", signed=True)
        self._conn = None  # PostgreSQL: the connection that holds the lock
        self._backend: int | None = None  # PostgreSQL: the server process of the connection that took it last
        self._fd: int | None = None  # SQLite: the locked file
        self._mutex = threading.Lock()  # check() runs in a worker thread; release() must not cross it
        self._released = False

    @classmethod
    def for_config(cls, cfg: Any) -> "InstanceLock":
        """The lock of the bridge a config describes, on its database (as Store.for_config opens it)."""
        return cls(normalise_url(cfg.bridge.database_url), cfg.vtn.ven_name)

    @property
    def where(self) -> str:
        """What the lock is held on, for messages."""
        return f"lock file {self._path}" if self._path else "PostgreSQL advisory lock"

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock; False if another process holds it for wait_s. (A bridge killed a moment ago may
        still hold it until its database connection is seen to be gone.)"""
        deadline = time.monotonic() + wait_s
        while True:
            with self._mutex:
                self._released = False
                if self._try():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def check(self) -> bool:
        """Whether this process still holds the lock. PostgreSQL drops it with the connection (the server
        restarting, the network, an administrator's pg_terminate_backend): then it is taken again, and this
        is False only when another instance took it meanwhile. A database that cannot be reached counts as
        still held; nobody else can take it there either."""
        if self._dsn is None:
            return True  # a flock stays with its process
        import psycopg

        with self._mutex:
            if self._released:
                return True
            if self._conn is not None:
                try:
                    self._conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    self._close_conn()
            try:
                return self._try() or self._still_ours()
            except psycopg.Error as exc:
                log.warning("could not check the instance lock (%s); trying again shortly", exc)
                return True

    def release(self) -> None:
        with self._mutex:
            self._released = True
            self._close_conn()
            if self._fd is not None:
                os.close(self._fd)  # closing the file drops its flock
                self._fd = None

    def _still_ours(self) -> bool:
        """Whether the lock is held by the server process of our own lost connection, which the server has not
        noticed is gone yet (a dropped network path). It is ended, so the next check takes the lock again."""
        import psycopg

        if self._backend is None:
            return False
        with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as conn:
            k = self._key & 0xFFFF_FFFF_FFFF_FFFF  # pg_locks shows a bigint key as two unsigned halves
            holders = [pid for (pid,) in conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                "AND classid = %s AND objid = %s AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())", (k >> 32, k & 0xFFFF_FFFF))]
            if not holders:
                return True  # let go between the two queries: nobody else has it, the next check takes it
            if holders != [self._backend]:
                return False
            conn.execute("SELECT pg_terminate_backend(%s)", (self._backend,))
        log.warning("the instance lock was still held by this bridge's lost database connection; it was ended, "
                    "and the lock is taken again at the next check")
        return True

    def _try(self) -> bool:
        if self._path is not None:
            return self._try_file()
        if self._dsn is not None:
            return self._try_postgres()
        return True  # an in-memory database belongs to its process anyway

    def _try_file(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.bridge}\n".encode())  # for an operator wondering who holds it
        self._fd = fd
        return True

    def _try_postgres(self) -> bool:
        import psycopg

        if self._conn is None:
            # Keepalives: a network path that drops silently is noticed in seconds, not hours, on both ends.
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5,
                                         application_name=f"dr-bridge instance lock {self.bridge}"[:63],
                                         keepalives=1, keepalives_idle=10, keepalives_interval=5,
                                         keepalives_count=3, tcp_user_timeout=20_000)
        got = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()[0]
        if got:
            self._backend = self._conn.info.backend_pid
        else:
            self._close_conn()
        return bool(got)

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # already broken: nothing left to close
                pass
            self._conn = None


def _lock_path(url: URL, bridge: str) -> Path | None:
    """The lock file beside a SQLite database file; None for any other database, or one in memory."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    path = url.database.removeprefix("file:")
    if path == ":memory:" or url.query.get("mode") == "memory":
        return None
    db = Path(path)
    return db.with_name(f"{db.name}.{hashlib.sha1(bridge.encode()).hexdigest()[:12]}.lock")
