"""Parameter-efficient fine-tuning, for any family built from the shared layers (`models/layers.py`, `attention.py`).

`apply` freezes the backbone and injects the method by module type and name: LoRA/AdaLoRA wrap the linear
layers named in `transfer.targets` (query/key/value are slices of the fused `qkv`), adapters wrap every
attention output and feed-forward output projection, prefix tuning hands every attention layer its prefix.
The returned `Method` is what the loop may call: `regularizer()`, `after_update(step)`, `state()`.
"""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.errors import PtmError
from ptmcli.models.attention import SelfAttention
from ptmcli.models.layers import FeedForward
from ptmcli.peft.adalora import RankAllocator
from ptmcli.peft.adapters import Adapted
from ptmcli.peft.lora import LowRankLinear
from ptmcli.peft.prefix import LayerPrefix, PrefixEncoder

QKV_SLICES = {"query": 0, "key": 1, "value": 2}
TARGETS = ("query", "key", "value", "qkv", "out", "up", "down")
METHODS = ("lora", "adalora", "adapter", "prefix")


def linear_targets(encoder: nn.Module, targets: list[str]) -> dict[str, tuple[nn.Module, str, list[int], int]]:
    """{qualified name: (parent, attribute, slices, number of slices)} of the linear layers to adapt."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise PtmError(f"transfer.targets has {unknown}; valid targets: {', '.join(TARGETS)}.")
    found = {}
    for name, module in encoder.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, SelfAttention):
            slices = sorted(
                {QKV_SLICES[t] for t in targets if t in QKV_SLICES} | ({0, 1, 2} if "qkv" in targets else set())
            )
            if slices:
                found[prefix + "qkv"] = (module, "qkv", slices, 3)
            if "out" in targets:
                found[prefix + "out"] = (module, "out", [0], 1)
        elif isinstance(module, FeedForward):
            for attr in ("up", "down"):
                if attr in targets:
                    found[prefix + attr] = (module, attr, [0], 1)
    if not found:
        raise PtmError(f"transfer.targets={targets} matched no layer of this model.")
    return found


class Method:
    """The injected method's handles for the loop and for export."""

    def __init__(self, name: str):
        self.name = name
        self.low_rank: dict[str, LowRankLinear] = {}
        self.allocator: RankAllocator | None = None
        self.prefix: PrefixEncoder | None = None

    def regularizer(self) -> torch.Tensor | None:
        return self.allocator.regularizer() if self.allocator else None

    def after_update(self, step: int) -> dict | None:
        """After each optimizer step (gradients still present): AdaLoRA's scores and budget."""
        if self.allocator is None:
            return None
        ranks = self.allocator.step(step)
        return {"ranks": ranks, "total_rank": sum(ranks.values())} if ranks else None

    def state(self) -> dict[str, torch.Tensor]:
        return self.allocator.state() if self.allocator else {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.allocator:
            self.allocator.load_state(state)

    def merge(self) -> None:
        for module in self.low_rank.values():
            module.merge()

    def unmerge(self) -> None:
        for module in self.low_rank.values():
            module.unmerge()


def apply(model: nn.Module, cfg, total_steps: int) -> Method:
    """Freeze `model.encoder`, inject method `cfg.mode`; the task head and the method's parameters train."""
    encoder = model.encoder
    encoder.requires_grad_(False)
    method = Method(cfg.mode)
    if cfg.mode in ("lora", "adalora"):
        svd = cfg.mode == "adalora"
        r = cfg.init_r if svd else cfg.r
        for name, (parent, attr, slices, n) in linear_targets(encoder, cfg.targets).items():
            wrapped = LowRankLinear(getattr(parent, attr), slices, n, r, cfg.alpha, cfg.dropout, svd=svd)
            setattr(parent, attr, wrapped)
            method.low_rank[name] = wrapped
            if not svd and cfg.bias == "lora_only" and wrapped.base.bias is not None:
                wrapped.base.bias.requires_grad_(True)
        if not svd and cfg.bias == "all":
            for pname, p in encoder.named_parameters():
                if pname.endswith("bias"):
                    p.requires_grad_(True)
        if svd:
            method.allocator = RankAllocator(method.low_rank, cfg, total_steps)
    elif cfg.mode == "adapter":
        for module in list(encoder.modules()):
            if isinstance(module, SelfAttention):
                module.out = Adapted(module.out, cfg.bottleneck)
            elif isinstance(module, FeedForward):
                module.down = Adapted(module.down, cfg.bottleneck)
        for module in encoder.modules():  # Houlsby train the layer norms too
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    elif cfg.mode == "prefix":
        layers = [m for m in encoder.modules() if isinstance(m, SelfAttention)]
        arch = encoder.arch
        if not all(layer.supports_prefix for layer in layers):
            raise PtmError(
                f"transfer=prefix is not available for {arch.family}: its attention does not take prefix key/values. "
                f"Use transfer=lora, adalora or adapter."
            )
        method.prefix = PrefixEncoder(
            len(layers), arch.num_heads, arch.hidden_size, cfg.num_virtual_tokens, cfg.projection_hidden, cfg.dropout
        )
        model.prefix_encoder = method.prefix
        for i, attention in enumerate(layers):
            attention.prefix = LayerPrefix(method.prefix, i)
    else:
        raise PtmError(f"transfer.mode={cfg.mode!r} is not a parameter-efficient method ({', '.join(METHODS)}).")
    return method


def trainable_keys(model: nn.Module) -> set[str]:
    """State-dict keys a parameter-efficient checkpoint keeps: trainable parameters and the method's buffers."""
    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    keys |= {name for name, _ in model.named_buffers() if name.startswith("prefix_encoder.")}
    return keys
