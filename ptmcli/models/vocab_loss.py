"""Cross-entropy of targets over a vocabulary projection, computed a chunk of tokens at a time.

With a 50k vocabulary the output projection is most of a small model's work, and the (tokens x vocabulary)
logits with their gradient most of its memory. Here each chunk's logits exist only while that chunk is
processed: the forward computes the chunk's loss and, since the loss is a plain sum, also the chunk's share of
the gradients (softmax minus one-hot, times the hidden states or the weight). The backward then only scales
the gradients it was handed, so the work is the same three matrix products as the straightforward
computation, without its largest tensors. The softmax is done in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ptmcli.models.exponential import exp_

IGNORE = -100  # a target that counts for nothing (padding), as in F.cross_entropy
# On a CPU at most EFFICIENT_ROWS rows a chunk, fewer only where their logits pass MAX_CHUNK_ELEMENTS (128 MiB in
# fp32). On 2 CPU cores the products run slower on fewer rows (`python tests/bench/vocab_loss.py --rows 333 512 1024`,
# GPT-2's 50,257 tokens: 2.14 / 1.92 / 1.86 s; each chunk adds into the whole weight gradient), and no faster on more
# where the vocabulary is small (`--vocab 8192 --rows 512 1024 2048`: 276 / 274 / 267 GFLOP/s), while each row more
# is a row of the logits buffer kept from step to step (BART's 8k vocabulary: 2,048 rows were 64 MiB). A GPU takes
# as many rows as fit GPU_CHUNK_ELEMENTS: fewer, larger kernels, and its caching allocator reuses the memory.
MAX_CHUNK_ELEMENTS = 1 << 25
GPU_CHUNK_ELEMENTS = 1 << 24
EFFICIENT_ROWS = 512
ROW_ALIGN = 64  # floats
CACHE_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of fp32 logits: half a core's 2 MB L2 on the benchmark CPU
# bf16 / fp16 products on a CPU go to oneDNN, which builds a kernel for each new shape and keeps it (~5-7 ms and 1-3
# MB each, `python tests/bench/bf16_shapes.py`). A chunk's rows (an MLM batch's masked tokens, the last chunk's
# remainder) change from step to step: there the products run on them padded with zero rows to a multiple of
# SHAPE_ROWS, so a run meets a handful of shapes (BART-mini's bf16 bench step peaked 300 MB lower, docs/results.md).
SHAPE_ROWS = 64


def in_cpu_autocast(x: torch.Tensor) -> bool:
    """Whether x's products run under a CPU's autocast (bf16 on oneDNN, a kernel kept per shape)."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


class VocabLoss(NamedTuple):
    loss: torch.Tensor  # fp32 scalar: the summed cross-entropy of the targets that are not IGNORE
    predicted: torch.Tensor | None  # (N,) argmax over the vocabulary, when asked for (evaluation statistics)
    sampled: torch.Tensor | None  # (N,) one token drawn from each row's softmax, when asked for (ELECTRA)


def chunk_rows(vocab_size: int, device_type: str = "cpu") -> int:
    wanted = EFFICIENT_ROWS if device_type == "cpu" else max(EFFICIENT_ROWS, GPU_CHUNK_ELEMENTS // vocab_size)
    return max(16, min(wanted, MAX_CHUNK_ELEMENTS // vocab_size))


_KEPT_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _logits_buffer(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A (rows, vocab) fp32 buffer whose rows start 256-byte aligned. On a CPU one buffer is kept from call to call:
    a fresh one of this size (tens of MB) is memory-mapped anew by the allocator at every step and page-faults in as
    the product writes it (`tests/bench/profile_step.py bart`: the logits' product ran at 134 GFLOP/s into a fresh
    buffer, the step's other products at 130-190). A GPU's caching allocator already hands back the same memory."""
    aligned = -(-vocab // ROW_ALIGN) * ROW_ALIGN
    if device.type != "cpu":
        return torch.empty(rows, aligned, device=device)[:, :vocab]
    kept = _KEPT_BUFFERS.get(device)
    if kept is None or kept.numel() < rows * aligned:
        kept = _KEPT_BUFFERS[device] = torch.empty(rows * aligned)
    return kept[: rows * aligned].view(rows, aligned)[:, :vocab]


def _chunked(hidden, weight, bias, targets, predict: bool, sample: float, need: tuple[bool, bool, bool]):
    """The loss (and argmax, samples) of all rows, chunk by chunk, with the gradients of the summed loss with
    respect to (hidden, weight, bias) where `need` asks for them, in fp32."""
    rows, device = hidden.shape[0], hidden.device
    grad_hidden = torch.empty(rows, hidden.shape[1], dtype=torch.float32, device=device) if need[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need[2] and bias is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=device)
    predicted = torch.empty(rows if predict else 0, dtype=torch.long, device=device)
    sampled = torch.empty(rows if sample else 0, dtype=torch.long, device=device)
    step = chunk_rows(weight.shape[0], device.type)
    autocast = torch.is_autocast_enabled(device.type)
    compute = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
    # Every chunk's fp32 logits land in one buffer, written in place from there on. A fresh (rows, V) tensor per
    # chunk costs as much in page faults as its matrix product on a CPU. Its rows start 256-byte aligned: with an
    # odd vocabulary (GPT-2's 50,257, BERT's 30,522) the product into unaligned rows ran at 60 % of the speed.
    buffer = _logits_buffer(min(step, rows), weight.shape[0], device)
    # under autocast, the weight cast once for every chunk's two products (autocast casts it at each)
    weight_c = weight.to(compute)
    bias_c = None if bias is None else bias.to(compute)
    in_buckets = compute != torch.float32 and device.type == "cpu"
    for start in range(0, rows, step):
        h, t = hidden[start : start + step], targets[start : start + step]
        n = h.shape[0]
        n_products = -(-n // SHAPE_ROWS) * SHAPE_ROWS if in_buckets else n  # rows the products run on
        if compute == torch.float32:
            x = torch.mm(h.float(), weight.float().t(), out=buffer[:n])
            if bias is not None:
                x.add_(bias.float())
        else:  # the product in the autocast dtype, the softmax in fp32
            x = buffer[:n].copy_(F.linear(_zero_rows_to(h, n_products, compute), weight_c, bias_c)[:n])
        valid = t != IGNORE
        safe = t.clamp(min=0)
        if predict:
            predicted[start : start + step] = x.argmax(-1)
        # log p(target) = (x_t - max) - log(sum(exp(x - max))), with the exponentials kept for the gradient
        shifted_target, total = _exponentiate(x, safe)
        loss -= ((shifted_target - total.log()) * valid).sum()
        if not (sample or any(need)):
            continue
        if sample:  # multinomial normalises the weights: exp(x - max) is the softmax up to a row's scale
            tempered = x if sample == 1.0 else x.pow(1.0 / sample)
            sampled[start : start + step] = torch.multinomial(tempered, 1).squeeze(1)
        if not any(need):
            continue
        # d(summed loss)/d(logits) = exp(x - max) / total - one_hot(target). The division is folded into the narrow
        # side of the two products (no pass over the (rows, V) matrix) and the one-hot part is a row of the weight
        # per target; ignored rows are zeroed on the narrow side too.
        keep = valid.float()
        scale = keep / total
        e = _zero_rows_to(x, n_products, compute)
        if grad_hidden is not None:
            own = weight[safe].float() * keep[:, None]
            grad_hidden[start : start + step] = (e @ weight_c)[:n].float() * scale[:, None] - own
        if grad_weight is not None or grad_bias is not None:
            scaled = _zero_rows_to(h.float() * scale[:, None], n_products, compute)
        if grad_weight is not None and compute == torch.float32:
            grad_weight.addmm_(e.t(), scaled)  # accumulated inside the product: no (V, C) temporary
        elif grad_weight is not None:
            grad_weight += e.t() @ scaled  # added in fp32, without an fp32 copy of the (V, C) product
        if grad_weight is not None:
            grad_weight.index_add_(0, safe, h.float() * -keep[:, None])
        if grad_bias is not None:
            grad_bias += (_zero_rows_to(scale[:, None], n_products, compute)[:, 0] @ e).float()
            grad_bias.index_add_(0, safe, -keep)
    return loss, predicted, sampled, (grad_hidden, grad_weight, grad_bias)


def _zero_rows_to(x: torch.Tensor, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x in `dtype` (default its own) with zero rows appended up to `rows` (SHAPE_ROWS)."""
    dtype = dtype or x.dtype
    if rows == x.shape[0]:
        return x.to(dtype)
    out = torch.empty(rows, x.shape[1], dtype=dtype, device=x.device)
    out[: x.shape[0]].copy_(x)
    out[x.shape[0] :].zero_()
    return out


def _exponentiate(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x <- exp(x - its row's max), in place; returns each row's (x[target] - max) and sum of the exponentials.
    On a CPU a few rows at a time: a block's passes (max, subtract, exponentiate, sum) then run in the core's cache,
    where over a whole chunk each pass went through memory. 512 rows of GPT-2's 50,257 logits: 25 ms whole, 14 ms
    in blocks of 4-16 rows, beside 51 ms for their product; the output layer's forward + backward 1.41 -> 1.33 s
    (`python tests/bench/vocab_loss.py --block-rows 5 8 16 512`). On a GPU a block is a kernel launch: one block.
    The exponentials are `exponential.exp_`'s: torch's exp slows down 12-37x on the logits that underflow."""
    rows = max(1, CACHE_BLOCK_ELEMENTS // x.shape[1]) if x.device.type == "cpu" else x.shape[0]
    shifted_target = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    total = torch.empty_like(shifted_target)
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        block.sub_(block.amax(-1, keepdim=True))
        torch.gather(block, 1, targets[start : start + rows, None], out=shifted_target[start : start + rows, None])
        torch.sum(exp_(block), -1, out=total[start : start + rows])
    return shifted_target, total


class _ProjectedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, predict: bool, sample: float):
        loss, predicted, sampled, grads = _chunked(
            hidden, weight, bias, targets, predict, sample, tuple(ctx.needs_input_grad[:3])
        )
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(predicted, sampled)
        return loss, predicted, sampled

    @staticmethod
    def backward(ctx, grad_loss, _predicted, _sampled):
        # scaled in place: a fresh (V, C) tensor per step costs page faults on a CPU
        grads = tuple(None if g is None else g.mul_(grad_loss).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes))
        ctx.grads = None  # a second backward through the same graph is not supported, as with retain_graph=False
        return (*grads, None, None, None)


def projected_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    predict: bool = False,
    sample: float = 0.0,
) -> VocabLoss:
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), rows whose target is IGNORE skipped.

    hidden: (N, C); weight: (V, C); bias: (V,) or None; targets: (N,). `predict` also returns each row's argmax,
    `sample` > 0 a token drawn from each row's softmax at that temperature (not differentiated)."""
    return _projected(hidden, weight, bias, targets, predict, sample)


def _projected_cross_entropy(hidden, weight, bias, targets, predict: bool, sample: float) -> VocabLoss:
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        loss, predicted, sampled = _ProjectedCrossEntropy.apply(hidden, weight, bias, targets, predict, sample)
    else:  # evaluation: no gradient is computed at all
        loss, predicted, sampled, _ = _chunked(hidden, weight, bias, targets, predict, sample, (False, False, False))
    return VocabLoss(loss, predicted if predict else None, sampled if sample else None)


_projected = _projected_cross_entropy


def keep_out_of_compiled_graphs() -> None:
    """Run the loss outside torch.compile's graphs from now on (called before a model is compiled). Traced by
    dynamo (any backend, even "eager") under CUDA bf16 autocast, its Function's gradients came out all zero with
    torch 2.11 on an H200 while the loss was right, and no compiled ptm model learnt; outside the graph they equal
    eager's (tests/bench/compile_probe.py). The loss is chunked matrix products: nothing for a compiler to fuse.
    Not done at import: `torch.compiler.disable` imports torch._dynamo (~70 MB, ~1 s) into every ptm process."""
    global _projected
    if _projected is _projected_cross_entropy:
        _projected = torch.compiler.disable(_projected_cross_entropy)


def targeted_cross_entropies(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: list[torch.Tensor],
    predict: bool = False,
) -> list[VocabLoss]:
    """One VocabLoss per tensor of `targets` (each shaped like hidden without its last axis), over only the rows
    where that tensor has a target: sequence-to-sequence labels are mostly padding, and several terms (T5's
    span and whole-block targets) take disjoint rows, so each row is projected at most once.
    `predicted` holds the kept rows' argmax, in the order of `t[t != IGNORE]`."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = []
    for t in targets:
        keep = t.reshape(-1) != IGNORE
        out.append(projected_cross_entropy(flat[keep], weight, bias, t.reshape(-1)[keep], predict))
    return out


def correct(out: VocabLoss, targets: torch.Tensor) -> torch.Tensor:
    """How many targets the argmax of `targeted_cross_entropies` got right (0 when it was not asked to predict)."""
    if out.predicted is None:
        return torch.zeros((), device=targets.device)
    return (out.predicted == targets[targets != IGNORE]).sum()
