"""Shared fixtures: databases on SQLite and on the real PostgreSQL server."""
from __future__ import annotations

import os
import sys
import uuid
from collections import Counter

import pytest

# Every peer in these tests listens on loopback: a proxy set for the machine must not stand between them
# (the eDRV transport, like httpx, would use it). The proxy test sets its own.
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.lower(), None)

PG_ADMIN_URL = os.environ.get("DR_BRIDGE_TEST_PG", "postgresql://127.0.0.1:5432/test")
# What the bad-input tests threw at the bridge, printed at the end of the run so CI's log shows it.
BAD_INPUT: Counter = Counter()


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as exc:  # the reason is shown in the skip message
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc.__class__.__name__}"


_PG_SKIP = _pg_reachable()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'bridge.db'}"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database per test, dropped afterwards."""
    if _PG_SKIP:
        if os.environ.get("CI"):  # CI promises the PostgreSQL tests ran: a skip there would hide that they did not
            pytest.fail(_PG_SKIP)
        pytest.skip(_PG_SKIP)
    import psycopg

    name = "drb_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bridge.db'}"
    return request.getfixturevalue("pg_url")


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault-injection and bad-input suites' counts, where CI's log shows them."""
    faults = sys.modules.get("tests.test_faults")
    if faults is not None and faults.TALLY.runs:
        terminalreporter.write_line(faults.TALLY.summary())
    if BAD_INPUT:
        terminalreporter.write_line("bad input, each answered and survived: " + ", ".join(
            f"{n} {what}" for what, n in sorted(BAD_INPUT.items())))
