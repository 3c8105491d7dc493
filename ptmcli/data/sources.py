"""Turn `data.source` into a `datasets.Dataset` of documents with a single `text` column.

Accepted sources: a local file or directory (text, csv/tsv, json/jsonl, parquet, pickles of plain lists,
or a zip of those),
`pkg://package/relative/path` for files shipped inside an installed Python package,
`hf:NAME[:CONFIG][@SPLIT]` for a dataset on the Hugging Face hub (online use only), and `task:NAME` for the
training texts of a fine-tuning task (task-adaptive pretraining).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import zipfile
from pathlib import Path

import datasets

from ptmcli.data.chinese import pickle_columns
from ptmcli.errors import PtmError
from ptmcli.files import (  # noqa: F401 (re-exported)
    cache_root,
    decode,
    decoding_failure,
    exception_chain,
    file_encoding,
    first_bad_json_line,
    package_path,
)
from ptmcli.schema import DataConfig

FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".pkl": "pickle",
    ".pickle": "pickle",
}


def extract_zip(path: Path) -> Path:
    """Extract once into the cache (datasets treats zip:// chains as remote, which fails offline)."""
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "extracted" / digest
    if not (target / ".complete").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(path) as archive:
            archive.extractall(tmp)
        (tmp / ".complete").touch()
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


def data_files(path: Path, fmt: str) -> tuple[str, list[str]]:
    """(builder, files) for a file or a directory of files of one format."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in FORMATS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise PtmError(f"data.source directory '{path}' holds no {', '.join(sorted(FORMATS))} files.")
    builders = {FORMATS.get(p.suffix.lower()) for p in files} if fmt == "auto" else {fmt}
    if None in builders or len(builders) != 1:
        raise PtmError(
            f"data.source '{path}': cannot tell the format of {[p.name for p in files[:5]]}; "
            f"set data.format to one of text, csv, json, parquet, pickle."
        )
    return builders.pop(), [str(p) for p in files]


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """All documents of the source as a Dataset with one non-empty `text` column."""
    source = cfg.source
    if source.startswith("task:"):
        return task_documents(source)
    files: list[str] = []
    if source.startswith("hf:"):
        ds = hub_split(source, "data.source", "train")
    else:
        path = package_path(source) if source.startswith("pkg://") else Path(source).expanduser()
        if not path.exists():
            raise PtmError(f"data.source file '{source}' does not exist. Check the path, or pick data=news-en.")
        if path.suffix.lower() == ".zip":
            path = extract_zip(path)
        builder, files = data_files(path, cfg.format)
        kwargs = {}
        if builder == "pickle":
            ds = read_pickles(files, cfg.pickle_columns)
        elif builder == "text":
            kwargs["sample_by"] = cfg.text_sample_by
        elif builder == "csv" and files[0].endswith(".tsv"):
            kwargs["delimiter"] = "\t"
        if builder != "pickle":
            ds = load_files(builder, files, cfg.encoding, "data.source", **kwargs)
    columns = cfg.text_column.split("+")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        by_extension = {FORMATS.get(Path(f).suffix.lower()) for f in files} - {None}
        misread = (
            f" It was read as {cfg.format} (data.format={cfg.format}) where its name says "
            f"{'/'.join(sorted(by_extension))}: set data.format=auto."
            if cfg.format != "auto" and by_extension and cfg.format not in by_extension
            else ""
        )
        raise PtmError(
            f"data.text_column='{cfg.text_column}': {', '.join(missing)} is not a column of '{source}'; its columns "
            f"are {', '.join(ds.column_names)[:300]}. Set data.text_column to the one holding the text (a+b joins "
            f"two).{misread}"
        )
    column = cfg.text_column
    if len(columns) > 1:
        ds = ds.map(
            lambda b: {"text": ["\n".join(str(c) for c in row if c) for row in zip(*(b[k] for k in columns))]},
            batched=True,
            remove_columns=ds.column_names,
        )
        column = "text"
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise PtmError(f"data.source '{source}' has no non-empty text in column '{column}': the corpus is empty.")
    return ds


def hub_parts(spec: str) -> tuple[str, str | None, str | None]:
    """`hf:ID[:CONFIG][@SPLIT]` -> (ID, CONFIG, SPLIT); ID may have its owner (`hf:stanfordnlp/imdb`)."""
    rest, _, split = spec[3:].partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, split or None


def hub_split(spec: str, key: str, split: str) -> datasets.Dataset:
    """One split of hub dataset `spec` (`split`, unless the spec names its own with @SPLIT), fetched by datasets:
    online use, cached after the first time."""
    name, config, named_split = hub_parts(spec)
    try:
        with failures_unlogged():
            return datasets.load_dataset(name, config, split=named_split or split)
    except Exception as err:  # offline, an unknown name, config or split, a gated dataset, HTTP errors: many types
        raise PtmError(
            f"{key}={spec} could not be fetched from the Hugging Face hub ({type(err).__name__}: "
            f"{' '.join(str(err).split())}). Check the name (hf:NAME, hf:NAME:CONFIG, hf:NAME@SPLIT) and your "
            f"connection, or download the data and give its path."
        ) from err


@contextlib.contextmanager
def failures_unlogged():
    """datasets and huggingface_hub log a failed read or request before they raise; the PtmError that follows says
    it once, with the cause and the fix."""
    loggers = [logging.getLogger("datasets"), logging.getLogger("huggingface_hub")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def load_files(builder: str, files: list[str], encoding: str, key: str, **kwargs) -> datasets.Dataset:
    """datasets' reader `builder` over `files`, in the encoding their byte-order mark or data.encoding gives."""
    if builder in ("text", "csv", "json"):
        name = file_encoding(Path(files[0]), encoding, key)
        if name != "utf-8":  # the default: passing it would change datasets' cache key for no reason
            kwargs["encoding"] = name
    try:
        with failures_unlogged():
            return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as err:  # datasets raises many types; the user needs the file and the cause
        if decoding_failure(err) is not None:
            for file in files:  # find the file and byte at fault, and say so
                decode(Path(file).read_bytes(), Path(file), key, kwargs.get("encoding", encoding))
        where = files[0] if len(files) == 1 else Path(files[0]).parent
        cause = reading_failure(builder, files, kwargs.get("encoding", "utf-8"), err)
        raise PtmError(f"{key}='{where}' could not be read as {builder}: {cause}") from err


def reading_failure(builder: str, files: list[str], encoding: str, err: Exception) -> str:
    """What stopped datasets' reader, in the words of the reader's own error (datasets wraps it in a generic
    one), with the file and line at fault where datasets gives none."""
    if builder == "json":
        for file in (f for f in files if Path(f).suffix in (".json", ".jsonl")):  # not compressed
            bad = first_bad_json_line(Path(file), encoding)
            if bad is not None:
                return (
                    f"{file} {bad}. A .jsonl file holds one JSON object per line; a .json file one array of "
                    f"objects (or an object of columns)."
                )
    cause = str(list(exception_chain(err))[-1]).strip() or str(err)
    if builder == "csv" and "fields in line" in cause:  # pandas: "Expected 2 fields in line 52, saw 3"
        cause += ". A field holding the delimiter (or a line break) must be in double quotes."
    return cause


def task_documents(source: str) -> datasets.Dataset:
    """The training texts of a fine-tuning task (data.source=task:NAME), fingerprinted by content."""
    from ptmcli.data.labeled import task_texts  # labeled reads its files through this module

    texts = task_texts(source)
    ds = datasets.Dataset.from_dict({"text": texts})
    ds._fingerprint = hashlib.sha1("\0".join(texts).encode()).hexdigest()[:16]  # from_dict's is random
    return ds


def read_pickles(files: list[str], names: list[str]) -> datasets.Dataset:
    """Pickled columns of all files, concatenated, fingerprinted by file identity so later maps cache."""
    columns: dict[str, list] = {}
    digest = hashlib.sha1(repr(names).encode())
    for file in files:
        stat = Path(file).stat()
        digest.update(f"{Path(file).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        for name, values in pickle_columns(Path(file), names).items():
            columns.setdefault(name, []).extend("" if v is None else v for v in values)
    ds = datasets.Dataset.from_dict(columns)
    ds._fingerprint = digest.hexdigest()[:16]  # from_dict gives a random one, which would defeat the caches
    return ds


def split_documents(ds: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded document-level train/validation split; at least one document on each side."""
    if len(ds) < 2:
        raise PtmError(f"data.source '{cfg.source}' has {len(ds)} document; at least 2 are needed to hold one out.")
    n_val = min(len(ds) - 1, max(1, round(len(ds) * cfg.validation_fraction)))
    parts = ds.train_test_split(test_size=n_val, seed=cfg.split_seed, shuffle=True)
    train = parts["train"]
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    return train, parts["test"]
