"""AdaLoRA's rank allocation (Zhang et al. 2023): importance scores and the budget schedule.

Sensitivity of a parameter w is I = |w * dL/dw|; it is smoothed, I_bar = b1 I_bar + (1 - b1) I, and its
uncertainty U_bar = b2 U_bar + (1 - b2) |I - I_bar|; the score is I_bar * U_bar. The score of singular
triplet i is s(E_i) + mean_j s(A_ij) + mean_j s(B_ji). The total budget (ranks kept over all updates) stays at
init_r per update for the first tinit of training, falls cubically to target_r per update until the last
tfinal, and the lowest-scoring triplets beyond it are switched off (E_i = 0) every delta_t steps.
"""

from __future__ import annotations

import torch

from ptmcli.peft.lora import LowRankLinear, whole
from ptmcli.transfers import AdaLoraTransfer


def budget(step: int, total_steps: int, cfg: AdaLoraTransfer, num_updates: int) -> tuple[int, bool]:
    """(ranks kept in total at `step`, whether to re-mask now)."""
    start, target = cfg.init_r * num_updates, cfg.target_r * num_updates
    t_init, t_final = int(cfg.tinit * total_steps), int(cfg.tfinal * total_steps)
    if step <= t_init:
        return start, False
    if step > total_steps - t_final:
        return target, True
    progress = (step - t_init) / max(1, total_steps - t_final - t_init)
    return int((start - target) * (1 - progress) ** 3 + target), step % cfg.delta_t == 0


def like(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`mask` laid out as `param` is: sharded the same way when FSDP shards the parameter."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask, param.device_mesh, param.placements)
    return mask


class RankAllocator:
    """Keeps the smoothed importance of every A, B, E entry and masks E to the scheduled budget."""

    def __init__(self, modules: dict[str, LowRankLinear], cfg: AdaLoraTransfer, total_steps: int):
        self.modules, self.cfg, self.total_steps = modules, cfg, total_steps
        self.updates = [(name, k) for name, m in modules.items() for k in range(len(m.slices))]
        self.ema: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        sensitivity = (whole(p) * whole(p.grad)).abs().detach()
        mean, unc = self.ema.get(id(p), (torch.zeros_like(sensitivity), torch.zeros_like(sensitivity)))
        mean = self.cfg.beta1 * mean + (1 - self.cfg.beta1) * sensitivity
        unc = self.cfg.beta2 * unc + (1 - self.cfg.beta2) * (sensitivity - mean).abs()
        self.ema[id(p)] = (mean, unc)
        return mean * unc

    @torch.no_grad()
    def step(self, step: int) -> dict[str, int] | None:
        """Called after each optimizer step, while gradients are still there. Returns the ranks now allocated per
        update when it re-masked, else None."""
        scores = []
        for name, k in self.updates:
            m = self.modules[name]
            a, b, e = m.lora_A[k], m.lora_B[k], m.lora_E[k]
            if a.grad is None or b.grad is None or e.grad is None:
                return None
            scores.append(self._score(e).view(-1) + self._score(a).mean(1) + self._score(b).mean(0))
        kept, remask = budget(step, self.total_steps, self.cfg, len(self.updates))
        if not remask:
            return None
        everything = torch.cat(scores)
        cut = len(everything) - kept
        if cut > 0:
            threshold = everything.kthvalue(cut).values
            for (name, k), score in zip(self.updates, scores):
                e = self.modules[name].lora_E[k]
                e.masked_fill_(like(e, (score <= threshold).view(-1, 1)), 0.0)
        return self.ranks()

    def ranks(self) -> dict[str, int]:
        """Ranks kept per update, named like 'layers.0.attention.query'."""

        def label(name: str, k: int) -> str:
            part = self.modules[name].slice_ids[k]
            return name.removesuffix("qkv") + ("query", "key", "value")[part] if name.endswith("qkv") else name

        return {label(name, k): int((whole(self.modules[name].lora_E[k]) != 0).sum()) for name, k in self.updates}

    def state(self) -> dict[str, torch.Tensor]:
        """The EMA scores as named tensors, for exact resume."""
        out = {}
        for name, m in self.modules.items():
            for group in ("lora_A", "lora_B", "lora_E"):
                for k, p in enumerate(getattr(m, group)):
                    if id(p) in self.ema:
                        out[f"{name}.{group}.{k}.mean"], out[f"{name}.{group}.{k}.unc"] = self.ema[id(p)]
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, m in self.modules.items():
            for group in ("lora_A", "lora_B", "lora_E"):
                for k, p in enumerate(getattr(m, group)):
                    key = f"{name}.{group}.{k}"
                    if f"{key}.mean" in state:
                        self.ema[id(p)] = (state[f"{key}.mean"].to(p.device), state[f"{key}.unc"].to(p.device))

    def regularizer(self) -> torch.Tensor:
        return self.cfg.orth_reg_weight * sum(m.orthogonality() for m in self.modules.values()) / len(self.modules)
