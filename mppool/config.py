"""``mppool serve --config pools.toml``: pools declared in a TOML file, checked before any
starts.

    [pools.db]                        [pools.api]
    fun = "myapp.db:connect"          kind = "token"
    max_size = 10                     max_size = 5
    closer = "myapp.db:close"

    [cluster]                         [pools.pg]
    url = "redis://redis:6379/0"      kind = "token"
    lease_ttl = 10.0                  scope = "cluster"      # shared by every host
    host = "web-1"                    max_size = 200

Functions and hooks are import paths (``module:attribute``). Every option is checked exactly as
the supervisor will check it (a trial ``Pool`` with ``min_size=0``, so ``fun`` is not called),
and a mistake is a `ConfigError` naming the file, the pool and the key.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import (
    CLUSTER_OPTIONS,
    HOOKS,
    KINDS,
    POOL_OPTIONS,
    SCOPES,
    TRANSFERS,
    cluster_token_options,
    token_pool_options,
)
from .pool import Pool
from .validate import check_int

# A host token pool's lease limits, as for any pool: warn about a token held past
# max_using_delay, take it back past max_using_delay_kill (and terminate its holder with
# kill_holder). Clients attach with its size alone (client.token_pool(name, max_size)).
TOKEN_LIMITS = ("max_using_delay", "max_using_delay_kill", "kill_holder")
TOKEN_KEYS = frozenset(("kind", "max_size", "scope", *TOKEN_LIMITS))
CLUSTER_KEYS = frozenset(("url", "lease_ttl", "host", "prefix"))


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


def _import_path(where: str, key: str, value: Any) -> Callable[..., Any]:
    if not isinstance(value, str) or value.count(":") != 1:
        raise ConfigError(f"{where}: {key} must be an import path \"module:attribute\", got {value!r}")
    modname, _, attr = value.partition(":")
    if not modname or not attr:
        raise ConfigError(f"{where}: {key} must be an import path \"module:attribute\", got {value!r}")
    try:
        obj: Any = importlib.import_module(modname)
    except ImportError as exc:
        raise ConfigError(f"{where}: {key} = {value!r}: cannot import module {modname!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{where}: {key} = {value!r}: {modname!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"{where}: {key} = {value!r} is not callable")
    return obj


def _check_keys(where: str, spec: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {keys} for {what} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _pool_options(where: str, spec: Any) -> dict[str, Any]:
    """One ``[pools.NAME]`` table as ``supervisor.serve`` takes it, fully validated."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table, got {spec!r}")
    kind = spec.get("kind", "pool")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if kind == "token" and spec.get("scope", "host") != "host":
        return _cluster_pool(where, spec)
    if kind == "token":
        _check_keys(where, spec, TOKEN_KEYS, "a token pool")
        try:
            max_size = check_int("max_size", spec.get("max_size", 4), minimum=1)
            # What client.token_pool() sends, plus the limits (checked by a trial Pool).
            opts = {**token_pool_options(max_size),
                    **{k: spec[k] for k in TOKEN_LIMITS if spec.get(k)}}
            Pool(**opts).shutdown()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return {"kind": "token", **opts}
    _check_keys(where, spec, POOL_OPTIONS | {"kind", "transfer", "fun"}, "a pool")
    transfer = spec.get("transfer", "copy")
    if transfer not in TRANSFERS:
        raise ConfigError(f"{where}: transfer must be one of {', '.join(map(repr, TRANSFERS))}, "
                          f"got {transfer!r}")
    if "fun" not in spec:
        raise ConfigError(f"{where}: missing key 'fun' (an import path \"module:function\" that "
                          "creates an object)")
    opts = {k: v for k, v in spec.items() if k not in ("kind", "transfer")}
    for key in ("fun", *HOOKS):
        if key in opts:
            opts[key] = _import_path(where, key, opts[key])
    try:
        min_size = check_int("min_size", opts.get("min_size", 1))
        max_size = opts.get("max_size", 0)
        if isinstance(max_size, int) and max_size and min_size > max_size:
            raise ValueError(f"min_size={min_size!r} must not exceed max_size={max_size!r}")
        # A trial pool checks every option exactly as the supervisor will; min_size=0 so that
        # fun is not called here.
        Pool(**dict(opts, min_size=0)).shutdown()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return {"kind": "pool", "transfer": transfer, **opts}


def _cluster_pool(where: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A ``scope = "cluster"`` token pool: shared through Redis by every host."""
    if spec.get("scope") not in SCOPES:
        raise ConfigError(f"{where}: scope must be one of {', '.join(map(repr, SCOPES))}, "
                          f"got {spec.get('scope')!r}")
    _check_keys(where, spec, CLUSTER_OPTIONS | {"kind", "scope"}, "a cluster token pool")
    try:
        max_size = check_int("max_size", spec.get("max_size", 4), minimum=1)
        kill = spec.get("max_using_delay_kill", 0)
        if isinstance(kill, bool) or not isinstance(kill, (int, float)) or not kill >= 0:
            raise ValueError(f"max_using_delay_kill must be a number of seconds >= 0, got {kill!r}")
        kill_holder = spec.get("kill_holder", False)
        if not isinstance(kill_holder, bool):
            raise ValueError(f"kill_holder must be true or false, got {kill_holder!r}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return {"kind": "cluster", **cluster_token_options(
        max_size, max_using_delay_kill=float(kill), kill_holder=kill_holder)}


def load_cluster(path: Path) -> dict[str, Any]:
    """The ``[cluster]`` table of a config file (url, lease_ttl, host, prefix), checked;
    empty when there is none."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    spec = data.get("cluster", {})
    where = f"{path}: [cluster]"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(where, spec, CLUSTER_KEYS, "the cluster")
    from .cluster.agent import check_lease_ttl
    from .cluster.keys import check_host_id, check_prefix

    out: dict[str, Any] = {}
    try:
        if "url" in spec:
            if not isinstance(spec["url"], str) or not spec["url"].startswith(
                    ("redis://", "rediss://", "unix://")):
                raise ValueError("url must be a Redis URL (redis://host:port/db)")
            out["cluster"] = spec["url"]
        if "lease_ttl" in spec:
            out["cluster_lease_ttl"] = check_lease_ttl(spec["lease_ttl"])
        if "host" in spec:
            out["cluster_host"] = check_host_id(spec["host"])
        if "prefix" in spec:
            out["cluster_prefix"] = check_prefix(spec["prefix"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return out


def load_config(path: Path) -> dict[str, dict[str, Any]]:
    """Pools declared in a TOML file: ``[pools.NAME]`` tables; ConfigError names what is wrong."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"pools", "cluster"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))} "
                          "(expected [pools.NAME] tables and a [cluster] table)")
    pools = data.get("pools", {})
    if not isinstance(pools, dict):
        raise ConfigError(f"{path}: 'pools' must be a table of [pools.NAME] tables")
    return {name: _pool_options(f"{path}: pool {name!r}", spec) for name, spec in pools.items()}
