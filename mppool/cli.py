"""The ``mppool`` command line (also ``python -m mppool``): serve, stats, top, demo.

The library only logs; this module is the one place that writes to the terminal.

Exit status: 0 success, 1 failure (no supervisor, a bound that did not hold), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .address import (
    Address,
    MissingDirectory,
    default_address,
    display,
    key_path,
    parse_address,
    parse_authkey,
    require_address_dir,
    server_authkey,
)
from .addrlock import AddressLock, LockTimeout
from .autostart import lock_path, remove_lock_file
from .client import Client, connect
from .config import ConfigError, load_cluster, load_config
from .demo import POOL_NAME, Demo, DemoResult, KillReport
from .display import demo_summary, fitted_pools_table, header, kill_line, top_frame
from .errors import PoolException, ServerUnavailable
from .supervisor import serve
from .version import __version__

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report in one line, with the exit status to return."""

    def __init__(self, message: str, status: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.status = status




# ------------------------------------------------------------------------------ arguments


def _address_arg(value: str) -> Address:
    try:
        return parse_address(value)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _authkey_file_arg(value: str) -> bytes:
    """The key, read from a file (hex). Never from the command line: every local user can
    read any process's arguments (ps, /proc/PID/cmdline). Errors never show the key."""
    try:
        with open(value) as f:
            text = f.read(1 << 16).strip()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value!r}: {exc.strerror or exc}") from None
    try:
        key = parse_authkey(text, f"the key in {value!r}")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not key:
        raise argparse.ArgumentTypeError(f"{value!r} holds no key (expected the key in hex)")
    return key


class _NoAuthkeyOnCommandLine(argparse.Action):
    """``--authkey KEY`` is gone: say what to use instead, in one line, and exit 2. The key
    itself is not repeated (and is already visible to other users while we run)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sys.stderr.write(f"{parser.prog}: error: --authkey is not accepted: a key on the command "
                         "line is visible to every local user; use --authkey-file FILE (the key in "
                         "hex, mode 0600) or MPPOOL_AUTHKEY\n")
        raise SystemExit(EXIT_USAGE)


def _positive_float(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not f > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return f


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n
    return parse


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", type=_address_arg, default=None,
                        help="unix socket path or host:port (default: $MPPOOL_ADDRESS, else the "
                             "per-user default socket)")
    common.add_argument("--authkey-file", dest="authkey", type=_authkey_file_arg, default=None,
                        metavar="FILE",
                        help="file holding the key, in hex (default: $MPPOOL_AUTHKEY, else the "
                             "key file beside the socket)")
    # Declared so that it is refused with a hint, not taken as an abbreviation of
    # --authkey-file (argparse accepts unambiguous prefixes).
    common.add_argument("--authkey", nargs="?", action=_NoAuthkeyOnCommandLine, help=argparse.SUPPRESS)
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--timeout", type=_positive_float, default=2.0,
                        help="seconds to keep trying to reach the supervisor (default: 2)")

    ap = argparse.ArgumentParser(prog="mppool", description="A resource pool shared by many processes.")
    ap.add_argument("--version", action="version", version=f"mppool {__version__}")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("serve", parents=[common], help="run a supervisor in the foreground",
                       description="Run a supervisor in the foreground until SIGTERM or Ctrl-C.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML file declaring pools: [pools.NAME] kind/fun/max_size/...")
    p.add_argument("--metrics-port", type=int, default=None, metavar="N",
                   help="serve Prometheus metrics on http://127.0.0.1:N/metrics")
    p.add_argument("--cluster", default=None, metavar="URL",
                   help="share scope=\"cluster\" token pools with other hosts through this "
                        "Redis (default: $MPPOOL_CLUSTER, or [cluster] url in the config)")
    p.add_argument("--cluster-lease-ttl", type=_positive_float, default=None, metavar="S",
                   help="seconds after which a dead host's cluster units come back (default 10)")
    p.add_argument("--cluster-host", default=None, metavar="ID",
                   help="this host's id in the cluster (default: the host name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stats", parents=[common, client], help="every pool's stats")
    p.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("top", parents=[common, client], help="live view of pools, holders, waiters")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="S",
                   help="seconds between refreshes (default: 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("demo", parents=[common],
                       help="workers sharing a budget, with a check that the bound held",
                       description="Start a private supervisor and N worker processes sharing a "
                                   "token budget of C; SIGKILL one while it holds a token; check "
                                   "that at most C tokens were ever out and that none was lost. "
                                   "--address/--authkey-file default to a fresh private socket here.")
    p.add_argument("--workers", type=_int_at_least(2), default=6, metavar="N",
                   help="worker processes (default: 6; one of them gets killed)")
    p.add_argument("--budget", type=_int_at_least(1), default=2, metavar="C",
                   help="tokens in the shared budget (default: 2)")
    p.add_argument("--seconds", type=_positive_float, default=5.0, metavar="S",
                   help="how long the workers run (default: 5)")
    p.set_defaults(func=cmd_demo)
    _console_parsers(sub, [common, client])
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        return int(ns.func(ns, out, err))
    except CliError as exc:
        # soft_wrap: one unbroken line, so that names in it can be searched for.
        err.print(Text(f"mppool {ns.verb}: error: {exc}", style="bold red"), soft_wrap=True)
        return exc.status
    except KeyboardInterrupt:
        err.print(Text(f"mppool {ns.verb}: interrupted"))
        return 130


# ------------------------------------------------------------------------------ client verbs


def _connect(ns: argparse.Namespace) -> Client:
    address = ns.address if ns.address is not None else default_address()
    if (ns.authkey is None and not os.environ.get("MPPOOL_AUTHKEY")
            and not key_path(address).exists()):
        # The library's wording ("pass authkey=") is for programmers; say it in CLI terms.
        raise CliError(f"no supervisor reachable at {display(address)}: no key file "
                       f"{key_path(address)} (is `mppool serve` running there?) and no "
                       "--authkey-file or MPPOOL_AUTHKEY")
    try:
        return connect(address, ns.authkey, timeout=ns.timeout)
    except ServerUnavailable as exc:
        raise CliError(f"no supervisor reachable at {display(address)}: {exc}") from None


def cmd_stats(ns: argparse.Namespace, out: Console, err: Console) -> int:
    client = _connect(ns)
    try:
        stats = client.stats()
        info = client.info()
    except PoolException as exc:
        raise CliError(f"supervisor stopped answering: {exc}") from None
    finally:
        client.close()
    if ns.json:
        # Plain json, not rich: the output must parse whatever the terminal width.
        sys.stdout.write(json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n")
        return EXIT_OK
    out.print(header(info))
    if not stats:
        out.print("no pools")
    else:
        out.print(fitted_pools_table(out, stats))
    return EXIT_OK


def cmd_top(ns: argparse.Namespace, out: Console, err: Console) -> int:
    client = _connect(ns)
    try:
        if ns.once:
            out.print(top_frame(client, out))
            return EXIT_OK
        with Live(top_frame(client, out), console=out, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(ns.interval)
                    live.update(top_frame(client, out), refresh=True)
            except KeyboardInterrupt:
                return EXIT_OK  # Ctrl-C is how one leaves top
    except PoolException as exc:
        raise CliError(f"supervisor stopped answering: {exc}") from None
    finally:
        client.close()


# ------------------------------------------------------------------------------ serve


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


# ------------------------------------------------------------------------------ demo


def cmd_demo(ns: argparse.Namespace, out: Console, err: Console) -> int:
    # The supervisor's own warnings (the reclaim) would tear through the progress bar; the
    # summary reports the same facts.
    os.environ.setdefault("MPPOOL_LOG_LEVEL", "ERROR")
    if not out.is_terminal:
        # Piped or logged (CI, make demo | tee): rich would wrap at 80 columns mid-sentence.
        # One line per message instead, and room for the tables.
        out = Console(highlight=False, soft_wrap=True, width=max(out.width, 160))
    # SIGTERM ends the run like Ctrl-C, so that the with-block below still reaps everything.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    demo = Demo(ns.workers, ns.budget, ns.seconds, ns.address, ns.authkey)
    kill: KillReport | None = None
    result: DemoResult | None = None
    out.print(f"[bold]mppool demo[/]: {ns.workers} worker processes share a budget of "
              f"{ns.budget} tokens for {ns.seconds:g} s")
    with demo:
        try:
            demo.start()
        except (RuntimeError, PoolException) as exc:
            raise CliError(f"could not start: {exc}") from None
        assert demo.server is not None
        out.print(f"supervisor pid {demo.server.pid} on {display(demo.server.address)}; "
                  f"token pool {POOL_NAME!r} of {ns.budget}; "
                  f"worker pids {', '.join(map(str, demo.pids))}", markup=False)
        progress = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[status]}"), console=out)
        kill_at = ns.seconds * 0.4  # early enough that the others run on with the reclaimed token
        with progress:
            task = progress.add_task("leasing", total=ns.seconds, status="")
            demo.go()
            try:
                while (elapsed := demo.elapsed()) < ns.seconds:
                    s = demo.sample()
                    if kill is None and elapsed >= kill_at:
                        kill = demo.kill_one()
                        progress.console.print(kill_line(kill))
                    progress.update(task, completed=min(s.elapsed, ns.seconds),
                                    status=f"tokens out {s.out}/{ns.budget} · waiting {s.waiting} · "
                                           f"leases {s.leases}")
                    time.sleep(0.005)
            except PoolException as exc:
                raise CliError(f"the supervisor stopped answering: {exc}") from None
            progress.update(task, completed=ns.seconds)
        result = demo.finish()
    demo_summary(out, result)
    return EXIT_OK if result.ok else EXIT_FAIL


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------- the operator's console


def _console_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """pause, resume, resize, kill, drain, reload, stop: one control-plane call each."""
    def verb(name: str, help: str, func: Callable[..., int], pool: bool = True) -> Any:
        p = sub.add_parser(name, parents=parents, help=help, description=help[0].upper() + help[1:] + ".")
        if pool:
            p.add_argument("name", metavar="NAME", help="the pool")
        p.set_defaults(func=func)
        return p

    verb("pause", "new gets on the pool wait (leases out continue) until resume", cmd_pause)
    verb("resume", "serve a paused pool again, the waiting gets first", cmd_resume)
    p = verb("resize", "change the pool's max_size", cmd_resize)
    p.add_argument("max_size", metavar="N", type=_int_at_least(0), help="the new max_size (0: unbounded)")
    p = verb("kill", "take back every lease of the pool held by a process", cmd_kill)
    p.add_argument("--pid", type=_int_at_least(1), required=True, metavar="P", help="the holder's pid")
    p.add_argument("--terminate", action="store_true",
                   help="also SIGTERM it (SIGKILL 2 s later); only a unix-socket client, "
                        "whose pid the kernel gave")
    verb("drain", "close the pool's idle objects and refill min_size with new ones", cmd_drain)
    verb("reload", "re-read the supervisor's --config file: create, resize, remove pools",
         cmd_reload, pool=False)
    verb("stop", "stop the supervisor gracefully (as SIGTERM does)", cmd_stop, pool=False)


def _console_call(ns: argparse.Namespace, call: Callable[[Client], Any]) -> Any:
    client = _connect(ns)
    try:
        return call(client)
    except PoolException as exc:
        raise CliError(str(exc)) from None
    except (ValueError, TypeError, PermissionError) as exc:
        raise CliError(str(exc), EXIT_USAGE if not isinstance(exc, PermissionError) else EXIT_FAIL) from None
    finally:
        client.close()


def _said(out: Console, line: str) -> int:
    out.print(line, soft_wrap=True, markup=False)
    return EXIT_OK


def cmd_pause(ns: argparse.Namespace, out: Console, err: Console) -> int:
    changed = _console_call(ns, lambda c: c.pause(ns.name))
    return _said(out, f"pool {ns.name!r} {'paused' if changed else 'was already paused'}")


def cmd_resume(ns: argparse.Namespace, out: Console, err: Console) -> int:
    changed = _console_call(ns, lambda c: c.resume(ns.name))
    return _said(out, f"pool {ns.name!r} {'resumed' if changed else 'was not paused'}")


def cmd_resize(ns: argparse.Namespace, out: Console, err: Console) -> int:
    _console_call(ns, lambda c: c.resize(ns.name, ns.max_size))
    return _said(out, f"pool {ns.name!r}: max_size={ns.max_size}")


def cmd_kill(ns: argparse.Namespace, out: Console, err: Console) -> int:
    r = _console_call(ns, lambda c: c.kill_holder(ns.name, ns.pid, terminate=ns.terminate))
    line = f"pool {ns.name!r}: took back {r['reclaimed']} lease(s) of pid {ns.pid}"
    if r["terminated"]:
        line += "; sent SIGTERM"
    return _said(out, line)


def cmd_drain(ns: argparse.Namespace, out: Console, err: Console) -> int:
    n = _console_call(ns, lambda c: c.drain(ns.name))
    return _said(out, f"pool {ns.name!r}: closed {n} idle object(s); min_size refills")


def cmd_reload(ns: argparse.Namespace, out: Console, err: Console) -> int:
    r = _console_call(ns, lambda c: c.reload())
    parts = [f"created {', '.join(r['created']) or 'none'}",
             "resized " + (", ".join(f"{n} {a}->{b}" for n, (a, b) in r["resized"].items()) or "none"),
             f"removed {', '.join(r['removed']) or 'none'}"]
    for name, why in r["kept"].items():
        err.print(f"mppool reload: pool {name!r} kept as it is: {why}", soft_wrap=True, markup=False)
    return _said(out, "reloaded: " + "; ".join(parts))


def cmd_stop(ns: argparse.Namespace, out: Console, err: Console) -> int:
    _console_call(ns, lambda c: c.stop())
    return _said(out, "supervisor stopping")
