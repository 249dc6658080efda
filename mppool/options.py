"""What a shared pool may be created with, in one place.

The client checks option names against `POOL_OPTIONS` before anything travels, the command
line's TOML config does the same, and the supervisor checks ``transfer`` against `TRANSFERS`.
A token pool is always created from `token_pool_options`, so that one declared in a config
file and one asked for by ``client.token_pool()`` are the same pool (their options compare
equal).
"""

from __future__ import annotations

from typing import Any

# Hooks run in the supervisor, on the pool's own threads (check and reconnect_failed too).
HOOKS = ("opener", "getter", "retter", "closer", "health", "stats", "tracer", "check",
         "reconnect_failed")
POOL_OPTIONS = frozenset((
    "max_size", "min_size", "timeout", "max_use", "max_avail_delay", "max_using_delay",
    "max_using_delay_kill", "health_freq", "delay", "log_level", "max_lifetime", "kill_holder",
    "burst_limit", "check_after", "max_waiting", "reconnect_timeout", *HOOKS,
))
TRANSFERS = ("copy", "proxy")
KINDS = ("pool", "token")
SCOPES = ("host", "cluster")
# What a cluster token pool may be declared with (in a config file); its units are leased
# in Redis, so objects' options (fun, hooks, lifetimes) mean nothing for it.
CLUSTER_OPTIONS = frozenset(("max_size", "max_using_delay_kill", "kill_holder"))


class TokenMaker:
    """The picklable ``fun`` of token pools: a new, distinct `mppool.pools.Token`."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __call__(self, i: int) -> Any:
        return self.cls(i)  # numbered: holders are told apart in stats and `mppool top`


def token_pool_options(max_size: int) -> dict[str, Any]:
    """The options of a token pool of ``max_size`` tokens."""
    from .pools import Token

    return {"fun": TokenMaker(Token), "max_size": int(max_size), "min_size": 0}


def cluster_token_options(max_size: int, **options: object) -> dict[str, object]:
    """The options of a cluster token pool (kind "cluster"): those of every host that
    declares it must match, or ValueError."""
    return {"max_size": int(max_size), **{k: v for k, v in options.items() if v}}
