"""Renaming a state dict between ptm's names and Hugging Face's, both ways, from one table of rules per family.

A rule pairs one ptm key with one Hugging Face key, or with several that ptm stacks along dim 0 (a fused
projection such as qkv). `{i}` stands for an encoder layer index and `{j}` for a decoder layer index. A rule
may carry a pair of functions for tensors that are stored in another layout (GPT-2's transposed Conv1D,
XLNet's (hidden, heads, head size) projections, BART's (1, V) bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Convert = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    load: Convert | None = None  # Hugging Face layout -> ours, for each stacked part
    save: Convert | None = None  # ours -> Hugging Face layout, for each split part


def rule(ours: str, *theirs: str, load: Convert | None = None, save: Convert | None = None) -> Rule:
    return Rule(ours, tuple(theirs), load, save)


def transposed(ours: str, theirs: str) -> Rule:
    """A weight stored as (in, out), as GPT-2's Conv1D does."""
    return Rule(ours, (theirs,), lambda t: t.t().contiguous(), lambda t: t.t().contiguous())


def renamed(prefix_ours: str, prefix_theirs: str, names: dict[str, str], suffixes=("weight", "bias")) -> list[Rule]:
    """Rules for modules that differ only in name: {our module: their module} under two prefixes."""
    return [
        rule(f"{prefix_ours}{ours}.{s}", f"{prefix_theirs}{theirs}.{s}")
        for ours, theirs in names.items()
        for s in suffixes
    ]


def indices(pattern: str, layers: dict[str, int]) -> list[dict[str, int]]:
    for placeholder, count in layers.items():
        if "{" + placeholder + "}" in pattern:
            return [{placeholder: n} for n in range(count)]
    return [{}]


def to_ours(state: dict[str, torch.Tensor], rules: list[Rule], layers: dict[str, int]) -> tuple[dict, set[str]]:
    """(our state dict, the Hugging Face keys that no rule used). A rule whose keys are absent is skipped, so a
    base-model checkpoint fills only the encoder."""
    out, used = {}, set()
    for r in rules:
        for index in indices(r.ours, layers):
            keys = [k.format(**index) for k in r.theirs]
            if not all(k in state for k in keys):
                continue
            parts = [r.load(state[k]) if r.load else state[k] for k in keys]
            out[r.ours.format(**index)] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
            used.update(keys)
    return out, set(state) - used


def to_theirs(state: dict[str, torch.Tensor], rules: list[Rule], layers: dict[str, int]) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face names (keys without a rule are left out: the caller checks coverage)."""
    out = {}
    for r in rules:
        for index in indices(r.ours, layers):
            key = r.ours.format(**index)
            if key not in state:
                continue
            parts = state[key].chunk(len(r.theirs), 0) if len(r.theirs) > 1 else (state[key],)
            for name, part in zip(r.theirs, parts):
                out[name.format(**index)] = (r.save(part) if r.save else part).contiguous()
    return out


def covered(state: dict[str, torch.Tensor], rules: list[Rule], layers: dict[str, int]) -> set[str]:
    """Our keys that some rule maps."""
    return {r.ours.format(**index) for r in rules for index in indices(r.ours, layers)} & set(state)
