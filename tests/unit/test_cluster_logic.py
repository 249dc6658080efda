"""The pure parts of cluster pools: key naming, argument checks, and the state machine of
a cluster pool in one supervisor (`ClusterTokens`) driven by a fake agent (no Redis)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ManualScheduler

from mppool.cluster.agent import check_lease_ttl, default_host_id
from mppool.cluster.keys import (
    PoolKeys,
    check_host_id,
    check_prefix,
    host_counts,
    member_host,
    member_run,
)
from mppool.cluster.link import redact, require_redis
from mppool.cluster.tokens import ClusterTokens
from mppool.config import ConfigError, load_cluster, load_config
from mppool.errors import PoolClosed, ServerUnavailable, TimeOut
from mppool.holder import Holder
from mppool.state import Entry, WaiterBase

# ------------------------------------------------------------------ keys and checks


def test_keys_share_one_hash_tag() -> None:
    keys = PoolKeys.of("mppool", "db")
    assert keys.tag == "{mppool:db}"
    assert all(k.startswith("{mppool:db}:") for k in keys.script_keys)
    assert keys.wake("h|r") == "{mppool:db}:wake:h|r"
    # Braces in a name cannot move the hash tag.
    assert PoolKeys.of("p", "a{b}c").tag == "{p:a(b)c}"


def test_members() -> None:
    m = "web-1|abc123|42"
    assert member_run(m) == "web-1|abc123"
    assert member_host(m) == "web-1"
    assert host_counts(["a|x|1", "b|y|1", "a|x|2"]) == {"a": 2, "b": 1}


@pytest.mark.parametrize("bad", ["", "a|b", "a b", "x" * 129, None, 3])
def test_bad_host_ids_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="host id"):
        check_host_id(bad)


def test_default_host_id_is_valid() -> None:
    assert check_host_id(default_host_id())


@pytest.mark.parametrize("bad", ["", "a{b", None])
def test_bad_prefixes_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="prefix"):
        check_prefix(bad)


@pytest.mark.parametrize("bad", [0, 0.1, -1, float("nan"), float("inf"), "10", True])
def test_bad_lease_ttls_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="cluster_lease_ttl"):
        check_lease_ttl(bad)


def test_urls_lose_their_password_in_messages() -> None:
    assert redact("redis://user:secret@host:6379/0") == "redis://***@host:6379/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_missing_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install 'mppool\[cluster\]'"):
        require_redis()


def test_config_cluster_pool_and_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cluster]\nurl = "redis://r:6379/0"\nlease_ttl = 6\nhost = "web-1"\n'
                    '[pools.pg]\nkind = "token"\nscope = "cluster"\nmax_size = 200\n'
                    'max_using_delay_kill = 30\n')
    assert load_config(path)["pg"] == {"kind": "cluster", "max_size": 200,
                                       "max_using_delay_kill": 30.0}
    assert load_cluster(path) == {"cluster": "redis://r:6379/0", "cluster_lease_ttl": 6.0,
                                  "cluster_host": "web-1"}


@pytest.mark.parametrize("text, match", [
    ('[pools.x]\nkind = "token"\nscope = "galaxy"\n', "scope must be one of"),
    ('[pools.x]\nkind = "token"\nscope = "cluster"\nfun = "a:b"\n', "unknown key 'fun'"),
    ('[pools.x]\nkind = "token"\nscope = "cluster"\nmax_using_delay_kill = -1\n',
     "max_using_delay_kill"),
])
def test_config_refuses_bad_cluster_pools(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


@pytest.mark.parametrize("text, match", [
    ('[cluster]\nurl = "http://x"\n', "Redis URL"),
    ('[cluster]\nlease_ttl = 0\n', "cluster_lease_ttl"),
    ('[cluster]\nhost = "a|b"\n', "host id"),
    ('[cluster]\nport = 1\n', "unknown key"),
])
def test_config_refuses_bad_cluster_tables(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_cluster(path)


# ------------------------------------------------------------------ the state machine


class FakeAgent:
    """What ClusterTokens asks of its agent, recorded instead of sent to Redis."""

    def __init__(self) -> None:
        self.prefix = "t"
        self.host = "here"
        self.display_url = "redis://fake"
        self.ttl = 3.0
        self.healthy = True
        self.ops: list[tuple[Any, ...]] = []
        self.registered = 0
        self._n = 0

    def new_member(self) -> str:
        self._n += 1
        return f"here|run|{self._n}"

    def why_down(self) -> str:
        return "" if self.healthy else "ConnectionError: down"

    def register(self, pool: Any) -> bool:
        self.registered += 1
        return True

    def acquire(self, pool: Any, member: str, enqueue: bool) -> None:
        self.ops.append(("acquire", member, enqueue))

    def forget(self, pool: Any, members: list[str], returning: bool = False) -> None:
        self.ops.append(("forget", tuple(members), returning))

    def unregister(self, pool: Any, members: list[str]) -> None:
        self.ops.append(("unregister", tuple(members)))


class W(WaiterBase):
    __slots__ = ("alive",)

    def __init__(self, holder: Holder) -> None:
        super().__init__(holder)
        self.alive = True

    def _can_take(self) -> bool:
        return self.alive

    def _wake(self, result: Any) -> None:
        pass


HOLDER = Holder(pid=1234, start=1.0, host="h", conn=7)


def make(kill: float = 0.0) -> tuple[ClusterTokens, FakeAgent, ManualScheduler]:
    agent = FakeAgent()
    sched = ManualScheduler()
    pool = ClusterTokens("p", 2, agent, sched, W, kill_delay=kill)  # type: ignore[arg-type]
    return pool, agent, sched


def test_grant_now_then_return() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, W)
    assert agent.registered == 1 and agent.ops == [("acquire", "here|run|1", True)]
    assert not w.done  # nothing is decided before Redis answers
    pool.acquired("here|run|1", [1, 0])
    assert isinstance(w.result, Entry) and w.result.holder == HOLDER
    lease = w.result.lease
    assert pool._lent(lease, HOLDER) is w.result
    assert pool.stats()["nusing"] == 1
    assert pool._checkin(lease, holder=HOLDER)
    assert agent.ops[-1] == ("forget", ("here|run|1",), True)
    assert not pool._checkin(lease, holder=HOLDER)  # twice: refused
    assert pool.stats()["nusing"] == 0 and pool.stats()["nreturns"] == 1


def test_queued_then_woken() -> None:
    pool, _, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [0, 5])
    assert not w.done and pool.waiting() == 1
    pool.granted("here|run|1")
    assert isinstance(w.result, Entry)
    pool.granted("here|run|1")  # a second wake-up (renewal and list both told): nothing
    assert pool.stats()["nusing"] == 1


def test_a_wake_up_before_the_acquire_answer_waits_for_it() -> None:
    pool, _, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.granted("here|run|1")  # in flight: the acquire's own answer decides
    assert not w.done
    pool.acquired("here|run|1", [1, 0])
    assert isinstance(w.result, Entry)


def test_a_wake_up_before_the_queued_answer_is_not_lost() -> None:
    pool, _, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.granted("here|run|1")  # the grant overtook the acquire's own "queued" answer
    pool.acquired("here|run|1", [0, 3])
    assert isinstance(w.result, Entry)


def test_deadline_while_queued_is_a_timeout_and_withdraws_the_ticket() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [0, 1])
    assert pool._cancel(w) is True
    assert agent.ops[-1] == ("forget", ("here|run|1",), False)
    pool.granted("here|run|1")  # granted meanwhile: the forget above gives it back
    assert pool.stats()["nusing"] == 0


def test_deadline_without_an_answer_is_server_unavailable() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, W)
    assert pool._cancel(w) is False
    assert isinstance(w.result, ServerUnavailable)
    assert agent.ops[-1] == ("forget", ("here|run|1",), False)
    pool.acquired("here|run|1", [1, 0])  # the late answer: nobody is waiting for it
    assert pool.stats()["nusing"] == 0


def test_deadline_while_redis_is_down_is_server_unavailable() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [0, 1])
    agent.healthy = False
    assert pool._cancel(w) is False
    assert isinstance(w.result, ServerUnavailable) and "down" in str(w.result)


def test_try_only_waits_for_the_answer() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, None)
    assert agent.ops == [("acquire", "here|run|1", False)]
    assert pool._cancel(w) is False and not w.done  # timeout=0: Redis's answer decides
    pool.acquired("here|run|1", [2, 0])
    assert isinstance(w.result, TimeOut)


def test_failed_acquire_is_server_unavailable() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", ConnectionError("refused"))
    assert isinstance(w.result, ServerUnavailable) and "refused" in str(w.result)
    assert agent.ops[-1] == ("forget", ("here|run|1",), False)


def test_other_max_size_in_the_cluster() -> None:
    pool, _, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [-1, 5])
    assert isinstance(w.result, ValueError) and "max_size=5" in str(w.result)


def test_a_grant_to_a_waiter_gone_is_given_back() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, W)
    w.alive = False  # its connection closed
    pool.acquired("here|run|1", [1, 0])
    assert not w.done and pool.stats()["nusing"] == 0
    assert agent.ops[-1] == ("forget", ("here|run|1",), False)


def test_renewal_finds_a_lost_lease_and_its_return_is_ignored() -> None:
    pool, _, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [1, 0])
    lease = w.result.lease
    leases, members, tickets = pool.renewal()
    assert (leases, members, tickets) == ([lease], ["here|run|1"], [])
    pool.renewed(leases, members, tickets, [b"0", b"", 0, [b"other|r|1"], 2, 1])
    s = pool.stats()
    assert s["lost_leases"] == 1 and s["nusing"] == 0
    assert s["cluster"]["hosts"] == {"other": 1} and s["cluster"]["held"] == 1
    assert pool._checkin(lease, holder=HOLDER) is True  # ignored, quietly
    assert pool._checkin(lease, holder=HOLDER) is False  # only once


def test_renewal_grants_a_ticket_whose_wake_up_was_lost_and_requeues_a_lapsed_one() -> None:
    pool, agent, _ = make()
    w1, w2 = pool._acquire(HOLDER, W), pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [0, 1])
    pool.acquired("here|run|2", [0, 2])
    leases, members, tickets = pool.renewal()
    assert tickets == ["here|run|1", "here|run|2"]
    pool.renewed(leases, members, tickets, [b"", b"LX", 1, [b"here|run|1"], 2, 0])
    assert isinstance(w1.result, Entry)
    assert not w2.done and agent.ops[-1] == ("acquire", "here|run|2", True)


def test_a_returned_lease_redis_no_longer_had_counts_as_lost() -> None:
    pool, _, _ = make()
    pool.forgotten(["a"], [0], returning=True)
    pool.forgotten(["b"], [0], returning=False)  # a withdrawn ticket: not a lease
    assert pool.stats()["lost_leases"] == 1


def test_reclaim_and_drop_waiters_of_a_dead_connection() -> None:
    pool, agent, _ = make()
    w = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [1, 0])
    w2 = pool._acquire(HOLDER, W)
    assert pool._drop_waiters(lambda x: x is w2) == 1
    assert pool._reclaim(lambda h: h.conn == 7) == 1
    assert agent.ops[-1] == ("forget", ("here|run|1",), False)
    assert pool.stats()["nusing"] == 0 and pool.stats()["nwaiting"] == 0
    assert w.done


def test_kill_delay_takes_the_lease_back() -> None:
    pool, agent, sched = make(kill=5.0)
    killed = []
    pool.kill_holder = True
    pool.on_kill_holder = lambda holder, age: killed.append(holder)
    w = pool._acquire(HOLDER, W)
    assert agent.ops[-1] == ("acquire", "here|run|1", True)
    pool.acquired("here|run|1", [1, 0])
    sched.advance(5.1)
    assert pool.stats()["nkilled"] == 1 and pool.stats()["nusing"] == 0
    assert agent.ops[-1] == ("forget", ("here|run|1",), False)
    assert killed == [HOLDER]
    assert pool._checkin(w.result.lease, holder=HOLDER) is False  # killed: refused


def test_unavailable_fails_every_waiter_and_shutdown_gives_everything_back() -> None:
    pool, agent, _ = make()
    w1 = pool._acquire(HOLDER, W)
    pool.acquired("here|run|1", [1, 0])
    w2 = pool._acquire(HOLDER, W)
    pool.unavailable(ConnectionError("gone"))
    assert isinstance(w2.result, ServerUnavailable)
    assert pool.stats()["nusing"] == 1  # units held stay usable
    pool.shutdown()
    assert agent.ops[-1] == ("unregister", ("here|run|1",))
    with pytest.raises(PoolClosed):
        pool._acquire(HOLDER, W)
    assert isinstance(w1.result, Entry)


def test_cluster_pools_refuse_resize() -> None:
    pool, _, _ = make()
    with pytest.raises(ValueError, match="cluster pool"):
        pool.resize(3)
