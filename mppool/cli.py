"""The ``mppool`` command line (also ``python -m mppool``): serve, stats, top, demo, and
the operator's console verbs.

Runs in the process of the ``mppool`` command: parses its arguments, runs one verb, returns
its exit status. The verbs of more than a screen live beside this module: ``serve`` in
`mppool.cli_serve`, the console (pause, resume, resize, kill, drain, reload, stop) in
`mppool.cli_console`; what every verb shares (errors, argument types, connecting) in
`mppool.cli_args`.

The library only logs; the command (these modules) is the one place that writes to the
terminal.

Exit status: 0 success, 1 failure (no supervisor, a bound that did not hold), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .address import display
from .cli_args import (
    EXIT_FAIL,
    EXIT_OK,
    CliError,
    NoAuthkeyOnCommandLine,
    address_arg,
    authkey_file_arg,
    connect_to,
    int_at_least,
    positive_float,
)
from .cli_console import add_console_verbs
from .cli_serve import cmd_serve
from .demo import POOL_NAME, Demo, DemoResult, KillReport
from .display import demo_summary, fitted_pools_table, header, kill_line, top_frame
from .errors import PoolException
from .version import __version__


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", type=address_arg, default=None,
                        help="unix socket path or host:port (default: $MPPOOL_ADDRESS, else the "
                             "per-user default socket)")
    common.add_argument("--authkey-file", dest="authkey", type=authkey_file_arg, default=None,
                        metavar="FILE",
                        help="file holding the key, in hex (default: $MPPOOL_AUTHKEY, else the "
                             "key file beside the socket)")
    # Declared so that it is refused with a hint, not taken as an abbreviation of
    # --authkey-file (argparse accepts unambiguous prefixes).
    common.add_argument("--authkey", nargs="?", action=NoAuthkeyOnCommandLine, help=argparse.SUPPRESS)
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--timeout", type=positive_float, default=2.0,
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
    p.add_argument("--cluster-lease-ttl", type=positive_float, default=None, metavar="S",
                   help="seconds after which a dead host's cluster units come back (default 10)")
    p.add_argument("--cluster-host", default=None, metavar="ID",
                   help="this host's id in the cluster (default: the host name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stats", parents=[common, client], help="every pool's stats")
    p.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("top", parents=[common, client], help="live view of pools, holders, waiters")
    p.add_argument("--interval", type=positive_float, default=1.0, metavar="S",
                   help="seconds between refreshes (default: 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("demo", parents=[common],
                       help="workers sharing a budget, with a check that the bound held",
                       description="Start a private supervisor and N worker processes sharing a "
                                   "token budget of C; SIGKILL one while it holds a token; check "
                                   "that at most C tokens were ever out and that none was lost. "
                                   "--address/--authkey-file default to a fresh private socket here.")
    p.add_argument("--workers", type=int_at_least(2), default=6, metavar="N",
                   help="worker processes (default: 6; one of them gets killed)")
    p.add_argument("--budget", type=int_at_least(1), default=2, metavar="C",
                   help="tokens in the shared budget (default: 2)")
    p.add_argument("--seconds", type=positive_float, default=5.0, metavar="S",
                   help="how long the workers run (default: 5)")
    p.set_defaults(func=cmd_demo)
    add_console_verbs(sub, [common, client])
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


def cmd_stats(ns: argparse.Namespace, out: Console, err: Console) -> int:
    client = connect_to(ns)
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
    client = connect_to(ns)
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
