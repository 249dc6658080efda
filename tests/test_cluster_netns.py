"""A real multi-host run: two network namespaces (``ip netns`` + veth), each with its own
supervisor and workers, sharing one cluster pool through a private redis-server reachable
from both over the veth links. Skipped, with the reason, where namespaces cannot be made
(not root, no ``ip``, a container without CAP_NET_ADMIN)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_kit import PrivateRedis, Sampler, peak_overlap

pytestmark = [pytest.mark.slow, pytest.mark.kill, pytest.mark.timeout(180)]

CAP = 3
SECONDS = 5.0
HERE = Path(__file__).parent


def _ip(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


class Namespaces:
    """Two namespaces, each linked to this one by a veth pair on its own /24."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.subnet = random.randrange(100, 250)
        self.names = [f"mppool-c{tag}-{i}" for i in range(2)]
        self.hostif = [f"mpc{tag}h{i}" for i in range(2)]
        self.gateways = [f"10.{self.subnet}.{i}.1" for i in range(2)]
        self.made: list[str] = []

    def __enter__(self) -> Namespaces:
        if shutil.which("ip") is None:
            pytest.skip("no `ip` command: cannot make network namespaces")
        probe = _ip("netns", "add", self.names[0])
        if probe.returncode != 0:
            pytest.skip(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
        self.made.append(self.names[0])
        try:
            for i, ns in enumerate(self.names):
                if i:
                    self._ok(_ip("netns", "add", ns))
                    self.made.append(ns)
                peer = f"{self.hostif[i]}p"
                self._ok(_ip("link", "add", self.hostif[i], "type", "veth", "peer", "name", peer))
                self._ok(_ip("link", "set", peer, "netns", ns))
                self._ok(_ip("addr", "add", f"{self.gateways[i]}/24", "dev", self.hostif[i]))
                self._ok(_ip("link", "set", self.hostif[i], "up"))
                self._ok(_ip("addr", "add", f"10.{self.subnet}.{i}.2/24", "dev", peer, ns=ns))
                self._ok(_ip("link", "set", peer, "up", ns=ns))
                self._ok(_ip("link", "set", "lo", "up", ns=ns))
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _ok(r: subprocess.CompletedProcess[str]) -> None:
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(r.args)}: {r.stderr.strip()}")

    def __exit__(self, *exc: object) -> None:
        for ns in self.made:  # deleting a namespace deletes its veth end, and so the pair
            _ip("netns", "del", ns)
        for ifname in self.hostif:
            _ip("link", "del", ifname)  # if its namespace never got its peer
        self.made = []


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    with Namespaces() as ns:
        yield ns


def test_two_hosts_in_network_namespaces(netns: Namespaces, tmp_path: Path, reap: None) -> None:
    prefix = f"netns-{os.getpid()}"
    logdir = tmp_path / "logs"
    logdir.mkdir()
    redis = PrivateRedis(tmp_path, bind=netns.gateways[0], also=tuple(netns.gateways[1:]))
    with redis:
        nodes = []
        with Sampler(redis.url, prefix, "net") as sampler:
            for i, ns in enumerate(netns.names):
                url = f"redis://{netns.gateways[i]}:{redis.port}/0"
                nodes.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, str(HERE / "cluster_node.py"),
                     url, prefix, f"ns{i}", "4", str(SECONDS), str(logdir), str(CAP)],
                    cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            outputs = []
            for p in nodes:
                try:
                    out, _ = p.communicate(timeout=SECONDS + 90)
                except subprocess.TimeoutExpired:
                    p.kill()  # ip netns exec execs the node: this pid is the node itself
                    out, _ = p.communicate()
                outputs.append(out)
        for p, out in zip(nodes, outputs, strict=True):
            assert p.returncode == 0, out
    done = [json.loads((logdir / f"ns{i}.done").read_text()) for i in range(2)]
    peak, n = peak_overlap(logdir)
    print(f"\n[cluster figures] two network namespaces, 4 workers each, cap {CAP}: {n} holds "
          f"({done[0]['nborrows']} via ns0, {done[1]['nborrows']} via ns1); peak held by "
          f"workers {peak}/{CAP}; peak in Redis {sampler.peak_redis}/{CAP} "
          f"({sampler.samples} samples)")
    assert all(d["nborrows"] > 20 and d["exitcodes"] == [0] * 4 for d in done), done
    assert all(d["lost_leases"] == 0 for d in done)
    assert peak <= CAP and sampler.peak_redis <= CAP
    assert sampler.samples > 100
