"""`ptm generate`: continue prompts with a causal LM pretraining run, or write outputs with a text-to-text
fine-tuning run (e.g. headlines for articles), from the run's own config, tokenizer and checkpoint."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ptmcli import checkpoint, hardware, runfiles
from ptmcli.data.tokenizer import SpecialIds
from ptmcli.distributed import Dist
from ptmcli.errors import PtmError
from ptmcli.files import replaced_whole
from ptmcli.generation import Sampling, generate
from ptmcli.models import PRETRAINING_MODELS
from ptmcli.runlog import console
from ptmcli.schema import check_pretrain


def load_causal_lm(run: Path, checkpoint_name: str | None = None):
    """(model in eval mode, tokenizer, hardware) of a pretraining run whose model decodes (has a KV cache)."""
    raw = runfiles.config(run)
    if not runfiles.is_pretraining(raw):
        raise PtmError(f"run='{run}' is a fine-tuning run; ptm generate continues text with a pretrained causal LM.")
    cfg = check_pretrain(raw)
    if cfg.objective.name != "clm":
        writes = cfg.model.family in ("t5", "bart")  # an encoder-decoder writes text once fine-tuned to do so
        then = (
            f" or a text-to-text run fine-tuned from this one (ptm finetune task=headline-gen init={run})"
            if writes
            else ", or a t5/bart run fine-tuned to write text (task.kind=text2text or transfer=text-to-text)"
        )
        raise PtmError(
            f"run='{run}' pretrained {cfg.model.family} with objective={cfg.objective.name}; ptm generate needs a "
            f"causal LM (a gpt pretraining run, objective=clm){then}."
        )
    root = run / "checkpoints"
    path = (root / checkpoint_name) if checkpoint_name else (root / "best" if (root / "best").exists() else None)
    path = path or checkpoint.latest(root)
    if path is None or not (path / checkpoint.MARKER).exists():
        raise PtmError(f"run='{run}' has no complete checkpoint{' ' + checkpoint_name if checkpoint_name else ''}.")
    tokenizer = runfiles.tokenizer(run)
    model = PRETRAINING_MODELS[cfg.model.family](cfg.model, tokenizer.get_vocab_size(), cfg.objective)
    checkpoint.load_weights(path.resolve(), model)
    hw = hardware.resolve(cfg.hardware, Dist())
    return model.to(hw.device).eval(), tokenizer, hw


def continue_texts(model, tokenizer: Tokenizer, prompts: list[str], cfg: Sampling, hw) -> list[str]:
    """Each prompt, continued. A prompt starts after the end token, as every document did in training."""
    end = SpecialIds.of(tokenizer).sep

    def step(ids: torch.Tensor, cache):
        with hw.autocast():
            return model(ids, cache=cache)[:, -1].float()

    # The model sees max_positions tokens: the end token, the prompt, the new ones. A longer prompt keeps its last
    # tokens (what the continuation follows), leaving room for max_new_tokens, or for all but one position.
    positions = model.max_positions
    room = min(cfg.max_new_tokens, positions - 2)
    if room < cfg.max_new_tokens:
        console.print(f"max_new_tokens={cfg.max_new_tokens}: the model has {positions} positions; at most {room} new.")
    out, cut = [], []
    for number, prompt in enumerate(prompts, 1):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        if len(prompt_ids) > positions - 1 - room:
            cut.append(f"{number} ({len(prompt_ids):,} tokens)")
            prompt_ids = prompt_ids[len(prompt_ids) - (positions - 1 - room) :]
        ids = torch.tensor([[end, *prompt_ids]], device=hw.device)
        new = generate(step, model.new_cache, ids, cfg, stop_id=end, max_length=positions)
        tokens = [t for t in new[0].tolist() if t != end]
        out.append(prompt + tokenizer.decode(tokens, skip_special_tokens=True))
    if cut:
        console.print(
            f"prompt {', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''}: longer than the model's {positions} "
            f"positions leave room for; each was continued from its last {positions - 1 - room} token(s)."
        )
    return out


def write_texts(run: Path, inputs: list[str], settings: dict, checkpoint_name: str | None) -> list[str]:
    """Outputs of a text-to-text fine-tuning run for `inputs` (its task prefix and truncation apply), decoded as
    its validation decoded except for the given `settings`."""
    from ptmcli.inference import load_run
    from ptmcli.loop import to_device
    from ptmcli.tasks.text2text import TextToText

    run_cfg, task, model, _labels, hw, _ckpt = load_run(run, checkpoint_name)
    if not isinstance(task, TextToText):
        raise PtmError(
            f"run='{run}' fine-tuned a {run_cfg.task.kind} head, which does not write text; use ptm predict, or "
            f"generate with a text-to-text run (t5/bart with task.kind=text2text or transfer=text-to-text)."
        )
    base = task.sampling
    if not settings.get("greedy", True) or {"temperature", "top_k", "top_p"} & settings.keys():
        base = dataclasses.replace(base, greedy=False, num_beams=1)  # sampling settings ask for sampling, not beams
    cfg = checked(dataclasses.replace(base, **settings))
    examples = task.examples([{"id": str(i), "text": t} for i, t in enumerate(inputs)])
    out = []
    for start, stop in examples.eval_ranges(run_cfg.trainer.batch_size):
        batch = to_device(examples.batch(list(range(start, stop)), 0), hw.device)
        with hw.autocast():
            out.extend(task.generate(model, batch, cfg))
    return out


def checked(cfg: Sampling) -> Sampling:
    problems = cfg.check()
    if problems:
        raise PtmError("ptm generate: " + "; ".join(problems) + ".")
    return cfg


def generate_run(run: Path, prompts: list[str], settings: dict, output: str | None, checkpoint_name: str | None):
    """`settings`: the Sampling fields the user gave; the rest default to Sampling's, or a text-to-text run's task."""
    if (run / "labels.json").exists():  # a fine-tuning run: it writes outputs for inputs
        texts = write_texts(run, prompts, settings, checkpoint_name)
    else:
        cfg = checked(Sampling(**settings))
        if cfg.num_beams > 1:
            raise PtmError("num_beams applies to text-to-text runs; a causal LM continues by sampling or greedy.")
        model, tokenizer, hw = load_causal_lm(run, checkpoint_name)
        texts = continue_texts(model, tokenizer, prompts, cfg, hw)
    if output:
        with replaced_whole(Path(output), "output") as f:
            for prompt, text in zip(prompts, texts):
                f.write(json.dumps({"prompt": prompt, "text": text}, ensure_ascii=False) + "\n")
        console.print(f"{len(texts)} continuation(s) written to {output}")
    else:
        for text in texts:
            sys.stdout.write(text + "\n\n")
    return texts
