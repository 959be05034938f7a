"""Data for ``lorakit finetune``: the embedded VADER lexicon or a user's CSV / JSONL file.

The default task is regression on the VADER sentiment lexicon (Hutto & Gilbert, 2014),
shipped inside the ``vaderSentiment`` package: each line of ``vader_lexicon.txt`` is
``token TAB mean-valence TAB std TAB [ten human ratings]``, the mean valence in
[-4, 4]. A user's file has a text column and a label column; numeric labels with a
fractional part mean regression, anything else (strings, a few integer values)
classification, unless ``task`` says otherwise.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import FinetuneError

VADER = "vader"
MAX_CLASSES = 50  # more distinct integer labels than this reads as regression


@dataclass
class Dataset:
    texts: list[str]
    labels: list  # floats (regression) or class indices (classification)
    task: str  # "regression" | "classification"
    classes: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> Dataset:
        return Dataset([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                       self.task, self.classes, self.source)


def vader_path() -> Path:
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError("the default data set is the VADER lexicon of the vaderSentiment package: "
                            "pip install --no-deps vadersentiment, or pass --data FILE")
    return Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt"


def load_vader() -> Dataset:
    path = vader_path()
    texts, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"cannot read {path} ({exc}); reinstall vadersentiment") from None
    for n, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0]:
            continue
        try:
            labels.append(float(parts[1]))
        except ValueError:
            raise FinetuneError(f"{path}:{n}: mean valence {parts[1]!r} is not a number") from None
        texts.append(parts[0])
    return Dataset(texts, labels, "regression", None, VADER)


def _read_rows(path: Path) -> list[dict]:
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FinetuneError(f"data file {path} not found") from None
    except IsADirectoryError:
        raise FinetuneError(f"data file {path} is a folder; pass a .csv, .tsv or .jsonl file") from None
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise FinetuneError(f"cannot read data file {path} ({exc.strerror})") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FinetuneError(f"{path}:{n}: not a JSON object per line ({exc.msg}); "
                                    "the file must be JSON Lines") from None
            if not isinstance(row, dict):
                raise FinetuneError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    if suffix in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if suffix == ".tsv" else ","
        try:
            reader = csv.DictReader(raw.splitlines(), delimiter=delimiter, strict=True)
            rows = list(reader)
        except csv.Error as exc:
            raise FinetuneError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
        for n, row in enumerate(rows, 2):
            if None in row or None in row.values():  # more or fewer fields than the header
                raise FinetuneError(f"{path}:{n}: row has a different number of fields than the header")
        return rows
    raise FinetuneError(f"data file {path}: unknown format {suffix or '(no suffix)'!r}; use .csv, .tsv or .jsonl")


def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return math.isfinite(v)
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def load_table(path: str | Path, text_column: str = "text", label_column: str = "label",
               task: str = "auto") -> Dataset:
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise FinetuneError(f"data file {path} has no rows")
    columns = list(rows[0])
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in columns:
            raise FinetuneError(f"data file {path} has no column {col!r} (columns: {', '.join(map(str, columns))}); "
                                f"choose one with {flag}")
    texts, raw = [], []
    for n, row in enumerate(rows, 1):
        text, label = row.get(text_column), row.get(label_column)
        if text is None or label is None or (isinstance(label, str) and not label.strip()):
            raise FinetuneError(f"data file {path}, row {n}: missing {text_column!r} or {label_column!r}")
        texts.append(str(text))
        raw.append(label)
    numeric = all(_is_number(v) for v in raw)
    if task == "auto":
        values = [float(v) for v in raw] if numeric else []
        few_ints = numeric and all(v.is_integer() for v in values) and len(set(values)) <= MAX_CLASSES
        task = "regression" if numeric and not few_ints else "classification"
    if task == "regression":
        if not numeric:
            bad = next(v for v in raw if not _is_number(v))
            raise FinetuneError(f"data file {path}: label {bad!r} is not a number; regression needs "
                                "numeric labels (or use --task classification)")
        return Dataset(texts, [float(v) for v in raw], task, None, str(path))
    if task != "classification":
        raise FinetuneError(f"task {task!r}: choose auto, regression or classification")
    names = [_class_name(v) for v in raw]
    classes = sorted(set(names), key=_class_key)
    if len(classes) < 2:
        raise FinetuneError(f"data file {path}: column {label_column!r} has a single class; nothing to learn")
    index = {c: i for i, c in enumerate(classes)}
    return Dataset(texts, [index[c] for c in names], task, classes, str(path))


def _class_name(v) -> str:
    if _is_number(v) and float(v).is_integer():
        return str(int(float(v)))
    return str(v)


def _class_key(c: str):
    return (0, float(c), c) if _is_number(c) else (1, 0.0, c)


def load_data(data: str | None, text_column: str = "text", label_column: str = "label",
              task: str = "auto") -> Dataset:
    if data is None or data == VADER:
        if task == "classification":
            raise FinetuneError("the VADER lexicon is a regression task; drop --task or pass --data FILE")
        return load_vader()
    return load_table(data, text_column, label_column, task)


def split(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A fixed, seeded train/test split (``random.Random`` so it never changes with torch)."""
    if not 0 < test_fraction < 1:
        raise FinetuneError(f"--test-fraction {test_fraction}: must be between 0 and 1")
    idx = list(range(len(data)))
    random.Random(seed).shuffle(idx)
    n_test = max(2, round(len(idx) * test_fraction))
    if len(idx) - n_test < 2:
        raise FinetuneError(f"{data.source}: {len(idx)} rows are too few for a train/test split "
                            "(need at least 4)")
    return data.subset(sorted(idx[n_test:])), data.subset(sorted(idx[:n_test]))
