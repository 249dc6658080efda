"""A Server leaves nothing behind: its private directory and files go at shutdown."""

from __future__ import annotations

import os

import pytest

import mppool
from mppool.supervisor import serve

pytestmark = pytest.mark.slow


def test_shutdown_removes_the_private_directory():
    srv = mppool.Server().start()
    d = os.path.dirname(srv.address)
    assert os.path.isdir(d)
    srv.shutdown()
    assert not os.path.exists(d)


def test_serve_with_a_bad_pool_leaves_nothing_half_started(tmp_path):
    addr = str(tmp_path / "s.sock")
    with pytest.raises(TypeError, match="max_size"):
        serve(addr, os.urandom(16), pools={"bad": {"fun": abs, "max_size": "many"}})
    assert not os.path.exists(addr) and not os.path.exists(addr + ".lease")


def test_a_bad_key_leaves_no_directory():
    import glob
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "mppool-*")))
    for bad in (b"", "not hex", 42):
        with pytest.raises((TypeError, ValueError), match="authkey"):
            mppool.Server(authkey=bad)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "mppool-*"))) <= before


def test_calls_on_a_shut_down_shared_pool_raise_pool_closed(server, client):
    pool = client.pool("gone", lambda i: i, max_size=1)
    pool.shutdown()
    with pytest.raises(mppool.PoolClosed):
        pool.stats()
    with pytest.raises(mppool.PoolClosed):
        pool.free()
