"""Supervised SimCSE (Gao et al., 2021, section 4): sentence vectors fine-tuned from labelled pairs.

A pair labelled `task.positive_label` gives an (anchor, positive); a pair with the same anchor labelled
`task.negative_label` gives that anchor's hard negative. Each anchor must pick its own positive out of every
positive and hard negative of the step (under data parallelism those of all processes, gathered with gradients),
by cosine similarity over `task.temperature`. On pair-cls (BBC News) the anchor is a headline, the positive its
article's body, the hard negative another article's body.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ptmcli.data.padding import pad
from ptmcli.data.tokenizer import SpecialIds
from ptmcli.errors import PtmError
from ptmcli.objectives.contrastive import gathered
from ptmcli.schema import TaskConfig
from ptmcli.tasks.common import EncodedExamples, task_tokenizer


class SentencePairs:
    terms = ("contrastive",)
    stats = ("contrastive_correct",)

    def __init__(self, cfg: TaskConfig, labels: list[str], tokenizer: Tokenizer):
        for key in ("positive_label", "negative_label"):
            value = getattr(cfg, key)
            if value is not None and value not in labels:
                raise PtmError(
                    f"task.{key}={value!r} is not a label of this data ({', '.join(labels)}); name the label of "
                    f"{'pairs that mean the same' if key == 'positive_label' else 'hard-negative pairs (or null)'}."
                )
        self.cfg, self.labels = cfg, labels
        self.tokenizer = task_tokenizer(tokenizer, cfg.max_seq_len)
        self.pad_id = SpecialIds.of(tokenizer).pad

    def triples(self, records: list[dict]) -> list[tuple[dict, str | None]]:
        """(positive pair, its anchor's hard negative text) for labelled records. With hard negatives asked for and
        found, anchors without one are left out (every process must serve as many candidates per row); unlabelled
        records (ptm predict) are pairs to score, as they are."""
        if not any(r.get("label") is not None for r in records):
            return [(r, None) for r in records]
        negatives: dict[str, str] = {}
        for r in records:
            if self.cfg.negative_label is not None and r.get("label") == self.cfg.negative_label:
                negatives.setdefault(r["text"], r["text_pair"])
        positives = [r for r in records if r.get("label") == self.cfg.positive_label]
        if negatives:
            return [(r, negatives[r["text"]]) for r in positives if r["text"] in negatives]
        return [(r, None) for r in positives]

    def examples(self, records: list[dict]) -> EncodedExamples:
        triples = self.triples(records)
        if not triples:
            raise PtmError(
                f"No pair is labelled task.positive_label={self.cfg.positive_label!r}; supervised SimCSE needs "
                f"positive pairs (labels here: {', '.join(self.labels)})."
            )

        def encode(texts: list[str]) -> list[np.ndarray]:
            return [np.array(e.ids) for e in self.tokenizer.encode_batch(texts)]

        anchors = encode([r["text"] for r, _ in triples])
        positives = encode([r["text_pair"] for r, _ in triples])
        negatives = encode([n for _, n in triples]) if triples[0][1] is not None else [None] * len(triples)
        features = [
            {"rows": [a, p] + ([n] if n is not None else []), "input": {k: r[k] for k in ("id", "text", "text_pair")}}
            for (r, _), a, p, n in zip(triples, anchors, positives, negatives)
        ]
        return EncodedExamples(features, self.collate)

    def collate(self, features: list[dict]) -> dict:
        """One padded block of rows: the anchors, then the positives, then the hard negatives (if any)."""
        rows = [f["rows"][column] for column in range(len(features[0]["rows"])) for f in features]
        ids = pad(rows, self.pad_id)
        mask = pad([np.ones(len(r)) for r in rows], 0)
        return {
            "input_ids": ids,
            "token_type_ids": torch.zeros_like(ids),
            "attention_mask": mask,
            "inputs": [f["input"] for f in features],
            "counts": {"contrastive": len(features)},
            "num_tokens": int(mask.sum()),
        }

    def vectors(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors, candidates: positives then hard negatives), L2-normalised."""
        vectors = F.normalize(
            model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float(), dim=-1
        )
        n = batch["counts"]["contrastive"]
        return vectors[:n], vectors[n:]

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict, dict]:
        anchors, candidates = self.vectors(model, batch)
        # evaluation gathers nothing: processes may run different numbers of batches there
        candidates, offset = gathered(candidates) if model.training else (candidates, 0)
        similarity = anchors @ candidates.t() / self.cfg.temperature
        targets = torch.arange(anchors.shape[0], device=anchors.device) + offset
        loss = F.cross_entropy(similarity, targets, reduction="sum")
        return {"contrastive": loss}, {"contrastive_correct": (similarity.argmax(-1) == targets).sum()}

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        # accuracy: the share of anchors whose own positive is the most similar of the batch's positives and hard
        # negatives (the pair task's trainer.metric=val/accuracy picks the best checkpoint by it)
        return {
            "loss": sums["contrastive"] / counts["contrastive"],
            "accuracy": stats["contrastive_correct"] / counts["contrastive"],
        }

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        """The cosine similarity of each (text, text_pair)."""
        anchors, candidates = self.vectors(model, batch)
        similarity = (anchors * candidates[: anchors.shape[0]]).sum(-1)
        return [{**source, "similarity": round(float(s), 6)} for source, s in zip(batch["inputs"], similarity)]
