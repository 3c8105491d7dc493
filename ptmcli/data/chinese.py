"""Chinese text: pickles read without running code, People's Daily NER derived from POS tags, jieba words.

The inews corpus ships as pickles. `pickle.load` runs whatever a file names, so ours refuses every global:
only plain containers, strings and numbers can come out of it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from ptmcli.errors import PtmError


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def safe_unpickle(path: Path):
    """The object pickled in `path`, provided it is built only of lists, tuples, dicts, str, int, float, None."""
    try:
        return _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise PtmError(
            f"'{path}' is a pickle that refers to code ({err}); ptm only reads pickles of plain lists, "
            f"strings and numbers, since loading anything else would run code from the file."
        ) from err
    except Exception as err:
        raise PtmError(f"'{path}' could not be read as a pickle: {err}") from err


def pickle_columns(path: Path, names: list[str]) -> dict[str, list]:
    """A pickled dict of lists, or a tuple of equal-length lists named by `names`, as {column: values}."""
    obj = safe_unpickle(path)
    if isinstance(obj, dict):
        return {str(k): list(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(c, (list, tuple)) for c in obj):
        if len(names) != len(obj):
            raise PtmError(
                f"'{path}' holds a tuple of {len(obj)} columns; name them with data.pickle_columns "
                f"(a list of {len(obj)} names, e.g. [title, text, label])."
            )
        if len({len(c) for c in obj}) != 1:
            raise PtmError(f"'{path}': the pickled columns have different lengths {[len(c) for c in obj]}.")
        return {name: list(column) for name, column in zip(names, obj)}
    raise PtmError(f"'{path}' holds a {type(obj).__name__}; ptm reads pickled dicts of lists or tuples of lists.")


# People's Daily POS tags -> entity types. Person names are tagged per part (surname/nr given-name/nr),
# so consecutive nr words form one person.
ENTITY_TAGS = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


def peoples_daily_ner(path: Path) -> list[dict]:
    """Character-level BIO tags (PER/LOC/ORG) derived from the nr/ns/nt tags of the POS-tagged corpus:
    one record per line, tokens = characters."""
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        chars, tags, previous = [], [], None
        for item in line.split():
            word, _, pos = item.rpartition("/")
            if not word:
                continue
            entity = ENTITY_TAGS.get(pos)
            continues = entity is not None and entity == previous == "PER"
            for i, ch in enumerate(word):
                chars.append(ch)
                tags.append("O" if entity is None else ("I-" if i or continues else "B-") + entity)
            previous = entity
        if chars:
            records.append({"id": f"{Path(path).name}:{n}", "tokens": chars, "tags": tags})
    return records


def jieba_word_ids(text: str) -> list[int]:
    """For every character of `text`, the index of the jieba word it belongs to."""
    try:
        import jieba
    except ImportError as err:
        raise PtmError(
            "data.word_segmenter=jieba needs the jieba package: `pip install jieba` (or `pip install ptmcli[zh]`)."
        ) from err
    jieba.setLogLevel(60)  # jieba prints its dictionary loading to stderr otherwise
    out = [0] * len(text)
    for k, (_word, start, end) in enumerate(jieba.tokenize(text)):
        out[start:end] = [k] * (end - start)
    return out
