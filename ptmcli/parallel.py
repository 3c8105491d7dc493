"""How the model is spread over processes and traded for memory: DDP or FSDP2 (`fully_shard` per transformer block,
then the root), activation checkpointing (each block's activations recomputed in backward) and torch.compile.

The transformer blocks are found, not declared: every family keeps them in `nn.ModuleList`s named `layers`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ptmcli.distributed import Dist
from ptmcli.hardware import Hardware
from ptmcli.models import vocab_loss


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every stack (encoder, decoder, ELECTRA's generator), outermost first."""
    found = []
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList):
            found.extend(layers)
    return found


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation keep nothing for a backward anyway
            return forward(*args, **kwargs)
        # non-reentrant: keyword arguments and outputs that need no grad work; the RNG state is kept, so dropout
        # draws the same masks when the block is run again in backward
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of keeping them. The block's `forward` is replaced
    on the instance, so state-dict keys (and checkpoints) are unchanged. Returns the number of blocks."""
    found = blocks(model)
    for block in found:
        block.forward = _recomputed(block.forward)
    return len(found)


def shard(model: nn.Module, hw: Hardware, dist: Dist) -> nn.Module:
    """FSDP2: each block its own unit (its weights gathered just before it runs, freed after), then the root
    (embeddings, heads and anything else). Parameters become DTensors sharded over the processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(hw.device.type, (dist.world_size,))
    # weights gathered in the run's compute dtype, gradients reduced in fp32 (the sum over processes keeps its bits)
    policy = MixedPrecisionPolicy(param_dtype=hw.dtype, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    # only `shard` makes an FSDPModule, and it imports FSDP: where nothing has, the answer is known without importing
    # it (with sympy and the rest of torch.distributed, ~44 MB resident)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Under FSDP, every unit's full weights for a whole evaluation, gathered once by all processes together:
    the processes may then run different numbers of forwards (a shorter last share of batches, generation that
    stops at different lengths) without waiting on each other. Resharded after."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def wrap(
    model: nn.Module, hw: Hardware, dist: Dist, strategy: str, compile: bool, activation_checkpointing: bool
) -> nn.Module:
    """The model as the loop trains it (compiling itself happens during the first steps)."""
    if activation_checkpointing:
        checkpoint_activations(model)
    if strategy == "fsdp" and dist.world_size > 1:
        model = shard(model, hw, dist)
    if compile:
        vocab_loss.keep_out_of_compiled_graphs()
        if hw.device.type == "cuda" and "TORCHINDUCTOR_MIX_ORDER_REDUCTION" not in os.environ:
            without_mix_order_reduction()
        model = torch.compile(model)
    if strategy == "ddp" and dist.world_size > 1:
        model = DistributedDataParallel(
            model,
            device_ids=[hw.device.index] if hw.device.type == "cuda" else None,
            find_unused_parameters=getattr(model, "has_unused_parameters", False),
        )
    return model


def without_mix_order_reduction() -> None:
    """Inductor's mix-order reduction (CUDA only, on by default since torch 2.10: one kernel reduces a gradient
    over rows and over columns) has computed wrong gradients without a word (pytorch/pytorch#193061, #190796).
    It was not what stopped compiled ptm models learning on an H200 (that was the vocabulary loss traced by dynamo,
    `models/vocab_loss.py`), and on that GPU ptm's models get the same gradients with it on or off
    (`tests/bench/compile_probe.py`); it stays off as a precaution against those reports. Setting
    TORCHINDUCTOR_MIX_ORDER_REDUCTION yourself keeps your choice."""
    from torch._inductor import config

    if hasattr(config.triton, "mix_order_reduction"):
        config.triton.mix_order_reduction = False


def gradient_sync(model: nn.Module, enabled: bool):
    """Gradients are reduced over processes only on a step's last micro-batch (DDP's no_sync, FSDP's
    set_requires_gradient_sync)."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    plain = getattr(model, "_orig_mod", model)
    if is_sharded(plain):
        plain.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
