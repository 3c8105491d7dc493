"""Text and text-pair classification: [CLS] a [SEP] (b [SEP]) -> one label."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ptmcli.data.tokenizer import SpecialIds
from ptmcli.schema import TaskConfig
from ptmcli.tasks.common import EncodedExamples, encoder_inputs, task_tokenizer


def confusion_metrics(matrix: np.ndarray, labels: list[str]) -> dict[str, float]:
    """accuracy, macro-F1 and per-class precision/recall/F1 from a (gold, predicted) count matrix."""
    tp = np.diag(matrix).astype(float)
    precision = np.divide(tp, matrix.sum(0), out=np.zeros_like(tp), where=matrix.sum(0) > 0)
    recall = np.divide(tp, matrix.sum(1), out=np.zeros_like(tp), where=matrix.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    out = {"accuracy": float(tp.sum() / max(matrix.sum(), 1)), "macro_f1": float(f1.mean())}
    for i, name in enumerate(labels):
        out.update(
            {f"precision_{name}": float(precision[i]), f"recall_{name}": float(recall[i]), f"f1_{name}": float(f1[i])}
        )
    return out


class Classification:
    terms = ("cls",)

    def __init__(self, cfg: TaskConfig, labels: list[str], tokenizer: Tokenizer):
        self.cfg, self.labels, self.pair = cfg, labels, cfg.kind == "pair-cls"
        self.tokenizer = task_tokenizer(tokenizer, cfg.max_seq_len)
        self.pad_id = SpecialIds.of(tokenizer).pad
        self.stats = tuple(f"cm_{i}_{j}" for i in range(len(labels)) for j in range(len(labels)))
        self.weights = torch.tensor(cfg.class_weights, dtype=torch.float) if cfg.class_weights else None

    def encode(self, records: list[dict]) -> list[dict]:
        inputs = [(r["text"], r["text_pair"]) if self.pair else r["text"] for r in records]
        index = {name: i for i, name in enumerate(self.labels)}
        return [
            {
                "input_ids": np.array(e.ids),
                "type_ids": np.array(e.type_ids),
                "label": index.get(r.get("label"), -1),
                "input": {k: r[k] for k in ("id", "text", "text_pair") if k in r},
            }
            for r, e in zip(records, self.tokenizer.encode_batch(inputs))
        ]

    def examples(self, records: list[dict]) -> EncodedExamples:
        return EncodedExamples(self.encode(records), self.collate)

    def collate(self, features: list[dict]) -> dict:
        batch = encoder_inputs(features, self.pad_id)
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        batch["inputs"] = [f["input"] for f in features]
        batch["counts"] = {"cls": len(features)}
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict, dict]:
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()  # (B, L)
        weight = self.weights.to(logits.device) if self.weights is not None else None
        sums = {"cls": F.cross_entropy(logits, batch["labels"], weight=weight, reduction="sum")}
        if model.training:
            return sums, {}
        n = len(self.labels)
        cells = batch["labels"] * n + logits.argmax(-1)
        matrix = torch.bincount(cells, minlength=n * n)
        return sums, dict(zip(self.stats, matrix))

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        n = len(self.labels)
        matrix = np.array([stats[f"cm_{i}_{j}"] for i in range(n) for j in range(n)], dtype=np.int64).reshape(n, n)
        return {
            "loss": sums["cls"] / counts["cls"],
            **confusion_metrics(matrix, self.labels),
            "confusion_matrix": matrix.tolist(),
        }

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        probs = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float().softmax(-1)
        return [
            {
                **source,
                "label": self.labels[int(p.argmax())],
                "scores": {n: round(float(v), 6) for n, v in zip(self.labels, p)},
            }
            for source, p in zip(batch["inputs"], probs)
        ]
