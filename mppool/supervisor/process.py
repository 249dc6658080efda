"""The supervisor process: sockets, signals, the parent watch, and its entry point.

It runs as ``python -c "from mppool.supervisor import main; main()"``, started by
``Server.start()`` (through `mppool.launch`), ``connect(autostart=True)`` or ``mppool
serve``. It listens on two sockets:

- the control socket (the address users give): a multiprocess manager serving ``Control``
  (create, attach, stats, pool calls; ``fun`` and hooks travel here once, with dill), each
  connection authenticated under a deadline on a thread of its own (acceptor.py);
- the lease socket (``<address>.lease``): get/put on the hot path (leases.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import dill
from multiprocess import process as mp_process

from ..address import Address, beside, display, parse_address, socket_leftovers, write_key
from ..addrlock import remove_if_unused
from ..protocol import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_MESSAGE, DEFAULT_MAX_UNREAD
from ..ratelog import RateLimitedLog
from .control import Control, ControlManager, set_control
from .core import Supervisor

log = logging.getLogger("mppool")


def serve(address: Address, authkey: bytes, *, parent: int | None = None,
          pools: dict[str, dict[str, Any]] | None = None, ready: Any = None,
          metrics_port: int | None = None, max_message: int = DEFAULT_MAX_MESSAGE,
          max_unread: int = DEFAULT_MAX_UNREAD,
          handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
          config: Path | None = None) -> None:
    """Run a supervisor in this process until SIGTERM/SIGINT, shutdown() or the parent dies.

    ``config``: the TOML file ``pools`` came from; ``client.reload()`` and ``SIGHUP`` apply
    it again (see console.py)."""
    from ..address import check_address_dir
    from .acceptor import ControlAcceptor, serve_authenticated

    # Its metrics are its own (--metrics-port), never files among a worker application's:
    # see mppool/poolmetrics.py. Before anything imports prometheus_client.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    logging.basicConfig(level=os.environ.get("MPPOOL_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s mppool[%(process)d] %(levelname)s %(message)s")
    raise_nofile_limit()
    try:
        check_address_dir(address)
    except FileNotFoundError as exc:
        raise FileNotFoundError(exc.errno, f"cannot serve on {display(address)}: directory "
                                f"{exc.filename!r} does not exist", exc.filename) from None
    old = os.umask(0o177)  # sockets are created 0777 & ~umask: 0600
    try:
        server = ControlManager(address, authkey).get_server()
    finally:
        os.umask(old)
    if isinstance(address, tuple):
        address = tuple(server.address)
    sup = Supervisor(address, authkey, max_message=max_message, max_unread=max_unread,
                     handshake_timeout=handshake_timeout)
    if metrics_port is not None:
        from .metrics import Metrics

        sup.metrics = Metrics(sup)
        sup.metrics.serve(metrics_port)
        log.info("mppool: Prometheus metrics on http://127.0.0.1:%d/metrics", metrics_port)
    set_control(Control(sup))
    sup.start()
    try:
        for name, opts in (pools or {}).items():
            transfer = opts.pop("transfer", "copy")
            kind = "token" if opts.pop("kind", "pool") == "token" else "pool"
            sup.create(name, kind, transfer, dill.dumps(opts))
    except BaseException:
        # Nothing half-started is left behind: threads stopped, sockets closed and removed.
        set_control(None)
        sup.stop()
        server.listener.close()
        if isinstance(address, str):
            _unlink(sup.loop.address)
        raise
    write_key(address, authkey)
    sup.console.config = config
    sup.console.config_pools = set(pools or {}) if config is not None else set()
    # Our own serve loop instead of Server.serve_forever(): that one creates its stop event
    # only once running (a signal before would be lost) and ends with sys.exit().
    stop = threading.Event()
    server.stop_event = stop  # the manager's remote shutdown() sets it
    mp_process.current_process()._manager_server = server

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    sup.console.request_stop = stop.set
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if config is not None:
        def on_hup(signum: int, frame: Any) -> None:
            # Not in the handler: a reload creates pools, which runs fun.
            threading.Thread(target=_reload_on_hup, args=(sup,), name="mppool-sighup",
                             daemon=True).start()

        signal.signal(signal.SIGHUP, on_hup)
    if parent:
        def watch_parent() -> None:
            # getppid() needs no descriptor (psutil would open /proc files, which fails when
            # descriptors run out); and the loop survives any exception anyway: a dead
            # watcher would leave an orphan supervisor running forever.
            logs = RateLimitedLog()
            while not stop.wait(0.2):
                try:
                    if os.getppid() != parent:
                        log.warning("mppool: parent %d is gone: stopping", parent)
                        stop.set()
                except Exception as exc:
                    logs.warning("parent", "mppool: watching parent %d: %s: %s", parent,
                                 type(exc).__name__, exc)
        threading.Thread(target=watch_parent, name="mppool-parent", daemon=True).start()

    # Not Server.accepter nor Listener.accept(): those authenticate on the accepting thread
    # without a deadline, so one silent peer would stop the control plane for everyone.
    acceptor = ControlAcceptor(server.listener, authkey,
                               lambda conn: serve_authenticated(server, conn), stop)
    acceptor.start()
    if ready is not None:
        ready(display(address), sup.loop.address)
    log.info("mppool: supervisor %d serving on %s", os.getpid(), display(address))
    try:
        while not stop.wait(1.0):
            pass
    finally:
        set_control(None)
        sup.stop()
        server.listener.close()  # removes the control socket
        for path in socket_leftovers(address):
            _unlink(path)
        # The autostart lock too, unless a starter holds it now (see addrlock.py).
        remove_if_unused(beside(address, ".lock"))
        log.info("mppool: supervisor %d stopped", os.getpid())


def _reload_on_hup(sup: Supervisor) -> None:
    from .console import audit

    audit("reload", None, {"signal": "SIGHUP"}, None)
    try:
        sup.console.reload()
    except Exception as exc:
        log.error("mppool: reload on SIGHUP failed, nothing changed: %s: %s",
                  type(exc).__name__, exc)


def _unlink(path: Any) -> None:
    try:
        os.unlink(path)
    except (OSError, TypeError):
        pass


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a supervisor holds two sockets per
    client; the usual soft default of 1024 is far too low); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:  # Linux refuses more than fs.nr_open
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("mppool: cannot raise the file descriptor limit from %d to %d: %s",
                        soft, target, exc)
    log.info("mppool: file descriptor limit %d (hard %d)", soft, hard)
    return soft


def main(argv: list[str] | None = None) -> None:
    """Entry point of the supervisor process (``Server.start()``).

    Protocol with the starter, on stdout: one line, ``READY <address> <pid>`` once serving,
    or ``ERROR <why>`` if it cannot start. Then stdout is pointed at /dev/null: the starter
    may be long gone, and its pipe must close when it exits (a detached supervisor keeps
    none of the caller's descriptors; its stderr is its log file).
    """
    ap = argparse.ArgumentParser(prog="python -m mppool.supervisor")
    ap.add_argument("--address", required=True)
    ap.add_argument("--parent", type=int, default=0)
    ap.add_argument("--max-message", type=int, default=DEFAULT_MAX_MESSAGE)
    ap.add_argument("--max-unread", type=int, default=DEFAULT_MAX_UNREAD)
    ap.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT)
    # Server(address=None) made the socket's private directory: remove it (if empty) when
    # we stop, for the starter may be gone (a SIGKILLed gunicorn arbiter) and cannot.
    ap.add_argument("--remove-dir", type=int, default=0)
    ns = ap.parse_args(argv)
    key = os.environ.pop("MPPOOL_AUTHKEY", "")
    extra = json.loads(os.environ.pop("MPPOOL_SYS_PATH", "[]"))
    sys.path[:0] = [p for p in extra if p not in sys.path]
    said = False

    def say(line: str) -> None:
        nonlocal said
        if said:
            return
        said = True
        try:
            sys.stdout.write(line.replace("\n", " ") + "\n")
            sys.stdout.flush()
        except OSError:
            pass  # the starter gave up waiting: nobody to tell
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # closes the pipe: the starter sees EOF
        os.close(devnull)

    def ready(addr: str, lease: Any) -> None:
        say(f"READY {addr} {os.getpid()}")

    try:
        address = parse_address(ns.address)
        serve(address, bytes.fromhex(key), parent=ns.parent or None, ready=ready,
              max_message=ns.max_message, max_unread=ns.max_unread,
              handshake_timeout=ns.handshake_timeout)
    except BaseException as exc:
        if not said:
            log.error("mppool: supervisor for %s could not start", ns.address, exc_info=True)
            say(f"ERROR {type(exc).__name__}: {exc}")
            raise SystemExit(1) from None
        raise
    finally:
        if ns.remove_dir and "/" in ns.address:
            try:
                os.rmdir(os.path.dirname(os.path.abspath(ns.address)))
            except OSError:
                pass  # not empty (something of the user's), or already removed by the Server


if __name__ == "__main__":

    main()
