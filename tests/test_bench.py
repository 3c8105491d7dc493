"""`make bench` cannot rot: every family's entry runs both sides for two steps at toy sizes (nothing is timed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "bench" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("ptm_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_entry_runs_both_sides(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    bench = _bench_module()
    assert set(bench.FAMILIES) == {"bert", "roberta", "gpt", "t5", "bart", "electra", "xlnet"}
    for name in bench.FAMILIES:
        for side, run in bench.SIDES.items():
            result = run(name, tmp_path, smoke=True)
            assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0, (name, side, result)
