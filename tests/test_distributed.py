"""Data parallelism on CPU (gloo): 2 processes with batch B/2 train exactly like 1 process with batch B."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import TINY, read_metrics, run_ptm

SAME = [
    *TINY,
    "trainer.max_steps=10",
    "trainer.log_every=1",
    "trainer.eval_every=5",
    "trainer.grad_accum=2",
    "model.dropout=0",
    "model.attention_dropout=0",
]


def test_two_processes_match_one_process(cache_env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_ptm(["pretrain", *SAME, "trainer.batch_size=8", f"hydra.run.dir={one}"], cache_env)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "ptmcli",
            "pretrain",
            *SAME,
            "trainer.batch_size=4",
            f"hydra.run.dir={two}",
        ],
        env=cache_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = read_metrics(one), read_metrics(two)
    assert [(r["step"], r["split"]) for r in single] == [(r["step"], r["split"]) for r in double]
    for a, b in zip(single, double):
        for key in ("loss", "mlm_loss", "nsp_loss"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], a["split"], key, a[key], b[key])
    assert sorted(p.name for p in (two / "checkpoints" / "step-10").glob("rng-rank*")) == [
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
    ]
    assert len(double) == len(single)  # only rank 0 writes metrics
