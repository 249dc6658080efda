"""The control plane under peers that never authenticate and under descriptor exhaustion."""

from __future__ import annotations

import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from multiprocess.connection import Client as MPClient
from multiprocess.connection import Listener

import mppool
from mppool.supervisor import raise_nofile_limit
from mppool.supervisor.acceptor import ControlAcceptor, serve_authenticated

pytestmark = pytest.mark.slow


def _connect_raw(address: str, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(address)
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket) -> bool:
    """True once the supervisor has closed its end (EOF after whatever it sent)."""
    try:
        while True:
            data = s.recv(4096, socket.MSG_DONTWAIT)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset: closed too


def test_silent_peers_neither_stop_the_control_plane_nor_linger(server, client) -> None:
    silent = _connect_raw(server.address, 100)
    try:
        t0 = time.monotonic()
        assert client.stats() == {}
        with mppool.connect(server.address, server.authkey, timeout=2) as fresh:
            assert fresh.info()["pid"] == server.pid
        assert time.monotonic() - t0 < 2.0
        # All 100 closed by the supervisor: at once beyond the 64 that may be pending, the
        # rest at the 5 s handshake deadline.
        wait_until(lambda: all(_closed_by_peer(s) for s in silent), timeout=8, interval=0.05,
                   what="the supervisor to close every silent connection")
        assert time.monotonic() - t0 < 7.0
        assert client.stats() == {}
    finally:
        for s in silent:
            s.close()


def test_a_peer_trickling_bytes_is_cut_off_at_the_deadline(server, client) -> None:
    """The deadline is on the whole handshake, not per read."""
    s = _connect_raw(server.address, 1)[0]
    try:
        t0 = time.monotonic()
        closed = False
        s.send(b"\x00\x00\x00\xc8")  # a frame of 200 bytes (under the 256 allowed) ...
        while time.monotonic() - t0 < 9 and not closed:
            try:
                s.send(b"\x00")  # ... sent one byte every 0.5 s: never complete in time
            except OSError:
                closed = True
                break
            closed = _closed_by_peer(s)
            time.sleep(0.5)  # the pace of the attack, not a wait for a result
        assert closed and time.monotonic() - t0 < 7.0
    finally:
        s.close()


NOFILE = 40
WRAPPER = ("import resource, sys; n = int(sys.argv.pop(1)); "
           "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
           "from mppool.supervisor import main; main()")


@pytest.fixture
def low_fd_supervisor(tmp_path: Path) -> Iterator[tuple[str, bytes, Path]]:
    """A supervisor whose hard (so also soft) fd limit is NOFILE, logging to a file."""
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    addr, key, logfile = str(d / "s.sock"), os.urandom(16), tmp_path / "supervisor.log"
    env = dict(os.environ, MPPOOL_AUTHKEY=key.hex())
    env.pop("MPPOOL_ADDRESS", None)
    with open(logfile, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(NOFILE), "--address", addr,
                                 "--parent", str(os.getpid())], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log, env=env)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().decode() if ready else ""
        assert line.startswith("READY"), (line, logfile.read_text())
        yield addr, key, logfile
    finally:
        proc.terminate()  # the pid this fixture started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_out_of_descriptors_existing_clients_work_new_ones_are_refused(low_fd_supervisor) -> None:
    addr, key, logfile = low_fd_supervisor
    old = mppool.connect(addr, key)
    tokens = old.token_pool("t", 2)
    tokens.put(tokens.get(timeout=5))
    hog = _connect_raw(addr, NOFILE + 10)  # more connections than it has descriptors
    try:
        t0 = time.monotonic()
        # Refused promptly, with the reserve descriptor, not left hanging in the backlog.
        with pytest.raises(mppool.ServerUnavailable):
            mppool.connect(addr, key, timeout=2)
        assert time.monotonic() - t0 < 4.0
        # Existing clients keep working, control plane and lease channel alike.
        assert old.stats()["t"]["max_size"] == 2
        tokens.put(tokens.get(timeout=5))
        time.sleep(1.5)  # let exhaustion last: the log must stay quiet meanwhile
        assert old.info()["pid"]
    finally:
        for s in hog:
            s.close()
    # Once they are gone, new clients get in again.
    def fresh_ok() -> bool:
        try:
            with mppool.connect(addr, key, timeout=2) as c:
                return bool(c.stats())
        except mppool.ServerUnavailable:
            return False
    wait_until(fresh_ok, timeout=10, interval=0.1, what="a new client to get in again")
    # Log records (not traceback lines) of the control plane and the parent watch: at most
    # about one a second each, however many connections were refused meanwhile.
    records = [ln for ln in logfile.read_text().splitlines() if " mppool[" in ln]
    emfile = [ln for ln in records if "file descriptors" in ln]
    assert 1 <= len(emfile) <= 8, emfile
    control = [ln for ln in records if "control" in ln or "parent" in ln]
    assert len(control) <= 16, control
    old.close()


def test_a_thread_that_cannot_start_costs_only_its_connection(tmp_path: Path) -> None:
    """In-process: the acceptor with a thread start that fails (as at the thread limit)."""
    addr, key = str(tmp_path / "c.sock"), os.urandom(16)
    listener = Listener(addr, backlog=16)
    served: list[object] = []
    failing = threading.Event()
    failing.set()

    def start_thread(t: threading.Thread) -> None:
        if failing.is_set():
            raise RuntimeError("can't start new thread")
        t.start()

    stop = threading.Event()
    acc = ControlAcceptor(listener, key, lambda c: (served.append(c), c.close()), stop,
                          start_thread=start_thread)
    acc.start()
    try:
        with pytest.raises((EOFError, OSError)):
            MPClient(addr, authkey=key)  # accepted, then closed: no thread to serve it
        wait_until(lambda: acc.nrefused == 1, timeout=5)
        failing.clear()
        MPClient(addr, authkey=key).close()  # the loop lived on
        wait_until(lambda: len(served) == 1, timeout=5)
        assert acc.pending() == 0
    finally:
        stop.set()
        listener.close()


def test_serve_authenticated_runs_the_request_without_a_second_challenge() -> None:
    class FakeServer:
        public = ("echo",)

        def echo(self, conn: object, x: int) -> int:
            return x + 1

    a, b = socket.socketpair()
    from multiprocess.connection import Connection

    mine, theirs = Connection(a.detach()), Connection(b.detach())
    mine.send((None, "echo", (41,), {}))
    serve_authenticated(FakeServer(), theirs)
    assert mine.recv() == ("#RETURN", 42)
    assert theirs.closed
    mine.close()


def test_the_soft_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        n = raise_nofile_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == n
        assert n >= min(hard, 256) and (hard == resource.RLIM_INFINITY or n == hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
