"""Does a torch.compile'd model get the gradients of the eager one on this device? One batch through tiny GPT
(causal LM) and BERT (MLM) models, eager and compiled, under the device's autocast; prints the loss before and
after one AdamW step, how many parameters got no gradient or an all-zero one, the compiled gradients' norm over
eager's, and the largest gradient difference from eager relative to the largest eager gradient.

Modes, to tell where a wrong gradient comes from, every one with ptm's vocabulary loss outside the graph as ptm
compiles (`vocab_loss.keep_out_of_compiled_graphs`) but one: inductor as torch.compile defaults to; inductor with
its mix-order reduction off (as ptm compiles on CUDA); with the vocabulary loss traced (which gave all-zero
gradients on CUDA in bf16 with torch 2.11: this says whether a torch version still does); with ptm's own autograd
Functions kept out of the graph;
`backend="aot_eager"` (dynamo and AOTAutograd, no inductor: the graph runs as eager ops) and `backend="eager"`
(dynamo alone); and a reference model of torch's own modules only (embedding, nn.TransformerEncoderLayer,
F.cross_entropy), compiled with inductor, which says whether compiling is wrong on this device for any model.

Run: python tests/bench/compile_probe.py [--bf16]   # CUDA when visible (bf16 autocast), else the CPU in fp32
                                                    # (--bf16: in bf16 autocast)
"""

from __future__ import annotations

import copy
import math
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli import compose
from ptmcli.distributed import init_from_env
from ptmcli.loop import to_device
from ptmcli.models import PRETRAINING_MODELS, recompute, rows, vocab_loss
from ptmcli.objectives import OBJECTIVES
from ptmcli.pretrain import build_examples

TOY = ["model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128", "model.num_layers=2"]
DATA = ["data.max_train_samples=200", "data.vocab_size=2000", "data.max_seq_len=64"]
NO_DROPOUT = ["model.dropout=0", "model.attention_dropout=0"]  # eager and compiled code draw masks differently
FAMILIES = {"gpt": ["conf=gpt-mini"], "bert": ["conf=bert-mini", "objective=mlm"]}
FUNCTIONS = [vocab_loss._ProjectedCrossEntropy, recompute.GeluThenLinear, recompute._RMSNorm, rows._ScatterRows]


class Mode(NamedTuple):
    backend: str = "inductor"
    mix_order_off: bool = False
    functions_out: bool = False  # every ptm autograd Function's apply run outside the graph
    loss_traced: bool = False  # the vocabulary loss traced into the graph (ptm keeps it out since stop 45)


MODES = {
    "compiled": Mode(),
    "compiled, mix-order reduction off (as ptm does on CUDA)": Mode(mix_order_off=True),
    "compiled, vocabulary loss traced (what gave zero gradients on CUDA in bf16)": Mode(loss_traced=True),
    "compiled, all ptm Functions eager": Mode(functions_out=True),
    "compiled, aot_eager backend (no inductor)": Mode("aot_eager"),
    "compiled, eager backend (dynamo alone)": Mode("eager"),
}
# what the second family and the torch-only reference run
SHORT = ("compiled", "compiled, mix-order reduction off (as ptm does on CUDA)")


class Reference(nn.Module):
    """A causal LM of torch's modules only: whether compiling is wrong on this device whatever the model."""

    def __init__(self, vocab_size: int, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        logits = self.head(self.layers(self.embed(ids), mask=mask, is_causal=True))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def gradients(model, loss_of, device, dtype) -> tuple[str, dict]:
    """The loss before and after one AdamW step (as text), and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_of(model)
    loss.backward()
    plain = getattr(model, "_orig_mod", model)
    grads = {n: None if p.grad is None else p.grad.float().clone() for n, p in plain.named_parameters()}
    # and one AdamW step (fused where the device has it, as ptm's): the loss on the same batch must move
    torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True).step()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        after = loss_of(model).item()
    return f"{loss.item():.4f} -> {after:.4f} after a step", grads


def compared(grads: dict, eager: dict) -> str:
    top = max(g.abs().max().item() for g in eager.values() if g is not None)
    both = [n for n, g in eager.items() if g is not None and grads[n] is not None]
    missing = [n for n, g in eager.items() if g is not None and grads[n] is None]
    zero = [n for n in both if not grads[n].any()]
    norm = math.sqrt(sum(grads[n].square().sum().item() for n in both))
    eager_norm = math.sqrt(sum(eager[n].square().sum().item() for n in both))
    diffs = {n: (grads[n] - eager[n]).abs().max().item() for n in both}
    worst = max(diffs, key=diffs.get, default=None)
    return (
        f"{len(missing)} params without grad {missing[:3]}, {len(zero)} of {len(both)} all zero {zero[:3]}, "
        f"grad norm {norm / eager_norm:.3f} of eager's, "
        f"largest grad difference {diffs.get(worst, float('nan')) / top:.2e} of the largest grad (at {worst})"
    )


def kept_out(functions):
    """Each Function's apply run outside the compiled graph; returns the originals to put back."""
    originals = {f: f.__dict__.get("apply") for f in functions}
    for f in functions:
        f.apply = torch.compiler.disable(f.apply)
    return originals


def put_back(originals) -> None:
    for f, apply in originals.items():
        if apply is None:
            del f.apply
        else:
            f.apply = apply


def probe(name: str, base: nn.Module, loss_of, modes: dict, device, dtype) -> None:
    from torch._inductor import config as inductor

    mix_order_default = getattr(inductor.triton, "mix_order_reduction", False)
    eager_losses, eager = gradients(copy.deepcopy(base), loss_of, device, dtype)
    print(f"{name}: eager loss {eager_losses}, {sum(g is None for g in eager.values())} params without grad")
    kept_out_loss = vocab_loss._projected  # as ptm compiles: outside the graph
    for name in modes:
        mode = MODES[name]
        torch._dynamo.reset()
        saved = kept_out(FUNCTIONS) if mode.functions_out else {}
        if mode.loss_traced:
            vocab_loss._projected = vocab_loss._projected_cross_entropy
        if hasattr(inductor.triton, "mix_order_reduction"):
            inductor.triton.mix_order_reduction = mix_order_default and not mode.mix_order_off
        try:
            loss, grads = gradients(torch.compile(copy.deepcopy(base), backend=mode.backend), loss_of, device, dtype)
        except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        finally:
            put_back(saved)
            vocab_loss._projected = kept_out_loss
            if hasattr(inductor.triton, "mix_order_reduction"):
                inductor.triton.mix_order_reduction = mix_order_default
        print(f"  {name}: loss {loss}, {compared(grads, eager)}", flush=True)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or "--bf16" in sys.argv else torch.float32
    print(f"torch {torch.__version__} on {device} ({dtype})", flush=True)
    vocab_loss.keep_out_of_compiled_graphs()  # as parallel.wrap does before it compiles a model
    for family, recipe in FAMILIES.items():
        _, cfg = compose.checked(compose.parse("pretrain", [*recipe, *TOY, *DATA, *NO_DROPOUT]))
        tokenizer, train, _, _ = build_examples(cfg, init_from_env())
        torch.manual_seed(0)
        base = PRETRAINING_MODELS[family](cfg.model, tokenizer.get_vocab_size(), cfg.objective).to(device)
        objective = OBJECTIVES[cfg.objective.name](cfg.objective)
        batch = to_device(train.batch(list(range(8)), 0), device)

        def loss_of(model, objective=objective, batch=batch):
            sums, _ = objective(model, batch)
            return sum(sums[t] / batch["counts"][t] for t in objective.terms)

        # every mode for the first family; the second and the torch-only reference run the two that ptm's runs hit
        probe(family, base, loss_of, MODES if family == "gpt" else SHORT, device, dtype)
        if family == "gpt":
            torch.manual_seed(0)
            reference = Reference(tokenizer.get_vocab_size()).to(device)
            ids = batch["input_ids"]
            probe("torch-only reference", reference, lambda model: model(ids), SHORT, device, dtype)


if __name__ == "__main__":
    sys.exit(main())
