"""Decoding for any model that gives next-token logits: greedy, temperature, top-k and top-p sampling, and
beam search with a length penalty and no-repeat n-grams.

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
    num_beams: int = 1  # > 1: beam search (deterministic; sampling settings are ignored)
    length_penalty: float = 1.0  # beam scores are log-probability / length**length_penalty
    no_repeat_ngram_size: int = 0  # 0 = off; else never produce an n-gram of this size twice

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
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams} must be at least 1")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be 0 (off) or more")
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


def ban_repeated_ngrams(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already present in that row of `ids`."""
    if n <= 0 or ids.shape[1] < n:
        return logits
    logits = logits.clone()
    for row, seq in enumerate(ids.tolist()):
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
        if banned:
            logits[row, banned] = float("-inf")
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
        logits = ban_repeated_ngrams(step(feed, cache), ids, cfg.no_repeat_ngram_size)
        token = next_token(logits, cfg, generator)
        if stop_id is not None:
            token = token.masked_fill(done, stop_id)
            done |= token == stop_id
        ids = torch.cat([ids, token[:, None]], 1)
        feed = token[:, None] if cache is not None else ids
        if done.all():
            break
    return ids[:, prompt.shape[1] :]


def reorder_cache(cache: list[dict] | None, rows: torch.Tensor) -> None:
    """Keep the cached keys/values of the beams that survive (`rows` index the flattened batch x beams)."""
    for layer in cache or []:
        for key, value in layer.items():
            layer[key] = value.index_select(0, rows)


@torch.no_grad()
def beam_search(
    step: Callable[[torch.Tensor, list | None], torch.Tensor],
    new_cache: Callable[[], list] | None,
    prompt: torch.Tensor,
    cfg: Sampling,
    stop_id: int,
    max_length: int | None = None,
) -> list[list[int]]:
    """Best continuation of each prompt row under beam search. `prompt` holds B rows; `step` must accept
    B * num_beams rows, beam-major within each prompt (row b * K + k), as `prompt.repeat_interleave(K, 0)`.

    A hypothesis is finished when it produces `stop_id`; its score is log p / length**length_penalty.
    Search for a prompt ends once it has num_beams finished hypotheses; rows still open at the length limit
    count as finished. Returns the token lists without `stop_id`."""
    B, K = prompt.shape[0], cfg.num_beams
    device = prompt.device
    ids = prompt.repeat_interleave(K, 0)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step does not repeat it
    cache = new_cache() if cfg.use_cache and new_cache is not None else None
    feed = ids
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    start = prompt.shape[1]
    budget = cfg.max_new_tokens if max_length is None else min(cfg.max_new_tokens, max_length - start)
    penalty = lambda tokens: max(len(tokens), 1) ** cfg.length_penalty  # noqa: E731
    for t in range(max(budget, 0)):
        logp = ban_repeated_ngrams(step(feed, cache).float(), ids, cfg.no_repeat_ngram_size).log_softmax(-1)
        V = logp.shape[-1]
        candidates = (scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=-1)
        origin = torch.zeros(B, K, dtype=torch.long, device=device)
        chosen = torch.full((B, K), stop_id, dtype=torch.long, device=device)
        new_scores = torch.full((B, K), float("-inf"), device=device)
        for b in range(B):
            if len(finished[b]) >= K:
                continue  # this prompt is done; its rows keep decoding harmlessly at -inf
            alive = 0
            for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                beam, token = divmod(index, V)
                if score == float("-inf"):
                    break
                if token == stop_id:
                    tokens = ids[b * K + beam, start:].tolist()
                    finished[b].append((score / penalty(tokens), tokens))
                    if len(finished[b]) >= K:
                        break
                    continue
                origin[b, alive], chosen[b, alive], new_scores[b, alive] = beam, token, score
                alive += 1
                if alive == K:
                    break
        rows = (origin + torch.arange(B, device=device)[:, None] * K).view(-1)
        ids = torch.cat([ids.index_select(0, rows), chosen.view(-1, 1)], 1)
        scores = new_scores
        reorder_cache(cache, rows)
        feed = chosen.view(-1, 1) if cache is not None else ids
        if all(len(f) >= K for f in finished):
            break
    for b in range(B):
        if len(finished[b]) < K:  # the length limit ended the search: open beams count as finished
            for k in range(K):
                if scores[b, k] > float("-inf"):
                    tokens = ids[b * K + k, start:].tolist()
                    finished[b].append((float(scores[b, k]) / penalty(tokens), tokens))
    return [max(f, key=lambda item: item[0])[1] if f else [] for f in finished]
