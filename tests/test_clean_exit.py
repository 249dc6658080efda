"""A client that exits cleanly (close(), end of script) says Bye: the supervisor takes back the
leases it still held and logs that at INFO; a holder that dies without a word (SIGKILL) is
still a WARNING. Read from a real supervisor's log (`mppool serve`'s stderr)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

import mppool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reap")]

START_TIMEOUT = 30.0


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    d = Path(f"/tmp/mpbye-{os.getpid()}-{os.urandom(3).hex()}")  # short: unix socket paths
    d.mkdir(mode=0o700)
    address, log = str(d / "s.sock"), tmp_path / "supervisor.log"
    env = dict(os.environ, MPPOOL_LOG_LEVEL="INFO")
    env.pop("MPPOOL_ADDRESS", None)
    env.pop("MPPOOL_AUTHKEY", None)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mppool", "serve", "--address", address],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
    try:
        wait_until(lambda: "serving on" in log.read_text() or proc.poll() is not None,
                   timeout=START_TIMEOUT, interval=0.02, what="mppool serve to be ready")
        assert proc.poll() is None, log.read_text()
        yield address, log
    finally:
        proc.terminate()  # the pid this fixture started
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


HOLDER = """
import os, signal, sys
import mppool
client = mppool.connect(sys.argv[1])
token = client.token_pool("t", 4).get(timeout=10)
print(os.getpid(), flush=True)
how = sys.argv[2]
if how == "close":
    client.close()
elif how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
# "exit": the end of the script, the client never closed
"""


def _hold_and_leave(address: str, how: str) -> int:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(HOLDER), address, how],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if how == "kill":
        assert r.returncode == -signal.SIGKILL, r.stderr
    else:
        assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[0])


def _reclaim_line(log: Path, pid: int) -> str:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [ln for ln in log.read_text().splitlines()
                    if "pool 't'" in ln and f"pid {pid}" in ln]
        return bool(found)

    wait_until(seen, timeout=15, interval=0.02, what=f"the supervisor to log pid {pid}'s leases")
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("how", ["close", "exit"])
def test_a_clean_exit_is_logged_at_info(supervisor: tuple[str, Path], how: str) -> None:
    address, log = supervisor
    pid = _hold_and_leave(address, how)
    line = _reclaim_line(log, pid)
    assert re.search(r" INFO .*took back 1 lease", line), line
    assert "WARNING" not in log.read_text(), log.read_text()
    with mppool.connect(address) as client:  # and the token did come back
        assert client.stats()["t"]["nusing"] == 0


@pytest.mark.kill
def test_a_holder_killed_is_a_warning(supervisor: tuple[str, Path]) -> None:
    address, log = supervisor
    pid = _hold_and_leave(address, "kill")
    line = _reclaim_line(log, pid)
    assert re.search(r" WARNING .*reclaimed 1 lease.*went away", line), line
    with mppool.connect(address) as client:
        assert client.stats()["t"]["nusing"] == 0
