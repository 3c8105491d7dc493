"""Text-to-text: an encoder-decoder reads `task.prefix + text` and writes the target text.

Any classification task becomes one by writing its label word (`transfer=text-to-text`); its accuracy is
the exact match of the generated word. Summarisation-like tasks (`task.kind=text2text`, records with a
`target`) are scored by ROUGE, next to the lead baseline (the input's first `task.lead_words` words) when set.
Training is teacher-forced cross-entropy; validation also generates (greedy or beam search, as
`task.num_beams` says), so the metric that picks checkpoints is the one users care about.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from ptmcli.data.padding import pad
from ptmcli.data.tokenizer import SpecialIds
from ptmcli.generation import Sampling, beam_search, generate
from ptmcli.models.vocab_loss import correct
from ptmcli.schema import TaskConfig
from ptmcli.tasks.common import EncodedExamples, task_tokenizer
from ptmcli.tasks.rouge import rouge

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
LEAD_KEYS = tuple(f"lead_{k}" for k in ROUGE_KEYS)


class TextToText:
    terms = ("gen",)
    stats = ("gen_correct", "examples", "exact", *ROUGE_KEYS)

    def __init__(self, cfg: TaskConfig, labels: list[str], tokenizer: Tokenizer, decoder_start: str = "pad"):
        self.cfg, self.labels = cfg, labels
        self.classify = cfg.kind in ("text-cls", "pair-cls")
        self.lead = bool(cfg.lead_words) and not self.classify
        if self.lead:
            self.stats = (*self.stats, *LEAD_KEYS)
        self.tokenizer = tokenizer
        self.inputs = task_tokenizer(tokenizer, cfg.max_seq_len)
        self.targets = task_tokenizer(tokenizer, cfg.max_target_len)
        self.special = SpecialIds.of(tokenizer)
        # T5 starts decoding from padding, BART from its end token
        self.start_id = self.special.pad if decoder_start == "pad" else self.special.sep
        self.sampling = Sampling(
            max_new_tokens=cfg.max_target_len,
            greedy=True,
            num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        )

    def _source(self, record: dict) -> str:
        text = record["text"] + (f" {record['text_pair']}" if record.get("text_pair") else "")
        return self.cfg.prefix + text

    def _target(self, record: dict) -> str:
        return record.get("label", "") if self.classify else record.get("target", "")

    def examples(self, records: list[dict]) -> EncodedExamples:
        sources = self.inputs.encode_batch([self._source(r) for r in records])
        targets = self.targets.encode_batch([self._target(r) for r in records])
        features = [
            {
                "input_ids": np.array(s.ids),
                "labels": np.array(t.ids),
                "reference": self._target(r),
                "input": {k: r[k] for k in ("id", "text", "text_pair") if k in r},
            }
            for r, s, t in zip(records, sources, targets)
        ]
        return EncodedExamples(features, self.collate)

    def collate(self, features: list[dict]) -> dict:
        labels = pad([f["labels"] for f in features], -100)
        decoder = torch.cat([torch.full((len(features), 1), self.start_id), labels[:, :-1]], 1)
        decoder = decoder.masked_fill(decoder == -100, self.special.pad)
        input_ids = pad([f["input_ids"] for f in features], self.special.pad)
        attention_mask = pad([np.ones(len(f["input_ids"])) for f in features], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder,
            "labels": labels,
            "references": [f["reference"] for f in features],
            "inputs": [f["input"] for f in features],
            "counts": {"gen": int((labels != -100).sum())},
            "num_tokens": int(attention_mask.sum()),
        }

    @torch.no_grad()
    def generate(self, model: nn.Module, batch: dict, sampling: Sampling | None = None) -> list[str]:
        """Decoded outputs for the batch's inputs (greedy, or beam search when num_beams > 1)."""
        cfg = sampling or self.sampling
        memory = model.encode(batch["input_ids"], batch["attention_mask"])
        B = memory.shape[0]
        start = torch.full((B, 1), self.start_id, dtype=torch.long, device=memory.device)
        stop = self.special.sep
        if cfg.num_beams > 1:
            K = cfg.num_beams
            memory_k, mask_k = memory.repeat_interleave(K, 0), batch["attention_mask"].repeat_interleave(K, 0)
            step = lambda ids, cache: model.decode(ids, memory_k, mask_k, cache)[:, -1]  # noqa: E731
            outputs = beam_search(step, model.new_cache, start, cfg, stop)
        else:
            step = lambda ids, cache: model.decode(ids, memory, batch["attention_mask"], cache)[:, -1]  # noqa: E731
            rows = generate(step, model.new_cache, start, cfg, stop_id=stop).tolist()
            outputs = [[t for t in row if t != stop] for row in rows]
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict, dict]:
        labels = batch["labels"]
        (out,) = model(
            batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], targets=[labels],
            predict=not model.training,
        )  # fmt: skip
        sums, stats = {"gen": out.loss}, {"gen_correct": correct(out, labels)}
        if model.training:
            return sums, stats
        outputs = self.generate(model, batch)
        scores = [rouge(o, r) for o, r in zip(outputs, batch["references"])]
        stats.update(
            examples=torch.tensor(len(outputs)),
            exact=torch.tensor(
                sum(o.strip().lower() == r.strip().lower() for o, r in zip(outputs, batch["references"]))
            ),
            **{k: torch.tensor(sum(s[k] for s in scores)) for k in ROUGE_KEYS},
        )
        if self.lead:
            leads = [" ".join(source["text"].split()[: self.cfg.lead_words]) for source in batch["inputs"]]
            lead = [rouge(text, r) for text, r in zip(leads, batch["references"])]
            stats.update({f"lead_{k}": torch.tensor(sum(s[k] for s in lead)) for k in ROUGE_KEYS})
        return sums, stats

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        n = max(stats["examples"], 1)
        out = {
            "loss": sums["gen"] / counts["gen"],
            "token_accuracy": stats["gen_correct"] / counts["gen"],
            "exact_match": stats["exact"] / n,
        }
        if self.classify:
            out["accuracy"] = out["exact_match"]
        else:
            out.update({k: stats[k] / n for k in ROUGE_KEYS})
            if self.lead:
                out.update({k: stats[k] / n for k in LEAD_KEYS})
        return out

    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        return [{**source, "output": text} for source, text in zip(batch["inputs"], self.generate(model, batch))]
