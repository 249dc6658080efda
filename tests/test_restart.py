"""Starting a supervisor where one died, and what a detached supervisor keeps of its caller."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import stop_pid, wait_until

import mppool

pytestmark = pytest.mark.slow


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    d = tmp_path / "s"  # unix socket paths must stay short; tmp_path is private (0700)
    d.mkdir(mode=0o700)
    return d


def test_start_takes_over_the_leftovers_of_a_killed_supervisor(sockdir: Path) -> None:
    addr = str(sockdir / "s.sock")
    key = os.urandom(16)
    first = mppool.Server(addr, key).start()
    os.kill(first.pid, signal.SIGKILL)  # the supervisor this test started
    first._proc.wait(10)  # our child: reap it, without shutdown() (which would tidy up)
    for leftover in (addr, addr + ".lease", addr + ".key"):
        assert os.path.exists(leftover), leftover
    with mppool.Server(addr, key) as second:
        assert second.pid != first.pid
        with mppool.connect(addr, key) as c:
            assert c.info()["pid"] == second.pid
            tokens = c.token_pool("t", 2)
            tokens.put(tokens.get(timeout=5))  # the lease channel was taken over too
            assert tokens.free() == 2


def test_start_refuses_an_address_a_live_supervisor_serves(sockdir: Path) -> None:
    addr = str(sockdir / "s.sock")
    with mppool.Server(addr, os.urandom(16)) as first:
        with pytest.raises(mppool.ServerUnavailable, match="already serves") as info:
            mppool.Server(addr, os.urandom(16)).start()
        assert addr in str(info.value)
        with first.client() as c:  # untouched: socket, key file and all
            assert c.info()["pid"] == first.pid


@pytest.mark.parametrize("detach", [False, True])
def test_start_reports_the_supervisors_own_error(tmp_path: Path, detach: bool) -> None:
    # A path too long for a unix socket: the directory is fine, only bind() fails, in the
    # child. Its message used to go to the child's stderr only.
    d = tmp_path / ("d" * 60)
    d.mkdir(mode=0o700)
    addr = str(d / ("s" * 60 + ".sock"))
    t0 = time.monotonic()
    with pytest.raises(mppool.ServerUnavailable, match="path too long") as info:
        mppool.Server(addr, os.urandom(16)).start(detach=detach)
    assert time.monotonic() - t0 < 20
    assert "OSError" in str(info.value)


def test_start_in_a_missing_directory_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(mppool.ServerUnavailable, match="does not exist") as info:
        mppool.Server(str(missing / "s.sock"), os.urandom(16)).start()
    assert repr(str(missing)) in str(info.value)
    assert "Traceback" not in str(info.value)


PROG = """
import sys
import mppool
c = mppool.connect(sys.argv[1], autostart=True, timeout=10)
print(c.info()["pid"], flush=True)
print("the caller's stderr", file=sys.stderr, flush=True)
"""


def test_a_detached_supervisor_keeps_none_of_the_callers_descriptors(sockdir: Path) -> None:
    addr = str(sockdir / "s.sock")
    env = dict(os.environ, MPPOOL_LOG_LEVEL="INFO")
    env.pop("MPPOOL_ADDRESS", None)
    env.pop("MPPOOL_AUTHKEY", None)
    t0 = time.monotonic()
    pid = None
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(PROG), addr], capture_output=True,
                           text=True, timeout=20, env=env, stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        with mppool.connect(addr, timeout=2) as c:
            pid = c.info()["pid"]
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.split()[0]) == pid
        assert elapsed < 15, f"the caller's pipes stayed open for {elapsed:.1f} s"
        # Its descriptors 0, 1, 2: /dev/null, /dev/null, its own log file beside the socket.
        fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)}
        assert fds == {0: os.devnull, 1: os.devnull, 2: addr + ".log"}, fds
        assert stat.S_IMODE(os.stat(addr + ".log").st_mode) == 0o600
        wait_until(lambda: "file descriptor limit" in Path(addr + ".log").read_text(),
                   timeout=5, what="the supervisor's INFO lines in its log file")
        # No pipe or socket of ours survived in it: every pipe it holds is its own.
        mine = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")}
        theirs = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert not {x for x in theirs & mine if x.startswith(("pipe:", "socket:"))}
    finally:
        # Whatever happened, stop the supervisor it started (found through its key file).
        if pid is None:
            try:
                with mppool.connect(addr, timeout=2) as c:
                    pid = c.info()["pid"]
            except mppool.ServerUnavailable:
                pass
        if pid is not None:
            stop_pid(pid)
