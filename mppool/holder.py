"""Who holds a lease: a process identified by pid *and* start time, so that a reused pid is
never mistaken for the holder.

The start time is counted from boot (``/proc/PID/stat`` field 22, in clock ticks), not read
from the wall clock: ``psutil.Process.create_time()`` adds the boot time that the kernel
reports in whole seconds of wall-clock time (``btime``), so a clock step of a second or more
would make every live holder look like a new process, hence dead, and the watchdog would hand
its units to somebody else. Where ``/proc`` is missing (macOS) psutil's value is the fallback.

On a unix socket the supervisor takes the peer's pid from the kernel (``SO_PEERCRED``) and
reads its start time itself: such a holder is *verified*, and only verified holders are ever
sent a signal (``kill_holder``). Over TCP the pid is what the client claims.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import psutil

HOSTNAME = socket.gethostname()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_start(pid: int) -> float | None:
    """Seconds from boot to the start of ``pid``, from /proc (0.0: no such process); None
    where there is no /proc. Any other OSError (out of descriptors) propagates: unknown is
    not dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0 if os.path.isdir("/proc/self") else None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19]) / _TICKS  # field 22 of the whole line


def process_start(pid: int) -> float:
    """``pid``'s start time (0.0 if there is no such process), immune to clock steps."""
    start = _proc_start(pid)
    if start is not None:
        return start
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0


def _same_start(a: float, b: float) -> bool:
    return abs(a - b) <= 1.5 / _TICKS


# The connection id of the leases the supervisor's fast-path region holds on behalf of its
# clients (mppool.supervisor.fastregion): who holds each of those tokens, and for how long,
# is tracked in the region, so the core Pool's lease limits (max_using_delay...) skip them.
REGION_CONN = -1


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    start: float  # process_start(pid)
    host: str
    conn: int = 0  # supervisor-side id of the client connection, 0 when in-process
    verified: bool = False  # pid and start read by the supervisor itself, not claimed

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "host": self.host, "conn": self.conn,
                "verified": self.verified}

    def alive(self) -> bool:
        """True unless this exact process (pid + start time) is known to be gone."""
        if self.host != HOSTNAME:
            return True  # cannot see it from here: its connection tells us instead
        try:
            start = process_start(self.pid)
        except (OSError, psutil.Error):
            return True  # cannot tell (out of descriptors, say): never declare it dead
        if not start or (self.start and not _same_start(start, self.start)):
            return False  # gone, or a new process under a reused pid (start 0.0: unknown)
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True

    def is_process(self, proc: psutil.Process) -> bool:
        """Whether ``proc`` is still this holder (not a new process with a reused pid)."""
        try:
            return proc.pid == self.pid and _same_start(process_start(proc.pid), self.start)
        except (OSError, psutil.Error):
            return False  # cannot tell: never signal a process we are not sure of


def peer_holder(sock: socket.socket, claimed_pid: int, claimed_start: float, claimed_host: str,
                conn_id: int) -> Holder:
    """The holder at the other end of ``sock``: the kernel's word on unix sockets."""
    if sock.family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        try:
            start = process_start(pid)
        except (OSError, psutil.Error):
            start = claimed_start if claimed_pid == pid else 0.0
        return Holder(pid, start, HOSTNAME, conn_id, verified=True)
    return Holder(claimed_pid, claimed_start, claimed_host, conn_id)


_local: Holder | None = None
_local_lock = threading.Lock()


def current_holder() -> Holder:
    """This process as a holder; /proc is read once per process, not per lease."""
    global _local
    h = _local
    if h is not None:
        return h
    with _local_lock:
        pid = os.getpid()
        _local = Holder(pid, process_start(pid), HOSTNAME, verified=True)
        return _local


def _forget_in_child() -> None:
    global _local, _local_lock
    _local = None
    _local_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
