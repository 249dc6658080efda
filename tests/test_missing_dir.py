"""A socket directory that does not exist: every way of starting a supervisor refuses it the
same way, with one message naming the directory, and creates nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mppool
import mppool.aio
from mppool.address import MissingDirectory

pytestmark = [pytest.mark.usefixtures("reap")]

RUN_TIMEOUT = 60.0  # spawned interpreters on a loaded 2-core box
APP_DIR = Path(__file__).parent / "gunicorn_app"


def _expected(missing: Path) -> list[str]:
    return [f"directory {str(missing)!r} does not exist", f"mkdir -m 700 {missing}"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MPPOOL_ADDRESS", "MPPOOL_AUTHKEY")}
    env["COLUMNS"] = "500"  # the CLI's one-line errors must not wrap
    env.update(extra)
    return env


@pytest.fixture
def missing(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    return base / "no" / "such"


def test_server_start(missing: Path) -> None:
    with pytest.raises(MissingDirectory) as info:
        mppool.Server(str(missing / "s.sock"), os.urandom(16)).start()
    for part in _expected(missing):
        assert part in str(info.value)
    assert isinstance(info.value, mppool.ServerUnavailable)
    assert not missing.parent.exists()


def test_connect_autostart_refuses_and_creates_nothing(missing: Path) -> None:
    with pytest.raises(MissingDirectory) as info:
        mppool.connect(str(missing / "s.sock"), autostart=True, timeout=5)
    for part in _expected(missing):
        assert part in str(info.value)
    assert not missing.parent.exists()  # no chain of directories, whatever their modes


def test_aio_connect_autostart_refuses(missing: Path) -> None:
    coro = mppool.aio.connect(str(missing / "s.sock"), autostart=True, timeout=5)
    with pytest.raises(MissingDirectory):
        asyncio.run(asyncio.wait_for(coro, 30))
    assert not missing.parent.exists()


@pytest.mark.slow
def test_mppool_serve(missing: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mppool", "serve", "--address", str(missing / "s.sock")],
                       capture_output=True, text=True, env=_env(), timeout=RUN_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r
    for part in _expected(missing):
        assert part in r.stderr
    assert "Traceback" not in r.stderr
    assert not missing.parent.exists()


@pytest.mark.slow
@pytest.mark.gunicorn
def test_gunicorn_hooks(missing: Path) -> None:
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn, "gunicorn is a test dependency"
    env = _env(MPPOOL_ADDRESS=str(missing / "s.sock"),
               PYTHONPATH=os.pathsep.join([str(APP_DIR), *sys.path]))
    r = subprocess.run([gunicorn, "-c", str(APP_DIR / "gunicorn.conf.py"), "-w", "1",
                        "-b", "127.0.0.1:0", "restart_app:app"], cwd=APP_DIR, env=env,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r
    for part in _expected(missing):
        assert part in r.stderr
    assert "Traceback" not in r.stderr  # gunicorn's one-line "Error: ..."
    assert not missing.parent.exists()
