"""Load a labeled text dataset (local file/folder or Hugging Face Hub), check it, map labels, split it."""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import lzma
import math
import os
from dataclasses import dataclass

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from .config import Config, strip_compression
from .errors import PipelineError, first_line, offline_reason
from .memory import release_heap

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_OPEN = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}  # to sniff a compressed file's first bytes


def file_format(cfg: Config) -> str | None:
    """csv | tsv | json | parquet for a local file (--dataset-format, else the extension, else sniffed from its
    first bytes); None for a folder or a Hub name."""
    path = cfg.dataset
    if cfg.dataset_format != "auto":
        return cfg.dataset_format
    base, _ = strip_compression(path)
    fmt = _FORMATS.get(os.path.splitext(base)[1].lower())
    if fmt is None and os.path.isfile(path):
        fmt = _sniff(path)
    return fmt


def _sniff(path: str) -> str:
    """The format of a file with a .txt or unknown extension: parquet by its magic bytes, JSON (lines) by a leading
    { or [, else tab- or comma-separated by its header line."""
    _, compression = strip_compression(path)
    try:
        with _OPEN.get(compression, open)(path, "rb") as fh:
            head = fh.read(1 << 16)
    except (OSError, EOFError) as e:
        raise PipelineError(f"cannot read dataset {path!r}: {e}") from None
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \r\n\t")
    if text.startswith(("{", "[")):
        return "json"
    header = text.split("\n", 1)[0]
    if "\t" in header:
        return "tsv"
    if "," in header:
        return "csv"
    raise PipelineError(
        f"cannot tell the format of dataset file {path!r}: its first line {header[:80]!r} is neither tab- nor "
        f"comma-separated with a header, nor JSON lines, nor parquet. Pass --dataset-format csv|tsv|json|parquet "
        f"(csv and tsv need a header line naming the columns).")


def load_source(cfg: Config) -> datasets.Dataset:
    """The split `cfg.split` (slicing allowed, e.g. "train[:10000]") of a local file, local folder or Hub dataset."""
    path = cfg.dataset
    fmt = file_format(cfg)
    if fmt and not os.path.isfile(path):
        hint = " Run `make data` to fetch the default corpus." if path.endswith("rotten_tomatoes_corpus_full.csv.bz2") else ""
        raise PipelineError(f"dataset file {path!r} does not exist.{hint}")
    try:
        if fmt == "tsv":  # tab-separated text (GLUE style): quotes are part of the text, never field delimiters
            ds = datasets.load_dataset("csv", data_files=path, split=cfg.split, delimiter="\t",
                                       quoting=csv.QUOTE_NONE)
        elif fmt:
            ds = datasets.load_dataset(fmt, data_files=path, split=cfg.split)
        else:
            ds = datasets.load_dataset(path, cfg.dataset_config, split=cfg.split)
    except ValueError as e:  # bad split name / slicing
        if "corresponds to no data" in str(e):
            raise PipelineError(f"dataset {path!r} split {cfg.split!r} is empty (no rows); choose a file or split "
                                f"with examples.") from None
        raise PipelineError(f"dataset {path!r}: cannot take split {cfg.split!r}: {first_line(e)}") from None
    except Exception as e:
        first = first_line(e)
        if os.path.exists(path):
            how = f"as {fmt}" if fmt else "as a folder of data files"
            raise PipelineError(f"cannot read dataset {path!r} {how}: {first}. If that is the wrong format, pass "
                                f"--dataset-format csv|tsv|json|parquet.") from None
        offline = offline_reason(e)
        if offline:
            raise PipelineError(
                f"cannot load dataset {path!r}: it is not a local file or folder, and it is not in the local Hugging "
                f"Face cache while {offline}. Point --dataset at a local csv/tsv/json/jsonl/parquet file or a folder "
                f"of them (the default corpus comes from `make data`), or download it once while online."
            ) from None
        raise PipelineError(
            f"cannot load dataset {path!r}: it is not a local file or folder and the Hugging Face Hub did not "
            f"provide it ({first}). If you are offline, point --dataset at a local csv/json/jsonl/parquet file "
            f"or a folder of them."
        ) from None
    if not isinstance(ds, datasets.Dataset):
        raise PipelineError(f"dataset {path!r}: --split must name one split (got {cfg.split!r}).")
    return ds


BATCH = 65536  # rows per pass over the Arrow table: every pass holds one batch of Python values, never the data


@dataclass
class LabeledData:
    """The cleaned rows stay in the Arrow table (memory-mapped by `datasets`); only per-example numbers are arrays."""
    ds: datasets.Dataset  # cleaned rows; row i has labels[i]
    text_column: str
    text_pair_column: str | None
    labels: np.ndarray  # int64 class ids or float32 targets
    label_names: list | None  # id -> name for classification
    splits: dict  # split name -> sorted np.ndarray of row indices into ds/labels
    fingerprint: str  # sha256 of the texts, pairs and labels actually used

    def texts_at(self, idx) -> tuple[list, list | None]:
        """The texts (and pairs) of the given rows, for the few callers that want Python strings (benchmarks)."""
        rows = self.ds.select(np.asarray(idx))
        return list(rows[self.text_column]), list(rows[self.text_pair_column]) if self.text_pair_column else None


def _batches(ds: datasets.Dataset, *columns):
    """(first row, {column: values}) per BATCH rows, reading only those columns."""
    for start, batch in zip(range(0, len(ds), BATCH), ds.select_columns(list(columns)).iter(batch_size=BATCH)):
        yield start, batch


def _check_texts(ds: datasets.Dataset, column: str) -> None:
    if ds.features[column] in (datasets.Value("string"), datasets.Value("large_string")):
        return  # Arrow strings: the only non-text is a null, which the empty-text step already handled
    bad, count = [], 0
    for start, batch in _batches(ds, column):
        rows = [start + i for i, v in enumerate(batch[column]) if not isinstance(v, str)]
        count += len(rows)
        bad += rows[:5 - len(bad)]
    if count:
        raise PipelineError(
            f"text column {column!r} has {count} missing or non-text values (first rows: {bad}); "
            f"clean or drop those rows."
        )


def _blank(v) -> bool:
    return isinstance(v, str) and not v.strip()


def _missing(v) -> bool:
    """An absent value: CSV readers turn an empty cell into None/NaN; a whitespace-only string counts too."""
    return v is None or (isinstance(v, float) and math.isnan(v)) or _blank(v)


def _read_labels(ds: datasets.Dataset, cfg: Config) -> tuple[np.ndarray, list | None]:
    """Label ids (or regression targets) in one pass over the label column, one batch of values at a time."""
    column, feature = cfg.label_column, ds.features[cfg.label_column]
    parts, kinds, missing, n_missing = [], set(), [], 0
    for start, batch in _batches(ds, column):
        values = batch[column]
        rows = [start + i for i, v in enumerate(values) if _missing(v)]
        n_missing += len(rows)
        missing += rows[:5 - len(missing)]
        if n_missing:
            continue
        batch_kinds = {type(v) for v in values}
        kinds |= batch_kinds
        if cfg.task == "regression" or isinstance(feature, datasets.ClassLabel):
            parts.append(values)
        elif batch_kinds <= {str}:
            names, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
            parts.append((names, inverse.astype(np.int32)))
        else:
            parts.append(values)
    if n_missing:
        raise PipelineError(
            f"label column {column!r} has {n_missing} missing (None/NaN/empty) labels "
            f"(first rows: {missing}); drop or fill those rows."
        )
    if cfg.task == "regression":
        try:
            return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]), None
        except (TypeError, ValueError):
            raise PipelineError(f"task=regression needs numeric labels in {column!r}.") from None
    if isinstance(feature, datasets.ClassLabel):
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]), list(feature.names)
    if kinds <= {str}:  # batch-local names, merged: the sorted set of every label string
        names = sorted(set().union(*(p[0].tolist() for p in parts)))
        index = {n: i for i, n in enumerate(names)}
        ids = np.concatenate([np.asarray([index[n] for n in local], dtype=np.int64)[inverse]
                              for local, inverse in parts])
        return ids, names
    values = [v for p in parts for v in p] if kinds - {int, bool, np.int64} else None
    if kinds <= {int, bool, np.int64} or (kinds <= {int, float} and all(float(v).is_integer() for v in values)):
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        if ids.min() < 0:
            raise PipelineError(f"label column {column!r} has negative class ids; use ids 0..n-1.")
        return ids, [str(i) for i in range(int(ids.max()) + 1)]
    if kinds <= {float}:
        raise PipelineError(
            f"label column {column!r} holds non-integer floats; use --task regression for real-valued targets."
        )
    raise PipelineError(
        f"label column {column!r} mixes label types {sorted(t.__name__ for t in kinds)}; "
        f"use all strings or all integers."
    )


def _check_label_range(ids: np.ndarray, names: list | None, cfg: Config) -> list | None:
    n = cfg.num_labels
    if n and names is not None:
        if len(ids) and ids.max() >= n:
            rows = np.flatnonzero(ids >= n)
            numbered = all(name == str(i) for i, name in enumerate(names))
            what = f"class ids up to {int(ids.max())}" if numbered else f"{len(names)} classes {names[:10]}"
            raise PipelineError(
                f"label column {cfg.label_column!r} has {what} but num_labels={n}: {len(rows)} rows are out of range "
                f"0..{n - 1} (first rows: {rows[:5].tolist()}). Raise --num-labels or fix those labels."
            )
        names = names[:n] + [f"LABEL_{i}" for i in range(len(names), n)]  # classes absent from this data
    return names


def _fingerprint(ds: datasets.Dataset, cfg: Config, labels: np.ndarray, names) -> str:
    """sha256 of the texts, pairs, labels and label names actually used, streamed batch by batch."""
    h = hashlib.sha256()
    cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for _, batch in _batches(ds, *cols):
        h.update(json.dumps([batch[c] for c in cols], ensure_ascii=False).encode())
    h.update(np.ascontiguousarray(labels))
    h.update(json.dumps(names).encode())
    return h.hexdigest()


def load_labeled(cfg: Config) -> LabeledData:
    """Load, clean, label and split the data. Memory: the rows stay in Arrow (on disk, memory-mapped); this holds
    a few numbers per example (labels, split indices) and one batch of Python values at a time."""
    ds = _clean(cfg)
    labels, names = _read_labels(ds, cfg)
    names = _check_label_range(labels, names, cfg)
    if names is not None and len(names) < 2:
        raise PipelineError(f"label column {cfg.label_column!r} has only one class {names}; need at least 2.")
    splits = split_indices(labels, cfg)
    return LabeledData(ds, cfg.text_column, cfg.text_pair_column, labels, names, splits,
                       _fingerprint(ds, cfg, labels, names))


def load_for_eval(cfg: Config, label_names: list | None) -> tuple[datasets.Dataset, np.ndarray]:
    """Every row of an external labeled file (an official test set), cleaned like training data, with its labels
    mapped onto the run's classes by name."""
    ds = _clean(cfg)
    labels, names = _read_labels(ds, cfg)
    if label_names is None:  # regression
        return ds, labels
    index = {n: i for i, n in enumerate(label_names)}
    unknown = sorted(set(names[i] for i in np.unique(labels)) - set(index))
    if unknown:
        raise PipelineError(f"labels {unknown[:10]} in {cfg.label_column!r} of {cfg.dataset!r} are not classes of "
                            f"the run ({', '.join(label_names)}); use the run's label names (or drop those rows "
                            f"with --exclude-labels).")
    return ds, np.asarray([index[n] for n in names], dtype=np.int64)[labels]


def _clean(cfg: Config) -> datasets.Dataset:
    """The needed columns of the source, with excluded labels, empty texts and non-texts dealt with."""
    ds = load_source(cfg)
    needed = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise PipelineError(
            f"dataset {cfg.dataset!r} has no column(s) {missing}; its columns are {ds.column_names}. "
            f"Set --text-column / --label-column (and --text-pair-column) accordingly."
        )
    ds = ds.select_columns(needed)
    if cfg.exclude_labels:
        excluded = {v.strip() for v in cfg.exclude_labels.split(",")}
        before = len(ds)
        ds = ds.filter(lambda vs: [str(v) not in excluded for v in vs], input_columns=cfg.label_column,
                       batched=True, batch_size=BATCH)
        if before != len(ds):
            print(f"data: dropped {before - len(ds)} of {before} rows labeled {sorted(excluded)} (exclude_labels)")
    if len(ds) == 0:
        why = f" after dropping rows labeled {cfg.exclude_labels!r} (--exclude-labels)" if cfg.exclude_labels else ""
        raise PipelineError(f"dataset {cfg.dataset!r} split {cfg.split!r} is empty{why}; choose a split with examples.")
    ds = _drop_empty_texts(ds, cfg)
    if 0 < cfg.max_examples < len(ds):
        ds = ds.shuffle(seed=cfg.split_seed).select(range(cfg.max_examples))
    _check_texts(ds, cfg.text_column)
    if cfg.text_pair_column:
        _check_texts(ds, cfg.text_pair_column)
    release_heap()  # the batched passes' Python strings, before the split's transient arrays
    return ds


def _drop_empty_texts(ds: datasets.Dataset, cfg: Config) -> datasets.Dataset:
    """Rows whose text (or text pair) is empty or whitespace only: dropped with a count, or an error."""
    cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    keep = np.ones(len(ds), dtype=bool)
    for start, batch in _batches(ds, *cols):
        for c in cols:
            keep[start:start + len(batch[c])] &= [not _missing(v) for v in batch[c]]
    if keep.all():
        return ds
    blank = np.flatnonzero(~keep)
    if cfg.empty_texts == "error":
        raise PipelineError(
            f"{len(blank)} rows have an empty or whitespace-only text in {cols} (first rows: {blank[:5].tolist()}); "
            f"remove them or pass --empty-texts drop."
        )
    print(f"data: dropped {len(blank)} of {len(ds)} rows with an empty or whitespace-only text (--empty-texts drop)")
    ds = ds.select(np.flatnonzero(keep))
    if len(ds) == 0:
        raise PipelineError(f"dataset {cfg.dataset!r} split {cfg.split!r} has no row with a non-empty text.")
    return ds


def split_indices(labels: np.ndarray, cfg: Config) -> dict:
    """Fixed-seed split into train/validation(/test), stratified by class for classification."""
    n = len(labels)
    idx = np.arange(n)
    n_val = max(1, round(n * cfg.val_fraction))
    n_test = round(n * cfg.test_fraction) if cfg.test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise PipelineError(f"only {n} examples: too few for a train/validation/test split; use more data.")
    rest, val = train_test_split(idx, test_size=n_val, random_state=cfg.split_seed,
                                 stratify=_stratify(labels, n_val, cfg))
    out = {"validation": np.sort(val)}
    if n_test:
        rest, test = train_test_split(rest, test_size=n_test, random_state=cfg.split_seed,
                                      stratify=_stratify(labels[rest], n_test, cfg))
        out["test"] = np.sort(test)
    out["train"] = np.sort(rest)
    return out


def _stratify(labels: np.ndarray, test_size: int, cfg: Config):
    """Labels to stratify on, or None where stratification is impossible (regression, tiny classes)."""
    if cfg.task != "classification":
        return None
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if counts.min() < 2 or test_size < len(counts) or len(labels) - test_size < len(counts):
        return None
    return labels
