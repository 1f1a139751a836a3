"""One running instance per bridge: the lock `dr-bridge run` and `retire` take, on SQLite and PostgreSQL.
(tests/test_restart.py runs the daemons themselves against it.)"""
from __future__ import annotations

import time

import psycopg
import pytest

from dr_bridge.instance import InstanceLock


def _terminate(admin_url: str, bridge: str) -> int:
    """What a PostgreSQL restart or an administrator does to the lock's connection."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = %s", (f"dr-bridge instance lock {bridge}",)).fetchone()[0]


def _allow_connections(admin_url: str, name: str, allow: bool) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allow else "false"}')


def _held_again(lock: InstanceLock, timeout: float = 5.0) -> bool:
    """Check until the lock is held on a live connection again; every check on the way must say "held"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert lock.check()
        if lock._conn is not None:
            return True
        time.sleep(0.1)
    return False


def test_one_holder_per_bridge_and_bridges_apart(db_url):
    a, again, other = InstanceLock(db_url, "utility-a"), InstanceLock(db_url, "utility-a"), InstanceLock(db_url, "b")
    try:
        assert a.acquire() and a.check()
        assert not again.acquire(wait_s=0.3)  # a second instance of the same bridge
        assert other.acquire()  # another bridge on the same database is not held up
        a.release()
        assert again.acquire()
    finally:
        for lock in (a, again, other):
            lock.release()


def test_a_lock_lost_with_its_connection_is_taken_again_unless_another_instance_took_it(pg_url):
    from tests.conftest import PG_ADMIN_URL

    a, b = InstanceLock(pg_url, "utility-a"), InstanceLock(pg_url, "utility-a")
    try:
        assert a.acquire()
        assert _terminate(PG_ADMIN_URL, "utility-a") == 1
        assert _held_again(a)  # nobody else wanted it
        assert not b.acquire()

        assert _terminate(PG_ADMIN_URL, "utility-a") == 1
        assert b.acquire(wait_s=5)  # another instance started while the connection was gone
        assert not a.check()  # the daemon stops on this (daemon._guard)
    finally:
        a.release()
        b.release()


def test_an_unreachable_database_counts_as_held_and_the_lock_is_taken_again_once_it_is_back(pg_url, caplog):
    from tests.conftest import PG_ADMIN_URL

    a, b = InstanceLock(pg_url, "utility-a"), InstanceLock(pg_url, "utility-a")
    name = pg_url.rsplit("/", 1)[-1]
    try:
        assert a.acquire()
        _allow_connections(PG_ADMIN_URL, name, False)
        _terminate(PG_ADMIN_URL, "utility-a")
        assert a.check() and a.check()  # nobody can take it there either; the bridge goes on
        assert "could not check the instance lock" in caplog.text
        _allow_connections(PG_ADMIN_URL, name, True)
        assert _held_again(a)  # the next check after the outage holds it again
        assert not b.acquire()
    finally:
        _allow_connections(PG_ADMIN_URL, name, True)
        a.release()
        b.release()


def test_a_lock_still_held_by_our_own_lost_connection_is_not_a_takeover(pg_url):
    """The network path went, the server has not noticed: its process for our old connection still holds
    the lock. That is not another instance; the old process is ended and the lock taken again."""
    a, b = InstanceLock(pg_url, "utility-a"), InstanceLock(pg_url, "utility-a")

    class Cut:  # the client's side of a connection whose network path is gone
        def execute(self, *args):
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        def close(self):
            pass

    assert a.acquire()
    alive_on_the_server = a._conn
    a._conn = Cut()
    try:
        assert _held_again(a)
        assert a._conn is not alive_on_the_server
        assert not b.acquire()
    finally:
        alive_on_the_server.close()
        a.release()
        b.release()


def test_check_after_release_does_not_take_the_lock_again(pg_url):
    a, b = InstanceLock(pg_url, "utility-a"), InstanceLock(pg_url, "utility-a")
    try:
        assert a.acquire()
        a.release()
        assert a.check()  # a check already on its way when the daemon stopped
        assert b.acquire()
    finally:
        a.release()
        b.release()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///:memory:?cache=shared",
                                 "sqlite:///file:x?mode=memory&uri=true"])
def test_an_in_memory_database_needs_no_lock(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lock = InstanceLock(url, "utility-a")
    assert lock.acquire() and lock.check()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # and leaves no file behind


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+pysqlite"])
def test_every_sqlite_url_form_of_a_file_is_locked(scheme, tmp_path):
    url = f"{scheme}:///{tmp_path / 'bridge.db'}?timeout=30"
    a, b = InstanceLock(url, "utility-a"), InstanceLock(url, "utility-a")
    try:
        assert a.acquire() and not b.acquire()
        assert [p.name for p in tmp_path.iterdir()] == [a.where.rsplit("/", 1)[-1]]
    finally:
        a.release()
        b.release()
