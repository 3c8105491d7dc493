"""Extractive QA: start/end of the answer span in the context; long contexts in overlapping windows."""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ptmcli.data.tokenizer import SpecialIds
from ptmcli.schema import TaskConfig
from ptmcli.tasks.common import EncodedExamples, encoder_inputs, task_tokenizer


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    def f1(gold: str) -> float:
        p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(a) for a in answers)


def best_span(start: np.ndarray, end: np.ndarray, context: np.ndarray, max_len: int) -> tuple[float, int, int]:
    """(score, start, end) maximising start+end logits over context tokens with 0 <= end-start < max_len."""
    scores = start[:, None] + end[None, :]
    allowed = context[:, None] & context[None, :]
    offsets = np.arange(len(start))
    length = offsets[None, :] - offsets[:, None]
    allowed &= (length >= 0) & (length < max_len)
    if not allowed.any():
        return -np.inf, 0, 0
    scores = np.where(allowed, scores, -np.inf)
    s, e = np.unravel_index(int(scores.argmax()), scores.shape)
    return float(scores[s, e]), int(s), int(e)


class ExtractiveQA:
    terms = ("span",)
    stats = ("exact", "f1", "questions")

    def __init__(self, cfg: TaskConfig, labels: list[str], tokenizer: Tokenizer):
        self.cfg, self.labels = cfg, labels
        self.tokenizer = task_tokenizer(tokenizer, cfg.max_seq_len, stride=cfg.doc_stride, strategy="only_second")
        self.pad_id = SpecialIds.of(tokenizer).pad

    def encode(self, records: list[dict]) -> tuple[list[dict], list[tuple[int, int]]]:
        features, groups = [], []
        encodings = self.tokenizer.encode_batch([(r["question"], r["context"]) for r in records])
        for r, first_window in zip(records, encodings):
            answers = r.get("answers") or {"text": [], "answer_start": []}
            char_start = answers["answer_start"][0] if answers["text"] else -1
            char_end = char_start + len(answers["text"][0]) if answers["text"] else -1
            begin = len(features)
            for e in [first_window, *first_window.overflowing]:
                context = np.array([s == 1 for s in e.sequence_ids])
                offsets = np.array(e.offsets)
                start = end = 0  # [CLS] when the answer is not inside this window
                inside = np.flatnonzero(context & (offsets[:, 0] >= char_start) & (offsets[:, 1] <= char_end))
                if (
                    char_start >= 0
                    and len(inside)
                    and offsets[inside[0], 0] == char_start
                    and offsets[inside[-1], 1] == char_end
                ):
                    start, end = int(inside[0]), int(inside[-1])
                features.append(
                    {
                        "input_ids": np.array(e.ids),
                        "type_ids": np.array(e.type_ids),
                        "start": start,
                        "end": end,
                        "context_mask": context,
                        "offsets": offsets,
                        "text": r["context"],
                        "answers": answers["text"],
                        "example": len(groups),
                        "id": r["id"],
                    }
                )
            groups.append((begin, len(features)))
        return features, groups

    def examples(self, records: list[dict]) -> EncodedExamples:
        features, groups = self.encode(records)
        return EncodedExamples(features, self.collate, groups)

    def collate(self, features: list[dict]) -> dict:
        batch = encoder_inputs(features, self.pad_id)
        batch["start"] = torch.tensor([f["start"] for f in features])
        batch["end"] = torch.tensor([f["end"] for f in features])
        batch["features"] = features
        batch["counts"] = {"span": len(features)}
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def _answers(self, logits: torch.Tensor, features: list[dict]) -> dict[int, tuple[str, dict]]:
        """Best answer text per example over all its windows in this batch."""
        best: dict[int, tuple[float, str, dict]] = {}
        start_logits, end_logits = logits[..., 0].float().cpu().numpy(), logits[..., 1].float().cpu().numpy()
        for f, s_row, e_row in zip(features, start_logits, end_logits):
            n = len(f["input_ids"])
            score, s, e = best_span(s_row[:n], e_row[:n], f["context_mask"], self.cfg.max_answer_len)
            if f["example"] not in best or score > best[f["example"]][0]:
                best[f["example"]] = (score, f["text"][f["offsets"][s, 0] : f["offsets"][e, 1]], f)
        return {k: (text, f) for k, (_, text, f) in best.items()}

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict, dict]:
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # (B, T, 2)
        loss = (
            F.cross_entropy(logits[..., 0].float(), batch["start"], reduction="sum")
            + F.cross_entropy(logits[..., 1].float(), batch["end"], reduction="sum")
        ) / 2
        if model.training:
            return {"span": loss}, {}
        answers = self._answers(logits.detach(), batch["features"])
        exact = sum(exact_match(text, f["answers"]) for text, f in answers.values() if f["answers"])
        f1 = sum(token_f1(text, f["answers"]) for text, f in answers.values() if f["answers"])
        return {"span": loss}, {
            "exact": torch.tensor(exact),
            "f1": torch.tensor(f1),
            "questions": torch.tensor(sum(1 for _, f in answers.values() if f["answers"])),
        }

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        n = max(stats["questions"], 1)
        return {"loss": sums["span"] / counts["span"], "exact_match": stats["exact"] / n, "f1": stats["f1"] / n}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        return [{"id": f["id"], "answer": text} for text, f in self._answers(logits, batch["features"]).values()]
