"""What every verb of the ``mppool`` command shares: exit statuses, the one-line error,
argument types, and how a verb reaches the supervisor that --address names.

Runs in the process of the ``mppool`` command (`mppool.cli` parses with these types, the
verbs connect with `connect_to`). A verb that fails raises `CliError`; `mppool.cli.main`
prints it in one line and returns its status. The one exception, `NoAuthkeyOnCommandLine`,
exits from inside argparse as argparse's own usage errors do.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from .address import Address, default_address, display, key_path, parse_address, parse_authkey
from .client import Client, connect
from .errors import ServerUnavailable

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report in one line, with the exit status to return."""

    def __init__(self, message: str, status: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ arguments


def address_arg(value: str) -> Address:
    try:
        return parse_address(value)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def authkey_file_arg(value: str) -> bytes:
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


class NoAuthkeyOnCommandLine(argparse.Action):
    """``--authkey KEY`` is gone: say what to use instead, in one line, and exit 2. The key
    itself is not repeated (and is already visible to other users while we run)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sys.stderr.write(f"{parser.prog}: error: --authkey is not accepted: a key on the command "
                         "line is visible to every local user; use --authkey-file FILE (the key in "
                         "hex, mode 0600) or MPPOOL_AUTHKEY\n")
        raise SystemExit(EXIT_USAGE)


def positive_float(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not f > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return f


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n
    return parse


# ---------------------------------------------------------------------- reaching the supervisor


def connect_to(ns: argparse.Namespace) -> Client:
    """A client of the supervisor that the verb's --address and --authkey-file name; a
    CliError in the command's own terms if there is none."""
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
