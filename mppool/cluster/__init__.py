"""Cluster pools: supervisors on many hosts share token pools through Redis.

    host A: workers ─▶ supervisor ─┐                      ┌─ supervisor ◀─ workers :host B
                     (ClusterTokens,│   Lua scripts, one   │
                      ClusterAgent) └──▶ key set per pool ◀┘
                                         in Redis (keys.py)

Workers talk only to their own host's supervisor, with the API of any shared pool; the
supervisor holds leases in Redis on their behalf:

- keys.py     the Redis keys of a pool (one hash tag) and how members are named
- scripts.py  acquire, forget, renew, declare: Lua, expiry in Redis server time
- link.py     redis-py connections with deadlines; batched script calls; the extra's hint
- agent.py    ``ClusterAgent``: the supervisor's threads that talk to Redis
- tokens.py   ``ClusterTokens``: a cluster pool as the lease loop sees it

See docs/cluster.md for the guarantees and their limits.
"""

from .agent import DEFAULT_LEASE_TTL, ClusterAgent, check_lease_ttl
from .tokens import ClusterTokens

__all__ = ["DEFAULT_LEASE_TTL", "ClusterAgent", "ClusterTokens", "check_lease_ttl"]
