"""Who holds a lease: a process identified by pid *and* start time, so a reused pid is
never mistaken for the holder."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    start: float  # psutil create_time(), seconds since the epoch
    host: str
    conn: int = 0  # supervisor-side id of the client connection, 0 when in-process

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "host": self.host, "conn": self.conn}

    def alive(self) -> bool:
        """True unless this exact process (pid + start time) is known to be gone."""
        if self.host != HOSTNAME:
            return True  # cannot see it from here: its connection tells us instead
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.start) > 0.01:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:
            return True


HOSTNAME = socket.gethostname()
_local: Holder | None = None
_local_lock = threading.Lock()


def process_start(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def current_holder() -> Holder:
    """This process as a holder; psutil is asked once per process, not per lease."""
    global _local
    h = _local
    if h is not None:
        return h
    with _local_lock:
        pid = os.getpid()
        _local = Holder(pid, process_start(pid), HOSTNAME)
        return _local


def _forget_in_child() -> None:
    global _local, _local_lock
    _local = None
    _local_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
