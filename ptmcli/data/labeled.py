"""Labelled data for fine-tuning: read records, deduplicate, split, and check labels.

Records are plain dicts of one of five shapes, by task kind:
  text-cls  {"id", "text", "label"}            pair-cls {"id", "text", "text_pair", "label"}
  token-cls {"id", "tokens", "tags"}           qa       {"id", "question", "context", "answers": {...}}
  text2text {"id", "text", "target"}
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import datasets
import numpy as np

from ptmcli.confdirs import config_dirs
from ptmcli.data.chinese import peoples_daily_ner, pickle_columns
from ptmcli.data.sources import FORMATS, extract_zip, hub_split, load_files, package_path
from ptmcli.errors import PtmError
from ptmcli.files import read_text, read_yaml
from ptmcli.runlog import console
from ptmcli.schema import LabeledDataConfig
from ptmcli.typecheck import check_section, did_you_mean

SPLITS = ("train", "validation", "test")


def _path(spec: str, key: str) -> Path:
    path = package_path(spec, key) if spec.startswith("pkg://") else Path(spec).expanduser()
    if not path.exists():
        raise PtmError(f"{key}='{spec}' does not exist. Check the path (pkg://package/path for files in a package).")
    return path


def read_text_file(path: Path, encoding: str = "auto", key: str = "data.train") -> str:
    """A text file in its byte-order mark's encoding, else the ones data.encoding lists (the BBC task files list
    utf-8,latin-1: the corpus has one Latin-1 file)."""
    return read_text(path, key, encoding)


def _missing(value) -> bool:
    """An empty cell: None (missing in JSON/parquet), NaN (pandas' empty CSV cell in a numeric column), blank."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _label_text(value) -> str:
    """A label as its name: integral numbers stay integers (a numeric column with a gap is read as floats)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def read_table(path: Path, cfg: LabeledDataConfig, key: str, kind: str) -> list[dict]:
    if path.suffix.lower() == ".zip":
        path = _only_table(extract_zip(path), key)
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".bz2", ".gz", ".xz") else path.suffix
    builder = FORMATS.get(suffix.split(".")[1] and "." + suffix.split(".")[1])
    if builder in (None, "text"):
        raise PtmError(
            f"{key}='{path}': a table must be .csv, .tsv, .json, .jsonl, .parquet (optionally .bz2/.gz) or .pkl."
        )
    kwargs = {"delimiter": "\t"} if ".tsv" in suffix else {}
    if builder == "pickle":
        ds = datasets.Dataset.from_dict(pickle_columns(path, cfg.pickle_columns))
    else:
        try:
            ds = load_files(builder, [str(path)], cfg.encoding, key, **kwargs)
        except PtmError as err:
            if "corresponds to no data" in str(err):
                return []  # a header and no rows: reported as an empty split
            raise
    return table_records(ds, cfg, key, kind, f"{key}='{path}'", path.name)


def table_records(
    ds: datasets.Dataset, cfg: LabeledDataConfig, key: str, kind: str, where: str, id_prefix: str
) -> list:
    """A table's rows as the task's records: its text (pair) and label (or target) columns, rows filtered, missing
    labels refused or dropped. `where` names the table in messages; record ids are `id_prefix:ROW` (a run's
    splits.json keeps them). A column of class labels (a hub dataset's ClassLabel) gives the classes' names."""
    text_columns = cfg.text_column.split("+")
    name = (lambda c: "data.text_column") if len(text_columns) == 1 else (lambda c: f"data.text_column ({c})")
    generate = kind == "text2text"
    answer = ("data.target_column", cfg.target_column) if generate else ("data.label_column", cfg.label_column)
    wanted = {name(c): c for c in text_columns} | dict([answer])
    pair = kind == "pair-cls"
    if pair:
        wanted["data.text_pair_column"] = cfg.text_pair_column or "text_pair"
    if cfg.filter_column:
        wanted["data.filter_column"] = cfg.filter_column
    for setting, column in wanted.items():
        if column not in ds.column_names:
            raise PtmError(
                f"{setting}='{column}' is not a column of {where}; its columns are "
                f"{', '.join(ds.column_names)}. Set {setting} to the right one."
            )
    classes = None if generate or cfg.index_labels else ds.features.get(cfg.label_column)
    classes = classes if isinstance(classes, datasets.ClassLabel) else None
    drop = set(cfg.filter_values)
    records, unlabeled = [], []
    for i, row in enumerate(ds):
        if cfg.filter_column and str(row[cfg.filter_column]) in drop:
            continue
        text = "\n".join(str(row[c]) for c in text_columns if row[c] is not None and str(row[c]).strip())
        if not text.strip():
            continue
        if generate:  # a row without a target has nothing to learn from (titles are missing in some corpora)
            target = " ".join(str(row[cfg.target_column] or "").split())
            if target:
                records.append({"id": f"{id_prefix}:{i}", "text": text, "target": target})
            continue
        label = row[cfg.label_column]
        if classes is not None and label is not None:  # -1: a split without labels (e.g. GLUE's test)
            label = classes.int2str(label) if label >= 0 else None
        if _missing(label):
            unlabeled.append(i + 1)
            continue
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if cfg.index_labels:
            if not isinstance(label, int) or not 0 <= label < len(cfg.index_labels):
                raise PtmError(
                    f"{where} row {i}: label {label!r} is not an index into data.index_labels={cfg.index_labels}."
                )
            label = cfg.index_labels[label]
        record = {"id": f"{id_prefix}:{i}", "text": text, "label": _label_text(label)}
        if pair:
            record["text_pair"] = str(row[wanted["data.text_pair_column"]] or "")
        records.append(record)
    if unlabeled and not cfg.drop_unlabeled:
        shown = ", ".join(map(str, unlabeled[:5])) + (" ..." if len(unlabeled) > 5 else "")
        raise PtmError(
            f"{where}: {len(unlabeled):,} row(s) have no label in data.label_column='{cfg.label_column}' "
            f"(rows {shown}, counting data rows from 1). A missing label is not a class: fill them in, or drop those "
            f"rows with data.drop_unlabeled=true."
        )
    if unlabeled:
        console.print(f"{key}: dropped {len(unlabeled):,} row(s) without a label (data.drop_unlabeled=true).")
    return records


def _only_table(folder: Path, key: str) -> Path:
    """The one table in an extracted zip."""
    tables = [p for p in sorted(folder.rglob("*")) if p.is_file() and FORMATS.get(p.suffix.lower(), "text") != "text"]
    if len(tables) != 1:
        names = ", ".join(p.name for p in tables) or "none"
        raise PtmError(f"{key}: the zip should hold exactly one table (csv/tsv/json(l)/parquet/pkl); it holds {names}.")
    return tables[0]


def read_folders(path: Path, encoding: str, key: str) -> list[dict]:
    """One sub-folder per label, one .txt document per file."""
    records = [
        {"id": f"{f.parent.name}/{f.name}", "text": read_text_file(f, encoding, key).strip(), "label": f.parent.name}
        for f in sorted(path.glob("*/*.txt"))
    ]
    if not records:
        raise PtmError(f"'{path}' has no LABEL/*.txt files; the folders loader wants one sub-folder per label.")
    return [r for r in records if r["text"]]


def read_lines(path: Path, encoding: str, key: str) -> list[dict]:
    """One LABEL.txt file per label, one text per line."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    records = [
        {"id": f"{f.name}:{n}", "text": line.strip(), "label": f.stem}
        for f in files
        for n, line in enumerate(read_text_file(f, encoding, key).splitlines(), 1)
        if line.strip()
    ]
    if len(files) < 2:
        raise PtmError(f"'{path}' should be a folder of LABEL.txt files (one per label, one text per line).")
    return records


def read_conll(path: Path, tag_column: int, encoding: str = "auto", key: str = "data.train") -> list[dict]:
    """Whitespace-separated columns, word first and the tag in `tag_column`; blank lines end sentences."""
    records, tokens, tags = [], [], []
    for n, line in enumerate(read_text_file(path, encoding, key).splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if tokens:
                records.append({"id": f"{path.name}:{len(records)}", "tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        if len(parts) < 2:
            raise PtmError(f"{path}:{n}: a CoNLL line needs a word and a tag column, got {line!r}.")
        tokens.append(parts[0])
        tags.append(parts[tag_column])
    if tokens:
        records.append({"id": f"{path.name}:{len(records)}", "tokens": tokens, "tags": tags})
    return records


def read_squad(path: Path, encoding: str, key: str) -> list[dict]:
    try:
        data = json.loads(read_text_file(path, encoding, key))["data"]
    except (ValueError, KeyError) as err:
        raise PtmError(f"'{path}' is not SQuAD-format JSON (a top-level 'data' list of paragraphs): {err}") from err
    return [
        {
            "id": qa["id"],
            "question": qa["question"],
            "context": paragraph["context"],
            "answers": {
                "text": [a["text"] for a in qa["answers"]],
                "answer_start": [a["answer_start"] for a in qa["answers"]],
            },
        }
        for article in data
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


def bbc_pairs(articles: list[dict], seed: int) -> list[dict]:
    """Derived pair task: (headline, body) of the same article -> "match"; the headline with the body of another
    article -> "mismatch". Built within one split, so no body crosses splits."""
    rng = np.random.default_rng(seed)
    heads_bodies = [(a["id"], *(a["text"].split("\n", 1) + [""])[:2]) for a in articles]
    heads_bodies = [(i, h.strip(), b.strip()) for i, h, b in heads_bodies if h.strip() and b.strip()]
    pairs = []
    for k, (doc_id, head, body) in enumerate(heads_bodies):
        other = (k + 1 + int(rng.integers(0, len(heads_bodies) - 1))) % len(heads_bodies)
        pairs.append({"id": f"{doc_id}+", "text": head, "text_pair": body, "label": "match"})
        pairs.append({"id": f"{doc_id}-", "text": head, "text_pair": heads_bodies[other][2], "label": "mismatch"})
    return pairs


_QUESTIONS = {
    "ORG": "Which organization is mentioned?",
    "PER": "Which person is mentioned?",
    "LOC": "Which location is mentioned?",
}


def headlines(articles: list[dict]) -> list[dict]:
    """Derived generation task: an article's body -> its headline (the first line of each BBC file)."""
    out = []
    for a in articles:
        headline, _, body = a["text"].strip().partition("\n")
        if headline.strip() and body.strip():
            out.append({"id": a["id"], "text": " ".join(body.split()), "target": headline.strip()})
    return out


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) word spans of BIO/IOB tags, conlleval-style: an I- after O or another type starts one."""
    spans, current = [], None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        if current and (prefix in ("B", "O") or kind != current[0] or tag == "O"):
            spans.append((current[0], current[1], i - 1))
            current = None
        if prefix in ("B", "I") and current is None:
            current = (kind, i)
    return spans


def conll_qa(sentences: list[dict]) -> list[dict]:
    """Derived QA task: for each sentence and entity type present, ask for that type; the answer is the first
    entity of the type, located by character offset in the space-joined sentence."""
    out = []
    for s in sentences:
        starts = np.cumsum([0] + [len(t) + 1 for t in s["tokens"]])
        context = " ".join(s["tokens"])
        seen = set()
        for kind, first, last in entity_spans(s["tags"]):
            if kind in _QUESTIONS and kind not in seen:
                seen.add(kind)
                text = " ".join(s["tokens"][first : last + 1])
                out.append(
                    {
                        "id": f"{s['id']}:{kind}",
                        "question": _QUESTIONS[kind],
                        "context": context,
                        "answers": {"text": [text], "answer_start": [int(starts[first])]},
                    }
                )
    return out


def _read(spec: str, key: str, cfg: LabeledDataConfig, kind: str) -> list[dict]:
    if spec.startswith("hf:"):
        if cfg.loader != "table":
            raise PtmError(
                f"{key}={spec}: a hub dataset is read as a table (data.loader=table: text, label or target columns); "
                f"this task's loader is {cfg.loader}. Download the data in its format and give its path."
            )
        split = key.removeprefix("data.")  # data.train reads the train split, unless the spec says @SPLIT
        return table_records(hub_split(spec, key, split), cfg, key, kind, f"{key}={spec}", spec)
    path = _path(spec, key)
    if cfg.loader == "table":
        records = read_table(path, cfg, key, kind)
    elif cfg.loader in ("folders", "bbc-pairs", "bbc-headlines"):
        records = read_folders(path, cfg.encoding, key)
    elif cfg.loader == "lines":
        records = read_lines(path, cfg.encoding, key)
    elif cfg.loader == "peoples-daily":
        records = peoples_daily_ner(path)
    elif cfg.loader in ("conll", "conll-qa"):
        records = read_conll(path, cfg.tag_column, cfg.encoding, key)
    else:
        records = read_squad(path, cfg.encoding, key)
    return records


def _text_key(record: dict) -> str:
    """What makes two records the same text. A multi-line text is keyed by its body without the first line:
    BBC News repeats some stories under a reworded headline, and those must not straddle train and test."""
    text = str(record.get("text", ""))
    lines = text.strip().split("\n", 1)
    body = lines[1] if len(lines) == 2 and lines[1].strip() else text
    rest = " ".join(str(record.get(k, "")) for k in ("text_pair", "tokens", "question", "context"))
    return re.sub(r"\s+", " ", f"{body} {rest}").strip().lower()


def load_splits(cfg: LabeledDataConfig, kind: str) -> dict[str, list[dict]]:
    """train/validation/test records. Missing splits are held out of train (seeded) after deduplication, so no
    test text is also a training text."""
    given = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    splits = {name: _read(spec, f"data.{name}", cfg, kind) for name, spec in given.items() if spec}
    if cfg.deduplicate:
        held = {_text_key(r) for name in ("validation", "test") for r in splits.get(name, [])}
        unique: dict[str, dict] = {}
        for r in splits["train"]:
            unique.setdefault(_text_key(r), r)
        splits["train"] = [r for k, r in unique.items() if k not in held]
    missing = [name for name in ("validation", "test") if name not in splits]
    if missing:
        order = np.random.default_rng(cfg.split_seed).permutation(len(splits["train"]))
        pool = [splits["train"][i] for i in order]
        fractions = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
        for name in missing:
            n = max(1, round(len(pool) * fractions[name])) if len(pool) > 2 else 0
            splits[name], pool = pool[:n], pool[n:]
        splits["train"] = sorted(pool, key=lambda r: r["id"])
    if cfg.loader == "bbc-pairs":
        splits = {name: bbc_pairs(records, cfg.split_seed + i) for i, (name, records) in enumerate(splits.items())}
    if cfg.loader == "conll-qa":
        splits = {name: conll_qa(records) for name, records in splits.items()}
    if cfg.loader == "bbc-headlines":
        splits = {name: headlines(records) for name, records in splits.items()}
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(splits["train"]):
        keep = np.random.default_rng(cfg.split_seed).permutation(len(splits["train"]))[: cfg.max_train_samples]
        splits["train"] = [splits["train"][i] for i in sorted(keep)]  # a seeded sample, not the first rows
    for name in SPLITS:
        if not splits.get(name):
            raise PtmError(
                f"The {name} split of data '{cfg.name}' is empty (from {given[name] or 'data.train'}). "
                f"Check the file, or the held-out fractions data.validation_fraction / data.test_fraction."
            )
    return splits


def label_names(splits: dict[str, list[dict]], kind: str, given: list[str] | None, data_name: str) -> list[str]:
    """The label vocabulary (given, or sorted from train), after checking every split uses only those labels."""

    def labels_of(records):
        if kind == "token-cls":
            return {t for r in records for t in r["tags"]}
        return {r["label"] for r in records} if kind not in ("qa", "text2text") else set()

    names = list(given) if given else sorted(labels_of(splits.get("train", [])))  # evaluate passes one split
    if kind == "token-cls" and "O" in names:
        names = ["O", *[n for n in names if n != "O"]]
    for split, records in splits.items():
        unknown = labels_of(records) - set(names)
        if unknown:
            raise PtmError(
                f"The {split} split of data '{data_name}' has label(s) {sorted(unknown)} that are not among "
                f"the known labels {names}. Fix the data, or list every label in task.labels."
            )
    return names


def input_texts(record: dict) -> list[str]:
    """What a model reads of a record, without its label, tags, answer or target: a pair gives two texts."""
    if "tokens" in record:
        return [" ".join(record["tokens"])]
    if "context" in record:
        return [record["context"]]
    return [str(record[k]) for k in ("text", "text_pair") if record.get(k)]


def task_texts(spec: str) -> list[str]:
    """data.source=task:NAME (conf/task/NAME.yaml) or task:PATH.yaml for pretraining: the distinct input texts of
    that task's training split. Labels, targets and the validation/test texts stay out, so task-adaptive
    pretraining (Gururangan et al., 2020) never sees what fine-tuning is scored on."""
    name = spec.removeprefix("task:")
    tasks = config_dirs()[0] / "task"
    path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) else tasks / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in tasks.glob("*.yaml"))
        raise PtmError(
            f"data.source={spec}: there is no task '{name}'.{did_you_mean(name, known)} Tasks: {', '.join(known)}; "
            f"or give task:path/to/task.yaml."
        )
    task_file = read_yaml(path, "data.source") or {}
    data = task_file.get("data") or {}
    if data.get("train") in (None, "", "???"):
        raise PtmError(
            f"data.source={spec}: {path} names no training data (data.train). Point data.source at your "
            f"texts directly instead."
        )
    kind = (task_file.get("task") or {}).get("kind", "text-cls")
    records = load_splits(check_section("data", data, LabeledDataConfig), kind)["train"]
    return list(dict.fromkeys(t for r in records for t in input_texts(r) if t.strip()))
