"""Test-suite plumbing shared by every test.

- Hang guard: a test still running shortly before pytest-timeout's limit gets every thread's
  stack dumped by ``faulthandler`` (a C-level watchdog thread, so it works even when the main
  thread is stuck in C code), written to the real stderr, not to pytest's capture.
- Services: the ``postgres_dsn``, ``mysql_dsn`` (MariaDB, through PyMySQL) and ``redis_url``
  fixtures, and the ``postgres``/``mysql``/``redis`` markers, check the real servers (TCP
  connect + a real query, 2 s timeout). A missing service skips the test with the reason, or
  fails it when ``MPPOOL_REQUIRE_SERVICES=1`` (as in CI). ``MPPOOL_PG_DSN``,
  ``MPPOOL_MYSQL_URL`` and ``MPPOOL_REDIS_URL`` override where the servers are.
- ``reap``: kills the child processes a test started and left running (by pid, never by
  name) and fails that test.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

import mppool

# --------------------------------------------------------------------------------------------
# Hang guard
# --------------------------------------------------------------------------------------------

_dump_fd: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _dump_fd
    # Capture is suspended while pytest_configure runs, so fd 2 is the real stderr here (under
    # pytest-xdist: the worker's inherited stderr, i.e. the terminal or the CI log).
    stream = sys.__stderr__
    if stream is not None:
        try:
            _dump_fd = os.dup(stream.fileno())
        except (OSError, ValueError):
            _dump_fd = None


def pytest_unconfigure(config: pytest.Config) -> None:
    global _dump_fd
    if _dump_fd is not None:
        faulthandler.cancel_dump_traceback_later()
        os.close(_dump_fd)
        _dump_fd = None


def _test_timeout(item: pytest.Item) -> float:
    """pytest-timeout's limit for this item (marker, then --timeout / ini), 0 for none."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
        if value is not None:
            return float(value)
    try:
        value = item.config.getoption("timeout")
    except ValueError:
        value = None
    if value is None:
        try:
            value = item.config.getini("timeout")
        except ValueError:
            value = None
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    override = os.environ.get("MPPOOL_TEST_STACK_DUMP_AFTER")  # seconds; 0 turns the guard off
    if override:
        delay = float(override)
    else:
        # Shortly before pytest-timeout fails the test, so that both reports are seen.
        limit = _test_timeout(item)
        delay = limit - min(5.0, limit * 0.1) if limit > 0 else 0.0
    if _dump_fd is None or delay <= 0:
        return (yield)
    faulthandler.dump_traceback_later(delay, repeat=False, file=_dump_fd, exit=False)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------------

PROBE_TIMEOUT = 2.0
DEFAULT_PG_DSNS = (
    "postgresql://postgres@127.0.0.1:5432/test",
    # libpq's default user (PGUSER, else the current OS user), in case there is no "postgres".
    "postgresql://127.0.0.1:5432/test",
)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/test"


def services_required() -> bool:
    return os.environ.get("MPPOOL_REQUIRE_SERVICES", "").strip() == "1"


@dataclass(frozen=True)
class _Probe:
    ok: bool
    target: str  # the DSN / URL that worked, or the one reported in the error
    error: str = ""


_probes: dict[str, _Probe] = {}  # per process: one probe per service per xdist worker


def _tcp_check(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
        pass


def _probe_postgres_dsn(dsn: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    port = int(str(params.get("port") or 5432).split(",")[0])
    if not host.startswith("/"):  # a unix socket directory has no TCP port to try
        _tcp_check(host.split(",")[0], port)
    with psycopg.connect(
        dsn, connect_timeout=int(PROBE_TIMEOUT), application_name="mppool-test-probe"
    ) as conn:
        conn.execute(f"SET statement_timeout = {int(PROBE_TIMEOUT * 1000)}")
        row = conn.execute("select 1").fetchone()
        if row != (1,):
            raise RuntimeError(f"'select 1' returned {row!r}")


def _probe_postgres() -> _Probe:
    override = os.environ.get("MPPOOL_PG_DSN")
    candidates = (override,) if override else DEFAULT_PG_DSNS
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        return _Probe(False, candidates[0], f"psycopg is not installed ({exc})")
    errors = []
    for dsn in candidates:
        try:
            _probe_postgres_dsn(dsn)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc).strip()}")
            if isinstance(exc, OSError):  # TCP refused/timed out: another user will not help
                break
        else:
            return _Probe(True, dsn)
    return _Probe(False, candidates[0], "; ".join(errors))


def _probe_redis() -> _Probe:
    url = os.environ.get("MPPOOL_REDIS_URL") or DEFAULT_REDIS_URL
    try:
        import redis
    except ImportError as exc:
        return _Probe(False, url, f"redis-py is not installed ({exc})")
    try:
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss"):
            _tcp_check(parts.hostname or "127.0.0.1", parts.port or 6379)
        with redis.Redis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT
        ) as client:
            if client.ping() is not True:
                raise RuntimeError("PING did not answer PONG")
    except Exception as exc:
        return _Probe(False, url, f"{type(exc).__name__}: {str(exc).strip()}")
    return _Probe(True, url)


def mysql_connect_args(url: str) -> dict[str, Any]:
    """PyMySQL's ``connect()`` keywords for a ``mysql://user:password@host:port/database`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "mysql":
        raise ValueError(f"MPPOOL_MYSQL_URL must be a mysql:// URL, got {url!r}")
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 3306,
            "user": parts.username or "root", "password": parts.password or "",
            "database": parts.path.lstrip("/") or "test"}


def _probe_mysql() -> _Probe:
    url = os.environ.get("MPPOOL_MYSQL_URL") or DEFAULT_MYSQL_URL
    try:
        import pymysql
    except ImportError as exc:
        return _Probe(False, url, f"PyMySQL is not installed ({exc})")
    try:
        args = mysql_connect_args(url)
        _tcp_check(args["host"], args["port"])
        conn = pymysql.connect(**args, connect_timeout=PROBE_TIMEOUT, read_timeout=PROBE_TIMEOUT)
        try:
            with conn.cursor() as cur:
                cur.execute("select 1")
                row = cur.fetchone()
            if row != (1,):
                raise RuntimeError(f"'select 1' returned {row!r}")
        finally:
            conn.close()
    except Exception as exc:
        return _Probe(False, url, f"{type(exc).__name__}: {str(exc).strip()}")
    return _Probe(True, url)


_SERVICES: dict[str, tuple[str, Callable[[], _Probe]]] = {
    "postgres": ("PostgreSQL", _probe_postgres),
    "mysql": ("MariaDB", _probe_mysql),
    "redis": ("Redis", _probe_redis),
}


def _where(target: str) -> str:
    parts = urlsplit(target)
    if parts.scheme and parts.hostname:
        return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    return target


def require_service(name: str) -> str:
    """Return the DSN/URL of service ``name`` if it answers; else skip (or fail if required)."""
    label, probe = _SERVICES[name]
    result = _probes.get(name)
    if result is None:
        result = _probes[name] = probe()
    if result.ok:
        return result.target
    reason = f"{label} not reachable at {_where(result.target)}: {result.error}"
    if services_required():
        pytest.fail(f"MPPOOL_REQUIRE_SERVICES=1 and {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in _SERVICES:
        if item.get_closest_marker(name) is not None:
            require_service(name)


def pytest_report_header(config: pytest.Config) -> str:
    required = "required (missing = failure)" if services_required() else "optional (missing = skip)"
    pg = os.environ.get("MPPOOL_PG_DSN") or " or ".join(DEFAULT_PG_DSNS)
    rd = os.environ.get("MPPOOL_REDIS_URL") or DEFAULT_REDIS_URL
    my = os.environ.get("MPPOOL_MYSQL_URL") or DEFAULT_MYSQL_URL
    return f"mppool services: {required}; postgres={pg}; mysql={my}; redis={rd}"


@pytest.fixture
def postgres_dsn() -> str:
    """A libpq URL (database ``test``) that answered ``select 1``; works with psycopg 3 and 2."""
    return require_service("postgres")


@pytest.fixture
def mysql_dsn() -> str:
    """A ``mysql://`` URL (MariaDB, database ``test``) that answered ``select 1`` through
    PyMySQL; ``mysql_connect_args(url)`` turns it into ``pymysql.connect`` keywords."""
    return require_service("mysql")


@pytest.fixture
def mysql_kwargs(mysql_dsn: str) -> dict[str, Any]:
    """``pymysql.connect`` keywords for the ``mysql_dsn`` server."""
    return mysql_connect_args(mysql_dsn)


@pytest.fixture
def redis_url() -> str:
    """A ``redis://`` URL that answered ``PING``."""
    return require_service("redis")


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------

REAP_GRACE = 2.0  # seconds a leftover child gets to exit on its own before it is killed


def _helper_pids() -> set[int]:
    """Long-lived helpers that multiprocessing/multiprocess start once per interpreter."""
    pids: set[int] = set()
    for modname in ("multiprocessing", "multiprocess"):
        for sub, attr, pid_attr in (
            ("resource_tracker", "_resource_tracker", "_pid"),
            ("forkserver", "_forkserver", "_forkserver_pid"),
        ):
            module = sys.modules.get(f"{modname}.{sub}")
            holder = getattr(module, attr, None) if module is not None else None
            pid = getattr(holder, pid_attr, None) if holder is not None else None
            if isinstance(pid, int):
                pids.add(pid)
    return pids


def _living_children() -> dict[tuple[int, float], psutil.Process]:
    """This process's descendants that are still running, keyed by (pid, create_time)."""
    found: dict[tuple[int, float], psutil.Process] = {}
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[(proc.pid, proc.create_time())] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())[:200]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        cmd = "?"
    return f"pid {proc.pid} ({cmd})"


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process is gone or a zombie; return those still running.

    Polls instead of waiting on them, so that their exit status is left for whoever owns them
    (a multiprocessing.Process that is joined later must still find its child to reap).
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


@pytest.fixture
def reap() -> Generator[None, None, None]:
    """Fail the test if it leaves child processes running; kill those (by pid) first.

    Request it before fixtures that start processes on purpose for the whole session, so
    that they are not counted as the test's own.
    """
    before = set(_living_children())
    yield
    deadline = time.monotonic() + REAP_GRACE
    while True:
        helpers = _helper_pids()
        left = {k: p for k, p in _living_children().items() if k not in before and k[0] not in helpers}
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if not left:
        return
    described = [_describe(p) for p in left.values()]
    procs = list(left.values())
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil checks the create time, so a reused pid is never hit
    alive = _wait_gone(procs, timeout=5.0)
    note = f"; still alive after SIGKILL: {[p.pid for p in alive]}" if alive else ""
    pytest.fail(
        f"test left {len(procs)} child process(es) running (killed by pid): " + ", ".join(described) + note,
        pytrace=False,
    )


# ---------------------------------------------------------------- supervisors and processes


@pytest.fixture
def server() -> Iterator[mppool.Server]:
    srv = mppool.Server().start()
    try:
        yield srv
    finally:
        srv.shutdown()


@pytest.fixture
def client(server: mppool.Server) -> Iterator[Any]:
    c = mppool.connect(server.address, server.authkey)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes a test starts; whatever is still alive at the end is killed, by pid."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)


@pytest.fixture
def sockdir(tmp_path: Path) -> Iterator[Path]:
    """A directory for sockets: unix socket paths must stay under ~100 characters."""
    if len(str(tmp_path / "mppool.sock.lease")) < 100:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="mp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
