"""connect(autostart=True): one supervisor per address, whoever races."""

from __future__ import annotations

import os
import signal
import stat
import tempfile

import psutil
import pytest
from helpers import fork_ctx, wait_until
from workers import autostart_connect

import mppool
from mppool.address import key_path

pytestmark = pytest.mark.slow


@pytest.fixture
def address():
    d = tempfile.mkdtemp(prefix="mpa")
    addr = os.path.join(d, "s.sock")
    yield addr
    # Stop the detached supervisor this test caused to start, by its pid.
    try:
        c = mppool.connect(addr, timeout=0.5)
        pid = c.info()["pid"]
        c.close()
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not psutil.pid_exists(pid) or
                   psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
    except mppool.ServerUnavailable:
        pass


def test_racing_callers_share_one_supervisor(address, procs):
    ctx = fork_ctx()
    out = ctx.Queue()
    for _ in range(5):
        p = ctx.Process(target=autostart_connect, args=(address, out))
        procs.append(p)
        p.start()
    pids = {out.get(timeout=30) for _ in range(5)}
    assert len(pids) == 1
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    # the supervisor outlives the processes that started it
    assert psutil.pid_exists(pids.pop())
    assert stat.S_IMODE(os.stat(key_path(address)).st_mode) == 0o600
    c = mppool.connect(address, autostart=True)
    assert c.token_pool("t", 2).free() == 2
    c.close()


def test_stale_socket_of_crashed_supervisor_is_replaced(address):
    first = mppool.connect(address, autostart=True)
    pid = first.info()["pid"]
    first.close()
    os.kill(pid, signal.SIGKILL)  # crashes: leaves its socket and key file behind
    # A zombie's other threads may still hold its descriptors for a moment (the leader turns
    # zombie first): wait until its socket refuses connections, the state this test is about.
    wait_until(lambda: _refused(address), timeout=10, what="the dead supervisor's socket refusing")
    assert os.path.exists(address)
    second = mppool.connect(address, autostart=True)
    assert second.info()["pid"] != pid
    second.close()


def test_env_address_is_the_default(address, monkeypatch):
    monkeypatch.setenv("MPPOOL_ADDRESS", address)
    c = mppool.connect(autostart=True)
    assert c.info()["address"] == address
    c.close()


def _refused(address: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False
