"""scripts/bench.py in a quick mode: it runs, prints its ratio lines, leaves no process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_bench_quick_prints_its_ratio_lines() -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--no-write"]
    cmd += ["--sections", "small,startup,replicas,profiler", "--repeats", "1"]
    cmd += ["--messages", "300", "--frames", "10", "--pure-items", "10", "--pure-work", "1000"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    verdict = r"= +[0-9.]+ +target {} +(PASS|MISS)"
    assert re.search(r"small msgs: pystream_zmq / zmq msgpack +" + verdict.format(">= 0.8"), out)
    assert re.search(r"parallelize\(\) of 5 stages.* " + verdict.format("< 1.5"), out)
    assert re.search(r"no-op worker RSS.* " + verdict.format("<= 60"), out)
    assert re.search(r"replicas=2 / replicas=1 +" + verdict.format(">= 1.8"), out)
    assert re.search(r"profiler on / off, 1 MB, 3 stages +" + verdict.format(">= 0.95"), out)
    assert "processes left over: 0" in out
