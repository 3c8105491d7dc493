"""`make bench` cannot rot: both of its sides run for two steps on a small sample (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "bench" / "bench_mlm.py"


def test_the_benchmark_runs_both_sides(cache_env):
    pytest.importorskip("transformers")
    env = {**cache_env, "PTM_BENCH_SMOKE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ratio ptm/HF:" in proc.stdout and "HF Trainer" in proc.stdout
