"""Starting weights: a ptm run or checkpoint, a Hugging Face model directory (any family, see `hf/`), or a hub
name. Fine-tuning takes the encoder (`encoder_state`), continued pretraining and text-to-text fine-tuning the
whole model (`model_state`). Weights are read with safetensors, or with `torch.load(weights_only=True)` for a
`pytorch_model.bin`: loading never runs code from a file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ptmcli import checkpoint, hf, runfiles
from ptmcli.errors import PtmError
from ptmcli.files import package_path
from ptmcli.peft import METHODS as PEFT_METHODS
from ptmcli.schema import MODEL_SCHEMAS, arch_from_spec


@dataclass
class Pretrained:
    family: str
    arch: Any
    encoder_state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the whole pretraining model's weights
    checkpoint: Path | None = None  # a ptm checkpoint's directory
    unused: list[str] = field(default_factory=list)  # what fine-tuning does not take: HF keys, a ptm run's heads
    load_seconds: float = 0.0


def _hub_snapshot(name: str) -> Path:
    """The hub model `name` in the local Hugging Face cache (downloaded once, only the files ptm reads)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise PtmError(
            f"init=hf:{name} needs `pip install 'ptmcli[hub]'` (huggingface_hub), or download the model directory "
            f"yourself and pass init=PATH."
        ) from err
    patterns = ["*.json", "*.safetensors", "pytorch_model*.bin", "vocab.txt", "merges.txt", "*.model"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many kinds (offline, unknown repo, gated, HTTP)
        raise PtmError(
            f"init=hf:{name} could not be fetched from the Hugging Face hub ({type(err).__name__}: "
            f"{' '.join(str(err).split())}). Check the "
            f"name and your connection, or download the directory and pass init=PATH."
        ) from err


def from_hf_dir(path: Path) -> Pretrained:
    started = time.perf_counter()
    imported = hf.read_dir(path)
    encoder = {k.removeprefix("encoder."): v for k, v in imported.state.items() if k.startswith("encoder.")}
    source = f"Hugging Face {hf.BY_FAMILY[imported.family].model_type} from {path}"
    return Pretrained(
        imported.family,
        imported.arch,
        encoder,
        imported.tokenizer,
        source,
        imported.state,
        unused=imported.unused,
        load_seconds=time.perf_counter() - started,
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
    if spec.get("transfer") in PEFT_METHODS:
        merge = (
            f"`ptm export run={run} merge=true output=DIR` writes its model with the update merged: give DIR instead"
            if spec["transfer"] in ("lora", "adalora")
            else "start from the run it was trained on, or from a LoRA run (whose update merges into the weights)"
        )
        raise PtmError(
            f"'{path}' is a transfer={spec['transfer']} fine-tuning run, whose checkpoints hold its method apart from "
            f"the {spec['family']} weights it adapts, not one model to start from: {merge}."
        )
    arch = arch_from_spec(spec)
    tokenizer = runfiles.tokenizer(run, "init")
    full = checkpoint.weights(ckpt)
    state = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
    # the heads a fine-tuning run does not take: a pretraining run's (mlm_head, ...), another task's `head`
    unused = sorted({k.split(".")[0] for k in full if not k.startswith("encoder.")})
    return Pretrained(spec["family"], arch, state, tokenizer, f"ptm checkpoint {ckpt}", full, ckpt, unused)


def _path(spec: str) -> Path:
    path = package_path(spec, "init") if spec.startswith("pkg://") else Path(spec).expanduser()
    if not path.exists():
        raise PtmError(
            f"init='{spec}' does not exist. Give a ptm run directory or checkpoint, a Hugging Face model "
            f"directory, pkg://package/path, or hf:name."
        )
    return path


def hf_directory(spec: str) -> Path | None:
    """The Hugging Face model directory init=`spec` names (hub names are fetched once), or None for ptm runs."""
    if spec.startswith("hf:"):
        return _hub_snapshot(spec[3:])
    path = _path(spec)
    return path if (path / "config.json").exists() else None


def load_pretrained(spec: str) -> Pretrained:
    directory = hf_directory(spec)
    return from_hf_dir(directory) if directory is not None else from_ptm(_path(spec))
