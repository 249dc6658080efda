"""Fixtures for tests that need a real supervisor process."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest

import mppool


@pytest.fixture
def server() -> Iterator[mppool.Server]:
    srv = mppool.Server().start()
    try:
        yield srv
    finally:
        srv.shutdown()


@pytest.fixture
def client(server: mppool.Server) -> Iterator[Any]:
    c = mppool.connect(server.address, server.authkey)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes a test starts; whatever is still alive at the end is killed, by pid."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)


def fork_ctx() -> Any:
    return multiprocessing.get_context("fork")
