"""The supervisor's connections to Redis: every call has a deadline, none runs on the lease
loop.

redis-py is optional (the ``cluster`` extra); `require_redis` says how to get it. Scripts
run by their SHA (``EVALSHA``), loaded again when Redis forgot them (a restart, a failover),
and batched: the calls queued while one round trip was in flight go together in the next
pipeline, so many gets cost few round trips.
"""

from __future__ import annotations

from typing import Any

from .scripts import SCRIPTS, SHAS

EXTRA_HINT = "pip install 'mppool[cluster]'"


def require_redis() -> Any:
    """The redis module, or an ImportError that names the extra to install."""
    try:
        import redis
    except ImportError:
        raise ImportError(f"cluster pools need the redis-py client: {EXTRA_HINT}") from None
    return redis


def connect(url: str, timeout: float, read_timeout: float | None = None) -> Any:
    """A redis-py client for ``url`` whose every call fails within ``read_timeout`` (default
    ``timeout``) seconds, without retries (the caller decides what a failure means)."""
    redis = require_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"cluster must be a Redis URL (redis://host:port/db, rediss://..., "
                         f"unix://path), got {_redact(url)!r}")
    return redis.Redis.from_url(url, socket_timeout=read_timeout or timeout,
                                socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                                health_check_interval=0)


def _redact(url: object) -> object:
    """A URL without its password, fit for an error message or a log line."""
    if not isinstance(url, str) or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


redact = _redact


def run_scripts(client: Any, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
    """Run ``(script name, keys, args)`` calls in one pipeline; per call its result or the
    exception it raised. A connection failure raises (for the whole batch)."""
    redis = require_redis()
    results = _pipeline(client, calls)
    again = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
    if again:
        # Redis forgot the scripts (restart, failover): load them, run those calls again.
        for src in SCRIPTS.values():
            client.script_load(src)
        for i, r in zip(again, _pipeline(client, [calls[i] for i in again]), strict=True):
            results[i] = r
    return results


def _pipeline(client: Any, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
    if len(calls) == 1:
        # One call alone: redis-py's pipeline machinery would cost more than the round trip.
        redis = require_redis()
        name, keys, args = calls[0]
        try:
            return [client.execute_command("EVALSHA", SHAS[name], len(keys), *keys, *args)]
        except redis.exceptions.ResponseError as exc:  # NOSCRIPT, a script error: per call
            return [exc]
    pipe = client.pipeline(transaction=False)
    for name, keys, args in calls:
        pipe.execute_command("EVALSHA", SHAS[name], len(keys), *keys, *args)
    return list(pipe.execute(raise_on_error=False))
