"""``mppool serve``: run a supervisor in the foreground, in this process, until SIGTERM or
Ctrl-C.

    the command line, the config file (pools, [cluster]), $MPPOOL_CLUSTER
        ──▶ checked here first (a configuration error leaves nothing behind, exit 2)
        ──▶ the autostart lock (a racing connect(autostart=True) waits, then finds us)
        ──▶ stale socket files of a SIGKILLed supervisor removed
        ──▶ mppool.supervisor.serve(): the supervisor runs here until it stops
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from rich.console import Console

from .address import (
    Address,
    MissingDirectory,
    default_address,
    display,
    key_path,
    parse_address,
    require_address_dir,
    server_authkey,
)
from .addrlock import AddressLock, LockTimeout
from .autostart import lock_path, remove_lock_file
from .cli_args import EXIT_OK, EXIT_USAGE, CliError
from .config import ConfigError, load_cluster, load_config
from .supervisor import serve


def _listening(address: Address) -> bool:
    """Something accepts connections at this unix socket (whatever its key)."""
    if not isinstance(address, str) or not os.path.exists(address):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
        except OSError:
            return False
    return True


def _cluster_options(ns: argparse.Namespace) -> dict[str, Any]:
    """serve()'s cluster arguments: the command line over $MPPOOL_CLUSTER over the config."""
    try:
        opts = load_cluster(ns.config) if ns.config is not None else {}
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    url = ns.cluster or os.environ.get("MPPOOL_CLUSTER") or opts.get("cluster")
    if ns.cluster_lease_ttl is not None:
        opts["cluster_lease_ttl"] = ns.cluster_lease_ttl
    if ns.cluster_host is not None:
        opts["cluster_host"] = ns.cluster_host
    if not url:
        if any(o.get("kind") == "cluster" for o in (load_config(ns.config) if ns.config else {}).values()):
            raise CliError("the config declares scope=\"cluster\" pools: give --cluster URL, "
                           "MPPOOL_CLUSTER or [cluster] url", EXIT_USAGE)
        return {}
    try:
        from .cluster.agent import check_lease_ttl
        from .cluster.keys import check_host_id
        from .cluster.link import require_redis

        require_redis()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("--cluster must be a Redis URL (redis://host:port/db)")
        check_lease_ttl(opts.get("cluster_lease_ttl", 10.0))
        if "cluster_host" in opts:
            check_host_id(opts["cluster_host"])
    except (ImportError, ValueError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return {**opts, "cluster": url}


def cmd_serve(ns: argparse.Namespace, out: Console, err: Console) -> int:
    # A console script does not put the current directory on sys.path (python -m does):
    # add it, so that fun = "mymodule:make" in the config finds mymodule, as gunicorn does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        pools = load_config(ns.config) if ns.config is not None else {}
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # see serve(): the supervisor's own metrics
    cluster = _cluster_options(ns)
    if ns.metrics_port is not None:
        # Checked before anything is created: a configuration error leaves nothing behind.
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise CliError("--metrics-port needs prometheus_client: pip install 'mppool[metrics]'",
                           EXIT_USAGE) from None
        if not 0 < ns.metrics_port < 65536:
            raise CliError(f"--metrics-port must be a TCP port (1-65535), got {ns.metrics_port}",
                           EXIT_USAGE)
    address: Address = ns.address if ns.address is not None else default_address()
    try:
        require_address_dir(address)
    except MissingDirectory as exc:
        raise CliError(str(exc)) from None
    key = server_authkey(ns.authkey)

    # serve() installs its SIGTERM/SIGINT handlers only once it is set up; a signal before
    # that is kept here and re-sent once they are in place, so it still stops cleanly.
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
           for s in (signal.SIGTERM, signal.SIGINT)}
    # The autostart lock: a connect(autostart=True) racing with us waits, then finds us.
    lock = AddressLock(lock_path(address))

    def ready(addr: str, lease: Any) -> None:
        lock.release()
        names = ", ".join(f"{n} ({o['kind']})" for n, o in pools.items()) or "none"
        where = f"; key file {key_path(parse_address(addr))}"
        # soft_wrap: one line, whatever the width, for whoever parses it.
        out.print(f"mppool: supervisor pid {os.getpid()} serving on {addr}{where}; pools: {names}",
                  soft_wrap=True, markup=False)
        out.file.flush()
        for signum in pending:
            os.kill(os.getpid(), signum)

    try:
        try:
            lock.acquire(timeout=30)
        except LockTimeout:
            raise CliError(f"cannot serve on {display(address)}: lock {lock.path} is held "
                           "by another process") from None
        try:
            if _listening(address):
                raise CliError(f"a supervisor is already serving on {display(address)}")
            if isinstance(address, str):
                # A supervisor that was SIGKILLed left its socket behind: nothing listens on it.
                for path in (address, address + ".lease", str(key_path(address))):
                    if os.path.exists(path):
                        err.print(f"mppool serve: removing stale {path}", markup=False)
                        os.unlink(path)
            try:
                serve(address, key, pools={n: dict(o) for n, o in pools.items()}, ready=ready,
                      metrics_port=ns.metrics_port, **cluster,
                      config=ns.config.resolve() if ns.config is not None else None)
            except OSError as exc:
                raise CliError(f"cannot serve on {display(address)}: {exc}") from None
        finally:
            lock.release()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    remove_lock_file(address)  # a clean stop leaves nothing beside the socket
    out.print(f"mppool: supervisor pid {os.getpid()} stopped", markup=False)
    return EXIT_OK
