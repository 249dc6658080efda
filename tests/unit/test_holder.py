"""Holders (``mppool.holder``): a process is its pid *and* its start time.

No process is started: the odd command name is given to a thread of this process (a thread
has a /proc/TID/stat of its own, read by the same parser), and the peer of a socket pair is
this process itself.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from mppool import holder as H
from mppool.holder import HOSTNAME, Holder, current_holder, peer_holder, process_start

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

TICK = 1 / os.sysconf("SC_CLK_TCK")


def stat_field_22(pid: int) -> float:
    """starttime, field 22 of /proc/PID/stat, in seconds: the line is cut after the command
    name read from /proc/PID/comm, which may hold spaces and parentheses."""
    with open(f"/proc/{pid}/comm", "rb") as f:
        comm = f.read()[:-1]
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    prefix = b"%d (%s) " % (pid, comm)
    assert stat.startswith(prefix)
    fields = stat[len(prefix):].split()  # from field 3 on
    return int(fields[22 - 3]) / os.sysconf("SC_CLK_TCK")


def unused_pid() -> int:
    """A pid with no process (or thread) behind it, from the top of the pid range, where
    new pids are handed out last."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    for pid in range(pid_max - 1, pid_max - 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid near pid_max")


# --------------------------------------------------------------------------- process_start


def test_process_start_is_field_22_of_stat_over_clock_ticks() -> None:
    pid = os.getpid()
    assert process_start(pid) == stat_field_22(pid)
    # psutil counts the same ticks, from the boot time instead of from boot.
    assert abs(process_start(pid) - (psutil.Process(pid).create_time() - psutil.boot_time())) < TICK


def test_process_start_of_the_parent_and_of_init() -> None:
    for pid in (os.getppid(), 1):
        if os.path.exists(f"/proc/{pid}/stat"):
            assert process_start(pid) == stat_field_22(pid)


def test_process_start_of_no_process_is_zero() -> None:
    assert process_start(unused_pid()) == 0.0


@pytest.fixture
def odd_thread() -> Iterator[tuple[int, float, float]]:
    """A thread named ``a) (b c) d`` (what /proc/TID/comm holds): its tid, and the boot
    clock just before and after it started."""
    named, stop = threading.Event(), threading.Event()
    box: dict[str, int] = {}

    def run() -> None:
        tid = threading.get_native_id()
        with open(f"/proc/self/task/{tid}/comm", "w") as f:
            f.write("a) (b c) d")
        box["tid"] = tid
        named.set()
        stop.wait(10)

    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert named.wait(5)
        after = time.clock_gettime(time.CLOCK_BOOTTIME)
        yield box["tid"], before, after
    finally:
        stop.set()
        t.join(5)


def test_a_command_name_with_spaces_and_parentheses(odd_thread: tuple[int, float, float]) -> None:
    tid, before, after = odd_thread
    with open(f"/proc/{tid}/comm", "rb") as f:
        assert f.read() == b"a) (b c) d\n"
    with open(f"/proc/{tid}/stat", "rb") as f:
        stat = f.read()
    assert b"(a) (b c) d)" in stat
    start = process_start(tid)
    assert start == stat_field_22(tid)
    # A parser that split the whole line at spaces would have read another field.
    assert stat.split()[21] != str(round(start / TICK)).encode()
    assert before - TICK <= start <= after + TICK


# --------------------------------------------------------------------------- Holder.alive


def me(start: float | None = None, host: str = HOSTNAME) -> Holder:
    pid = os.getpid()
    return Holder(pid, process_start(pid) if start is None else start, host)


def test_this_process_is_alive() -> None:
    assert me().alive()
    assert current_holder().alive()


def test_a_pid_with_no_process_is_dead() -> None:
    pid = unused_pid()
    assert not Holder(pid, 1234.5, HOSTNAME).alive()
    assert not Holder(pid, 0.0, HOSTNAME).alive()


def test_a_reused_pid_is_not_the_holder() -> None:
    """Same pid, another start time: another process, so the holder is gone."""
    start = process_start(os.getpid())
    assert not me(start + 10.0).alive()
    assert not me(start - 10.0).alive()
    assert not me(start + 2 * TICK).alive()
    assert me(start + TICK).alive()  # within a tick: the same process, rounded


def test_an_unknown_start_is_not_compared() -> None:
    assert me(0.0).alive()


def test_a_holder_on_another_host_is_never_declared_dead_from_here() -> None:
    assert Holder(unused_pid(), 1.0, HOSTNAME + "-elsewhere").alive()
    assert Holder(os.getpid(), 1.0, "other-host").alive()


def test_unknown_is_not_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    """When /proc cannot be read (out of descriptors), a holder is presumed alive."""
    def no_fds(pid: int) -> float | None:
        raise OSError(24, "Too many open files")

    holder = Holder(unused_pid(), 1.0, HOSTNAME)
    monkeypatch.setattr(H, "_proc_start", no_fds)
    assert holder.alive()
    assert not holder.is_process(psutil.Process(os.getpid()))  # and never signalled


def test_is_process() -> None:
    proc = psutil.Process(os.getpid())
    assert me().is_process(proc)
    assert not me(process_start(os.getpid()) + 10.0).is_process(proc)
    assert not Holder(os.getppid(), process_start(os.getpid()), HOSTNAME).is_process(proc)


def test_current_holder_is_this_process_verified_and_cached() -> None:
    h = current_holder()
    assert (h.pid, h.start, h.host, h.conn, h.verified) == (
        os.getpid(), process_start(os.getpid()), HOSTNAME, 0, True)
    assert current_holder() is h


def test_as_dict() -> None:
    h = Holder(12, 3.5, "host", 4, verified=True)
    assert h.as_dict() == {"pid": 12, "start": 3.5, "host": "host", "conn": 4, "verified": True}


# --------------------------------------------------------------------------- peer_holder


def test_peer_on_a_unix_socket_is_the_kernels_word() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        h = peer_holder(a, claimed_pid=os.getpid() + 1, claimed_start=1.0,
                        claimed_host="liar", conn_id=9)
    pid = os.getpid()
    assert h == Holder(pid, process_start(pid), HOSTNAME, 9, verified=True)


def test_peer_over_tcp_is_what_it_claims() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()):
        peer, _ = server.accept()
        with peer:
            h = peer_holder(peer, claimed_pid=4242, claimed_start=17.5,
                            claimed_host="remote-host", conn_id=3)
    assert h == Holder(4242, 17.5, "remote-host", 3, verified=False)
