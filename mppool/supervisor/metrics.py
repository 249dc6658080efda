"""Prometheus metrics for a supervisor (``mppool serve --metrics-port N``).

Gauges and counters are read from every pool's ``stats()`` at scrape time, so the hot path
pays nothing for them. The two histograms (acquire wait, hold time) are observed by the
lease loop, only when metrics are on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..counters import COUNTERS, HELP
from ..shm import HOLD_BUCKETS
from .fastviews import fold_metrics

if TYPE_CHECKING:
    from .core import Supervisor

BUCKETS = HOLD_BUCKETS  # the fast path counts hold times in the same buckets


class Metrics:
    """Histograms observed by the lease loop, and a collector of the pools' stats."""

    def __init__(self, sup: Supervisor, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = registry or CollectorRegistry()
        # First: at a scrape, the fast leases are folded into the histograms before they
        # are read (a registry collects in the order of registration).
        self.registry.register(_FastFold(sup, self))
        self.wait = Histogram("mppool_acquire_wait_seconds", "Time a get() waited for an object",
                              ["pool"], buckets=BUCKETS, registry=self.registry)
        self.hold = Histogram("mppool_hold_seconds", "Time an object was held before ret()",
                              ["pool"], buckets=BUCKETS, registry=self.registry)
        self.registry.register(_StatsCollector(sup))

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        from prometheus_client import start_http_server

        return start_http_server(port, addr=addr, registry=self.registry)


class _FastFold:
    """Collects nothing: adds the fast leases of every region to the histograms."""

    def __init__(self, sup: Supervisor, metrics: Metrics) -> None:
        self.sup, self.metrics = sup, metrics

    def collect(self) -> Iterator[Any]:
        for region in list(self.sup.loop.fast_regions.values()):
            fold_metrics(region, self.metrics.wait, self.metrics.hold)
        return iter(())


class _StatsCollector:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        gauges = {
            "size": ("mppool_pool_objects", "Objects the pool manages (idle + in use)", "nobjs"),
            "max": ("mppool_pool_max_size", "The pool's bound (0: unbounded)", "max_size"),
            "using": ("mppool_pool_in_use", "Objects lent out", "nusing"),
            "idle": ("mppool_pool_idle", "Objects idle in the pool", "navail"),
            "waiting": ("mppool_pool_waiting", "Blocked get() calls", "nwaiting"),
        }
        counters = {
            "borrows": ("mppool_pool_borrows", "Objects lent", "nborrows"),
            "created": ("mppool_pool_created", "Objects created", "ncreated"),
            "kills": ("mppool_pool_kills", "Leases killed for exceeding max_using_delay_kill",
                      "nkilled"),
            "destroys": ("mppool_pool_destroys", "Objects closed", "ndestroys"),
        }
        counters.update({key: (f"mppool_pool_{key}", f"psycopg_pool's {key}: {HELP[key]}", key)
                         for key in COUNTERS})
        stats = self.sup.stats()
        for name, help_, key in gauges.values():
            g = GaugeMetricFamily(name, help_, labels=["pool"])
            for pool, s in stats.items():
                g.add_metric([pool], float(s[key] or 0))
            yield g
        for name, help_, key in counters.values():
            c = CounterMetricFamily(name, help_, labels=["pool"])
            for pool, s in stats.items():
                c.add_metric([pool], float(s.get(key) or 0))
            yield c
        yield from _cluster_metrics(stats)
        r = CounterMetricFamily("mppool_reclaimed", "Leases reclaimed from processes that died")
        r.add_metric([], float(self.sup.watchdog.nreclaimed))
        yield r


def _cluster_metrics(stats: dict[str, Any]) -> Iterator[Any]:
    """Cluster pools: units held per host (as the last renewal saw Redis), the cluster's
    queue, leases found lost, and whether Redis answers."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    cluster = {name: s["cluster"] for name, s in stats.items() if s.get("cluster")}
    if not cluster:
        return
    held = GaugeMetricFamily("mppool_cluster_held", "Cluster units held, per host",
                             labels=["pool", "host"])
    queue = GaugeMetricFamily("mppool_cluster_queue", "Gets queued in the whole cluster",
                              labels=["pool"])
    lost = CounterMetricFamily("mppool_cluster_lost_leases", "Cluster leases found lapsed "
                               "in Redis (a frozen supervisor, a Redis failover)", labels=["pool"])
    up = GaugeMetricFamily("mppool_cluster_redis_up", "1 if the cluster's Redis answers",
                           labels=["pool"])
    for name, c in cluster.items():
        for host, n in sorted((c.get("hosts") or {}).items()):
            held.add_metric([name, host], float(n))
        queue.add_metric([name], float(c.get("queue") or 0))
        lost.add_metric([name], float(stats[name].get("lost_leases", 0)))
        up.add_metric([name], 1.0 if c.get("redis_ok") else 0.0)
    yield from (held, queue, lost, up)
