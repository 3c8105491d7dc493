"""Copy an exported Hugging Face encoder directory with one part of it set back to a fresh initialisation, to tell
which part of a pretrained encoder helps or hurts fine-tuning (docs/results.md, ELECTRA).

Run: python tests/bench/reinit_part.py EXPORTED_DIR --part embeddings|layers --output DIR [--std 0.02] [--seed 0]
  --part embeddings   the word, position and segment embeddings and their LayerNorm start afresh; the layers
                      (and ELECTRA's projection to the hidden width) stay pretrained
  --part layers       every `encoder.layer.N` weight starts afresh; the embeddings stay pretrained
Fresh is ptm's initialisation: weight matrices and embeddings normal(0, std), biases 0, LayerNorm weights 1.
Then fine-tune from the copy as from any Hugging Face directory: ptm finetune task=news-cls init=DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PARTS = {"embeddings": ".embeddings.", "layers": ".encoder.layer."}


def fresh(name: str, value: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    if "LayerNorm" in name:
        return torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value)
    if name.endswith("bias"):
        return torch.zeros_like(value)
    return torch.randn(value.shape, generator=generator, dtype=value.dtype) * std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--part", choices=list(PARTS), required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; name a new directory")
    state = load_file(str(args.source / "model.safetensors"))
    marker = PARTS[args.part]
    chosen = [name for name in state if marker in f".{name}"]
    if not chosen:
        raise SystemExit(f"no tensor of {args.source / 'model.safetensors'} has '{marker.strip('.')}' in its name")
    shutil.copytree(args.source, args.output, ignore=shutil.ignore_patterns("generator"))
    generator = torch.Generator().manual_seed(args.seed)
    for name in chosen:
        state[name] = fresh(name, state[name], args.std, generator)
    save_file({k: v.contiguous() for k, v in state.items()}, str(args.output / "model.safetensors"))
    print(f"{len(chosen)} of {len(state)} tensors re-initialised ({args.part}) -> {args.output}")


if __name__ == "__main__":
    main()
