"""A short soak: benchmarks/soak.py as a user runs it, 16 clients for 15 s against `pellucid serve`
on the real default model: no errors, no lost or mixed-up output, the 5 MB body refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from paths import ROOT

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_short_soak_loses_nothing(real_path, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--model-file", str(real_path), "--clients", "16",
           "--duration", "15", "--warmup", "3", "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["errors"] == 0, r["first_errors"]
    assert r["mismatches"] == 0, r["first_mismatches"]
    assert r["requests"] > r["abandoned"] > 0 and r["server_alive"]
    assert r["big_refusals"] and all(400 <= s < 500 for s in r["big_refusals"])
