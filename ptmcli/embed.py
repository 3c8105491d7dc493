"""Sentence vectors from any encoder: a ptm run or checkpoint (pretraining, SimCSE or fine-tuning), or a Hugging
Face model directory. Each text becomes the mean of its token states or its first token's state, L2-normalised,
so a dot product is a cosine similarity. `ptm embed` writes them; retrieval evaluation ranks with them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from ptmcli import checkpoint, hardware, runfiles
from ptmcli.architectures import a_family
from ptmcli.data.tokenizer import SpecialIds
from ptmcli.distributed import Dist
from ptmcli.errors import PtmError
from ptmcli.files import replaced_whole
from ptmcli.inference import read_records
from ptmcli.models import ENCODERS
from ptmcli.models.layers import pool
from ptmcli.schema import SEQ2SEQ_FAMILIES, HardwareConfig
from ptmcli.tasks.common import encoder_inputs, task_tokenizer
from ptmcli.weights import load_pretrained

POOLINGS = ("mean", "cls")


@dataclass
class Embedder:
    encoder: nn.Module
    tokenizer: Tokenizer
    pooling: str
    source: str
    device: torch.device
    family: str

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, max_seq_len: int = 128, show: bool = True) -> np.ndarray:
        """(N, C) float32, each row of unit length. Texts are batched by length (least padding), returned in order."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # longer texts are cut to what the encoder's positions hold (relative positions: to max_seq_len)
        limit = self.encoder.arch.max_positions if self.family not in ("xlnet",) else max_seq_len
        tokenizer = task_tokenizer(self.tokenizer, min(max_seq_len, limit))
        encoded = tokenizer.encode_batch(texts)
        pad_id = SpecialIds.of(self.tokenizer).pad
        order = np.argsort([len(e.ids) for e in encoded], kind="stable")
        out = np.zeros((len(texts), self.encoder.arch.hidden_size), dtype=np.float32)
        columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not show, transient=True) as progress:
            bar = progress.add_task("embed", total=len(texts))
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                features = [
                    {"input_ids": np.array(encoded[i].ids), "type_ids": np.array(encoded[i].type_ids)} for i in rows
                ]
                batch = {k: v.to(self.device) for k, v in encoder_inputs(features, pad_id).items()}
                hidden = self.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
                vectors = nn.functional.normalize(pool(hidden.float(), batch["attention_mask"], self.pooling), dim=-1)
                out[rows] = vectors.cpu().numpy()
                progress.advance(bar, len(rows))
        return out


def default_pooling(path: str) -> str:
    """A SimCSE run's own pooling (unsupervised pretraining or supervised fine-tuning); otherwise the mean of token
    states (better than an untrained [CLS])."""
    directory = Path(path).expanduser()
    run = directory.parent.parent if (directory / checkpoint.MARKER).exists() else directory
    if (run / "config.yaml").exists():
        config = runfiles.config(run)
        objective, task = config.get("objective") or {}, config.get("task") or {}
        if objective.get("name") == "simcse":
            return objective.get("pooling", "cls")
        if task.get("objective") == "simcse-supervised":  # a supervised SimCSE fine-tuning run
            return {"pooler": "cls"}.get(task.get("pooling", "pooler"), task.get("pooling"))
    return "mean"


def load_embedder(spec: str, pooling: str | None = None, key: str = "run") -> Embedder:
    """The encoder of a ptm run/checkpoint or Hugging Face directory (hf:NAME fetches one), in eval mode."""
    if pooling is not None and pooling not in POOLINGS:
        raise PtmError(f"pooling={pooling!r}: choose {' or '.join(POOLINGS)}.")
    pretrained = load_pretrained(spec)
    if pretrained.family in SEQ2SEQ_FAMILIES:
        raise PtmError(
            f"{key}={spec} is {a_family(pretrained.family)} encoder-decoder; ptm embed reads the encoder families "
            f"(bert, roberta, electra, xlnet; gpt with mean pooling)."
        )
    encoder = ENCODERS[pretrained.family](pretrained.arch, pretrained.tokenizer.get_vocab_size())
    missing, _ = encoder.load_state_dict(pretrained.encoder_state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler")]
    if missing:
        raise PtmError(
            f"{key}={spec} ({pretrained.source}) does not hold a whole {pretrained.family} encoder (missing "
            f"{missing[:4]}). A parameter-efficient run keeps only its method: for LoRA or AdaLoRA, `ptm export "
            f"run=... merge=true` writes a whole model to embed with (an adapter or prefix run has no such form)."
        )
    hw = hardware.resolve(HardwareConfig(), Dist())
    encoder.to(hw.device).eval()
    chosen = pooling or (default_pooling(spec) if not spec.startswith("hf:") else "mean")
    return Embedder(encoder, pretrained.tokenizer, chosen, pretrained.source, hw.device, pretrained.family)


def read_texts(path: Path) -> list[str]:
    """One text per line, or JSON lines with a "text" field (as `ptm predict` reads a text classifier's input)."""
    return [r["text"] for r in read_records(path, "text-cls")]


def write_vectors(vectors: np.ndarray, texts: list[str], output: Path) -> None:
    """.npy: the (N, C) float32 matrix; .jsonl: {"index", "text", "vector"} per line (embed_command checked the
    suffix before any work). Written whole or not at all (files.replaced_whole)."""
    if output.suffix == ".npy":
        with replaced_whole(output, "output", "wb") as f:
            np.save(f, vectors)
    else:
        with replaced_whole(output, "output") as f:
            for i, (text, vector) in enumerate(zip(texts, vectors)):
                row = {"index": i, "text": text, "vector": [round(float(x), 6) for x in vector]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def positive_int(values: dict[str, str], key: str, default: int) -> int:
    """The whole number >= 1 given as key=..., or the default."""
    try:
        value = int(values.get(key, default))
    except ValueError:
        raise PtmError(f"{key}={values[key]!r} is not a whole number.") from None
    if value < 1:
        raise PtmError(f"{key}={value} must be at least 1.")
    return value


def embed_command(values: dict[str, str]) -> None:
    """`ptm embed run=SOURCE input=FILE output=FILE.npy|.jsonl [pooling=mean|cls] [batch_size=64] [max_seq_len=128]`"""
    from ptmcli.runlog import console

    for key in ("input", "output"):
        if key not in values:
            raise PtmError(f"ptm embed needs {key}=FILE (input: one text per line; output: a .npy or .jsonl file).")
    output = Path(values["output"])
    if output.suffix not in (".npy", ".jsonl"):
        raise PtmError(f"output='{output}': name a .npy file (one matrix) or a .jsonl file (a vector per line).")
    sizes = {key: positive_int(values, key, default) for key, default in (("batch_size", 64), ("max_seq_len", 128))}
    texts = read_texts(Path(values["input"]))
    embedder = load_embedder(values["run"], values.get("pooling"))
    vectors = embedder.encode(texts, sizes["batch_size"], sizes["max_seq_len"], show=console.is_terminal)
    write_vectors(vectors, texts, output)
    console.print(
        f"{len(texts):,} vectors of {vectors.shape[1]} ({embedder.pooling} pooling, normalised) from "
        f"{embedder.source} written to {output}"
    )
