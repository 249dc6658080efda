"""eventlet's ``tpool`` with the supervisor as the thread pool.

``execute(fn, *args, **kwargs)`` runs ``fn`` on the supervisor's worker threads and returns its
result; ``Proxy(obj)`` hosts ``obj`` in the supervisor and returns a proxy that every process
can call (it pickles, and reconnects wherever it is unpickled).

The supervisor is the one of ``use(client)``, else ``mppool.connect(autostart=True)``.
"""

from __future__ import annotations

from typing import Any

from .client import Client, HostedProxy, default_client
from .validate import check_callable, check_int

__all__ = ["Proxy", "execute", "killall", "set_num_threads", "use"]

_client: Client | None = None


def use(client: Client | None) -> None:
    """Make ``client``'s supervisor the thread pool (None: back to autostart)."""
    global _client
    _client = client


def _get_client() -> Client:
    client = _client
    return client if client is not None and not client._closed else default_client()


def execute(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in the supervisor's worker threads; exceptions propagate."""
    check_callable("fn", fn, required=True)
    return _get_client().execute(fn, *args, **kwargs)


class Proxy(HostedProxy):
    """``obj`` hosted in the supervisor; calls run there, results come back by value.

    ``autowrap`` and ``autowrap_names`` are accepted for eventlet compatibility: objects
    that are not plain data are always returned as proxies here.
    """

    __slots__ = ()

    def __init__(self, obj: Any, autowrap: tuple[type, ...] = (), autowrap_names: tuple[str, ...] = (),
                 *, _hid: int = 0, _client: Client | None = None) -> None:
        super().__init__(obj, _client or _get_client(), _hid)


def set_num_threads(n: int) -> None:
    """How many worker threads the supervisor may run (it grows on demand up to n)."""
    _get_client()._call("set_num_threads", check_int("n", n, minimum=1))


def killall() -> None:
    """Forget every hosted object; their proxies fail from now on."""
    _get_client()._call("killall")
