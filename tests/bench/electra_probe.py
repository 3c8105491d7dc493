"""Why an ELECTRA discriminator stays at the all-original baseline in short runs: train ELECTRA-mini for a few
hundred steps (batch 16 unless --batch, 128 tokens, AdamW lr 5e-4, linear warmup/decay, English news) and print,
every 50 steps, the generator's MLM loss, the part of the discriminator's loss explained beyond the base rate
(gap = entropy of the replaced share - RTD loss, nats), the discriminator's ROC AUC on the last batch (0.5 = it
ranks replaced tokens no higher than originals, whatever its calibration) and the mean cosine similarity between
the discriminator's final token states (1 = every token has the same state: collapsed).

Run: python tests/bench/electra_probe.py [--hf] [--zero-bias] [--unigram-generator] [--untied] [--steps=400]
       [--batch=16] [KEY=VALUE ...]
  --hf                 train Hugging Face's ElectraForMaskedLM and ElectraForPreTraining instead, from the very same
                       initial weights (ptm's, exported), embeddings shared, on the same batches with the same
                       optimizer: the reference implementation's forward and backward under the same run
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
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptmcli import compose
from ptmcli.distributed import init_from_env
from ptmcli.export import write_pretraining
from ptmcli.models import PRETRAINING_MODELS
from ptmcli.objectives import OBJECTIVES
from ptmcli.pretrain import build_examples

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class PtmSide:
    """ptm's ELECTRA model and objective: the step's loss and its parts, the discriminator's judgement and states."""

    def __init__(self, model, cfg):
        self.model, self.objective, self.rtd_weight = model, OBJECTIVES["rtd"](cfg.objective), cfg.objective.rtd_weight
        shared = {id(p) for p in model.encoder.parameters()}
        self.generator_own = {id(p) for m in (model.generator, model.mlm_head) for p in m.parameters()} - shared

    def step(self, batch) -> tuple[torch.Tensor, float, float, float]:
        """The loss to step on, the generator's MLM loss, the discriminator's loss and the replaced share."""
        sums, stats = self.objective(self.model, batch)
        mlm, rtd = sums["mlm"] / batch["counts"]["mlm"], sums["rtd"] / batch["counts"]["rtd"]
        return mlm + self.rtd_weight * rtd, mlm.item(), rtd.item(), float(stats["replaced"]) / batch["counts"]["rtd"]

    def judged(self, batch) -> dict:
        out = self.model(*(batch[k] for k in INPUTS), batch["mlm_positions"], batch["mlm_targets"])
        return {"rtd_logits": out["rtd_logits"], "replaced": out["replaced"]}

    def states(self, batch) -> torch.Tensor:
        """The discriminator's final states of the batch as it comes (masked, not yet filled by the generator)."""
        return self.model.encoder(*(batch[k] for k in INPUTS))


class HuggingFaceSide:
    """The same initial weights as Hugging Face's generator and discriminator (tests/bench/bench.py's ElectraPair:
    shared embeddings, multinomial samples, 50 x the discriminator's mean loss plus the generator's)."""

    def __init__(self, model, cfg, tokenizer):
        from bench import INPUTS as HF_INPUTS
        from bench import hf_model

        exported = Path(tempfile.mkdtemp(prefix="electra-probe-hf-"))
        write_pretraining(model, cfg.model, cfg.objective.name, tokenizer, exported)
        self.model, self.convert = hf_model("electra", exported, cfg.objective.rtd_weight), HF_INPUTS["electra"]
        shared = {id(p) for p in self.model.discriminator.parameters()}
        self.generator_own = {id(p) for p in self.model.generator.parameters()} - shared

    def step(self, batch) -> tuple[torch.Tensor, float, float, float]:
        out = self.model(**self.convert(batch))
        real = batch["attention_mask"].bool()
        return out["loss"], out["mlm"].item(), out["rtd"].item(), float(out["replaced"][real].float().mean())

    def judged(self, batch) -> dict:
        return self.model(**self.convert(batch))

    def states(self, batch) -> torch.Tensor:
        inputs = (batch[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
        return self.model.discriminator.electra(*inputs).last_hidden_state


def evaluated(side, batch, what: str):
    """side.judged or side.states on a batch with dropout off; the global random state is put back, so the run goes
    on as without this measurement."""
    side.model.eval()
    random_state = torch.get_rng_state()
    with torch.no_grad():
        out = getattr(side, what)(batch)
    torch.set_rng_state(random_state)
    side.model.train()
    return out


def collapse(side, batch) -> float:
    """Mean cosine similarity between the discriminator's final states of 500 real tokens of a batch."""
    real = batch["attention_mask"].bool()
    states = evaluated(side, batch, "states")[real]
    states = F.normalize(
        states[torch.randperm(states.shape[0], generator=torch.Generator().manual_seed(0))[:500]], dim=-1
    )
    return float((states @ states.t()).mean())


def detection_auc(side, batch) -> float:
    """ROC AUC of the discriminator's logits on a batch (dropout off): the chance that a replaced token scores
    above an original one."""
    out = evaluated(side, batch, "judged")
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
    side = HuggingFaceSide(model, cfg, tokenizer) if "--hf" in flags else PtmSide(model, cfg)
    model = side.model
    split = {own: [p for p in model.parameters() if (id(p) in side.generator_own) == own] for own in (False, True)}
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
        loss, mlm, rtd, share = side.step(batch)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * min((step + 1) / warmup, (steps - step) / (steps - warmup))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window["mlm"] += mlm
        window["rtd"] += rtd
        window["entropy"] -= share * math.log(share) + (1 - share) * math.log(1 - share)
        if (step + 1) % 50 == 0:
            mean = {k: v / 50 for k, v in window.items()}
            print(
                f"step {step + 1:4d}  generator MLM {mean['mlm']:.3f}  RTD {mean['rtd']:.4f}  "
                f"gap {mean['entropy'] - mean['rtd']:.4f}  AUC {detection_auc(side, batch):.3f}  "
                f"token-state cosine {collapse(side, batch):.3f}",
                flush=True,
            )
            window = dict.fromkeys(window, 0.0)


if __name__ == "__main__":
    main(sys.argv[1:])
