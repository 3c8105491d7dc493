"""Decoding for any model that gives next-token logits: greedy, temperature, top-k and top-p sampling.

The model is seen through one function, `step(new_ids, cache) -> (B, V) logits of the last position`. With a
KV cache, each step feeds only the newest token; without one, the whole sequence so far. Both give the
same tokens (a test holds them to that), the cache just does less work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 40
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0
    use_cache: bool = True

    def check(self) -> list[str]:
        """Problems with these settings, each naming the argument."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be above 0 (use greedy=true for argmax)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be 0 (off) or more")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must lie in (0, 1]")
        return problems


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits with everything outside the top-k and outside the smallest set of tokens whose probability
    reaches top_p (nucleus) set to -inf. The most likely token always survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, cfg: Sampling, generator: torch.Generator) -> torch.Tensor:
    """(B, V) -> (B,) chosen token ids."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    step: Callable[[torch.Tensor, list | None], torch.Tensor],
    new_cache: Callable[[], list] | None,
    prompt: torch.Tensor,
    cfg: Sampling,
    stop_id: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """prompt: (B, T) ids -> (B, n) new ids, n <= max_new_tokens. Stops early once every row has produced
    `stop_id` (rows that stopped are padded with it); never grows past `max_length` tokens in all."""
    generator = torch.Generator(device=prompt.device).manual_seed(cfg.seed)
    cache = new_cache() if cfg.use_cache and new_cache is not None else None
    ids, feed = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    budget = cfg.max_new_tokens if max_length is None else min(cfg.max_new_tokens, max_length - prompt.shape[1])
    for _ in range(max(budget, 0)):
        logits = step(feed, cache)
        token = next_token(logits, cfg, generator)
        if stop_id is not None:
            token = token.masked_fill(done, stop_id)
            done |= token == stop_id
        ids = torch.cat([ids, token[:, None]], 1)
        feed = token[:, None] if cache is not None else ids
        if done.all():
            break
    return ids[:, prompt.shape[1] :]
