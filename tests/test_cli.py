"""The ``mppool`` command line, run as users run it: ``python -m mppool ...`` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

import mppool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reap")]

RUN_TIMEOUT = 60.0  # generous: spawned interpreters on a loaded 2-core CI box
START_TIMEOUT = 30.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The tests say where the supervisor is; a developer's own settings must not leak in.
    env.pop("MPPOOL_ADDRESS", None)
    env.pop("MPPOOL_AUTHKEY", None)
    env["COLUMNS"] = "200"  # rich wraps at 80 columns when not on a terminal; keep pids whole
    return env


def run_cli(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mppool", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_demo_bound_holds_and_cleans_up(sockdir: Path) -> None:
    address = str(sockdir / "demo.sock")
    env = _env()
    env.pop("COLUMNS")  # piped at rich's default width: messages must still be one line each
    r = subprocess.run([sys.executable, "-m", "mppool", "demo", "--seconds", "2", "--address",
                        address], capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^watchdog: SIGKILLed worker \d+ \(pid \d+\) while it held a token → token "
                     r"back in [\d.]+ ms \(out \d+ \+ available \d+ = budget 2\)$", r.stdout, re.M), r.stdout
    assert re.search(r"^supervisor pid \d+ on .*; worker pids [\d, ]+$", r.stdout, re.M), r.stdout
    m = re.search(r"bound held: peak (\d+) <= budget (\d+)", r.stdout)
    assert m, r.stdout
    assert 1 <= int(m[1]) <= int(m[2]) == 2
    assert "token back in" in r.stdout  # the watchdog part ran and the token came back
    assert re.search(r"at the end\s+tokens out 0 \+ available 2 = budget 2", r.stdout), r.stdout
    # Everything it started is gone: the supervisor (and its socket, key) and the workers.
    pids = [int(p) for p in re.findall(r"supervisor pid (\d+)", r.stdout)]
    wm = re.search(r"worker pids ([\d, ]+)", r.stdout)
    assert pids and wm, r.stdout
    pids += [int(p) for p in wm[1].split(",")]
    assert len(pids) == 7
    wait_until(lambda: all(_gone(p) for p in pids), timeout=5, what="demo processes to be gone")
    for suffix in ("", ".lease", ".key"):
        assert not os.path.exists(address + suffix)


def test_demo_rejects_a_single_worker() -> None:
    r = run_cli("demo", "--workers", "1")
    assert r.returncode == 2
    assert "--workers" in r.stderr


CONFIG = """
[pools.db]
kind = "token"
max_size = 3

[pools.nums]
fun = "builtins:int"
max_size = 2
min_size = 1
max_avail_delay = 30
"""


def test_serve_stats_top_and_sigterm(sockdir: Path, tmp_path: Path) -> None:
    address = str(sockdir / "mppool.sock")
    keyfile = address + ".key"
    config = tmp_path / "pools.toml"
    config.write_text(CONFIG)
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mppool", "serve", "--address", address,
                                 "--config", str(config)], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=_env())
    try:
        # The "serving on" line is printed once the signal handlers are in place.
        wait_until(lambda: "serving on" in out_path.read_text() or proc.poll() is not None,
                   timeout=START_TIMEOUT, interval=0.02, what="mppool serve to be ready")
        assert proc.poll() is None, out_path.read_text() + err_path.read_text()
        assert os.path.exists(address) and os.path.exists(keyfile)
        assert f"pid {proc.pid}" in out_path.read_text()

        r = run_cli("stats", "--json", "--address", address)
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout)
        assert set(stats) == {"db", "nums"}
        assert stats["db"]["kind"] == "token" and stats["db"]["max_size"] == 3
        assert stats["nums"]["kind"] == "pool" and stats["nums"]["max_size"] == 2
        assert stats["nums"]["navail"] == 1  # min_size objects made by builtins:int

        # Attach by name as a program would, and hold one of each so top has holders to show.
        with mppool.connect(address) as client:
            token = client.token_pool("db", 3).get(timeout=5)
            nums = client.pool("nums")
            num = nums.get(timeout=5)
            assert num == 0  # int(0): fun receives the creation number
            r = run_cli("top", "--once", "--address", address)
            assert r.returncode == 0, r.stderr
            assert "holders" in r.stdout and "waiters: none" in r.stdout
            holder_rows = [ln for ln in r.stdout.splitlines() if f" {os.getpid()} " in ln]
            assert {"db", "nums"} <= {w for ln in holder_rows for w in ln.replace("│", " ").split()}
            nums.ret(num)
            client.token_pool("db").put(token)

        r = run_cli("stats", "--address", address)
        assert r.returncode == 0, r.stderr
        assert re.search(r"\bdb\b.*\btoken\b", r.stdout) and "nums" in r.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, err_path.read_text()
        assert "stopped" in out_path.read_text()
        for path in (address, address + ".lease", keyfile, address + ".lock"):
            assert not os.path.exists(path), path
        assert not [p for p in sockdir.iterdir() if p.name.startswith("mppool.sock")]
    finally:
        if proc.poll() is None:
            proc.kill()  # only the pid we started
            proc.wait(10)


@pytest.mark.parametrize(("toml", "named"), [
    ('[pools.nums]\nfun = "builtins:int"\nmax_sise = 3\n', ["pool 'nums'", "max_sise"]),
    ('[pools.nums]\nfun = "mppool_no_such_module:make"\n', ["pool 'nums'", "fun", "mppool_no_such_module"]),
    ('[pools.nums]\nfun = "builtins:no_such_function"\n', ["pool 'nums'", "fun", "no_such_function"]),
    ('[pools.nums]\nfun = "builtins"\n', ["pool 'nums'", "fun", "module:attribute"]),
    ('[pools.nums]\nmax_size = 3\n', ["pool 'nums'", "missing key 'fun'"]),
    ('[pools.nums]\nfun = "builtins:int"\ntimeout = "soon"\n', ["pool 'nums'", "timeout", "'soon'"]),
    ('[pools.db]\nkind = "token"\nfun = "builtins:int"\n', ["pool 'db'", "'fun'", "token pool"]),
    ('[pools.db]\nkind = "token"\nmax_size = 0\n', ["pool 'db'", "max_size"]),
    ('[pool.db]\nkind = "token"\n', ["'pool'", "top-level"]),
    ("[pools.db\n", ["not valid TOML"]),
])
def test_serve_bad_config_exits_2(sockdir: Path, tmp_path: Path, toml: str, named: list[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    address = str(sockdir / "bad.sock")
    r = run_cli("serve", "--address", address, "--config", str(config))
    assert r.returncode == 2, r.stdout + r.stderr
    for word in named:
        assert word in r.stderr, (word, r.stderr)
    assert "Traceback" not in r.stderr
    assert not os.path.exists(address) and not os.path.exists(address + ".key")


def test_stats_without_supervisor_exits_1(sockdir: Path) -> None:
    address = str(sockdir / "nobody.sock")
    r = run_cli("stats", "--address", address)
    assert r.returncode == 1
    assert "no supervisor reachable" in r.stderr and address in r.stderr
    # With a key but nothing listening: same answer once the connect timeout runs out.
    keyfile = sockdir / "key"
    keyfile.write_text("00" * 16)
    r = run_cli("stats", "--json", "--address", address, "--authkey-file", str(keyfile),
                "--timeout", "0.2")
    assert r.returncode == 1
    assert "no supervisor reachable" in r.stderr and r.stdout == ""
    r = run_cli("top", "--once", "--address", address)
    assert r.returncode == 1 and "no supervisor reachable" in r.stderr


def _start_serve(address: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mppool", "serve", "--address", address],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env())
    wait_until(lambda: "serving on" in log.read_text() or proc.poll() is not None,
               timeout=START_TIMEOUT, interval=0.02, what="mppool serve to be ready")
    assert proc.poll() is None, log.read_text()
    return proc


def test_serve_replaces_a_stale_socket_and_stops_on_ctrl_c(sockdir: Path, tmp_path: Path) -> None:
    address = str(sockdir / "mppool.sock")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # A supervisor that is SIGKILLed leaves its socket, lease socket and key file behind.
        procs.append(_start_serve(address, tmp_path / "first.log"))
        procs[0].kill()
        procs[0].wait(10)
        assert os.path.exists(address) and os.path.exists(address + ".key")
        procs.append(_start_serve(address, tmp_path / "second.log"))
        assert "removing stale" in (tmp_path / "second.log").read_text()
        # A second serve on a live address refuses instead of stealing it.
        r = run_cli("serve", "--address", address)
        assert r.returncode == 1 and "already serving" in r.stderr
        assert run_cli("stats", "--address", address).returncode == 0
        procs[1].send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert procs[1].wait(timeout=15) == 0, (tmp_path / "second.log").read_text()
        for path in (address, address + ".lease", address + ".key"):
            assert not os.path.exists(path), path
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # only the pids we started
                p.wait(10)


def test_authkey_on_the_command_line_is_refused_with_a_hint(sockdir: Path) -> None:
    """A key in argv is readable by every local user (/proc/PID/cmdline): --authkey is gone,
    in every spelling, with a one-line pointer to --authkey-file, and the key is not echoed."""
    key = "c0ffee" * 6
    for args in (["--authkey", key], [f"--authkey={key}"], ["--authk", key]):
        r = run_cli("stats", "--address", str(sockdir / "s.sock"), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "--authkey-file" in r.stderr and key not in r.stderr, r.stderr
    r = run_cli("stats", "--authkey", key)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_authkey_file_reaches_the_supervisor_and_bad_keys_are_not_echoed(sockdir: Path,
                                                                         tmp_path: Path) -> None:
    address = str(sockdir / "mppool.sock")
    key = os.urandom(16).hex()
    keyfile = tmp_path / "key"
    keyfile.write_text(key + "\n")
    keyfile.chmod(0o600)
    env_key = dict(_env(), MPPOOL_AUTHKEY=key)
    out = tmp_path / "serve.log"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mppool", "serve", "--address", address],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env_key)
    try:
        wait_until(lambda: "serving on" in out.read_text() or proc.poll() is not None,
                   timeout=START_TIMEOUT, interval=0.02, what="mppool serve to be ready")
        assert proc.poll() is None, out.read_text()
        assert key not in " ".join(psutil.Process(proc.pid).cmdline())
        os.unlink(address + ".key")  # so that only --authkey-file can provide the key
        r = run_cli("stats", "--json", "--address", address, "--authkey-file", str(keyfile))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {}
        typo = key[:-1] + "g"
        keyfile.write_text(typo)
        r = run_cli("stats", "--address", address, "--authkey-file", str(keyfile))
        assert r.returncode == 2 and "not hex" in r.stderr, r.stderr
        assert typo not in r.stderr and key[:-1] not in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)  # the pid we started
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mppool {mppool.__version__}", r


def test_metrics_port_without_prometheus_client_exits_2_and_leaves_nothing(sockdir: Path,
                                                                           tmp_path: Path) -> None:
    # prometheus_client made unimportable for this one run: a module of that name that fails.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    address = str(sockdir / "m.sock")
    env = _env()
    env["PYTHONPATH"] = str(shadow) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "mppool", "serve", "--address", address,
                        "--metrics-port", "9"], capture_output=True, text=True, env=env,
                       timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "pip install 'mppool[metrics]'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not [p for p in sockdir.iterdir() if p.name.startswith("m.sock")], list(sockdir.iterdir())
