"""``mppool.Server``: the supervisor, as a multiprocess ``SyncManager``.

``start()`` runs the supervisor in a fresh interpreter (``python -m mppool.supervisor``), not
a fork of the caller: it inherits no threads, locks or listening sockets (a gunicorn arbiter's,
say) and needs no ``if __name__ == "__main__"`` guard in the caller's script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from types import TracebackType
from typing import Any

from multiprocess.connection import Client as MPClient
from multiprocess.managers import SyncManager, dispatch

from .address import Address, display, fresh_address, key_path, parse_address, server_authkey
from .errors import ServerUnavailable

START_TIMEOUT = 30.0


class Server(SyncManager):
    """The supervisor process; a context manager.

    ``Server(address=None)`` listens on a fresh unix socket in a private directory.
    """

    def __init__(self, address: object = None, authkey: object = None) -> None:
        key = server_authkey(authkey)  # checked first: a bad key must leave no directory
        fresh = fresh_address() if address is None else None
        addr: Address = fresh if fresh is not None else parse_address(address)
        # The private directory of a fresh address is ours to remove at shutdown.
        self._own_dir = os.path.dirname(fresh) if fresh is not None else None
        super().__init__(address=addr, authkey=key)
        self._address: Address = addr
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def address(self) -> Address:
        return self._address

    @property
    def authkey(self) -> bytes:
        return bytes(self._authkey)

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self, detach: bool = False) -> Server:
        """Start the supervisor process and wait until it serves; returns self.

        With ``detach=True`` it outlives this process (autostart): it is started through a
        launcher that exits at once (a double fork), so it is nobody's child here and never
        lingers as our zombie. Otherwise it is our child and stops when this process dies.
        """
        if self._pid is not None:
            raise RuntimeError("this Server is already started")
        # -c, not -m: under -m the module would be loaded twice (as __main__ and by name).
        cmd = [sys.executable, "-c", "from mppool.supervisor import main; main()",
               "--address", display(self._address)]
        if detach:
            cmd = [sys.executable, "-c", _LAUNCHER, *cmd]
        else:
            cmd += ["--parent", str(os.getpid())]
        # Like multiprocessing's spawn: the caller's sys.path, so that a fun or hook defined
        # in the caller's modules unpickles (by reference) in the supervisor.
        env = dict(os.environ, MPPOOL_AUTHKEY=self.authkey.hex(),
                   MPPOOL_SYS_PATH=json.dumps([p or os.getcwd() for p in sys.path]))
        env.pop("MPPOOL_ADDRESS", None)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                                close_fds=True)
        line = _readline(proc, START_TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()
        words = line.rstrip("\n").split(" ")
        if len(words) < 3 or words[0] != "READY" or not words[-1].isdigit():
            if proc.poll() is None:
                proc.kill()  # only the process we started
            proc.wait(5)
            raise ServerUnavailable(f"supervisor for {display(self._address)} did not start "
                                    f"(exit status {proc.poll()}, said {line!r})")
        self._address = parse_address(" ".join(words[1:-1]))  # a path may hold spaces
        self._pid = int(words[-1])
        if detach:
            proc.wait(5)  # the launcher: it exits as soon as the supervisor is started
        else:
            self._proc = proc
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the supervisor: every pool is shut down, socket and key file removed."""
        pid = self._pid
        if pid is None:
            return
        try:
            conn = MPClient(self._address, authkey=self.authkey)
            try:
                dispatch(conn, None, "shutdown")
            finally:
                conn.close()
        except Exception:
            pass  # already gone, or unreachable: the pid below still ends it
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()  # only the pid we started
                self._proc.wait(5)
        else:
            _wait_gone(pid, timeout)
        self._proc = None
        self._pid = None
        if isinstance(self._address, str):
            for path in (self._address, self._address + ".lease", str(key_path(self._address))):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self._own_dir:
            try:
                os.rmdir(self._own_dir)
            except OSError:
                pass  # not empty: something of the user's is there, leave it

    def client(self, timeout: float = 5.0) -> Any:
        """A client of this supervisor (``mppool.connect(server.address, server.authkey)``)."""
        from .client import connect
        return connect(self._address, self.authkey, timeout=timeout)

    def __enter__(self) -> Server:
        return self.start() if self._proc is None else self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<mppool.Server {display(self._address)} pid={self.pid}>"


# Starts the supervisor in a new session and exits: the supervisor inherits our stdout pipe
# and writes its READY line there itself.
_LAUNCHER = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"


def _wait_gone(pid: int, timeout: float) -> None:
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


def _control_factory() -> Any:
    from .supervisor import get_control
    return get_control()


Server.register("Control", callable=_control_factory,
                exposed=("info", "create", "stats", "pool_call", "names", "execute", "host", "unhost",
                         "set_num_threads", "killall"))

