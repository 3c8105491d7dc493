"""AdamW or Adafactor with weight-decay groups, and warmup + linear/cosine/constant learning-rate schedules."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ptmcli.errors import PtmError
from ptmcli.schema import OptimizerConfig


def param_groups(model: nn.Module, cfg: OptimizerConfig, lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """Trainable parameters grouped by (decayed?, lr multiplier). Only matrices are decayed: biases and LayerNorm
    weights (all 1-D parameters) are not. `lr_scale(name)` gives per-parameter multipliers (layer-wise decay)."""
    groups: dict[tuple[bool, float], dict] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # frozen, or a tied weight already placed
            continue
        seen.add(id(p))
        decay, scale = p.ndim >= 2, lr_scale(name) if lr_scale else 1.0
        group = groups.setdefault(
            (decay, scale), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
        )
        group["params"].append(p)
    return list(groups.values())


class _Undecorated:
    """A torch optimizer's own methods, called without the wrappers that keep torch's compiler out of them: each
    wrapper imports `torch._dynamo` on its first call (with sympy, torch.distributed and more: 71 MB resident, ~10 % of
    T5-mini's bench peak) to run eager code that ptm never compiles. The methods underneath are torch's, unchanged
    (the wrappers' `__wrapped__`); where a torch version has no such attribute, the wrapper is called as before."""

    def add_param_group(self, param_group: dict) -> None:
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _unwrapped(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return _unwrapped(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _unwrapped(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure=None):
        wrapped = super().step  # the optimizer's step, under a wrapper that turns gradients off (and imports)
        step = getattr(wrapped, "__wrapped__", None)
        if step is None:
            return wrapped(closure)
        with torch.set_grad_enabled(self.defaults.get("differentiable", False)):
            return step(self, closure)


def _unwrapped(method: Callable) -> Callable:
    return getattr(method, "__wrapped__", method)


class AdamW(_Undecorated, torch.optim.AdamW):
    pass


class Adafactor(_Undecorated, getattr(torch.optim, "Adafactor", torch.optim.Optimizer)):  # torch >= 2.5
    pass


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch (>= 2.4) has a fused AdamW kernel and `fused: auto` uses it


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device: torch.device, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    if cfg.name == "adafactor":
        # T5's optimiser: factored second moments, and steps relative to each parameter's scale (its RMS), which
        # T5's initialisation (embeddings of std 1, matrices of std fan_in^-0.5) is tuned for; lr is the
        # relative step size, capped at 1/sqrt(step) as in the paper
        if not hasattr(torch.optim, "Adafactor"):
            raise PtmError(
                f"optimizer.name=adafactor needs torch >= 2.5 (this is {torch.__version__}); upgrade torch, or use "
                "optimizer=adamw with an absolute learning rate such as optimizer.lr=1e-3."
            )
        return Adafactor(param_groups(model, cfg, lr_scale), lr=cfg.lr)
    # torch's fused kernel takes one pass over each tensor, where the foreach path makes temporaries as large as all
    # the weights: on a CPU, AdamW's step on XLNet-mini took 35 ms, fused 7 (`python tests/bench/profile_step.py xlnet`)
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type in FUSED_ADAMW_DEVICES)
    return AdamW(
        param_groups(model, cfg, lr_scale), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )


def lr_caution(cfg: OptimizerConfig) -> str | None:
    """A warning for an Adafactor lr at AdamW's scale: task files set absolute rates such as 1e-4, which as a
    relative step barely move the weights."""
    if cfg.name == "adafactor" and cfg.lr < 1e-3:
        return (
            f"optimizer.lr={cfg.lr:g} is small for Adafactor, whose lr is a step relative to each weight's scale "
            "(T5 fine-tunes at 1e-3 and pretrains at 1e-2); a task file's lr is meant for AdamW: pass "
            "optimizer.lr=1e-2 or 1e-3 to override it."
        )
    return None


def lr_factor(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then decay to `min_lr_ratio`."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
