"""client.execute() and client.host(): code and objects kept in the supervisor (what
mppool.tpool did before it became eventlet's in-process thread pool)."""

from __future__ import annotations

import os
import pickle

import pytest
from helpers import fork_ctx

pytestmark = pytest.mark.slow


def test_execute_runs_in_the_supervisor(client, server):
    assert client.execute(os.getpid) == server.pid
    factor = 3
    assert client.execute(lambda a, b=0: (a + b) * factor, 1, b=2) == 9


def test_execute_propagates_exceptions(client):
    def boom():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing") as info:
        client.execute(boom)
    assert "boom" in info.value.remote_traceback  # the supervisor-side traceback, as text


def test_host_keeps_the_object_in_the_supervisor(client):
    p = client.host({"a": 1})
    p["b"] = 2
    assert p.get("b") == 2 and len(p) == 2
    assert sorted(p.keys()) == ["a", "b"]  # a proxied view, iterated remotely
    assert "a" in p
    del p["a"]
    assert p.copy() == {"b": 2}
    f = client.host(lambda x: x * 2)
    assert f(21) == 42
    assert client.host(os.getpid)() != os.getpid()


def test_hosted_object_shared_by_other_processes(client, procs):
    p = client.host([])
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


def test_set_num_threads_and_unhost_all(client):
    client.set_num_threads(4)
    with pytest.raises(ValueError, match="n"):
        client.set_num_threads(0)
    p = client.host([1])
    assert p.copy() == [1]
    client.unhost_all()
    with pytest.raises(KeyError):
        p.copy()
