"""Who can touch a supervisor's files: symlinks, shared directories, keys in messages."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil
import pytest
from helpers import stop_pid

import mppool
from mppool.address import UnsafeDirectory, parse_authkey, runtime_dir, write_key


@pytest.fixture
def private(tmp_path: Path) -> Path:
    d = tmp_path / "p"
    d.mkdir(mode=0o700)
    return d


def test_key_file_is_not_written_through_a_planted_symlink(private: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o644)
    addr = str(private / "s.sock")
    os.symlink(victim, addr + ".key")
    key = os.urandom(16)
    path = write_key(addr, key)
    assert victim.read_text() == "precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644  # no chmod through the link either
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert path.read_text() == key.hex()
    assert sorted(os.listdir(private)) == ["s.sock.key"]  # no temporary file left behind


@pytest.mark.slow
def test_server_start_replaces_a_planted_key_symlink(private: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    addr = str(private / "s.sock")
    os.symlink(victim, addr + ".key")
    with mppool.Server(addr, os.urandom(16)) as srv:
        assert victim.read_text() == "precious"
        assert not os.path.islink(addr + ".key")
        with mppool.connect(addr) as c:  # the key file the supervisor wrote
            assert c.info()["pid"] == srv.pid


def test_runtime_dir_that_is_a_symlink_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A symlink can be swapped after any check of its target: refuse it, even when it
    points to a private directory of ours."""
    base = tmp_path / "xdg"
    base.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, base / "mppool")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    with pytest.raises(PermissionError, match="symlink") as info:
        runtime_dir()
    assert str(base / "mppool") in str(info.value)
    monkeypatch.delenv("MPPOOL_ADDRESS", raising=False)
    with pytest.raises(mppool.ServerUnavailable, match="symlink"):
        mppool.connect(timeout=0.5)


def test_runtime_dir_open_to_others_is_refused(tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "xdg"
    (base / "mppool").mkdir(parents=True, mode=0o700)
    os.chmod(base / "mppool", 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    with pytest.raises(PermissionError, match="0755"):
        runtime_dir()
    os.chmod(base / "mppool", 0o700)
    assert runtime_dir() == base / "mppool"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [0o770, 0o705])
def test_socket_directory_open_to_others_is_refused_at_start_and_connect(tmp_path: Path,
                                                                        mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    addr = str(shared / "s.sock")
    key = os.urandom(16)
    with pytest.raises(PermissionError, match=f"{mode:04o}") as info:
        mppool.Server(addr, key).start()
    assert str(shared) in str(info.value)
    assert isinstance(info.value, mppool.ServerUnavailable)
    assert not os.path.exists(addr) and not os.path.exists(addr + ".key")
    with pytest.raises(UnsafeDirectory, match=str(shared)):
        mppool.connect(addr, key, timeout=0.5)
    with pytest.raises(UnsafeDirectory):
        mppool.connect(addr, key, autostart=True, timeout=0.5)
    assert not os.path.exists(addr)


def test_socket_directory_that_is_a_symlink_is_refused(private: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    os.symlink(private, link)
    with pytest.raises(PermissionError, match="symlink"):
        mppool.Server(str(link / "s.sock"), os.urandom(16)).start()


@pytest.mark.parametrize("bad", ["c0ffee" * 5 + "zz", "secret-passphrase", " " + "ab" * 16 + "x"])
def test_a_mistyped_key_is_never_echoed(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_authkey(bad)
    msg = str(info.value)
    assert "authkey" in msg and f"{len(bad)} characters" in msg
    assert bad not in msg and bad.strip()[:8] not in msg
    with pytest.raises(ValueError) as info:
        mppool.Server(authkey=bad)
    assert bad.strip()[:8] not in str(info.value)
    with pytest.raises(ValueError) as info:
        mppool.connect("/nonexistent/s.sock", authkey=bad, timeout=0.5)
    assert bad.strip()[:8] not in str(info.value)


@pytest.mark.parametrize("bad", [b"", 42, ["ab"]])
def test_keys_of_the_wrong_type_are_described_not_shown(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="authkey") as info:
        parse_authkey(bad)
    assert repr(bad) not in str(info.value)


@pytest.mark.slow
def test_the_key_is_not_on_the_supervisors_command_line(private: Path) -> None:
    key = os.urandom(16)
    srv = mppool.Server(str(private / "s.sock"), key).start(detach=True)
    try:
        cmdline = " ".join(psutil.Process(srv.pid).cmdline())
        assert key.hex() not in cmdline
    finally:
        stop_pid(srv.pid)
