"""mppool.tpool: calls run in the supervisor."""

from __future__ import annotations

import os
import pickle

import pytest
from helpers import fork_ctx

from mppool import tpool

pytestmark = pytest.mark.slow


@pytest.fixture
def tp(client):
    tpool.use(client)
    yield client
    tpool.use(None)


def test_execute_runs_in_the_supervisor(tp, server):
    assert tpool.execute(os.getpid) == server.pid
    factor = 3
    assert tpool.execute(lambda a, b=0: (a + b) * factor, 1, b=2) == 9


def test_execute_propagates_exceptions(tp):
    def boom():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        tpool.execute(boom)
    with pytest.raises(TypeError, match="fn"):
        tpool.execute(42)


def test_proxy_hosts_the_object(tp, server):
    p = tpool.Proxy({"a": 1})
    p["b"] = 2
    assert p.get("b") == 2 and len(p) == 2
    assert sorted(p.keys()) == ["a", "b"]  # a proxied view, iterated remotely
    assert "a" in p
    del p["a"]
    assert p.copy() == {"b": 2}
    f = tpool.Proxy(lambda x: x * 2)
    assert f(21) == 42


def test_proxy_shared_by_other_processes(tp, procs):
    p = tpool.Proxy([])
    blob = pickle.dumps(p)
    ctx = fork_ctx()

    def child(blob=blob):
        q = pickle.loads(blob)
        q.append(os.getpid())

    for _ in range(3):
        pr = ctx.Process(target=child)
        procs.append(pr)
        pr.start()
        pr.join(10)
        assert pr.exitcode == 0
    assert len(p.copy()) == 3 and all(pid != os.getpid() for pid in p.copy())


def test_set_num_threads_and_killall(tp):
    tpool.set_num_threads(4)
    with pytest.raises(ValueError, match="n"):
        tpool.set_num_threads(0)
    p = tpool.Proxy([1])
    assert p.copy() == [1]
    tpool.killall()
    with pytest.raises(KeyError):
        p.copy()
