"""`ptm export run=DIR [format=hf|peft] [merge=true] [output=DIR]`: a run's model for use elsewhere.

format=hf (every run that is not an adapter run): a directory `transformers` loads with `from_pretrained`.
A pretraining run becomes its family's pretraining class (BertForPreTraining, GPT2LMHeadModel,
T5ForConditionalGeneration, ...; ELECTRA's generator goes to `generator/`); a fine-tuning run becomes the
matching task class with its labels. A head that has no Hugging Face equivalent (a [CLS] or mean-pooled
classifier, which Hugging Face puts behind a dense + tanh layer) is not dressed up as one: the encoder is
exported as the bare model and the head's weights beside it, and the message says so.
format=peft (LoRA, AdaLoRA and prefix runs): the adapter in PEFT's format, loadable onto the base model.
merge=true: LoRA/AdaLoRA folded into the base weights, written as format=hf.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ptmcli import checkpoint, hf, runfiles
from ptmcli.errors import PtmError
from ptmcli.files import staged_directory
from ptmcli.hf.electra import GENERATOR_CLASS, generator_config, generator_rules
from ptmcli.hf.keymap import indices
from ptmcli.inference import checkpoint_of, load_run
from ptmcli.pretrain import pretraining_model
from ptmcli.runlog import console
from ptmcli.schema import check_pretrain


def merged_state(model: torch.nn.Module, method) -> dict[str, torch.Tensor]:
    """The task model's weights with every low-rank update merged, under the names of a plain model."""
    method.merge()
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base.", ".")] = value.detach().contiguous().clone()
    return state


def _peft_module(family: hf.HfFamily, arch, tokens, ours: str, part: int, parts: int) -> tuple[str, bool]:
    """(Hugging Face module name relative to the base model, whether it fuses all `parts` slices) of slice `part`
    of our linear `ours` (e.g. 'layers.3.attention.qkv' slice 0 -> 'encoder.layer.3.attention.self.query')."""
    target = f"encoder.{ours}.weight"
    for r in family.rules(arch, tokens):
        for index in indices(r.ours, family.layer_counts(arch)):
            if r.ours.format(**index) != target or r.theirs[0].endswith(("rel_attn.q", "rel_attn.o")):
                continue  # (XLNet's projections are parameters, not modules PEFT can wrap)
            fused = len(r.theirs) != parts
            name = r.theirs[0 if fused else part].format(**index)
            return name.removesuffix(".weight").removeprefix(family.prefix), fused
    raise PtmError(
        f"format=peft: the adapted layer '{ours}' has no module in Hugging Face's {family.model_type} model that PEFT "
        f"can wrap; adapt other transfer.targets (e.g. up, down) or export with merge=true."
    )


def _suffix(module: str) -> str:
    """'encoder.layer.3.attention.self.query' -> 'attention.self.query': PEFT matches target modules by suffix."""
    return re.split(r"\.\d+\.", module, maxsplit=1)[-1]


def peft_lora(model, method, cfg, arch, tokenizer: Tokenizer, total_steps: int) -> tuple[dict, dict]:
    """LoRA/AdaLoRA factors under PEFT's names. Where Hugging Face fuses q/k/v into one layer (GPT-2's c_attn),
    the three rank-r updates are one rank-3r update of it: A stacked, B block-diagonal, alpha scaled to keep
    alpha / r."""
    family = hf.BY_FAMILY[arch.family]
    tokens = hf.tokens_of(tokenizer)
    tensors, targets, ranks, alphas = {}, set(), {}, {}
    for name, module in method.low_rank.items():
        total = module.base.out_features // (module.slices[0][1] - module.slices[0][0])
        groups: dict[str, list[int]] = {}
        for k, part in enumerate(module.slice_ids):
            hf_name, fused = _peft_module(family, arch, tokens, name, part, total)
            groups.setdefault(hf_name, []).append(k)
        for hf_name, ks in groups.items():
            suffix = _suffix(hf_name)
            targets.add(suffix)
            a = torch.cat([module.lora_A[k].detach() for k in ks])
            b = torch.block_diag(*(module.lora_B[k].detach() for k in ks))
            if fused:
                if len(ks) != total:
                    raise PtmError(
                        f"format=peft: Hugging Face's {family.model_type} fuses q, k and v into '{suffix}', which PEFT "
                        f"adapts only whole: fine-tune with transfer.targets=[qkv] to export this run's adapter."
                    )
                ranks[suffix], alphas[suffix] = a.shape[0], cfg.alpha * total
            prefix = f"base_model.model.{hf_name}"
            if method.name == "lora":
                tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
                tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
            else:
                tensors[f"{prefix}.lora_A"] = a.contiguous()
                tensors[f"{prefix}.lora_B"] = b.contiguous()
                tensors[f"{prefix}.lora_E"] = torch.cat([module.lora_E[k].detach() for k in ks]).contiguous()
                tensors[f"{prefix}.ranknum"] = torch.tensor([float(a.shape[0])])
    config = {
        "peft_type": method.name.upper(),
        "task_type": None,
        "target_modules": sorted(targets),
        "lora_dropout": cfg.dropout,
        "bias": getattr(cfg, "bias", "none"),
        "fan_in_fan_out": family.family == "gpt",  # GPT-2's Conv1D stores (in, out)
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    if method.name == "lora":
        config.update(r=cfg.r, lora_alpha=cfg.alpha, rank_pattern=ranks, alpha_pattern=alphas)
    else:
        config.update(
            r=cfg.init_r,
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            lora_alpha=cfg.alpha,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            deltaT=cfg.delta_t,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight,
            total_step=total_steps,
        )  # pruned E entries are zeros
    return tensors, config


def peft_prefix(model, method, cfg) -> tuple[dict, dict]:
    P, L, _, nh, hs = method.prefix.shape
    tensors = {"prompt_embeddings": method.prefix.states().detach().contiguous()}  # (P, L * 2 * C), plain tensors
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": None,
        "num_virtual_tokens": P,
        "token_dim": nh * hs,
        "num_transformer_submodules": 1,
        "num_attention_heads": nh,
        "num_layers": L,
        "encoder_hidden_size": cfg.projection_hidden,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    return tensors, config


def _check_named(family: hf.HfFamily, arch, state: dict, rules: list) -> None:
    left = hf.unmapped(family, arch, state, rules)
    if left:
        raise PtmError(f"format=hf: ptm's {family.family} tensors {left[:5]} have no Hugging Face name.")


def write_pretraining(model: torch.nn.Module, arch, objective: str, tokenizer: Tokenizer, out: Path, **decoding) -> str:
    """A whole model (a pretraining model with its heads, or a text-to-text run's encoder-decoder) as its family's
    Hugging Face pretraining class; `decoding` goes to generation_config.json. Returns the class name."""
    family = hf.BY_FAMILY[arch.family]
    state = checkpoint.unwrap(model).state_dict()
    tokens = hf.tokens_of(tokenizer)
    rules = family.rules(arch, tokens)
    generator = family.family == "electra"  # ELECTRA's generator is a model of its own in Hugging Face
    _check_named(family, arch, state, rules + (generator_rules(arch, tokens) if generator else []))
    config = hf.model_config(family, arch, tokenizer, family.pretraining[objective])
    generation = hf.generation_config(config, **decoding) if family.generates else None
    states = hf.hf_state(family, arch, tokenizer, state, rules)
    hf.write_dir(out, config, states, tokenizer, family, arch.max_positions, generation)
    if generator:
        config = hf.model_config(family, arch, tokenizer, GENERATOR_CLASS, **generator_config(arch, tokens))
        states = hf.hf_state(family, arch, tokenizer, state, generator_rules(arch, tokens))
        hf.write_dir(out / "generator", config, states, tokenizer, family, arch.max_positions)
    return family.pretraining[objective]


def _task_state(model, method) -> dict[str, torch.Tensor]:
    if method is None:
        return model.state_dict()
    if not method.low_rank:
        raise PtmError(
            f"format=hf needs the whole model, and transfer={method.name} keeps its own modules, which Hugging "
            f"Face's model classes lack; export it with format=peft{' (prefix tuning)' if method.prefix else ''}, "
            f"or fine-tune with transfer=lora to merge."
        )
    return merged_state(model, method)


def write_finetuned(cfg, model, method, labels: list[str], tokenizer: Tokenizer, out: Path) -> str:
    """A fine-tuned model as the matching Hugging Face task class; returns what was written, in words."""
    state = _task_state(model, method)
    arch = model.encoder.arch
    family = hf.BY_FAMILY[arch.family]
    if cfg.transfer.mode == "text-to-text" or cfg.task.kind == "text2text":
        objective = next(iter(family.pretraining))
        t = cfg.task
        decoding = {
            "num_beams": t.num_beams,
            "max_new_tokens": t.max_target_len,
            "no_repeat_ngram_size": t.no_repeat_ngram_size,
        }
        return f"{write_pretraining(model, arch, objective, tokenizer, out, **decoding)} (text-to-text)"
    if cfg.task.objective == "simcse-supervised":  # sentence vectors: the bare encoder; the projection trains only
        return write_encoder({k: v for k, v in state.items() if k.startswith("encoder.")}, arch, tokenizer, out)
    kind = model.head_kind
    head = {k.removeprefix("head."): state.pop(k) for k in list(state) if k.startswith("head.")}
    task_class = family.heads.get(kind)
    exact = task_class and (kind != "sequence" or (family.pooler and model.pooling == "pooler"))
    if kind != "sequence" or not exact:  # Hugging Face's token, span and bare classes have no pooler
        state = {k: v for k, v in state.items() if not k.startswith("encoder.pooler.")}
    rules = family.rules(arch, hf.tokens_of(tokenizer))
    _check_named(family, arch, state, rules)
    theirs = hf.hf_state(family, arch, tokenizer, state, rules)
    if exact:
        name, module = task_class
        theirs.update({f"{module}.{k}": v for k, v in head.items()})
        hf.write_dir(
            out, hf.model_config(family, arch, tokenizer, name, labels), theirs, tokenizer, family, arch.max_positions
        )
        return name
    if family.base is None:
        raise PtmError(
            f"format=hf: Hugging Face has no class for a lone {family.family} encoder with a task head (its model "
            f"needs the decoder). Fine-tune with transfer=text-to-text for a run that exports."
        )
    write_encoder(state, arch, tokenizer, out, labels)
    save_file({k: v.contiguous() for k, v in head.items()}, str(out / "ptm_head.safetensors"))
    pooling = model.pooling if kind == "sequence" else kind
    return (
        f"{family.base} + ptm_head.safetensors: Hugging Face has no {family.family} {kind} head that reads the "
        f"encoder as this run's does ({pooling} pooling, one linear layer), so the encoder is exported as the bare "
        f"model and the head's weight and bias lie beside it"
    )


def write_encoder(state: dict, arch, tokenizer: Tokenizer, out: Path, labels: list[str] | None = None) -> str:
    """ptm `encoder.*` tensors as the family's bare Hugging Face model (BertModel, ...). Returns the class name."""
    family = hf.BY_FAMILY[arch.family]
    rules = family.rules(arch, hf.tokens_of(tokenizer))
    _check_named(family, arch, state, rules)
    theirs = hf.hf_state(family, arch, tokenizer, state, rules)
    theirs = {k.removeprefix(family.prefix): v for k, v in theirs.items()}
    config = hf.model_config(family, arch, tokenizer, family.base, labels)
    hf.write_dir(out, config, theirs, tokenizer, family, arch.max_positions)
    return family.base


def export_pretraining_run(run: Path, out: Path, checkpoint_name: str | None) -> str:
    """Write a pretraining run's model into `out`; returns what was written, in words."""
    cfg = check_pretrain(runfiles.config(run))
    tokenizer = runfiles.tokenizer(run)
    ckpt = checkpoint_of(run, checkpoint_name)
    model = pretraining_model(cfg, tokenizer.get_vocab_size())
    checkpoint.load_weights(ckpt, model)
    if cfg.objective.name == "simcse":  # the sentence encoder; SimCSE's projection serves training only
        state = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
        written = write_encoder(state, cfg.model, tokenizer, out)
    else:
        written = write_pretraining(model, cfg.model, cfg.objective.name, tokenizer, out)
    return f"{written} ({ckpt.name})"


def export_run(
    run: Path,
    fmt: str | None = None,
    merge: bool = False,
    output: Path | None = None,
    checkpoint_name: str | None = None,
) -> Path:
    raw = runfiles.config(run)
    runfiles.tokenizer(run)
    out = output or run / "export"
    if fmt not in (None, "hf", "peft"):
        raise PtmError(f"format={fmt!r}: use format=hf (transformers) or format=peft (adapters).")
    if runfiles.is_pretraining(raw):
        if fmt == "peft" or merge:
            raise PtmError(f"run='{run}' is a pretraining run, which has no adapter: export it with format=hf.")
        with staged_directory(out, "output") as stage:
            written = export_pretraining_run(run, stage, checkpoint_name)
        console.print(f"{written} written to {out}")
        return out
    cfg, task, model, labels, hw, ckpt, method = load_run(run, checkpoint_name, with_method=True)
    if cfg.tasks is not None:
        raise PtmError(
            f"run='{run}' is a multi-task run ({', '.join(cfg.tasks)}): Hugging Face has no model class with a head "
            f"per task, so it is not exported. Use it with ptm evaluate / ptm predict task=NAME, or as init= of a "
            f"single-task run."
        )
    model = model.cpu()
    if method is not None and not cfg.init:
        _check_base_in_run(run, cfg, method, fmt)
    if merge and (method is None or not method.low_rank):
        instead = "Export it without merge=true."
        if method is not None and method.prefix is None:  # Houlsby adapters: no format outside ptm holds them
            instead = "Houlsby adapters have no Hugging Face format: use the run with ptm evaluate / ptm predict."
        raise PtmError(
            f"merge=true folds LoRA/AdaLoRA updates into the base; run '{run}' used "
            f"transfer={cfg.transfer.mode}. {instead}"
        )
    if fmt is None:  # an adapter for its base model, unless that base was random (init=none): then merged
        fmt = "peft" if method is not None and not merge and cfg.init else "hf"
    tokenizer = runfiles.tokenizer(run)
    with staged_directory(out, "output") as stage:
        if fmt == "hf":
            written = f"{write_finetuned(cfg, model, method, labels, tokenizer, stage)} ({ckpt.name})"
            (stage / "labels.json").write_text(json.dumps(labels) + "\n")
        else:
            written = export_peft(run, cfg, model, method, ckpt, stage)
    console.print(f"{written} written to {out}")
    return out


def _check_base_in_run(run: Path, cfg, method, fmt: str | None) -> None:
    """A method trained on a base built at random (init=none): the base exists only in this run's checkpoints, so no
    adapter can be loaded onto it elsewhere; LoRA and AdaLoRA still merge into a whole model (format=hf)."""
    base = (
        f"run '{run}' trained transfer={cfg.transfer.mode} on a model built at random (init=none), whose base "
        "weights exist only in this run's checkpoints"
    )
    if not method.low_rank:
        raise PtmError(
            f"{base}, and Hugging Face's model classes have no place for its {method.name} modules: nothing outside "
            "ptm could load an export. Use the run with ptm evaluate / ptm predict, or train with transfer=lora, "
            "which merges into a whole model."
        )
    if fmt == "peft":
        raise PtmError(
            f"format=peft: {base}, so an adapter has no base model to load onto. Export format=hf: the "
            "LoRA update merged into the whole model."
        )


def export_peft(run: Path, cfg, model, method, ckpt: Path, out: Path) -> str:
    """Write a LoRA, AdaLoRA or prefix run's method in PEFT's format into `out`; returns what was written."""
    if method is None:
        raise PtmError(
            f"format=peft: run '{run}' used transfer={cfg.transfer.mode}, which has no adapter; export the whole "
            f"model with format=hf."
        )
    if method.low_rank:
        state = checkpoint.read_state(ckpt)
        total_steps = state.get("max_steps", state["step"])
        tokenizer = runfiles.tokenizer(run)
        tensors, config = peft_lora(model, method, cfg.transfer, model.encoder.arch, tokenizer, total_steps)
    elif method.prefix is not None:
        tensors, config = peft_prefix(model, method, cfg.transfer)
    else:
        raise PtmError(
            "Houlsby adapters have no Hugging Face PEFT format; use the run's checkpoints with ptm, or "
            "transfer=lora for PEFT users."
        )
    out.mkdir(parents=True, exist_ok=True)
    config["base_model_name_or_path"] = cfg.init
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    head = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / "head.safetensors"))  # the task head PEFT's base model has no place for
    for name in ("tokenizer.json", "labels.json", "config.yaml"):
        (out / name).write_bytes((run / name).read_bytes())
    return f"PEFT {config['peft_type']} adapter ({ckpt.name})"
