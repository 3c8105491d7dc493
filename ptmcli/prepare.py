"""`ptm prepare conf=RECIPE [overrides] output=DIR`: read, tokenize and pack a pretraining corpus once into a token
directory (see data.token_dir), which any number of runs then train from with `data.tokens=DIR`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ptmcli.compose import checked, parse
from ptmcli.errors import PtmError
from ptmcli.preflight import check_paths
from ptmcli.runlog import console


def prepare(args: list[str]) -> None:
    outputs = [a.partition("=")[2] for a in args if a.startswith("output=")]
    if len(outputs) != 1 or not outputs[0]:
        raise PtmError(
            "ptm prepare needs one output=DIR, the token directory to write, e.g. "
            "ptm prepare conf=gpt-mini data=files data.source=corpus/ output=tokens/gpt-mini."
        )
    output = Path(outputs[0]).expanduser()
    _, cfg = checked(parse("pretrain", [a for a in args if not a.startswith("output=")]))
    if cfg.data.tokens:
        raise PtmError(f"ptm prepare reads data.source; data.tokens={cfg.data.tokens} is already prepared. Drop it.")
    if output.is_file():
        raise PtmError(f"output='{output}' is a file; give the directory to write the token directory into.")
    if output.exists() and any(output.iterdir()):  # before minutes of work, not after
        raise PtmError(f"output='{output}' exists and is not empty; choose a new directory or remove that one.")
    check_paths(cfg)

    import datasets

    from ptmcli.data import corpus_cache, token_dir
    from ptmcli.distributed import Dist
    from ptmcli.pretrain import LAYOUT, prepare_chunks

    datasets.disable_progress_bars()  # the counted steps switch them on for themselves
    started = time.perf_counter()
    tokenizer = None
    if cfg.init:  # the ids must be those of the tokenizer init's weights were trained with
        from ptmcli.weights import load_pretrained

        tokenizer = load_pretrained(cfg.init).tokenizer
    corpus = prepare_chunks(cfg, Dist(), tokenizer)
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in corpus_cache.RUN_ONLY}
    layout = LAYOUT[cfg.objective.name]
    with console.status(f"[bold]writing {output}[/]…"):
        manifest = token_dir.write(
            output,
            corpus.tokenizer,
            corpus.chunks,
            corpus.documents,
            layout,
            cfg.data.max_seq_len,
            {"fingerprint": corpus.fingerprint, "init": cfg.init, "data": data},
        )
    splits = manifest["splits"]
    console.print(
        f"[bold green]prepared[/] {output}: {splits['train']['sequences']:,} train / {splits['val']['sequences']:,} "
        f"val sequences of <= {cfg.data.max_seq_len} ({layout}; {splits['train']['tokens']:,} train tokens as "
        f"{manifest['ids_dtype']}), vocabulary {manifest['vocab_size']:,}, in {time.perf_counter() - started:.1f} s."
        f"\n  train from it: ptm pretrain conf=... data.tokens={output}",
        soft_wrap=True,
    )
