"""`make demo`: why pretraining exists, in about five minutes on two CPU cores.

1. pretrain a small BERT on English news (`ptm pretrain`, the demo recipe);
2. fine-tune it on BBC news topics, and the same architecture from scratch with the same tokenizer and budget,
   side by side (one core each);
3. print both test accuracies, then `ptm predict` on three new sentences with the pretrained one;
4. print what to try next.
Every number comes from the real runs; nothing here is canned.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SENTENCES = [
    "The striker scored twice as the club won the cup final.",
    "Shares in the bank fell after profits dropped and the chief executive resigned.",
    "The new phone has a faster chip, a bigger screen and better battery life.",
]
# the fine-tuning budget both runs share (the news-cls task file's settings otherwise)
FINETUNE = ["task=news-cls", "hardware=cpu", "trainer.epochs=3", "task.max_seq_len=128"]


def ptm(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptmcli", *args], **popen)


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(root: Path) -> None:
    started = time.time()
    pretrained, finetuned, scratch = root / "pretrain", root / "finetune-pretrained", root / "finetune-scratch"
    say("1/3  pretraining a BERT-tiny (2 layers x 128) on 3,824 English news articles: masked LM + next sentence")
    if ptm("pretrain", "conf=demo", f"hydra.run.dir={pretrained}").wait():
        sys.exit(1)
    say("2/3  fine-tuning on BBC news topics (5 classes): from that run, and from scratch, side by side")
    logs = {name: open(root / f"{name}.log", "w") for name in ("pretrained", "scratch")}
    jobs = {
        "pretrained": ptm(
            "finetune",
            *FINETUNE,
            f"init={pretrained}",
            f"hydra.run.dir={finetuned}",
            stdout=logs["pretrained"],
            stderr=subprocess.STDOUT,
            env={**_env(), "OMP_NUM_THREADS": "1"},
        ),
        "scratch": ptm(
            "finetune",
            *FINETUNE,
            "init=none",
            "model=bert-tiny",
            f"tokenizer={pretrained}",
            f"hydra.run.dir={scratch}",
            stdout=logs["scratch"],
            stderr=subprocess.STDOUT,
            env={**_env(), "OMP_NUM_THREADS": "1"},
        ),
    }
    for name, job in jobs.items():
        if job.wait():
            sys.exit(f"fine-tuning ({name}) failed; see {root / (name + '.log')}")
    accuracy = {
        name: json.loads((path / "test_metrics.json").read_text())["accuracy"]
        for name, path in (("pretrained", finetuned), ("scratch", scratch))
    }
    say("3/3  results on the 188 held-out test articles")
    print(f"  fine-tuned from the pretrained BERT-tiny   test accuracy {accuracy['pretrained']:.3f}")
    print(f"  the same model trained from scratch        test accuracy {accuracy['scratch']:.3f}")
    gain = accuracy["pretrained"] - accuracy["scratch"]
    print(f"  (chance: ~0.23, the largest class)          difference    {gain:+.3f}")
    texts = root / "sentences.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "ptmcli", "predict", f"run={finetuned}", f"input={texts}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print("\n  ptm predict, the pretrained run on three new sentences:")
    for line in out.splitlines():
        row = json.loads(line)
        print(f"    {row['label']:<14} ({row['scores'][row['label']]:.2f})  {row['text']}")
    print(f"\ndone in {(time.time() - started) / 60:.1f} min; the runs are in {root}/. Next, try:")
    print(f"  ptm evaluate run={finetuned} split=test        # the table and confusion matrix again")
    print("  ptm finetune task=news-cls                       # the real pretrained MiniLM: ~0.98 in 5 min")
    print("  ptm finetune task=news-cls optimizer.lr=5e-5,1e-4 -m   # a sweep, one run per learning rate")
    print("  ptm pretrain conf=bert-mini                      # a bigger BERT; ptm ls lists every recipe and task")
    print("  docs/getting-started.md                          # the tour, step by step")


def _env() -> dict:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    run(Path("runs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S"))
