"""Valid ranges of numeric settings, by key name: a name means the same in every section (model.dropout and
transfer.dropout are both probabilities). Checked at start with the types, so no bad value reaches torch."""

from __future__ import annotations

import dataclasses
from typing import Any

from ptmcli.errors import PtmError

_BY_BOUNDS = {
    ">= 1": "hidden_size num_layers num_heads intermediate_size max_positions embedding_size generator_hidden_size "
    "generator_intermediate_size generator_num_heads num_decoder_layers relative_buckets relative_max_distance "
    "bottleneck projection_hidden num_virtual_tokens r init_r target_r delta_t batch_size grad_accum max_steps "
    "log_every max_train_samples num_proc max_answer_len max_target_len num_beams vocab_size mean_span_length",
    ">= 0": "eval_every eval_batches save_every keep_last patience threads warmup_steps doc_stride lead_words "
    "no_repeat_ngram_size min_frequency freeze_layers position_offset type_vocab_size weight_decay orth_reg_weight "
    "class_weights",
    "> 0": "lr eps layer_norm_eps init_std alpha epochs max_grad_norm rtd_weight sampling_temperature poisson_lambda "
    "layer_lr_decay",
    "[0, 1)": "dropout attention_dropout classifier_dropout warmup_ratio beta1 beta2 betas",
    "(0, 1)": "mask_prob noise_density mask_ratio validation_fraction test_fraction",
    "[0, 1]": "mask_token_prob random_token_prob nsp_random_prob full_target_fraction min_lr_ratio tinit tfinal",
    ">= 8": "max_seq_len",
    ">= 2": "plm_k",
}
RANGES = {name: bounds for bounds, names in _BY_BOUNDS.items() for name in names.split()}


def _in_range(value: float, bounds: str) -> bool:
    if bounds.startswith((">", "<")):
        op, _, limit = bounds.partition(" ")
        return {">=": value >= float(limit), ">": value > float(limit)}[op]
    low, high = (float(x) for x in bounds[1:-1].split(","))
    return (low <= value if bounds[0] == "[" else low < value) and (
        value <= high if bounds[-1] == "]" else value < high
    )


def check_ranges(name: str, section: Any) -> None:
    """Every numeric key of a built section lies in its valid range (RANGES)."""
    for f in dataclasses.fields(section):
        bounds, value = RANGES.get(f.name), getattr(section, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if bounds and isinstance(v, (int, float)) and not isinstance(v, bool) and not _in_range(v, bounds):
                shown = "must be " + (f"{bounds}" if bounds[0] in "><" else f"in {bounds}")
                raise PtmError(
                    f"{name}.{f.name}={value} is out of range: it {shown}"
                    + (f" ({f.metadata['help']})." if f.metadata.get("help") else ".")
                )
