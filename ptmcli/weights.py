"""Starting weights for fine-tuning: a ptm run or checkpoint, a Hugging Face model directory, or a hub name.

Only the encoder is taken; pretraining heads are dropped. Weights are read with safetensors, or with
`torch.load(weights_only=True)` for a `pytorch_model.bin`: loading never runs code from a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from ptmcli import checkpoint
from ptmcli.data.sources import package_path
from ptmcli.data.tokenizer import load_tokenizer
from ptmcli.errors import PtmError
from ptmcli.models import HF_FAMILIES
from ptmcli.schema import MODEL_SCHEMAS, arch_from_spec


@dataclass
class Pretrained:
    family: str
    arch: Any
    encoder_state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the whole checkpoint (encoder-decoders)
    checkpoint: Path | None = None  # a ptm checkpoint's directory


def _hub_snapshot(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise PtmError(
            f"init=hf:{name} needs `pip install huggingface_hub` (or download the model directory "
            f"yourself and pass init=PATH)."
        ) from err
    patterns = [
        "config.json",
        "*.safetensors",
        "pytorch_model.bin",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    return Path(snapshot_download(name, allow_patterns=patterns))


def from_hf_dir(path: Path) -> Pretrained:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type", "bert")
    if model_type not in HF_FAMILIES:
        raise PtmError(f"init='{path}' is a Hugging Face '{model_type}' model; ptm maps {', '.join(HF_FAMILIES)}.")
    family, to_arch, to_state = HF_FAMILIES[model_type]
    try:
        arch = to_arch(config)
    except (KeyError, ValueError) as err:
        raise PtmError(f"init='{path}': config.json does not describe a supported {model_type}: {err}") from err
    if (path / "model.safetensors").exists():
        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise PtmError(f"init='{path}' has config.json but neither model.safetensors nor pytorch_model.bin.")
    lowercase = True
    if (path / "tokenizer_config.json").exists():
        lowercase = json.loads((path / "tokenizer_config.json").read_text()).get("do_lower_case", True)
    tokenizer_file = next((path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).exists()), None)
    if tokenizer_file is None:
        raise PtmError(f"init='{path}' has no tokenizer.json or vocab.txt.")
    return Pretrained(
        family,
        arch,
        to_state(state, arch.num_layers),
        load_tokenizer(str(tokenizer_file), lowercase),
        f"Hugging Face {model_type} from {path}",
    )


def from_ptm(path: Path) -> Pretrained:
    if (path / checkpoint.MARKER).exists():
        ckpt, run = path, path.parent.parent
    else:
        run = path
        best = path / "checkpoints" / "best"
        ckpt = best.resolve() if best.exists() else checkpoint.latest(path / "checkpoints")
        if ckpt is None:
            raise PtmError(
                f"init='{path}' is not a checkpoint: expected a ptm run directory with checkpoints/step-N, a "
                f"checkpoint directory (with a {checkpoint.MARKER} marker) or a Hugging Face model directory "
                f"(with config.json)."
            )
    spec = checkpoint.read_state(ckpt).get("model", {})
    if spec.get("family") not in MODEL_SCHEMAS:
        raise PtmError(
            f"init='{path}': checkpoint {ckpt} does not record a known model family ({spec.get('family')!r})."
        )
    arch = arch_from_spec(spec)
    tokenizer_path = run / "tokenizer.json"
    if not tokenizer_path.exists():
        raise PtmError(f"init='{path}': the run directory {run} has no tokenizer.json.")
    full = load_file(str(ckpt / "model.safetensors"))
    state = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return Pretrained(spec["family"], arch, state, tokenizer, f"ptm checkpoint {ckpt}", full, ckpt)


def load_pretrained(spec: str) -> Pretrained:
    if spec.startswith("hf:"):
        return from_hf_dir(_hub_snapshot(spec[3:]))
    path = package_path(spec, "init") if spec.startswith("pkg://") else Path(spec).expanduser()
    if not path.exists():
        raise PtmError(
            f"init='{spec}' does not exist. Give a ptm run directory or checkpoint, a Hugging Face model "
            f"directory, pkg://package/path, or hf:name."
        )
    return from_hf_dir(path) if (path / "config.json").exists() else from_ptm(path)
