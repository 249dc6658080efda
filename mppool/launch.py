"""Starting a supervisor process: what ``Server.start()`` and autostart share.

``start()`` runs the supervisor in a fresh interpreter (``python -m mppool.supervisor``), not
a fork of the caller: it inherits no threads, locks or listening sockets (a gunicorn arbiter's,
say) and needs no ``if __name__ == "__main__"`` guard in the caller's script.

Start-up, step by step:

- the socket's directory must exist and be private (see ``address.check_private_dir``);
- an address where a supervisor was SIGKILLed still holds its socket, ``.lease`` socket and
  key file. They are taken over only when nothing answers there: a connect refused
  (``ECONNREFUSED``) proves the socket is dead. If something answers, start() refuses with
  ``ServerUnavailable`` rather than steal a live supervisor's address;
- the child says ``READY <address> <pid>`` on a pipe, or ``ERROR <why>`` when it cannot start
  (address in use, a bad directory, ...): that line, else the last line of its log, is the
  message of the ``ServerUnavailable`` start() raises;
- a detached supervisor (``detach=True``, autostart) keeps none of the caller's descriptors:
  stdin is /dev/null, stderr (its log) goes to ``<socket>.log`` (mode 0600; for a TCP
  address, in the runtime directory), and it closes the READY pipe once it has written that
  line. So ``python prog.py 2>&1 | cat`` and ``subprocess.run(..., capture_output=True)``
  finish when the program exits, whatever the supervisor does. A supervisor that is our
  child (``detach=False``) shares our stderr, so that its warnings land in our log.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .address import Address, beside, display, parse_address, socket_leftovers
from .errors import ServerUnavailable

log = logging.getLogger("mppool")

START_TIMEOUT = 30.0
PROBE_TIMEOUT = 1.0


@dataclass
class Launched:
    address: Address  # where it serves (a TCP port 0 is resolved)
    pid: int
    proc: subprocess.Popen[bytes] | None  # our child, or None when detached


def launch(address: Address, authkey: bytes, detach: bool = False,
           options: dict[str, Any] | None = None) -> Launched:
    """Start a supervisor process for ``address`` and wait until it serves.

    The caller has checked the directory and taken the address over. ``options`` become
    ``--name value`` arguments of the supervisor (its limits). Raises ServerUnavailable with
    the supervisor's own reason when it cannot start.
    """
    where = display(address)
    cmd = [sys.executable, "-c", _BOOT, "--address", where]
    if detach:
        cmd = [sys.executable, "-c", _LAUNCHER, *cmd]
    else:
        cmd += ["--parent", str(os.getpid())]
    options = dict(options or {})
    # A Redis URL may hold a password: it travels in the environment, not on a command line.
    cluster = options.pop("cluster", None)
    for name, value in options.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    # Like multiprocessing's spawn: the caller's sys.path, so that a fun or hook defined
    # in the caller's modules unpickles (by reference) in the supervisor.
    env = dict(os.environ, MPPOOL_AUTHKEY=authkey.hex(),
               MPPOOL_SYS_PATH=json.dumps([p or os.getcwd() for p in sys.path]))
    env.pop("MPPOOL_ADDRESS", None)
    env.pop("MPPOOL_CLUSTER", None)
    if cluster:
        env["MPPOOL_CLUSTER"] = str(cluster)
    logfile = log_path(address) if detach else None
    stderr: Any = None  # our child: it shares our stderr
    if logfile is not None:
        stderr = open_log(logfile)
        log_start = os.fstat(stderr).st_size
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, env=env, close_fds=True)
    finally:
        if logfile is not None:
            os.close(stderr)
    line = _readline(proc, START_TIMEOUT)
    assert proc.stdout is not None
    proc.stdout.close()
    words = line.rstrip("\n").split(" ")
    if len(words) < 3 or words[0] != "READY" or not words[-1].isdigit():
        if proc.poll() is None:
            proc.kill()  # only the process we started
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        why = line[len("ERROR "):].strip() if line.startswith("ERROR ") else ""
        if not why and logfile is not None:
            why = _last_line(logfile, log_start)
        if not why:
            why = f"exit status {proc.poll()}, no message" if line == "" else \
                f"exit status {proc.poll()}, said {line.strip()!r}"
        raise ServerUnavailable(f"supervisor for {where} did not start: {why}"
                                + (f" (log: {logfile})" if logfile is not None else ""))
    if detach:
        proc.wait(5)  # the launcher: it exits as soon as the supervisor is started
    return Launched(parse_address(" ".join(words[1:-1])), int(words[-1]),  # a path may hold spaces
                    None if detach else proc)



# Starts the supervisor in a new session and exits: the supervisor inherits our stdout pipe
# and writes its READY line there itself (then closes it); stdin and stderr are what start()
# gave us: /dev/null and the log file. Nothing else crosses (close_fds).
_LAUNCHER = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"

# -c, not -m: under -m the module would be loaded twice (as __main__ and by name). A failure
# to import is said on the READY pipe too, so that start() can report it.
_BOOT = """import sys
try:
    from mppool.supervisor import main
except BaseException as exc:
    sys.stdout.write(f"ERROR cannot import mppool.supervisor: {type(exc).__name__}: {exc}\\n")
    sys.stdout.flush()
    raise
main()
"""


def log_path(address: Address) -> Path:
    """Where a detached supervisor logs: beside its socket, or in the runtime directory."""
    return beside(address, ".log")


def open_log(path: Path) -> int:
    """Open (append) a supervisor log file: mode 0600, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _last_line(path: Path, start: int) -> str:
    """The last meaningful line a failed supervisor wrote to its log since ``start``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            f.seek(start)
            text = f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def probe(address: Address, timeout: float = PROBE_TIMEOUT) -> str:
    """Is a supervisor serving ``address``? ``"alive"``: something accepted a connection
    (or is too busy to: a full backlog is not a dead socket); ``"dead"``: a connect was
    refused, the socket file is a leftover; ``"absent"``: no socket file there."""
    if isinstance(address, str):
        try:
            st = os.lstat(address)
        except FileNotFoundError:
            return "absent"
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerUnavailable(f"cannot use {address}: it exists and is not a socket")
        family, target = socket.AF_UNIX, address
    else:
        if address[1] == 0:
            return "absent"  # any free port: nobody can be there yet
        family, target = (socket.AF_INET6 if ":" in address[0] else socket.AF_INET), address  # type: ignore[assignment]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(target)
        except ConnectionRefusedError:
            return "dead"
        except FileNotFoundError:
            return "absent"
        except (TimeoutError, BlockingIOError):
            return "alive"
        except OSError as exc:
            if exc.errno == errno.EAGAIN:  # unix socket with a full backlog: busy, not dead
                return "alive"
            raise ServerUnavailable(f"cannot probe {display(address)}: {exc}") from None
    return "alive"


START_HINT = ("start one with mppool.Server(...).start(), `mppool serve`, or "
              "mppool.connect(autostart=True)")


def no_key(address: Address) -> ServerUnavailable:
    """What ``connect()`` raises when it has no key for ``address``: first whether anything
    runs there (and how to start one), then what to do about the key."""
    where = display(address)
    try:
        state = probe(address)
    except ServerUnavailable as exc:
        return exc
    if state == "alive":
        return ServerUnavailable(f"a supervisor runs at {where} but its key file "
                                 f"{beside(address, '.key')} is missing: pass authkey= or set "
                                 "MPPOOL_AUTHKEY to the key it was started with")
    return ServerUnavailable(f"no supervisor at {where}: {START_HINT}")


def take_over(address: Address) -> None:
    """Clear ``address`` for a new supervisor: remove a dead one's leftovers (socket,
    ``.lease`` socket, key file), refuse if a live one answers."""
    state = probe(address)
    if state == "alive":
        raise ServerUnavailable(f"a supervisor already serves {display(address)} (it accepted a "
                                "connection): stop it first, or use another address")
    if state == "dead" and isinstance(address, str):
        log.warning("mppool: taking over %s: removing the socket, lease socket and key file of "
                    "a supervisor that died", address)
        for path in socket_leftovers(address):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def wait_gone(pid: int, timeout: float) -> None:
    """Wait for a supervisor that is not our child to exit; SIGKILL it if it will not."""
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()  # the pid this Server started (checked by psutil's identity)
    except psutil.Error:
        pass


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Read the supervisor's READY line without hanging if it dies or stalls."""
    assert proc.stdout is not None
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    return out[0].decode(errors="replace") if out else ""


