"""The getting-started `transfer="proxy"` example runs as written: a proxy used after its
return raises `mppool.PoolClosed`, as the example catches and the errors table says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reap")]

DOC = Path(__file__).resolve().parent.parent / "docs" / "getting-started.md"


def _proxy_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if 'transfer="proxy"' in b and "except mppool.PoolClosed" in b]
    assert len(found) == 1, "the proxy example of getting-started.md is gone or duplicated"
    return found[0]


def test_the_proxy_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_proxy_example())
    env = dict(os.environ)
    env.pop("MPPOOL_ADDRESS", None)
    env.pop("MPPOOL_AUTHKEY", None)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                       env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[(1,), (2,)]", r.stdout
    assert "no longer yours" in lines[1], r.stdout
