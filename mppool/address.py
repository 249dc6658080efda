"""Where a supervisor listens and where its key lives.

A filesystem path is a unix socket; ``"host:port"`` or ``(host, port)`` is TCP. The authkey
comes from the caller, else ``MPPOOL_AUTHKEY`` (hex), else the key file written beside the
socket with mode 0600.

Whoever can write to the directory of a socket or key file can swap them: plant a symlink
where the key file is about to be written (and have it overwrite a file of the victim's),
or replace the directory itself by a symlink to one of their own after it was checked. So
the directory of every unix socket, and the runtime directory of default sockets and TCP key
files, must be a real directory (``lstat``: not a symlink) owned by the user with no group
or other permission bits, checked at every start and every connect. Inside such a directory
nobody else can create or rename anything, and the key file is still written without
following symlinks (a temporary file created ``O_EXCL|O_NOFOLLOW`` and renamed over the final
name). A key never appears in an error message: a mistyped key is often the real one.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

from .errors import ServerUnavailable

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


class UnsafeDirectory(ServerUnavailable, PermissionError):
    """The directory of a socket or key file is not private to this user (a symlink, owned
    by another user, or open to group/others). Both a ``ServerUnavailable`` (what callers of
    ``connect`` handle) and a ``PermissionError``."""


def check_private_dir(directory: str | os.PathLike[str]) -> None:
    """Raise ``UnsafeDirectory`` unless ``directory`` is a real directory (not a symlink),
    owned by this user, with no group/other permission bits; ``FileNotFoundError`` (naming
    it) if it does not exist."""
    d = os.fspath(directory)
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"directory {d!r} does not exist", d) from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"directory {d!r} is a symlink: a socket or key directory must be "
                              "a real directory (anyone who can change the link can move it)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{d!r} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(f"directory {d!r} belongs to uid {st.st_uid}, not to this user "
                              f"(uid {os.getuid()}): use a directory of your own")
    if st.st_mode & 0o077:
        raise UnsafeDirectory(f"directory {d!r} has mode {stat.S_IMODE(st.st_mode):04o}: other "
                              "users could replace its sockets and key file; it must be private "
                              f"(chmod 700 {d})")


class MissingDirectory(ServerUnavailable, FileNotFoundError):
    """The directory of a unix socket address does not exist. Every way of starting a
    supervisor (``Server.start()``, ``connect(autostart=True)``, the gunicorn hooks, ``mppool
    serve``) refuses it with the same message, naming the directory: mppool creates only its
    own per-user directory, never a chain of directories from a path that may be mistyped."""


def require_address_dir(address: Address) -> None:
    """``check_address_dir``, a missing directory raised as ``MissingDirectory``."""
    try:
        check_address_dir(address)
    except FileNotFoundError as exc:
        d = exc.filename
        raise MissingDirectory(f"cannot start a supervisor at {display(address)}: directory "
                               f"{d!r} does not exist; create it, private to you "
                               f"(mkdir -m 700 {d}), or use another address") from None


def socket_dir(address: Address) -> Path:
    """The directory holding ``address``'s socket, or its key file for a TCP address."""
    if isinstance(address, str):
        return Path(os.path.abspath(address)).parent
    return runtime_dir()


def check_address_dir(address: Address) -> None:
    """Check the directory of a unix socket address (TCP: runtime_dir() checks itself)."""
    if isinstance(address, str):
        check_private_dir(socket_dir(address))
    else:
        runtime_dir()


def runtime_dir() -> Path:
    """A private (0700) per-user directory for default sockets and keys, checked each call."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = Path(base) / "mppool" if base and os.access(base, os.W_OK) else \
        Path(tempfile.gettempdir()) / f"mppool-{os.getuid()}"
    try:
        d.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass  # checked below: a symlink or a file planted there is refused, not used
    check_private_dir(d)
    return d


def default_address() -> Address:
    env = os.environ.get("MPPOOL_ADDRESS")
    if env:
        return parse_address(env)
    return str(runtime_dir() / "mppool.sock")


def fresh_address() -> str:
    return str(Path(tempfile.mkdtemp(prefix="mppool-")) / "mppool.sock")


def beside(address: Address, suffix: str) -> Path:
    """A file that belongs to the supervisor of ``address``: beside its socket, or for a TCP
    address in the runtime directory. The suffixes in use: ``.key`` (the key), ``.lease``
    (the lease socket), ``.lock`` (the start lock, see `mppool.addrlock`), ``.log`` (a detached one's log)."""
    if isinstance(address, str):
        return Path(address + suffix)
    host, port = address
    return runtime_dir() / f"tcp-{host.replace(':', '_')}-{port}{suffix}"


def key_path(address: Address) -> Path:
    return beside(address, ".key")


def socket_leftovers(address: Address) -> list[str]:
    """What a supervisor leaves behind if it dies without cleaning up (SIGKILL): its
    sockets and key file, removed at a clean stop and when a new one takes the address."""
    if isinstance(address, str):
        return [address, address + ".lease", str(key_path(address))]
    return [str(key_path(address))]


def lease_address(address: Address) -> Address:
    """The supervisor's get/put channel: a sibling socket, or a free port on the same host."""
    if isinstance(address, str):
        return address + ".lease"
    return (address[0], 0)


def display(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def parse_authkey(authkey: object, name: str = "authkey") -> bytes | None:
    """The key as bytes (None stays None). Errors describe the value, never show it: a
    mistyped key is often the real key with one character wrong, and error messages end up
    in logs and bug reports."""
    if authkey is None:
        return None
    if isinstance(authkey, str):
        try:
            key = bytes.fromhex(authkey)
        except ValueError:
            raise ValueError(f"{name} must be bytes or a hex string (got a str of {len(authkey)} "
                             "characters that is not hex)") from None
        if not key:
            raise ValueError(f"{name} must be bytes or a hex string (got an empty str)")
        return key
    if isinstance(authkey, (bytes, bytearray)):
        if not authkey:
            raise ValueError(f"{name} must be non-empty bytes or a hex string (got empty bytes)")
        return bytes(authkey)
    raise TypeError(f"{name} must be non-empty bytes or a hex string (got a "
                    f"{type(authkey).__name__})")


def server_authkey(authkey: object) -> bytes:
    key = parse_authkey(authkey) or parse_authkey(os.environ.get("MPPOOL_AUTHKEY") or None,
                                                  "MPPOOL_AUTHKEY")
    return key or secrets.token_bytes(32)


def client_authkey(authkey: object, address: Address) -> bytes | None:
    key = parse_authkey(authkey) or parse_authkey(os.environ.get("MPPOOL_AUTHKEY") or None,
                                                  "MPPOOL_AUTHKEY")
    # Checked on every connect, whether or not the key file is read: a socket in a directory
    # others can write to may be theirs.
    try:
        check_address_dir(address)
    except FileNotFoundError:
        pass  # nothing can be listening there: connecting fails as for any absent supervisor
    if key:
        return key
    try:
        fd = os.open(key_path(address), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            return bytes.fromhex(f.read().strip()) or None
    except (OSError, ValueError):
        return None


def write_key(address: Address, authkey: bytes) -> Path:
    """Write the key file (mode 0600) without following symlinks, atomically.

    A temporary file is created ``O_CREAT|O_EXCL|O_NOFOLLOW`` in the same directory, written,
    synced, and renamed over the final name: ``rename`` replaces whatever is there (a planted
    symlink included) and never writes through it, and readers see the old key or the whole
    new one. Mode comes from ``fchmod`` on our own descriptor, never a path ``chmod``.
    """
    path = key_path(address)
    check_private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue  # a name collision (or a planted name): draw another
    else:
        raise FileExistsError(f"cannot create a temporary key file in {str(path.parent)!r}")
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, authkey.hex().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
