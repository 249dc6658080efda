"""Code and objects hosted in the supervisor: ``client.execute(fn)`` and ``client.host(obj)``.

Both travel with dill on the control plane. Calls run on a thread pool of their own, never on
a pool's threads nor on the lease loop; hosted objects live until ``killall()`` (nothing
counts their proxies across processes).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dill

log = logging.getLogger("mppool")


class Hosted:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[int, Any] = {}
        self.next_id = 1
        self.executor = ThreadPoolExecutor(8, thread_name_prefix="mppool-hosted")

    def submit(self, fn: Any, *args: Any) -> Future[Any] | None:
        try:
            return self.executor.submit(fn, *args)
        except RuntimeError:
            log.warning("mppool: cannot start a thread for a hosted call", exc_info=True)
            return None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def execute(self, blob: bytes) -> Any:
        """Run a dill-shipped call on the worker threads; its exception propagates."""
        fn, args, kwargs = dill.loads(blob)
        return self.executor.submit(fn, *args, **kwargs).result()

    def host(self, blob: bytes) -> int:
        obj = dill.loads(blob)
        with self.lock:
            hid = self.next_id
            self.next_id += 1
            self.objects[hid] = obj
        return hid

    def unhost(self, hid: int) -> None:
        with self.lock:
            self.objects.pop(hid, None)

    def set_num_threads(self, n: int) -> None:
        # ThreadPoolExecutor grows up to _max_workers on demand; idle extra threads stay
        # parked if it shrinks, which is harmless.
        self.executor._max_workers = n

    def killall(self) -> None:
        with self.lock:
            self.objects.clear()

