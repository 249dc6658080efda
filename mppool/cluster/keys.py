"""Where a cluster pool lives in Redis, and how its members are named (pure functions).

Every key of one cluster pool shares one hash tag, ``{<prefix>:<name>}``, so that the whole
pool sits in one slot of a Redis Cluster and every script touches one slot only:

    {mppool:db}:meta        hash   max_size (declared by the first host, checked by the others)
    {mppool:db}:leases      zset   member -> expiry (ms, Redis server time)
    {mppool:db}:kill        hash   member -> hard deadline (ms): max_using_delay_kill
    {mppool:db}:queue       zset   ticket -> sequence number (first come, first served)
    {mppool:db}:qlive       zset   ticket -> liveness expiry (ms): a waiter's host is alive
    {mppool:db}:tkill       hash   ticket -> its kill delay (ms), applied when it is granted
    {mppool:db}:seq         string the ticket counter
    {mppool:db}:wake:<run>  list   tickets granted to the supervisor run <run> (BLPOP)

A member (a lease, or a ticket that becomes the lease once granted) is
``<host>|<run>|<n>``: the host id shown in stats, the supervisor run (random, so a restarted
supervisor never mistakes an old lease for its own) and a counter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KEY_NAMES = ("meta", "leases", "queue", "qlive", "kill", "tkill", "seq")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


def check_host_id(host: object) -> str:
    """A host id as members carry it: 1-128 characters of ``[A-Za-z0-9_.:@-]``."""
    if not isinstance(host, str) or not _HOST_RE.match(host):
        raise ValueError(f"cluster host id must be 1-128 characters of letters, digits and "
                         f"'_.:@-', got {host!r}")
    return host


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{}\n"):
        raise ValueError(f"cluster key prefix must be a non-empty string without braces, "
                         f"got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class PoolKeys:
    """The keys of one cluster pool (all in one hash slot)."""

    tag: str  # "{prefix:name}"

    @classmethod
    def of(cls, prefix: str, name: str) -> PoolKeys:
        # Braces in a name would move the hash tag: they are escaped away.
        safe = name.replace("{", "(").replace("}", ")")
        return cls("{" + f"{prefix}:{safe}" + "}")

    def key(self, what: str) -> str:
        return f"{self.tag}:{what}"

    @property
    def script_keys(self) -> list[str]:
        """KEYS of every script, in the order the scripts expect."""
        return [self.key(k) for k in KEY_NAMES]

    @property
    def wake_prefix(self) -> str:
        return self.key("wake:")

    def wake(self, run: str) -> str:
        return self.wake_prefix + run


def member_run(member: str) -> str:
    """``host|run`` of a member: whose wake-up list hears of its grant."""
    return member.rsplit("|", 1)[0]


def member_host(member: str) -> str:
    return member.split("|", 1)[0]


def host_counts(members: list[str]) -> dict[str, int]:
    """Leases held per host, from the members of the lease set."""
    out: dict[str, int] = {}
    for m in members:
        h = member_host(m)
        out[h] = out.get(h, 0) + 1
    return out
