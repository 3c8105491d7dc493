"""Why an ELECTRA discriminator stays at the all-original baseline in short runs: train ELECTRA-mini for a few
hundred steps (batch 16 unless --batch, 128 tokens, AdamW lr 5e-4, linear warmup/decay, English news) and print,
every 50 steps, the generator's MLM loss, the part of the discriminator's loss explained beyond the base rate
(gap = entropy of the replaced share - RTD loss, nats), the discriminator's ROC AUC on the last batch (0.5 = it
ranks replaced tokens no higher than originals, whatever its calibration) and the mean cosine similarity between
the discriminator's final token states (1 = every token has the same state: collapsed).

Run: python tests/bench/electra_probe.py [--zero-bias] [--unigram-generator] [--untied] [--steps=400] [--batch=16]
       [KEY=VALUE ...]
  --zero-bias          the discriminator's output bias starts at 0 (the reference code) instead of the log-odds
                       of the masking rate (ptm's default)
  --unigram-generator  the generator's output bias starts at the corpus' log unigram frequencies
  --untied             the discriminator gets its own copy of the embeddings
  --steps=N            the length of the run, and of its learning-rate schedule (400)
  --batch=N            sequences per step (16); the training sequences are read in order, from the start again
                       when they run out
  --lr=X --warmup=N    the peak learning rate (5e-4) and the warm-up steps (60)
  --generator-lr=X     the peak learning rate of the generator's own weights (default: --lr; the embeddings it
                       shares with the discriminator follow --lr)
  --generator-layers=N keep only the generator's first N layers (default: as many as the discriminator)
  KEY=VALUE            recipe overrides, e.g. objective.mask_prob=0.15
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ptmcli import compose
from ptmcli.distributed import init_from_env
from ptmcli.models import PRETRAINING_MODELS
from ptmcli.objectives import OBJECTIVES
from ptmcli.pretrain import build_examples


def collapse(model, batch) -> float:
    """Mean cosine similarity between the discriminator's final states of 500 real tokens of a batch."""
    model.eval()
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        states = model.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])[real]
        states = F.normalize(states[torch.randperm(states.shape[0])[:500]], dim=-1)
    model.train()
    return float((states @ states.t()).mean())


def detection_auc(model, batch) -> float:
    """ROC AUC of the discriminator's logits on a batch (dropout off): the chance that a replaced token scores
    above an original one. The global random state is put back: the run goes on as without this measurement."""
    model.eval()
    random_state = torch.get_rng_state()
    with torch.no_grad():
        out = model(
            *(batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")),
            batch["mlm_positions"],
            batch["mlm_targets"],
        )
    torch.set_rng_state(random_state)
    model.train()
    real = batch["attention_mask"].bool()
    logits, replaced = out["rtd_logits"][real], out["replaced"][real]
    ranks = torch.empty_like(logits).scatter_(0, logits.argsort(), torch.arange(len(logits), dtype=logits.dtype))
    positives = int(replaced.sum())
    negatives = len(replaced) - positives
    return float((ranks[replaced].sum() - positives * (positives - 1) / 2) / max(positives * negatives, 1))


def main(args: list[str]) -> None:
    flags = {a for a in args if a.startswith("--")}
    overrides = [a for a in args if not a.startswith("--")]

    def flag(name: str, default):
        """The value of --NAME=VALUE, of the default's type."""
        return next((type(default)(a.split("=", 1)[1]) for a in flags if a.startswith(f"--{name}=")), default)

    steps, warmup, lr = flag("steps", 400), flag("warmup", 60), flag("lr", 5e-4)
    if not 0 < warmup < steps:
        sys.exit(f"--warmup={warmup} must be above 0 and below --steps={steps} (the rate decays after it).")
    generator_lr, generator_layers = flag("generator-lr", lr), flag("generator-layers", 0)
    batch_size = flag("batch", 16)
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # as measured (docs/results.md); results differ slightly with the thread count
    _, cfg = compose.checked(compose.parse("pretrain", ["conf=electra-mini", *overrides]))
    tokenizer, train, _, _ = build_examples(cfg, init_from_env())
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["electra"](cfg.model, tokenizer.get_vocab_size(), cfg.objective)
    if "--zero-bias" in flags:
        torch.nn.init.zeros_(model.rtd_out.bias)
    if "--unigram-generator" in flags:
        counts = np.ones(tokenizer.get_vocab_size())
        for ids in train.chunks[:4000]["ids"]:
            np.add.at(counts, np.asarray(ids), 1)
        with torch.no_grad():
            model.mlm_head.bias.copy_(torch.from_numpy(np.log(counts / counts.sum())))
    if generator_layers:
        model.generator.layers = model.generator.layers[:generator_layers]
    if "--untied" in flags:
        model.encoder.embeddings = copy.deepcopy(model.generator.embeddings)
    objective = OBJECTIVES["rtd"](cfg.objective)
    shared = {id(p) for p in model.encoder.parameters()}
    generator_own = {id(p) for m in (model.generator, model.mlm_head) for p in m.parameters()} - shared
    split = {own: [p for p in model.parameters() if (id(p) in generator_own) == own] for own in (False, True)}
    groups = [
        {
            "params": [p for p in params if (p.ndim > 1) == matrices],
            "weight_decay": 0.01 if matrices else 0.0,
            "peak_lr": peak,
        }
        for params, peak in ((split[False], lr), (split[True], generator_lr))
        for matrices in (True, False)
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, eps=1e-6)  # the paper's Adam epsilon
    window = {"mlm": 0.0, "rtd": 0.0, "entropy": 0.0}
    for step in range(steps):
        batch = train.batch([i % len(train.chunks) for i in range(step * batch_size, (step + 1) * batch_size)], 0)
        sums, stats = objective(model, batch)
        loss = sums["mlm"] / batch["counts"]["mlm"] + cfg.objective.rtd_weight * sums["rtd"] / batch["counts"]["rtd"]
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * min((step + 1) / warmup, (steps - step) / (steps - warmup))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        share = float(stats["replaced"]) / batch["counts"]["rtd"]
        window["mlm"] += sums["mlm"].item() / batch["counts"]["mlm"]
        window["rtd"] += sums["rtd"].item() / batch["counts"]["rtd"]
        window["entropy"] -= share * math.log(share) + (1 - share) * math.log(1 - share)
        if (step + 1) % 50 == 0:
            mean = {k: v / 50 for k, v in window.items()}
            print(
                f"step {step + 1:4d}  generator MLM {mean['mlm']:.3f}  RTD {mean['rtd']:.4f}  "
                f"gap {mean['entropy'] - mean['rtd']:.4f}  AUC {detection_auc(model, batch):.3f}  "
                f"token-state cosine {collapse(model, batch):.3f}",
                flush=True,
            )
            window = dict.fromkeys(window, 0.0)


if __name__ == "__main__":
    main(sys.argv[1:])
