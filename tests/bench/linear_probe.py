"""A linear probe of news-cls on frozen sentence vectors: what an encoder's features hold for the task, apart from
how fine-tuning moves from them (docs/results.md, ELECTRA).

Run: python tests/bench/linear_probe.py SOURCE... [--seed 0] [--threads 1]
  SOURCE   a ptm run or checkpoint, or a Hugging Face directory, as `ptm embed run=` reads it;
           random:SOURCE is SOURCE's architecture and tokenizer with ptm's fresh initialisation (drawn with --seed)
For each source and each pooling (mean, cls): the news-cls articles (split as `task=news-cls` splits them) embedded
by `ptm embed`'s code (L2-normalised, 128 tokens), standardised with the training split's statistics, then a
multinomial logistic regression fitted on the training split (full-batch L-BFGS) with its L2 weight chosen on the
validation split; prints validation and test accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from ptmcli.compose import checked, parse
from ptmcli.data.labeled import load_splits
from ptmcli.embed import Embedder, load_embedder
from ptmcli.models import ENCODERS
from ptmcli.models.layers import init_normal

L2_WEIGHTS = (1e-4, 1e-3, 1e-2, 1e-1)


def embedder(source: str, pooling: str, seed: int) -> Embedder:
    if not source.startswith("random:"):
        return load_embedder(source, pooling)
    trained = load_embedder(source.removeprefix("random:"), pooling)
    torch.manual_seed(seed)
    arch = trained.encoder.arch
    encoder = ENCODERS[trained.family](arch, trained.tokenizer.get_vocab_size())
    init_normal(encoder, arch.init_std)
    return Embedder(encoder.eval(), trained.tokenizer, pooling, source, trained.device, trained.family)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe(vectors: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], classes: int) -> dict[str, float]:
    mean, std = vectors["train"].mean(0), vectors["train"].std(0) + 1e-6
    x = {split: (v - mean) / std for split, v in vectors.items()}

    def accuracy(split, weight, bias):
        return ((x[split] @ weight + bias).argmax(1) == labels[split]).float().mean().item()

    best = None
    for l2 in L2_WEIGHTS:
        weight, bias = fit(x["train"], labels["train"], classes, l2)
        validation = accuracy("validation", weight, bias)
        if best is None or validation > best["validation"]:
            best = {"validation": validation, "test": accuracy("test", weight, bias), "l2": l2}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--seed", type=int, default=0, help="the fresh weights of random:SOURCE")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, task = checked(parse("finetune", ["task=news-cls"]))  # the task's data and split, as fine-tuning reads them
    splits = load_splits(task.data, task.task.kind)
    names = sorted({r["label"] for r in splits["train"]})
    labels = {s: torch.tensor([names.index(r["label"]) for r in records]) for s, records in splits.items()}
    texts = {split: [r["text"] for r in records] for split, records in splits.items()}
    for source in args.sources:
        row = [source]
        loaded = embedder(source, "mean", args.seed)  # loaded (or drawn) once; only the pooling differs
        for pooling in ("mean", "cls"):
            encoder = dataclasses.replace(loaded, pooling=pooling)
            vectors = {split: torch.from_numpy(encoder.encode(t, show=False)) for split, t in texts.items()}
            best = probe(vectors, labels, len(names))
            row.append(f"{pooling}: validation {best['validation']:.3f} test {best['test']:.3f} (l2 {best['l2']:g})")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
