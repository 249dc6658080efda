"""The operator's console on the command line: ``mppool pause|resume|resize|kill|drain|
reload|stop``.

Runs in the process of the ``mppool`` command. Each verb is one audited control-plane call
of `mppool.Client` (``Client.pause`` ...) to the supervisor that --address names, and one
line on stdout saying what changed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rich.console import Console

from .cli_args import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, connect_to, int_at_least
from .client import Client
from .errors import PoolException


def add_console_verbs(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
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
    p.add_argument("max_size", metavar="N", type=int_at_least(0), help="the new max_size (0: unbounded)")
    p = verb("kill", "take back every lease of the pool held by a process", cmd_kill)
    p.add_argument("--pid", type=int_at_least(1), required=True, metavar="P", help="the holder's pid")
    p.add_argument("--terminate", action="store_true",
                   help="also SIGTERM it (SIGKILL 2 s later); only a unix-socket client, "
                        "whose pid the kernel gave")
    verb("drain", "close the pool's idle objects and refill min_size with new ones", cmd_drain)
    verb("reload", "re-read the supervisor's --config file: create, resize, remove pools",
         cmd_reload, pool=False)
    verb("stop", "stop the supervisor gracefully (as SIGTERM does)", cmd_stop, pool=False)


def _console_call(ns: argparse.Namespace, call: Callable[[Client], Any]) -> Any:
    client = connect_to(ns)
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
