"""Where a supervisor listens and where its key lives.

A filesystem path is a unix socket; ``"host:port"`` or ``(host, port)`` is TCP. The authkey
comes from the caller, else ``MPPOOL_AUTHKEY`` (hex), else the key file written beside the
socket with mode 0600.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

Address = str | tuple[str, int]

_HOSTPORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^/:\s]*):(?P<port>\d{1,5})$")


def parse_address(address: object) -> Address:
    """Normalise a user-given address; ValueError/TypeError name the bad value."""
    if isinstance(address, tuple):
        if (len(address) != 2 or not isinstance(address[0], str)
                or isinstance(address[1], bool) or not isinstance(address[1], int)
                or not 0 <= address[1] <= 65535):
            raise ValueError(f"address must be (host, port) with 0 <= port <= 65535, got {address!r}")
        return (address[0] or "127.0.0.1", address[1])
    if isinstance(address, os.PathLike):
        address = os.fspath(address)
    if not isinstance(address, str):
        raise TypeError(f"address must be a socket path, 'host:port' or (host, port), got {address!r}")
    m = _HOSTPORT.match(address)
    if m:
        port = int(m["port"])
        if port > 65535:
            raise ValueError(f"address port must be <= 65535, got {address!r}")
        return (m["host"].strip("[]") or "127.0.0.1", port)
    if address and ("/" in address or address.endswith(".sock")):
        return address
    raise ValueError(f"address must be a filesystem path (a unix socket) or host:port, got {address!r}")


def runtime_dir() -> Path:
    """A private (0700) per-user directory for default sockets and keys."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = Path(base) / "mppool" if base and os.access(base, os.W_OK) else \
        Path(tempfile.gettempdir()) / f"mppool-{os.getuid()}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if d.stat().st_uid != os.getuid():
        raise PermissionError(f"{d} belongs to another user; set MPPOOL_ADDRESS")
    return d


def default_address() -> Address:
    env = os.environ.get("MPPOOL_ADDRESS")
    if env:
        return parse_address(env)
    return str(runtime_dir() / "mppool.sock")


def fresh_address() -> str:
    return str(Path(tempfile.mkdtemp(prefix="mppool-")) / "mppool.sock")


def key_path(address: Address) -> Path:
    if isinstance(address, str):
        return Path(address + ".key")
    host, port = address
    return runtime_dir() / f"tcp-{host.replace(':', '_')}-{port}.key"


def lease_address(address: Address) -> Address:
    """The supervisor's get/put channel: a sibling socket, or a free port on the same host."""
    if isinstance(address, str):
        return address + ".lease"
    return (address[0], 0)


def display(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def parse_authkey(authkey: object, name: str = "authkey") -> bytes | None:
    if authkey is None:
        return None
    if isinstance(authkey, str):
        try:
            return bytes.fromhex(authkey)
        except ValueError:
            raise ValueError(f"{name} must be bytes or a hex string, got {authkey!r}") from None
    if isinstance(authkey, (bytes, bytearray)) and authkey:
        return bytes(authkey)
    raise TypeError(f"{name} must be non-empty bytes or a hex string, got {authkey!r}")


def server_authkey(authkey: object) -> bytes:
    key = parse_authkey(authkey) or parse_authkey(os.environ.get("MPPOOL_AUTHKEY") or None,
                                                  "MPPOOL_AUTHKEY")
    return key or secrets.token_bytes(32)


def client_authkey(authkey: object, address: Address) -> bytes | None:
    key = parse_authkey(authkey) or parse_authkey(os.environ.get("MPPOOL_AUTHKEY") or None,
                                                  "MPPOOL_AUTHKEY")
    if key:
        return key
    try:
        return bytes.fromhex(key_path(address).read_text().strip())
    except (OSError, ValueError):
        return None


def write_key(address: Address, authkey: bytes) -> Path:
    path = key_path(address)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(authkey.hex())
    return path
