"""Token directories: packed pretraining sequences in memory-mapped files, written once by `ptm prepare` and read
by every run with `data.tokens=DIR`.

A directory holds `manifest.json` (what it was made from and how), `tokenizer.json`, and per split (`train/`,
`val/`) flat binary arrays:

    ids.bin        every sequence's token ids, one after another (uint16 when the vocabulary fits, else uint32)
    starts.bin     1 where a token begins a word (uint8), for whole-word masking
    offsets.bin    where sequence i starts in ids.bin (int64, sequences + 1 entries)
    doc.bin        the document each sequence came from (int64)
    sent_lens.bin  sentence lengths within each sequence (uint32; the `sentences` layout for NSP only), with
    sent_offsets.bin  where sequence i's lengths start (int64)

Training maps these files instead of reading them, so a run's memory does not grow with the corpus: the page
cache holds what is being read. Rows come back exactly as `build_chunks`'s dataset gives them (lists of ints),
so the examples, and therefore every batch, are the same as from the in-memory path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from ptmcli.data.tokenizer import tokenizer_digest
from ptmcli.errors import PtmError

if TYPE_CHECKING:  # training from a token directory never loads datasets (nor pandas, pyarrow)
    import datasets

FORMAT = "ptm-tokens"
VERSION = 1
SPLITS = ("train", "val")


def _ids_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_split(chunks: datasets.Dataset, folder: Path, dtype: str, with_sentences: bool) -> dict:
    """Stream `chunks` (build_chunks' rows) into `folder`'s arrays a thousand rows at a time."""
    folder.mkdir(parents=True)
    names = ["ids", "starts", "offsets", "doc", *(["sent_lens", "sent_offsets"] if with_sentences else [])]
    files = {name: open(folder / f"{name}.bin", "wb") for name in names}
    tokens = sentences = 0
    try:
        np.zeros(1, np.int64).tofile(files["offsets"])
        if with_sentences:
            np.zeros(1, np.int64).tofile(files["sent_offsets"])
        for batch in chunks.iter(batch_size=1000):
            lengths = np.fromiter((len(r) for r in batch["ids"]), np.int64, len(batch["ids"]))
            if len(lengths) == 0:
                continue
            np.concatenate(batch["ids"]).astype(dtype).tofile(files["ids"])
            np.concatenate(batch["starts"]).astype(np.uint8).tofile(files["starts"])
            (tokens + np.cumsum(lengths)).tofile(files["offsets"])
            np.asarray(batch["doc"], np.int64).tofile(files["doc"])
            tokens += int(lengths.sum())
            if with_sentences:
                counts = np.fromiter((len(s) for s in batch["sent_lens"]), np.int64, len(lengths))
                np.concatenate(batch["sent_lens"]).astype(np.uint32).tofile(files["sent_lens"])
                (sentences + np.cumsum(counts)).tofile(files["sent_offsets"])
                sentences += int(counts.sum())
    finally:
        for f in files.values():
            f.close()
    return {"sequences": len(chunks), "tokens": tokens}


def write(
    output: Path,
    tokenizer: Tokenizer,
    chunks: dict[str, datasets.Dataset],
    documents: dict[str, int],
    layout: str,
    max_seq_len: int,
    source: dict,
) -> dict:
    """Write a token directory at `output` (which must not exist) and return its manifest. Everything goes into a
    temporary sibling first and is renamed into place at the end, so a directory that exists is complete."""
    if output.exists() and any(output.iterdir()):
        raise PtmError(
            f"output='{output}' exists and is not empty; a token directory is written once. Choose a new "
            f"directory, or remove that one to prepare it again."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dtype = _ids_dtype(tokenizer.get_vocab_size())
        splits = {}
        for split in SPLITS:
            written = write_split(chunks[split], tmp / split, dtype, layout == "sentences")
            splits[split] = {**written, "documents": documents[split]}
        tokenizer.save(str(tmp / "tokenizer.json"))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "layout": layout,
            "max_seq_len": max_seq_len,
            "ids_dtype": dtype,
            "vocab_size": tokenizer.get_vocab_size(),
            "tokenizer_digest": tokenizer_digest(tokenizer),
            "source": source,
            "splits": splits,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if output.exists():
            output.rmdir()  # empty: checked above
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise PtmError(
            f"data.tokens='{directory}' is {'a file' if directory.is_file() else 'a directory'}, not a token directory "
            f"(no manifest.json). Write one with `ptm prepare conf=RECIPE [data overrides] output=tokens/NAME`."
        ) from None
    except (OSError, ValueError) as err:
        raise PtmError(f"data.tokens='{directory}': manifest.json could not be read ({err}).") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PtmError(
            f"data.tokens='{directory}': manifest.json is not a version-{VERSION} ptm token directory; prepare it "
            f"again with this ptm (`ptm prepare ... output=DIR`)."
        )
    return manifest


def check(directory: Path, manifest: dict, layout: str, max_seq_len: int, objective: str) -> None:
    """Refuse a token directory packed for another layout or sequence length than the run's."""
    if manifest["max_seq_len"] != max_seq_len:
        raise PtmError(
            f"data.tokens='{directory}' holds sequences of <= {manifest['max_seq_len']} tokens and this run has "
            f"data.max_seq_len={max_seq_len}. Set data.max_seq_len={manifest['max_seq_len']}, or prepare a "
            f"directory with data.max_seq_len={max_seq_len}."
        )
    if manifest["layout"] != layout:
        raise PtmError(
            f"data.tokens='{directory}' is packed as '{manifest['layout']}' and objective={objective} needs "
            f"'{layout}'. Prepare a directory with this recipe's objective (`ptm prepare conf=RECIPE ...`)."
        )


def check_tokenizer(directory: Path, manifest: dict, tokenizer: Tokenizer, whose: str) -> None:
    """The run's tokenizer (data.tokenizer, or init's) must be the one the ids were made with."""
    if tokenizer_digest(tokenizer) != manifest["tokenizer_digest"]:
        raise PtmError(
            f"data.tokens='{directory}' was tokenized with another tokenizer than {whose} "
            f"({manifest['vocab_size']:,} vs {tokenizer.get_vocab_size():,} tokens, or the same size with other "
            f"entries). Prepare the directory with that tokenizer (`ptm prepare ... data.tokenizer=...` or "
            f"init=...), or drop {whose.split(' ')[0]}."
        )


def _array(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenBlocks:
    """One split of a token directory, indexed like build_chunks' dataset: `blocks[i]` is a row, `blocks[[i, j]]`
    a dict of columns."""

    def __init__(self, folder: Path, ids_dtype: str, layout: str):
        self.ids = _array(folder / "ids.bin", ids_dtype)
        self.starts = _array(folder / "starts.bin", "uint8")
        self.offsets = _array(folder / "offsets.bin", "int64")
        self.doc = _array(folder / "doc.bin", "int64")
        self.sentences = layout == "sentences"
        if self.sentences:
            self.sent_lens = _array(folder / "sent_lens.bin", "uint32")
            self.sent_offsets = _array(folder / "sent_offsets.bin", "int64")
        if len(self.offsets) != len(self.doc) + 1 or (len(self.offsets) and self.offsets[-1] != len(self.ids)):
            raise PtmError(f"token directory split '{folder}' is damaged (its arrays disagree); prepare it again.")

    def __len__(self) -> int:
        return len(self.doc)

    def _row(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.sentences:
            lens = self.sent_lens[int(self.sent_offsets[i]) : int(self.sent_offsets[i + 1])].tolist()
        else:
            lens = [end - start]
        return {
            "ids": self.ids[start:end].tolist(),
            "sent_lens": lens,
            "starts": self.starts[start:end].tolist(),
            "doc": int(self.doc[i]),
        }

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._row(int(index))
        rows = [self._row(int(i)) for i in index]
        return {key: [r[key] for r in rows] for key in ("ids", "sent_lens", "starts", "doc")}


def open_splits(directory: Path, manifest: dict) -> tuple[Tokenizer, dict[str, TokenBlocks]]:
    try:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as err:
        raise PtmError(f"data.tokens='{directory}': tokenizer.json could not be read ({err}).") from err
    try:
        splits = {s: TokenBlocks(directory / s, manifest["ids_dtype"], manifest["layout"]) for s in SPLITS}
    except (OSError, ValueError) as err:  # a missing array, or one cut short of a whole element
        raise PtmError(f"data.tokens='{directory}' is damaged ({err}); prepare it again.") from err
    return tokenizer, splits
