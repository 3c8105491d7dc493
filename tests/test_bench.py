"""`make bench` cannot rot: every family's entry runs both sides for two steps at toy sizes (nothing is timed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "bench" / "bench.py"


def _bench_module(path: Path = BENCH, name: str = "ptm_bench"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_entry_runs_both_sides(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PTM_CACHE", str(tmp_path / "cache"))
    bench = _bench_module()
    bench.keep_corpus("t5", tmp_path, smoke=True)  # what `bench.py` does before timing a family
    assert len(list((tmp_path / "cache" / "corpora").iterdir())) == 1
    assert set(bench.FAMILIES) == {"bert", "roberta", "gpt", "t5", "bart", "electra", "xlnet"}
    for name in bench.FAMILIES:
        for side, run in bench.SIDES.items():
            result = run(name, tmp_path, smoke=True)
            assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0, (name, side, result)
    tokens = bench.prepare_tokens("bart", tmp_path, smoke=True)  # `bench.py --tokens`: ptm from `ptm prepare`'s output
    assert bench.run_ptm("bart", tmp_path, smoke=True, tokens=tokens)["tokens_per_s"] > 0
    monkeypatch.setenv("PTM_BENCH_PRECISION", "bf16")  # `make bench PRECISION=bf16`: both sides under bf16 autocast
    bf16 = _bench_module(name="ptm_bench_bf16")
    assert "hardware.precision=bf16" in bf16.overrides("t5", smoke=True)
    for run in bf16.SIDES.values():
        assert run("t5", tmp_path, smoke=True)["tokens_per_s"] > 0


def test_linear_probe_reads_what_the_features_hold():
    """tests/bench/linear_probe.py (docs/results.md): separable features give a perfect probe, features that hold
    nothing about the labels give chance. Synthetic vectors: the fit does not depend on where they come from."""
    probe_module = _bench_module(BENCH.parent / "linear_probe.py", "ptm_linear_probe")
    import torch

    generator = torch.Generator().manual_seed(0)
    labels = {split: torch.arange(n) % 4 for split, n in (("train", 400), ("validation", 100), ("test", 200))}
    centres = torch.randn(4, 16, generator=generator) * 3
    separable = {s: centres[y] + torch.randn(len(y), 16, generator=generator) for s, y in labels.items()}
    noise = {s: torch.randn(len(y), 16, generator=generator) for s, y in labels.items()}
    assert probe_module.probe(separable, labels, 4)["test"] == 1.0
    assert probe_module.probe(noise, labels, 4)["test"] < 0.4  # chance is 0.25


def test_the_electra_against_bert_comparison_composes_and_reads_its_runs(tmp_path):
    """tests/bench/electra_vs_bert.py (issue 22's bar; minutes on a GPU, hours here, so not run): every run it
    would start is a valid ptm config, and its curve reads the discriminator's gap over the base rate."""
    import json

    from ptmcli import compose

    evb = _bench_module(BENCH.with_name("electra_vs_bert.py"), "ptm_electra_vs_bert")
    opts, overrides = evb.options(["--steps=1500", "--seeds=0,1", "hardware.precision=fp32"])
    assert opts["steps"] == "1500" and overrides == ["hardware.precision=fp32"]
    for arm in evb.ARMS:
        args = evb.pretrain_args(arm, 1500, 128, overrides, False, tmp_path / arm)
        _, cfg = compose.checked(compose.parse("pretrain", [a for a in args[1:] if not a.startswith("hydra.")]))
        assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.data.max_seq_len) == (1500, 128, evb.SEQ_LEN)
    compose.checked(compose.parse("finetune", ["task=news-cls", "trainer.seed=1"]))
    run = tmp_path / "electra"
    run.mkdir()
    row = {"step": 250, "split": "val", "mlm_loss": 6.8, "rtd_loss": 0.5, "replaced_fraction": 0.25}
    row.update(rtd_accuracy=0.76, rtd_recall=0.03)
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (point,) = evb.curve(run)
    assert point["rtd_gap"] == pytest.approx(evb.replaced_entropy(0.25) - 0.5, abs=1e-4) and point["step"] == 250
