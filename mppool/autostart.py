"""``connect(autostart=True)``: exactly one supervisor per address, however many racers.

Under the lock beside the socket (`mppool.addrlock`), a caller either finds a live supervisor (a control
connection succeeds) or removes what a crashed one left and starts a detached one. The
socket's directory is created private (0700) if missing, and checked private in any case.
The detached supervisor keeps none of the caller's descriptors and logs to ``<socket>.log``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from multiprocess.connection import Client as MPClient
from multiprocess.context import AuthenticationError

from .address import (
    Address,
    beside,
    client_authkey,
    display,
    parse_authkey,
    require_address_dir,
    server_authkey,
)
from .addrlock import AddressLock, remove_if_unused
from .errors import ServerUnavailable
from .launch import launch, take_over

log = logging.getLogger("mppool")


def lock_path(address: Address) -> Path:
    return beside(address, ".lock")


def remove_lock_file(address: Address) -> None:
    """Remove the lock file after a clean stop, unless somebody holds it now (it is taken
    without waiting and removed while held: see addrlock.py for why that is safe)."""
    remove_if_unused(lock_path(address))


def _alive(address: Address, key: bytes | None) -> bool:
    if key is None:
        return False
    try:
        MPClient(address, authkey=key).close()
        return True
    except AuthenticationError:
        raise ServerUnavailable(f"supervisor at {display(address)} refused the key") from None
    except (OSError, EOFError):
        return False


def ensure_supervisor(address: Address, authkey: object, timeout: float) -> bytes:
    """Return the key of the supervisor serving ``address``, starting one if none is."""

    given = parse_authkey(authkey)
    # Before the lock file is created in it. A missing directory is refused, not created:
    # a mistyped path would otherwise start a supervisor nobody else finds.
    require_address_dir(address)
    lock = AddressLock(lock_path(address))
    lock.acquire(timeout=max(timeout, 30.0))
    try:
        key = client_authkey(given, address)
        if _alive(address, key):
            return key  # type: ignore[return-value]
        # Under the lock, so that no other autostart removes what this one starts. A live
        # supervisor whose key we do not have is not removed: take_over() refuses.
        take_over(address)
        key = server_authkey(given)
        started = launch(address, key, detach=True)
        log.info("mppool: started supervisor pid %s at %s", started.pid, display(started.address))
        return key
    finally:
        lock.release()
