"""The chaos run of test_chaos.py with its token pool on the normal path (MPPOOL_FAST=0 makes
every ``token_pool()`` of the run, in every process it starts, ``fast=False``, so every lease
is a message to the supervisor): holders and waiters SIGKILLed and SIGSTOPped, the supervisor
killed and restarted, garbage sent, and still nothing lost and nothing held twice.
test_chaos.py itself runs with the default, the fast path, and checks that it took it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_chaos import test_chaos_kills_stops_restarts_and_garbage_lose_nothing as chaos

pytestmark = [pytest.mark.slow, pytest.mark.kill]


def test_chaos_on_the_normal_path(reap: None, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPPOOL_FAST", "0")
    chaos(reap, tmp_path)
