"""The operator's console against a real supervisor (``mppool serve --config``): pause,
resume, resize, kill, drain, reload (and SIGHUP), stop, through ``mppool.Client`` and the CLI,
each audited in the supervisor's log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

import mppool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reap")]

START_TIMEOUT = 30.0
RUN_TIMEOUT = 60.0

APP = '''
import os

def make(i):
    return {"i": i}

def close(obj):
    with open(os.environ["CONSOLE_CLOSED"], "a") as f:
        f.write(f"{obj['i']}\\n")
'''

HOLDER = '''
import sys, time
import mppool
client = mppool.connect(sys.argv[1])
obj = client.pool("nums").get()
print("held", flush=True)
time.sleep(120)
'''


def _toml(pools: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, opts in pools.items():
        lines.append(f"[pools.{name}]")
        lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower()}"
                  if isinstance(v, bool) else f"{k} = {v}" for k, v in opts.items()]
    return "\n".join(lines).replace("'", '"') + "\n"


def _nums(**over: Any) -> dict[str, Any]:
    return {"fun": "consoleapp:make", "closer": "consoleapp:close", "max_size": 2,
            "min_size": 1, **over}


class Served:
    def __init__(self, root: Path, sockdir: Path, pools: dict[str, dict[str, Any]]) -> None:
        self.root = root
        self.address = str(sockdir / "mppool.sock")
        self.config = root / "pools.toml"
        self.log = root / "serve.log"
        self.closed = root / "closed.txt"
        (root / "consoleapp.py").write_text(APP)
        self.write(pools)
        self.env = dict(os.environ, CONSOLE_CLOSED=str(self.closed), COLUMNS="200")
        self.env.pop("MPPOOL_ADDRESS", None)
        self.env.pop("MPPOOL_AUTHKEY", None)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mppool", "serve", "--address", self.address,
                 "--config", str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, cwd=root)
        wait_until(lambda: "serving on" in self.log.read_text() or self.proc.poll() is not None,
                   timeout=START_TIMEOUT, interval=0.02, what="mppool serve to be ready")
        assert self.proc.poll() is None, self.log.read_text()

    def write(self, pools: dict[str, dict[str, Any]]) -> None:
        self.config.write_text(_toml(pools))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mppool", args[0], "--address", self.address,
                               *args[1:]], capture_output=True, text=True, env=self.env,
                              timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL, cwd=self.root)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def served(tmp_path: Path, sockdir: Path) -> Iterator[Served]:
    s = Served(tmp_path, sockdir, {"nums": _nums()})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(served: Served) -> Iterator[Any]:
    c = mppool.connect(served.address)
    try:
        yield c
    finally:
        c.close()


def test_pause_then_resume(served: Served, client: Any) -> None:
    nums = client.pool("nums")
    held = nums.get()
    assert client.pause("nums") is True
    assert client.stats()["nums"]["paused"] is True
    with pytest.raises(mppool.TimeOut):
        nums.get(timeout=0.2)  # room to create one more, but paused
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(nums.get(timeout=30)))
    t.start()
    try:
        wait_until(lambda: client.stats()["nums"]["nwaiting"] == 1, what="the get to queue")
        nums.ret(held)  # a lease held through the pause comes back fine
        wait_until(lambda: client.stats()["nums"]["nusing"] == 0, what="the return")
        assert box == [] and client.stats()["nums"]["nwaiting"] == 1
        r = served.cli("resume", "nums")
        assert r.returncode == 0, r.stderr
        assert "resumed" in r.stdout
    finally:
        t.join(35)
    assert not t.is_alive() and box == [{"i": 0}]
    nums.ret(box[0])
    assert client.stats()["nums"]["paused"] is False
    r = served.cli("pause", "nums")
    assert r.returncode == 0 and "paused" in r.stdout, r.stderr
    assert client.resume("nums") is True and client.resume("nums") is False
    text = served.text()
    assert f"pause pool 'nums' by pid {os.getpid()}" in text
    assert "resume pool 'nums' by pid " in text
    r = served.cli("pause", "nope")
    assert r.returncode != 0 and "nope" in r.stderr


def test_resize(served: Served, client: Any) -> None:
    client.resize("nums", 5)
    assert client.stats()["nums"]["max_size"] == 5
    r = served.cli("resize", "nums", "3")
    assert r.returncode == 0, r.stderr
    assert client.stats()["nums"]["max_size"] == 3
    assert "resize pool 'nums' max_size=3 by pid" in served.text()


def test_kill_takes_leases_back_and_terminates(served: Served, client: Any) -> None:
    out = served.root / "holder.out"
    with open(out, "w") as f:
        child = subprocess.Popen([sys.executable, "-c", HOLDER, served.address], stdout=f,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=served.env)
    try:
        wait_until(lambda: "held" in out.read_text() or child.poll() is not None,
                   timeout=START_TIMEOUT, what="the child to hold a lease")
        assert child.poll() is None, out.read_text()
        assert client.stats()["nums"]["nusing"] == 1
        r = client.kill_holder("nums", child.pid)
        assert r == {"reclaimed": 1, "terminated": []}
        assert client.stats()["nums"]["nusing"] == 0
        assert child.poll() is None  # not signalled without terminate
        r = served.cli("kill", "nums", "--pid", str(child.pid), "--terminate")
        assert r.returncode == 0, r.stderr
        assert "sent SIGTERM" in r.stdout
        assert child.wait(10) == -signal.SIGTERM
        text = served.text()
        assert f"kill_holder pool 'nums' pid={child.pid} terminate=False by pid {os.getpid()}" in text
        assert f"kill_holder pool 'nums' pid={child.pid} terminate=True by pid" in text
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(5)
    # Nobody with that pid any more: nothing to take back, nobody to signal.
    with pytest.raises(PermissionError):
        client.kill_holder("nums", child.pid, terminate=True)


def test_drain_replaces_idle_objects(served: Served, client: Any) -> None:
    client.resize("nums", 3)
    nums = client.pool("nums")
    a, b = nums.get(), nums.get()
    nums.ret(b)
    assert client.stats()["nums"]["navail"] == 1
    assert client.drain("nums") == 1
    assert served.closed.read_text().split() == [str(b["i"])]  # idle: closed; in use: not
    nums.ret(a)
    before = client.stats()["nums"]
    assert before["navail"] == 1 and before["nusing"] == 0
    r = served.cli("drain", "nums")
    assert r.returncode == 0 and "closed 1 idle" in r.stdout, r.stderr
    assert sorted(served.closed.read_text().split()) == sorted([str(a["i"]), str(b["i"])])
    # min_size=1 is refilled at once with a new object, not at the next housekeeping round.
    wait_until(lambda: client.stats()["nums"]["ncreated"] == before["ncreated"] + 1,
               what="min_size to be refilled")
    assert nums.get(timeout=5) not in (a, b)
    assert "drain pool 'nums' by pid" in served.text()


def test_reload_and_sighup(served: Served, client: Any) -> None:
    served.write({"nums": _nums(max_size=4), "fresh": _nums()})
    r = client.reload()
    assert r == {"created": ["fresh"], "resized": {"nums": [2, 4]}, "removed": [], "kept": {}}
    stats = client.stats()
    assert set(stats) == {"nums", "fresh"} and stats["nums"]["max_size"] == 4
    # Attaching with the file's new options works (the pool now is what the file says).
    served.write({"nums": _nums(max_size=1)})
    r = served.cli("reload")
    assert r.returncode == 0, r.stderr
    assert "removed fresh" in r.stdout and "nums 4->1" in r.stdout
    stats = client.stats()
    assert set(stats) == {"nums"} and stats["nums"]["max_size"] == 1
    served.write({"nums": _nums(max_size=2), "third": _nums(min_size=0)})
    served.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: set(client.stats()) == {"nums", "third"}, timeout=10,
               what="SIGHUP to reload")
    wait_until(lambda: client.stats()["nums"]["max_size"] == 2, timeout=10, what="the resize")
    # A broken file changes nothing and says why.
    served.config.write_text("[pools.x]\nfun = 3\n")
    with pytest.raises(ValueError, match="fun"):
        client.reload()
    assert set(client.stats()) == {"nums", "third"}
    text = served.text()
    assert f"reload by pid {os.getpid()}" in text and "reload signal='SIGHUP'" in text


def test_stop(served: Served, client: Any) -> None:
    client.pool("nums").get()
    client.stop()
    assert served.proc.wait(20) == 0
    assert not os.path.exists(served.address)
    assert served.closed.read_text().split()  # the pool's closer ran
    assert f"stop by pid {os.getpid()}" in served.text()


def test_stop_from_the_cli(served: Served) -> None:
    r = served.cli("stop")
    assert r.returncode == 0, r.stderr
    assert served.proc.wait(20) == 0
