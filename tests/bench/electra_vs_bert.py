"""ELECTRA against BERT at equal pretraining compute (issue 22's bar): pretrain BERT-mini with masked LM and
ELECTRA-mini with replaced-token detection (embeddings tied, and all weights tied) for the same steps x batch x
length on English news, with the same tokenizer, then fine-tune each on news-cls with several seeds; print the
pretraining curves and the test accuracies as one table, and write electra_vs_bert.json.

Every run is a plain `ptm` command, printed before it starts; the arms (and then the fine-tuning runs) run side by
side, one process each, so on a GPU they share the device.

Run: python tests/bench/electra_vs_bert.py [--steps=N|auto] [--batch=128] [--seeds=0,1,2]
       [--arms=bert,electra,electra-tied] [--budget-s=240] [--max-steps=6000] [--out=DIR] [--smoke] [KEY=VALUE ...]
  --steps=auto    time 40 steps of every arm side by side, then take as many steps (a multiple of 500, at least
                  1,500 and at most --max-steps) as the slowest arm runs in --budget-s seconds
  --smoke         toy sizes on the CPU (a few steps, a few hundred documents): tests the script itself
  KEY=VALUE       overrides for every pretraining run, e.g. hardware.precision=fp32
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "bert": ["conf=bert-mini", "objective=mlm"],
    "electra": ["conf=electra-mini"],
    "electra-tied": ["conf=electra-mini", "model.share_all_weights=true"],
}
SEQ_LEN = 128


def options(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"steps": "auto", "batch": "128", "seeds": "0,1,2", "arms": "bert,electra,electra-tied"}
    opts.update({"budget-s": "240", "max-steps": "6000", "out": "electra-vs-bert", "smoke": False})
    overrides = []
    for arg in argv:
        if arg == "--smoke":
            opts["smoke"] = True
        elif arg.startswith("--") and "=" in arg and arg[2:].split("=")[0] in opts:
            key, value = arg[2:].split("=", 1)
            opts[key] = value
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            sys.exit(f"electra_vs_bert: unknown argument {arg!r} (see the docstring for the flags)")
    return opts, overrides


def launch(args: list[str], log: Path, scratch: Path) -> subprocess.Popen:
    """One ptm command in its own process, its output in `log`; each gets its own datasets cache so that runs
    side by side never write the same cache file."""
    print("  python -m ptmcli " + " ".join(args), flush=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(scratch / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "2")
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "ptmcli", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> dict[str, bool]:
    done = {}
    for name, proc in procs.items():
        done[name] = proc.wait() == 0
        if not done[name]:
            tail = logs[name].read_text().strip().splitlines()[-5:]
            print(f"  {name} FAILED (exit {proc.returncode}):\n    " + "\n    ".join(tail), flush=True)
    return done


def rows(run_dir: Path, split: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def pretrain_args(arm: str, steps: int, batch: int, overrides: list[str], smoke: bool, run_dir: Path) -> list[str]:
    every = max(steps // 6, 1)
    args = [
        "pretrain",
        *ARMS[arm],
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={batch}",
        f"data.max_seq_len={SEQ_LEN}",
        f"trainer.eval_every={every}",
        "trainer.eval_batches=50",
        f"trainer.log_every={max(every // 10, 1)}",
        "trainer.save_every=0",
        "trainer.curves=false",
    ]
    if smoke:
        args += ["hardware=cpu", "data.max_train_samples=300", "trainer.eval_batches=2"]
    return [*args, *overrides, f"hydra.run.dir={run_dir}"]


def replaced_entropy(share: float) -> float:
    """The RTD loss of a discriminator that knows only the replaced share (nats): the base rate to beat."""
    share = min(max(share, 1e-9), 1 - 1e-9)
    return -(share * math.log(share) + (1 - share) * math.log(1 - share))


def curve(run_dir: Path) -> list[dict]:
    out = []
    for r in rows(run_dir, "val"):
        point = {"step": r["step"], "mlm_loss": round(r["mlm_loss"], 3)}
        if "rtd_loss" in r:
            point["rtd_gap"] = round(replaced_entropy(r["replaced_fraction"]) - r["rtd_loss"], 4)
            point["rtd_accuracy"] = round(r["rtd_accuracy"], 3)
            point["rtd_recall"] = round(r["rtd_recall"], 3)
        out.append(point)
    return out


def main() -> None:
    opts, overrides = options(sys.argv[1:])
    smoke, batch = opts["smoke"], int(opts["batch"])
    arms, seeds = opts["arms"].split(","), [int(s) for s in opts["seeds"].split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"electra_vs_bert: unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    out = Path(opts["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    steps = opts["steps"]
    if steps == "auto":
        probe = 4 if smoke else 40
        print(f"timing {probe} steps of every arm, side by side:", flush=True)
        dirs = {a: out / f"probe-{a}" for a in arms}
        logs = {a: out / f"probe-{a}.log" for a in arms}
        procs = {a: launch(pretrain_args(a, probe, batch, overrides, smoke, dirs[a]), logs[a], out) for a in arms}
        if not all(wait_all(procs, logs).values()):
            sys.exit(1)
        # tokens/s of the later windows (the first holds the warm-up); the slowest arm sets the pace
        rates = {a: [r["tokens_per_s"] for r in rows(dirs[a], "train")][1:] or [1.0] for a in arms}
        slowest = min(sum(v) / len(v) for v in rates.values()) / (batch * SEQ_LEN)
        fits = int(float(opts["budget-s"]) * slowest) // 500 * 500
        steps = 8 if smoke else max(1500, min(int(opts["max-steps"]), fits))
        print(f"  slowest arm {slowest:.1f} steps/s side by side -> {steps} steps each", flush=True)
    steps = int(steps)

    print(f"pretraining {steps} steps x {batch} x {SEQ_LEN} tokens, side by side:", flush=True)
    t0 = time.perf_counter()
    dirs = {a: out / f"pretrain-{a}" for a in arms}
    logs = {a: out / f"pretrain-{a}.log" for a in arms}
    procs = {a: launch(pretrain_args(a, steps, batch, overrides, smoke, dirs[a]), logs[a], out) for a in arms}
    if opts["steps"] == "auto":
        # a few fine-tuning steps from a probe run, beside the long runs: a fault there stops everything now
        check = out / "news-cls-check"
        args = ["finetune", "task=news-cls", f"init={out / f'probe-{arms[-1]}'}", "trainer.epochs=0.05"]
        args += ["trainer.eval_every=2", *(["hardware=cpu"] if smoke else []), f"hydra.run.dir={check}"]
        checked = launch(args, Path(f"{check}.log"), out)
        if not wait_all({"check": checked}, {"check": Path(f"{check}.log")})["check"]:
            for proc in procs.values():
                proc.terminate()
            sys.exit(1)
    pretrained = wait_all(procs, logs)
    pretrain_s = time.perf_counter() - t0

    print("fine-tuning news-cls from every arm, side by side:", flush=True)
    t0 = time.perf_counter()
    runs = {(a, s): out / f"news-cls-{a}-seed{s}" for a in arms if pretrained[a] for s in seeds}
    logs = {k: Path(f"{d}.log") for k, d in runs.items()}
    extra = ["hardware=cpu", "trainer.epochs=0.05", "trainer.eval_every=2"] if smoke else []
    procs = {
        k: launch(
            ["finetune", "task=news-cls", f"init={dirs[k[0]]}", f"trainer.seed={k[1]}", *extra, f"hydra.run.dir={d}"],
            logs[k],
            out,
        )
        for k, d in runs.items()
    }
    finetuned = wait_all(procs, logs)
    finetune_s = time.perf_counter() - t0

    results = {"steps": steps, "batch": batch, "seq_len": SEQ_LEN, "overrides": overrides, "arms": {}}
    for a in arms:
        scores = {}
        for s in seeds:
            metrics = runs.get((a, s), Path("-")) / "test_metrics.json"
            if finetuned.get((a, s)) and metrics.exists():
                m = json.loads(metrics.read_text())
                scores[s] = {"accuracy": round(m["accuracy"], 3), "macro_f1": round(m["macro_f1"], 3)}
        train = rows(dirs[a], "train")
        results["arms"][a] = {
            "pretrained": pretrained[a],
            "curve": curve(dirs[a]),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in train[1:]) / max(len(train) - 1, 1)),
            "news_cls": scores,
            "mean_accuracy": round(sum(v["accuracy"] for v in scores.values()) / len(scores), 3) if scores else None,
        }
    results["seconds"] = {"pretrain": round(pretrain_s), "finetune": round(finetune_s)}
    results["seconds"]["total"] = round(time.perf_counter() - started)
    (out / "electra_vs_bert.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n{steps} steps x {batch} x {SEQ_LEN} tokens; seeds {seeds}; {results['seconds']} s")
    print("| arm | validation (step: MLM loss / RTD gap nats / RTD recall) | tok/s | news-cls test accuracy | mean |")
    print("|---|---|---|---|---|")
    for a, r in results["arms"].items():
        points = "; ".join(
            f"{p['step']}: {p['mlm_loss']}" + (f" / {p['rtd_gap']} / {p['rtd_recall']}" if "rtd_gap" in p else "")
            for p in r["curve"]
        )
        accs = " / ".join(f"{v['accuracy']:.3f}" for v in r["news_cls"].values())
        print(f"| {a} | {points} | {r['tokens_per_s']:,} | {accs} | {r['mean_accuracy']} |")
    sys.exit(0 if all(pretrained.values()) and all(finetuned.values()) else 1)


if __name__ == "__main__":
    main()
