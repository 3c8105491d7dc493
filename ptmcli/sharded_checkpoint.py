"""The weights and optimizer state of an FSDP run, written with torch's distributed checkpoint (DCP): each process
writes its own shards, and any number of processes (one included, with or without FSDP) reads them back,
resharded to its own layout.

DCP's default format keeps its index in a pickle; this one uses DCP's safetensors storage instead, whose index is
JSON in each file's header, so reading a checkpoint never unpickles anything. In a checkpoint directory:

    model/        shard-0000R-model-00001-of-00001.safetensors, one per process (R = rank + 1)
    optimizer/    the same for the optimizer's tensors, keyed `PARAMETER_NAME.STATE_NAME`
    optimizer.json  param groups (by parameter name) and the optimizer's non-tensor state
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ptmcli.errors import PtmError

MODEL, OPTIMIZER = "model", "optimizer"


def is_sharded(path: Path) -> bool:
    """Whether checkpoint `path` was written by this module."""
    return (path / MODEL).is_dir()


def tied_names(model: nn.Module) -> set[str]:
    """Second names of shared weights (an output layer tied to the embeddings): safetensors stores a tensor once,
    and loading the first name fills both."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def _model_state(model: nn.Module, keys: set[str] | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tied = tied_names(model)
    return {k: v for k, v in get_model_state_dict(model).items() if k not in tied and (keys is None or k in keys)}


def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{name}.{key}"] = value
    return tensors, scalars


def load_full(
    weights: dict[str, torch.Tensor], optimizer_state: dict, model: nn.Module, optimizer, keys: set[str] | None
) -> None:
    """A checkpoint written whole (by one process or DDP: weights by name, only `keys` for a parameter-efficient
    run, optimizer state by parameter index) into a sharded model: each process keeps its slices."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    expected = (keys if keys is not None else set(model.state_dict())) - tied_names(model)
    if set(weights) != expected:
        raise PtmError(
            f"The checkpoint does not fit this model (missing {sorted(expected - set(weights))[:5]}, unexpected "
            f"{sorted(set(weights) - expected)[:5]}). It was probably written with another objective or model."
        )
    whole = StateDictOptions(full_state_dict=True)
    # not strict: a tied weight was written once, under its first name, which fills both (names checked above)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**group, "params": [ordered[i] for i in group["params"]]} for group in optimizer_state["param_groups"]]
    state = {ordered[int(i)]: values for i, values in optimizer_state["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=whole)


def save(folder: Path, model: nn.Module, optimizer, keys: set[str] | None, is_main: bool) -> None:
    """Every process writes its shards of the model (only `keys`, when given) and of the optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = _model_state(model, keys)
    dcp.save(weights, storage_writer=HuggingFaceStorageWriter(str(folder / MODEL), save_distributed=True))
    state = get_optimizer_state_dict(model, optimizer)
    tensors, scalars = _flat_optimizer(state)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / OPTIMIZER), save_distributed=True))
    if is_main:
        saved = {"param_groups": state["param_groups"], "scalars": scalars}
        (folder / "optimizer.json").write_text(json.dumps(saved, indent=1))


def _read(template: dict[str, torch.Tensor], folder: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    # one process without a process group reads every shard itself (which DCP would warn about)
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(template, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=no_dist)


def load_model(path: Path, model: nn.Module, keys: set[str] | None = None) -> None:
    """Fill `model` (sharded or not) from the checkpoint's model shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = _model_state(model, keys)
    _read(weights, path / MODEL)
    # not strict: tied names are filled through their first name (the caller checked the names)
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))


def load_optimizer(path: Path, model: nn.Module, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)  # creates the state's tensors, to be filled in
    tensors, _ = _flat_optimizer(state)
    _read(tensors, path / OPTIMIZER)
    saved = json.loads((path / "optimizer.json").read_text())
    values: dict[str, dict] = {}
    for key, value in [*tensors.items(), *saved["scalars"].items()]:
        name, _, field = key.rpartition(".")
        values.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": values, "param_groups": saved["param_groups"]})


def names(path: Path) -> set[str]:
    """The model tensors' names, from the shards' headers."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    return set(HuggingFaceStorageReader(str(path / MODEL)).read_metadata().state_dict_metadata)


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every model tensor whole, in one process (for fine-tuning from, exporting or generating with a run)."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    index = HuggingFaceStorageReader(str(path / MODEL)).read_metadata().state_dict_metadata
    weights = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in index.items()}
    _read(weights, path / MODEL)
    return weights
