"""`ptm export run=DIR [merge=true] [output=DIR]`: a fine-tuning run's weights for use elsewhere.

merge=true (LoRA/AdaLoRA): the update folded into the base weights, written as a plain ptm model
(`model.safetensors` with the usual names). Otherwise, for LoRA, AdaLoRA and prefix tuning, the adapter in
Hugging Face PEFT's format (`adapter_model.safetensors` + `adapter_config.json`, PEFT's key names) so that
PEFT users can load it onto the same base model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ptmcli.errors import PtmError
from ptmcli.inference import load_run
from ptmcli.models import HF_MODULE_NAMES
from ptmcli.runlog import console


def merged_state(model: torch.nn.Module, method) -> dict[str, torch.Tensor]:
    """The task model's weights with every low-rank update merged, under the names of a plain model."""
    method.merge()
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base.", ".")] = value.detach().contiguous().clone()
    return state


def peft_lora(model, method, cfg, family: str, total_steps: int) -> tuple[dict, dict]:
    to_hf = HF_MODULE_NAMES[family]
    tensors, targets = {}, set()
    for name, module in method.low_rank.items():
        for k, part in enumerate(module.slice_ids):
            hf = to_hf(name, part)
            targets.add(hf.split("encoder.layer.")[1].split(".", 1)[1])
            prefix = f"base_model.model.{hf}"
            if method.name == "lora":
                tensors[f"{prefix}.lora_A.weight"] = module.lora_A[k].detach().contiguous()
                tensors[f"{prefix}.lora_B.weight"] = module.lora_B[k].detach().contiguous()
            else:
                tensors[f"{prefix}.lora_A"] = module.lora_A[k].detach().contiguous()
                tensors[f"{prefix}.lora_B"] = module.lora_B[k].detach().contiguous()
                tensors[f"{prefix}.lora_E"] = module.lora_E[k].detach().contiguous()
                tensors[f"{prefix}.ranknum"] = torch.tensor([float(module.r)])
    config = {
        "peft_type": method.name.upper(),
        "task_type": None,
        "target_modules": sorted(targets),
        "lora_dropout": cfg.dropout,
        "bias": getattr(cfg, "bias", "none"),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    if method.name == "lora":
        config.update(r=cfg.r, lora_alpha=cfg.alpha)
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


def export_run(run: Path, merge: bool, output: Path | None = None) -> Path:
    cfg, task, model, labels, hw, ckpt, method = load_run(run, with_method=True)
    out = output or run / "export"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "labels.json", "config.yaml"):
        shutil.copy(run / name, out / name)
    model = model.cpu()
    if merge:
        if method is None or not method.low_rank:
            raise PtmError(
                f"merge=true folds LoRA/AdaLoRA updates into the base; run '{run}' used "
                f"transfer={cfg.transfer.mode}. Export it without merge=true."
            )
        save_file(merged_state(model, method), str(out / "model.safetensors"))
        console.print(f"merged model written to {out / 'model.safetensors'}")
        return out
    if method is None:
        raise PtmError(
            f"run '{run}' used transfer={cfg.transfer.mode}, which has no adapter to export; its "
            f"checkpoints ({ckpt}) already hold the whole model."
        )
    if method.low_rank:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        total_steps = state.get("max_steps", state["step"])
        tensors, config = peft_lora(model, method, cfg.transfer, model.encoder.arch.family, total_steps)
    elif method.prefix is not None:
        tensors, config = peft_prefix(model, method, cfg.transfer)
    else:
        raise PtmError(
            "Houlsby adapters have no Hugging Face PEFT format; use merge=false checkpoints from "
            f"{run / 'checkpoints'} with ptm, or transfer=lora for PEFT users."
        )
    config["base_model_name_or_path"] = cfg.init
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    head = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / "head.safetensors"))  # the task head PEFT's base model has no place for
    console.print(f"PEFT {config['peft_type']} adapter written to {out}")
    return out
