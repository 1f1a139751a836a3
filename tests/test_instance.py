"""One running instance per bridge: the lock `dr-bridge run` and `retire` take, on SQLite and PostgreSQL.
(tests/test_restart.py runs the daemons themselves against it.)"""
from __future__ import annotations

import psycopg
import pytest

from dr_bridge.instance import InstanceLock


def _terminate(admin_url: str, bridge: str) -> int:
    """What a PostgreSQL restart or an administrator does to the lock's connection."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = %s", (f"dr-bridge instance lock {bridge}",)).fetchone()[0]


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
        assert a.check()  # reconnected and held again: nobody else wanted it
        assert not b.acquire()

        assert _terminate(PG_ADMIN_URL, "utility-a") == 1
        assert b.acquire()  # another instance started while the connection was gone
        assert not a.check()  # the daemon stops on this (daemon._guard)
    finally:
        a.release()
        b.release()


def test_an_unreachable_database_counts_as_still_held(pg_url, caplog):
    from tests.conftest import PG_ADMIN_URL

    a = InstanceLock(pg_url, "utility-a")
    name = pg_url.rsplit("/", 1)[-1]
    try:
        assert a.acquire()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        _terminate(PG_ADMIN_URL, "utility-a")
        assert a.check()  # nobody can take it there either; the bridge goes on
        assert "could not check the instance lock" in caplog.text
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        a.release()
    assert a.acquire() and a.check()
    a.release()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_database_needs_no_lock(url):
    lock = InstanceLock(url, "utility-a")
    assert lock.acquire() and lock.check()
    lock.release()
