"""Token classification (NER): a tag per word, predicted at the word's first sub-token; entity-level scoring."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ptmcli.data.labeled import entity_spans
from ptmcli.data.padding import pad
from ptmcli.data.tokenizer import SpecialIds
from ptmcli.schema import TaskConfig
from ptmcli.tasks.common import EncodedExamples, encoder_inputs, task_tokenizer


def align_words(word_ids: list[int | None], num_words: int) -> np.ndarray:
    """Position of each word's first sub-token (-1 for words cut off by truncation)."""
    first = np.full(num_words, -1)
    for position, word in enumerate(word_ids):
        if word is not None and first[word] == -1:
            first[word] = position
    return first


def span_counts(gold: list[str], predicted: list[str]) -> dict[str, tuple[int, int, int]]:
    """Per entity type (tp, fp, fn) of exact span matches, seqeval/conlleval-style."""
    g, p = set(entity_spans(gold)), set(entity_spans(predicted))
    out = {}
    for kind in {s[0] for s in g | p}:
        gk, pk = {s for s in g if s[0] == kind}, {s for s in p if s[0] == kind}
        out[kind] = (len(gk & pk), len(pk - gk), len(gk - pk))
    return out


def prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class TokenClassification:
    terms = ("token",)

    def __init__(self, cfg: TaskConfig, labels: list[str], tokenizer: Tokenizer):
        self.cfg, self.labels = cfg, labels
        self.tokenizer = task_tokenizer(tokenizer, cfg.max_seq_len)
        self.pad_id = SpecialIds.of(tokenizer).pad
        self.types = sorted({name.partition("-")[2] for name in labels if "-" in name})
        self.stats = ("correct", *(f"{c}_{t}" for t in self.types for c in ("tp", "fp", "fn")))
        self.weights = torch.tensor(cfg.class_weights, dtype=torch.float) if cfg.class_weights else None

    def encode(self, records: list[dict]) -> list[dict]:
        index = {name: i for i, name in enumerate(self.labels)}
        features = []
        for r, e in zip(records, self.tokenizer.encode_batch([r["tokens"] for r in records], is_pretokenized=True)):
            first = align_words(e.word_ids, len(r["tokens"]))
            labels = np.full(len(e.ids), -100)
            kept = first >= 0
            labels[first[kept]] = [index.get(t, 0) for t, k in zip(r["tags"], kept) if k]
            features.append(
                {
                    "input_ids": np.array(e.ids),
                    "type_ids": np.array(e.type_ids),
                    "labels": labels,
                    "first": first,
                    "tags": [index.get(t, 0) for t in r["tags"]],
                    "words": r["tokens"],
                }
            )
        return features

    def examples(self, records: list[dict]) -> EncodedExamples:
        return EncodedExamples(self.encode(records), self.collate)

    def collate(self, features: list[dict]) -> dict:
        batch = encoder_inputs(features, self.pad_id)
        batch["labels"] = pad([f["labels"] for f in features], -100)
        batch["first"] = [f["first"] for f in features]
        batch["tags"] = [f["tags"] for f in features]
        batch["words"] = [f["words"] for f in features]
        batch["counts"] = {"token": int((batch["labels"] != -100).sum())}
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict, dict]:
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()  # (B, T, L)
        labels = batch["labels"]
        weight = self.weights.to(logits.device) if self.weights is not None else None
        sums = {
            "token": F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), weight=weight, ignore_index=-100, reduction="sum"
            )
        }
        if model.training:
            return sums, {}
        predicted = logits.argmax(-1)
        stats = {"correct": ((predicted == labels) & (labels != -100)).sum()}
        totals = {k: 0 for k in self.stats[1:]}
        for pred_row, first, tags in zip(predicted.tolist(), batch["first"], batch["tags"]):
            words = [self.labels[pred_row[p]] if p >= 0 else "O" for p in first]
            for kind, (tp, fp, fn) in span_counts([self.labels[t] for t in tags], words).items():
                if f"tp_{kind}" in totals:
                    totals[f"tp_{kind}"] += tp
                    totals[f"fp_{kind}"] += fp
                    totals[f"fn_{kind}"] += fn
        stats.update({k: torch.tensor(v) for k, v in totals.items()})
        return sums, stats

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        out = {"loss": sums["token"] / counts["token"], "token_accuracy": stats["correct"] / counts["token"]}
        totals = [sum(stats[f"{c}_{t}"] for t in self.types) for c in ("tp", "fp", "fn")]
        out["precision"], out["recall"], out["f1"] = prf(*totals)
        for t in self.types:
            out[f"precision_{t}"], out[f"recall_{t}"], out[f"f1_{t}"] = prf(
                *(stats[f"{c}_{t}"] for c in ("tp", "fp", "fn"))
            )
        return out

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        predicted = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).argmax(-1).tolist()
        out = []
        for row, first, words in zip(predicted, batch["first"], batch["words"]):
            tags = [self.labels[row[p]] if p >= 0 else "O" for p in first]
            entities = [
                {"type": k, "text": " ".join(words[a : b + 1]), "start": a, "end": b} for k, a, b in entity_spans(tags)
            ]
            out.append({"tokens": words, "tags": tags, "entities": entities})
        return out
