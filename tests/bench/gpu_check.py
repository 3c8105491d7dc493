"""The GPU check (`tests/bench/gpu_check.sh`): everything about ptm that only a GPU can show, in one table, in at
most 8 minutes on one GPU.

Rows: BERT-base MLM and GPT-2-small CLM trained for a fixed number of steps in bf16 and in fp16 with GradScaler
(loss finite and falling, tokens/s, MFU, peak CUDA memory); T5-small span corruption in fp16 (the forward that
overflows without T5's fp16 clamp: no inf/NaN); that fused AdamW is what the optimizer uses on CUDA; ptm against
the Hugging Face Trainer on the same GPT-2-small model and batches (tests/bench/bench.py on the GPU, bf16); one
batch's compiled gradients against eager ones (compile_probe.py); then BERT-base and GPT-2-small compiled in bf16
(compile time too). Prints the table and, when $OUT is set, writes gpu_check.json there.

`PTM_GPU_CHECK_SMOKE=1` runs every row at toy sizes on the CPU (fp32, no compile), to test the script itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

SMOKE = os.environ.get("PTM_GPU_CHECK_SMOKE") == "1"
# the rows to run, by key (all by default): eager (BERT-base, GPT-2-small), t5, adamw, hf, probe, compiled; e.g.
# PTM_GPU_CHECK_ROWS=probe,compiled,t5 when a short lease has measured the eager rows already; run in that order
ROW_KEYS = ("eager", "t5", "adamw", "hf", "probe", "compiled")
ONLY = os.environ.get("PTM_GPU_CHECK_ROWS", ",".join(ROW_KEYS)).split(",")
STEPS = 6 if SMOKE else 60
TOY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128"]
COMMON = [
    f"trainer.max_steps={STEPS}",
    f"trainer.log_every={2 if SMOKE else 10}",
    "trainer.eval_every=0",
    "trainer.eval_batches=2",
    "trainer.save_every=0",
    "trainer.curves=false",
    "trainer.batch_size=8" if SMOKE else "trainer.batch_size=32",
    "data.max_seq_len=64" if SMOKE else "data.max_seq_len=128",
    *(["optimizer.warmup_steps=1", "optimizer.lr=3e-3"] if SMOKE else ["optimizer.warmup_steps=5"]),
    "trainer.grad_accum=1",
    *(["data.max_train_samples=200", "data.vocab_size=2000", *TOY] if SMOKE else []),
]
# (row, recipe, precision, compiled, extra overrides)
# eager rows first: compiling takes the longest, and stop 44's first GPU run had no time left for the rows after it
RUNS = [
    ("bert-base MLM", "bert-base", "bf16", False, ["objective=mlm"]),
    ("bert-base MLM", "bert-base", "fp16", False, ["objective=mlm"]),
    ("gpt2-small CLM", "gpt2-small", "bf16", False, []),
    ("gpt2-small CLM", "gpt2-small", "fp16", False, []),
    ("t5-small span corruption", "t5-small", "fp16", False, ["optimizer=adamw", "data.vocab_size=8000"]),
]
COMPILED = [
    ("bert-base MLM", "bert-base", "bf16", True, ["objective=mlm"]),
    ("gpt2-small CLM", "gpt2-small", "bf16", True, []),
]


def ptm(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ptmcli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def train_row(name, recipe, precision, compiled, extra, workdir: Path) -> dict:
    run = workdir / f"{recipe}-{precision}-{'compiled' if compiled else 'eager'}"
    hardware = ["hardware=cpu", "hardware.precision=fp32"] if SMOKE else [f"hardware.precision={precision}"]
    args = ["pretrain", f"conf={recipe}", *COMMON, *hardware, *extra, f"hydra.run.dir={run}"]
    if compiled and not SMOKE:
        args.append("hardware.compile=true")
    started = time.perf_counter()
    proc = ptm(args, timeout=240)
    row = {"run": name, "precision": precision, "compiled": compiled, "seconds": round(time.perf_counter() - started)}
    if proc.returncode:
        return {**row, "ok": False, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    later = train[1:] or train  # the first window holds the warm-up (and compiling)
    losses = [r["loss"] for r in train]
    finite = all(math.isfinite(v) for v in losses) and all(
        math.isfinite(v) for r in rows if r["split"] == "val" for v in r.values() if isinstance(v, float)
    )
    return {
        **row,
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in later) / len(later)),
        "mfu": None if later[-1].get("mfu") is None else round(sum(r["mfu"] or 0 for r in later) / len(later), 3),
        "peak_memory_mb": round(max(r["peak_memory_mb"] for r in train)),
        "first_loss": round(losses[0], 3),
        "last_loss": round(losses[-1], 3),
        "compile_s": next((round(r["compile_s"], 1) for r in train if "compile_s" in r), None),
        "ok": finite and losses[-1] < losses[0],
    }


def fused_adamw() -> dict:
    import torch

    from ptmcli.optim import build_optimizer
    from ptmcli.schema import OptimizerConfig

    device = torch.device("cpu" if SMOKE else "cuda")
    optimizer = build_optimizer(torch.nn.Linear(8, 8).to(device), OptimizerConfig(), device, None)
    fused = bool(optimizer.defaults.get("fused"))
    return {"run": "AdamW on the device", "fused": fused, "ok": fused or SMOKE}


def versus_hf() -> dict:
    """bench.py's GPT entry on the GPU: the same GPT-2-small model and batches, ptm vs the Trainer, bf16."""
    env = {**os.environ, "PTM_BENCH_REPEATS": "1"}
    if not SMOKE:
        env.update(PTM_BENCH_DEVICE="cuda", PTM_BENCH_RECIPE="gpt2-small")
    bench = Path(__file__).with_name("bench.py")
    args = [sys.executable, str(bench), "gpt"] if not SMOKE else [sys.executable, str(bench), "--smoke", "gpt"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not lines:
        return {"run": "gpt2-small ptm vs HF Trainer", "ok": False, "error": (proc.stderr or proc.stdout)[-300:]}
    result = json.loads(lines[-1][6:])
    return {
        "run": "gpt2-small ptm vs HF Trainer",
        "precision": "bf16",
        "tokens_per_s": result["ptm_tokens_per_s"],
        "hf_tokens_per_s": result["hf_tokens_per_s"],
        "ratio": result["ratio"],
        "ok": True,
    }


def compile_probe() -> dict:
    """compile_probe.py: one batch's gradients, compiled as ptm compiles (the vocabulary loss outside the graph,
    mix-order reduction off on CUDA) against eager, for tiny GPT and BERT models and a torch-only reference; ok
    when they agree to 5 % of the largest gradient (bf16 autocast)."""
    probe = Path(__file__).with_name("compile_probe.py")
    proc = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300, check=False)
    print(proc.stdout, flush=True)  # every mode's line: where a wrong gradient comes from
    ours = [line for line in proc.stdout.splitlines() if "as ptm does" in line]
    plain = [line for line in proc.stdout.splitlines() if line.strip().startswith("compiled:")]
    if proc.returncode or len(ours) != 3:  # GPT, the torch-only reference, BERT
        return {"run": "compiled gradients vs eager", "ok": False, "error": (proc.stderr or proc.stdout)[-300:]}

    def difference(line: str) -> float:
        return float(line.split("largest grad difference ")[1].split()[0])

    worst, worst_plain = max(map(difference, ours)), max(map(difference, plain), default=float("nan"))
    row = {"run": "compiled gradients vs eager", "difference": worst, "plain_difference": worst_plain}
    return {**row, "ok": worst < 0.05}


def main() -> None:
    import torch

    if set(ONLY) - set(ROW_KEYS):
        sys.exit(f"gpu_check: PTM_GPU_CHECK_ROWS={','.join(ONLY)}: the rows are {', '.join(ROW_KEYS)}.")
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible (PTM_GPU_CHECK_SMOKE=1 tests the script on the CPU).")
    device = "CPU (smoke)" if SMOKE else torch.cuda.get_device_name()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            *(
                (("t5" if spec[1].startswith("t5") else "eager"), partial(train_row, *spec, Path(workdir)))
                for spec in RUNS
            ),
            ("adamw", fused_adamw),
            ("hf", versus_hf),
            ("probe", compile_probe),
            *(("compiled", partial(train_row, *spec, Path(workdir))) for spec in COMPILED),
        ]
        for key in ONLY:  # in the order asked for
            for row in (row for k, row in rows if k == key):
                results.append(row())
                print(json.dumps(results[-1]), flush=True)
    print(
        f"\nptm GPU check on {device}, torch {torch.__version__}, {STEPS} steps per run, "
        f"{time.perf_counter() - started:.0f} s"
    )
    header = ("run", "prec", "compiled", "tok/s", "MFU", "peak MB", "loss first->last", "compile s", "ok")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        loss = f"{r['first_loss']} -> {r['last_loss']}" if "first_loss" in r else ""
        if "ratio" in r:
            loss = f"HF {r['hf_tokens_per_s']:,.0f} tok/s, ptm/HF {r['ratio']}x"
        if "fused" in r:
            loss = f"fused={r['fused']}"
        if "difference" in r:
            loss = f"largest difference {r['difference']:.1e} ({r['plain_difference']:.1e} with mix-order reduction)"
        cells = (
            r["run"],
            r.get("precision", ""),
            "yes" if r.get("compiled") else "",
            f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "",
            f"{r['mfu']:.1%}" if r.get("mfu") else "",
            f"{r['peak_memory_mb']:,}" if r.get("peak_memory_mb") else "",
            loss or r.get("error", ""),
            f"{r['compile_s']}" if r.get("compile_s") is not None else "",
            "ok" if r["ok"] else "FAIL",
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
