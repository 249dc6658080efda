"""Nothing is left beside a socket once its supervisor has stopped, however it stopped: no
``<socket>.lock`` after a clean stop, no empty private directory after the process that
started the supervisor (a gunicorn arbiter) was SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import free_port, http_get, wait_until

import mppool

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).parent / "gunicorn_app"


def test_no_lock_file_after_server_shutdown(sockdir):
    address = str(sockdir / "s.sock")
    server = mppool.Server(address).start()
    try:
        # An autostart caller finds it under the lock, which creates the lock file.
        mppool.connect(address, server.authkey, autostart=True).close()
        assert os.path.exists(address + ".lock")
    finally:
        server.shutdown()
    assert sorted(os.listdir(sockdir)) == []


def test_no_lock_file_after_an_autostarted_supervisor_is_stopped(sockdir):
    address = str(sockdir / "s.sock")
    with mppool.connect(address, autostart=True) as client:
        pid = client.info()["pid"]
        assert os.path.exists(address + ".lock")
        client.stop()
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
               timeout=15, what="the supervisor to stop")
    # Its log file (a detached supervisor's stderr) is kept on purpose: it says why it stopped.
    assert sorted(os.listdir(sockdir)) == ["s.sock.log"]


def test_a_held_lock_file_is_not_removed(sockdir):
    from mppool.addrlock import AddressLock

    address = str(sockdir / "s.sock")
    lock = AddressLock(address + ".lock")
    lock.acquire(timeout=0)  # an autostart on its way to start a supervisor here
    try:
        server = mppool.Server(address).start()
        server.shutdown()
        assert os.path.exists(address + ".lock")
    finally:
        lock.release()


def _gunicorn_supervisor(arbiter: psutil.Process, other_than: int = 0) -> psutil.Process | None:
    for p in arbiter.children():
        try:
            if p.pid != other_than and "mppool.supervisor" in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            pass
    return None


@pytest.mark.gunicorn
@pytest.mark.kill
@pytest.mark.timeout(90)
@pytest.mark.parametrize("restarted", [False, True], ids=["first", "restarted"])
def test_no_private_directory_after_the_gunicorn_arbiter_is_sigkilled(tmp_path, restarted):
    """``restarted``: the supervisor was SIGKILLed first and the arbiter's watcher started a
    new one at the same address: that one must remove the directory too."""
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn, "gunicorn is a test dependency"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APP_DIR), *sys.path]))
    for name in ("MPPOOL_ADDRESS", "MPPOOL_AUTHKEY"):
        env.pop(name, None)  # Server(None): a fresh socket in a private directory
    with open(tmp_path / "gunicorn.log", "w") as log:
        proc = subprocess.Popen([gunicorn, "-c", str(APP_DIR / "gunicorn.conf.py"), "-w", "1",
                                 "-b", f"127.0.0.1:{port}", "restart_app:app"],
                                cwd=APP_DIR, env=env, stdout=subprocess.DEVNULL, stderr=log)
    arbiter = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        wait_until(lambda: _ok(port), timeout=30, interval=0.05, what="gunicorn serving")
        sup = _gunicorn_supervisor(arbiter)
        assert sup is not None
        cmd = sup.cmdline()
        address = cmd[cmd.index("--address") + 1]
        directory = os.path.dirname(address)
        assert os.path.isdir(directory) and os.path.basename(directory).startswith("mppool-")
        if restarted:
            sup.kill()  # the supervisor gunicorn started for this test
            sup = wait_until(lambda: _gunicorn_supervisor(arbiter, other_than=sup.pid),
                             timeout=20, interval=0.05, what="the watcher to restart it")
            wait_until(lambda: _ok(port), timeout=20, interval=0.05, what="serving again")
        started = arbiter.children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # the arbiter this test started: on_exit never runs
        proc.wait(10)
        # The supervisor sees its parent gone and stops; the worker sees it too.
        _, alive = psutil.wait_procs(started, timeout=20)
        assert not alive, f"still running: {[p.pid for p in alive]}"
        assert not os.path.exists(directory), os.listdir(directory)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for p in started:  # processes this test started, by pid
            if p.is_running():
                p.kill()


def _ok(port: int) -> bool:
    try:
        return http_get(port, 10)[0] == 200
    except OSError:
        return False
