"""``Supervisor``: the parts of the supervisor process, wired together.

    Supervisor
    ├ registry   named pools (registry.py), each with its own threads for user code
    ├ loop       the lease loop: get/put for every client on one thread (leases.py)
    ├ watchdog   reclaims what dead processes held; lease-kill signals (watchdog.py)
    ├ hosted     client.execute() / client.host() (hosted.py)
    ├ cluster    with ``cluster=URL``: the Redis side of cluster pools (`mppool.cluster`)
    └ sched      housekeeping rounds of every pool (they only decide; user code runs on the
                 pools' own threads)

The threads that must always run (lease loop, scheduler, watchdog, kill timers) never run
user code, which may hang for ever.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import Future
from typing import Any

from ..address import Address, display, lease_address
from ..clock import REAL_CLOCK, Clock
from ..protocol import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_MESSAGE, DEFAULT_MAX_UNREAD
from ..sched import Scheduler
from .conn import RemoteWaiter
from .console import Console
from .hosted import Hosted
from .leases import Conn, LeaseLoop
from .registry import Record, Registry
from .watchdog import Watchdog


class Supervisor:
    def __init__(self, address: Address, authkey: bytes, clock: Clock = REAL_CLOCK,
                 scan_interval: float = 0.2, *, max_message: int = DEFAULT_MAX_MESSAGE,
                 max_unread: int = DEFAULT_MAX_UNREAD,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 cluster: str | None = None, cluster_lease_ttl: float = 10.0,
                 cluster_host: str | None = None, cluster_prefix: str = "mppool") -> None:
        self.address = address
        self.clock = clock
        # This run of the supervisor: pool ids mean something only on the run that issued
        # them, and a client reconnecting to a restart at the same address must know.
        self.instance = secrets.randbits(63) or 1
        self.sched = Scheduler(clock, workers=2, name="mppool-hk")
        self.registry = Registry(clock, self.sched)
        self.by_id = self.registry.by_id  # read by the lease loop on the hot path
        self.hosted_objects = Hosted()
        self.hosted = self.hosted_objects.objects
        self.metrics: Any = None  # metrics.Metrics when serving Prometheus metrics
        self.loop = LeaseLoop(self, lease_address(address), authkey, max_message=max_message,
                              max_unread=max_unread, handshake_timeout=handshake_timeout)
        self.watchdog = Watchdog(self.registry, self.loop, clock, scan_interval)
        self.registry.on_kill_holder = self.watchdog.terminate_holder
        self.console = Console(self)  # the operator's verbs (console.py)
        self.cluster: Any = None  # cluster.ClusterAgent when serving cluster pools
        if cluster:
            from ..cluster import ClusterAgent

            self.cluster = ClusterAgent(cluster, cluster_lease_ttl, cluster_host, cluster_prefix)
            self.registry.make_cluster = self._make_cluster

    def start(self) -> None:
        self.loop.thread.start()
        self.watchdog.start()
        if self.cluster is not None:
            self.cluster.start()

    def stop(self) -> None:
        self.watchdog.stopped.set()
        self.loop.stop()
        self.registry.close_all()
        if self.cluster is not None:
            self.cluster.stop()
        self.hosted_objects.close()
        self.sched.close()
        self.watchdog.stop()

    def _make_cluster(self, name: str, options: dict[str, Any]) -> Any:
        """A cluster token pool, its max_size checked against the cluster's (in Redis)."""
        from ..cluster import ClusterTokens

        pool = ClusterTokens(name, options["max_size"], self.cluster, self.sched, RemoteWaiter,
                             kill_delay=float(options.get("max_using_delay_kill") or 0.0),
                             kill_holder=bool(options.get("kill_holder")))
        self.cluster.declare(pool)
        pool.register()  # renewals (and each host's holders in stats) from now on
        return pool

    # what the lease loop needs
    def release_conn(self, conn: Conn) -> None:
        self.watchdog.release_conn(conn)

    def submit_hosted(self, fn: Any, *args: Any) -> Future[Any] | None:
        return self.hosted_objects.submit(fn, *args)

    # what the control plane needs
    def create(self, name: str, kind: str, transfer: str, blob: bytes | None) -> Record:
        return self.registry.create(name, kind, transfer, blob)

    def get_record(self, name: str) -> Record:
        return self.registry.get_record(name)

    def drop(self, name: str, delay: float = 0.0) -> None:
        self.registry.drop(name, delay)

    def stats(self) -> dict[str, Any]:
        return self.registry.stats()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "lease_address": self.loop.address,
                "address": display(self.address), "connections": len(self.loop.conns),
                "nreclaimed": self.watchdog.nreclaimed, "nscans": self.watchdog.nscans,
                "cluster": None if self.cluster is None else {
                    "url": self.cluster.display_url, "host": self.cluster.host,
                    "lease_ttl": self.cluster.ttl, "redis_ok": self.cluster.healthy}}
