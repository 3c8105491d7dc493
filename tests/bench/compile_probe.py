"""Does a torch.compile'd model get the gradients of the eager one on this device? One batch through tiny GPT
(causal LM) and BERT (MLM) models, eager and compiled (plain; with inductor's mix-order reduction off, as ptm
compiles on CUDA; with ptm's own autograd Functions kept out of the graph), under the device's autocast; prints
the loss before and after one AdamW step, how many parameters got no gradient, and the largest gradient
difference from eager relative to the largest eager gradient.

Run: python tests/bench/compile_probe.py [--bf16]   # CUDA when visible (bf16 autocast), else the CPU in fp32
                                                    # (--bf16: in bf16 autocast)
"""

from __future__ import annotations

import copy
import sys

import torch

from ptmcli import compose
from ptmcli.distributed import init_from_env
from ptmcli.loop import to_device
from ptmcli.models import PRETRAINING_MODELS, layers, recompute, vocab_loss
from ptmcli.objectives import OBJECTIVES
from ptmcli.pretrain import build_examples

TOY = ["model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128", "model.num_layers=2"]
DATA = ["data.max_train_samples=200", "data.vocab_size=2000", "data.max_seq_len=64"]
NO_DROPOUT = ["model.dropout=0", "model.attention_dropout=0"]  # eager and compiled code draw masks differently
FAMILIES = {"gpt": ["conf=gpt-mini"], "bert": ["conf=bert-mini", "objective=mlm"]}
FUNCTIONS = {
    "vocab loss": [vocab_loss._ProjectedCrossEntropy],
    "all": [vocab_loss._ProjectedCrossEntropy, recompute.GeluThenLinear, recompute._RMSNorm, layers._ScatterRows],
}


def gradients(model, objective, batch, device, dtype) -> tuple[str, dict]:
    """The loss before and after one AdamW step (as text), and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        sums, _ = objective(model, batch)
    loss = sum(sums[t] / batch["counts"][t] for t in objective.terms)
    loss.backward()
    plain = getattr(model, "_orig_mod", model)
    grads = {n: None if p.grad is None else p.grad.float().clone() for n, p in plain.named_parameters()}
    # and one AdamW step (fused where the device has it, as ptm's): the loss on the same batch must move
    torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True).step()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        sums, _ = objective(model, batch)
    after = sum(sums[t] / batch["counts"][t] for t in objective.terms).item()
    return f"{loss.item():.4f} -> {after:.4f} after a step", grads


def kept_out(functions):
    """Each Function's apply run outside the compiled graph; returns the originals to put back."""
    originals = {f: f.__dict__.get("apply") for f in functions}
    for f in functions:
        f.apply = torch.compiler.disable(f.apply)
    return originals


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or "--bf16" in sys.argv else torch.float32
    print(f"torch {torch.__version__} on {device} ({dtype})", flush=True)
    from torch._inductor import config as inductor

    mix_order_default = inductor.triton.mix_order_reduction
    for family, recipe in FAMILIES.items():
        _, cfg = compose.checked(compose.parse("pretrain", [*recipe, *TOY, *DATA, *NO_DROPOUT]))
        tokenizer, train, _, _ = build_examples(cfg, init_from_env())
        torch.manual_seed(0)
        base = PRETRAINING_MODELS[family](cfg.model, tokenizer.get_vocab_size(), cfg.objective).to(device)
        objective = OBJECTIVES[cfg.objective.name](cfg.objective)
        batch = to_device(train.batch(list(range(8)), 0), device)
        eager_losses, eager = gradients(copy.deepcopy(base), objective, batch, device, dtype)
        top = max(g.abs().max().item() for g in eager.values() if g is not None)
        print(f"{family}: eager loss {eager_losses}, {sum(g is None for g in eager.values())} params without grad")
        modes = ("compiled", "compiled, mix-order reduction off (as ptm does on CUDA)")
        for mode in (*modes, "compiled, vocab loss eager", "compiled, all ptm Functions eager"):
            torch._dynamo.reset()
            saved = kept_out(FUNCTIONS["vocab loss" if "vocab" in mode else "all"]) if "eager" in mode else {}
            inductor.triton.mix_order_reduction = "mix-order" not in mode and mix_order_default
            try:
                model = torch.compile(copy.deepcopy(base))
                loss, grads = gradients(model, objective, batch, device, dtype)
            except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
                print(f"  {mode}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            finally:
                for f, apply in saved.items():
                    if apply is None:
                        del f.apply
                    else:
                        f.apply = apply
            missing = [n for n, g in grads.items() if g is None and eager[n] is not None]
            diff = max(
                ((grads[n] - g).abs().max().item() for n, g in eager.items() if g is not None and grads[n] is not None),
                default=float("nan"),
            )
            print(
                f"  {mode}: loss {loss}, {len(missing)} params without grad {missing[:3]}, "
                f"largest grad difference {diff / top:.2e} of the largest grad",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
