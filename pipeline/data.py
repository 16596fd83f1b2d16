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
from .tasks import entity_scheme, iob2_breaks, task_for

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
            ".conll": "conll", ".conllu": "conllu"}
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
    elif fmt == "tsv" and os.path.isfile(path) and _looks_like_conll(_head(path).decode("utf-8", errors="replace")):
        fmt = "conll"  # a .tsv without a header: CoNLL columns
    return fmt


def _head(path: str) -> bytes:
    """The first 64 KiB of a (possibly compressed) file."""
    _, compression = strip_compression(path)
    try:
        with _OPEN.get(compression, open)(path, "rb") as fh:
            return fh.read(1 << 16)
    except (OSError, EOFError) as e:
        raise PipelineError(f"cannot read dataset {path!r}: {e}") from None


def _sniff(path: str) -> str:
    """The format of a file with a .txt or unknown extension: parquet by its magic bytes, JSON (lines) by a leading
    { or [, CoNLL columns (one word per line, blank lines between sentences), else tab- or comma-separated by its
    header line."""
    head = _head(path)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \r\n\t")
    if text.startswith(("{", "[")):
        return "json"
    if _looks_like_conll(text):
        return "conll"
    header = text.split("\n", 1)[0]
    if "\t" in header:
        return "tsv"
    if "," in header:
        return "csv"
    raise PipelineError(
        f"cannot tell the format of dataset file {path!r}: its first line {header[:80]!r} is neither tab- nor "
        f"comma-separated with a header, nor JSON lines, nor parquet. Pass --dataset-format csv|tsv|json|parquet "
        f"(csv and tsv need a header line naming the columns).")


def _looks_like_conll(head: str) -> bool:
    """One word per line: sentences separated by blank (or whitespace-only) lines or -DOCSTART-, (nearly) every
    other line split into the same number (>= 2) of columns, and (nearly) no space inside the first column: lines
    of running text vary in width, and tab-separated texts hold spaces."""
    lines = head.split("\n")[:-1] or head.split("\n")  # the last line of a 64 KiB head may be cut
    words = [ln for ln in lines if ln.strip() and not ln.startswith("-DOCSTART-")]
    breaks = len(lines) - len(words)
    if not words or not breaks:
        return False
    cols = [_columns(ln) for ln in words]
    widths = np.bincount([len(c) for c in cols])
    spaced = sum(1 for c in cols if " " in c[0].strip())  # a word column holds words, not running text
    return int(widths.argmax()) >= 2 and widths.max() >= 0.98 * len(words) and spaced <= 0.02 * len(words)


def _columns(line: str) -> list:
    """A CoNLL line's columns: tab-separated when it has a tab (words may then hold spaces), else whitespace."""
    line = line.rstrip("\r\n")
    return line.split("\t") if "\t" in line else line.split()


CONLLU_FIELDS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")


def _conll_rows(path: str, fmt: str, tag_field):
    """Sentences of a CoNLL (words in column 0, tags in column `tag_field`, default the last) or CoNLL-U file (FORM,
    and the field named by `tag_field`; multiword-token ranges and empty nodes skipped)."""
    _, compression = strip_compression(path)
    words, tags, width, first = [], [], None, 0
    with _OPEN.get(compression, open)(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if fmt == "conllu" and line.startswith("#"):
                continue
            if not line.strip() or line.startswith("-DOCSTART-"):
                if words:
                    yield {"tokens": words, "tags": tags}
                words, tags = [], []
                continue
            cols = line.rstrip("\r\n").split("\t") if fmt == "conllu" else _columns(line)
            if fmt == "conllu":
                if len(cols) != 10:
                    raise PipelineError(f"{path}, line {number}: a CoNLL-U word line has 10 tab-separated fields, "
                                        f"this one has {len(cols)}: {line.strip()[:80]!r}.")
                if not cols[0].isdigit():  # 3-4 (multiword token) or 5.1 (empty node)
                    continue
                word, tag = cols[1], cols[tag_field]
            else:
                if width is None:
                    width, first = len(cols), number
                    if tag_field is not None and tag_field >= width:
                        raise PipelineError(f"--label-column {tag_field}: {path} has {width} columns "
                                            f"(0..{width - 1}).")
                if len(cols) != width or width < 2:
                    raise PipelineError(
                        f"{path}, line {number}: {len(cols)} column(s), but line {first} has {width}; every word line "
                        f"of a CoNLL file has the same columns (word first, tags in column --label-column, default "
                        f"the last). Fix that line.")
                word, tag = cols[0], cols[-1 if tag_field is None else tag_field]
            if not word.strip():
                raise PipelineError(f"{path}, line {number}: the word column is empty; every word line needs a word.")
            words.append(word)
            tags.append(tag)
        if words:
            yield {"tokens": words, "tags": tags}


def _load_conll(cfg: Config, fmt: str) -> datasets.Dataset:
    """A CoNLL / CoNLL-U file as rows of words (column cfg.text_column) and tags (cfg.label_column)."""
    default = Config.__dataclass_fields__["label_column"].default
    label = cfg.label_column
    if cfg.split != "train":
        raise PipelineError(f"--split {cfg.split!r}: a {fmt} file is one split (train), divided by --val-fraction and "
                            f"--test-fraction; --split applies to Hub datasets.")
    if fmt == "conllu":
        if label in CONLLU_FIELDS:
            field = CONLLU_FIELDS.index(label)
        elif label == default:
            field = CONLLU_FIELDS.index("upos")
        else:
            raise PipelineError(f"--label-column {label!r} is not a CoNLL-U field; choose one of "
                                f"{', '.join(CONLLU_FIELDS[2:])} (default upos).")
    elif label.lstrip("-").isdigit():
        field = int(label)
    elif label == default:
        field = None
    else:
        raise PipelineError(f"--label-column {label!r}: in a CoNLL file it is a column number (0-based; default: "
                            f"the last column).")
    try:
        size = os.path.getsize(cfg.dataset)
        mtime = os.path.getmtime(cfg.dataset)
        ds = datasets.Dataset.from_generator(_conll_rows, gen_kwargs={"path": cfg.dataset, "fmt": fmt,
                                                                       "tag_field": field},
                                             features=datasets.Features({"tokens": datasets.Sequence(
                                                 datasets.Value("string")), "tags": datasets.Sequence(
                                                 datasets.Value("string"))}),
                                             fingerprint=hashlib.sha256(json.dumps(
                                                 [os.path.abspath(cfg.dataset), size, mtime, fmt, field]).encode(
                                             )).hexdigest()[:32])
    except Exception as e:  # datasets wraps what the generator raised
        seen = e
        while seen is not None and not isinstance(seen, PipelineError):
            seen = seen.__cause__ or seen.__context__
        if seen is not None:
            raise seen from None
        raise PipelineError(f"cannot read {cfg.dataset!r} as {fmt}: {first_line(e)}") from None
    if len(ds) == 0:
        raise PipelineError(f"{cfg.dataset!r} holds no sentence (no word lines).")
    return ds.rename_columns({"tokens": "__words", "tags": "__tags"}).rename_columns(
        {"__words": cfg.text_column, "__tags": cfg.label_column})


def quoting_of(path: str, delimiter: str) -> int:
    """How a comma- or tab-separated file was written: csv.QUOTE_MINIMAL when it reads whole with quoted fields (as
    pandas, Excel and Python's csv module write a field holding the delimiter, a quote or a newline), csv.QUOTE_NONE
    when every line holds the header's number of fields with quotes taken as text (GLUE-style files with unbalanced
    quotes). When both read, the quoted reading wins unless it joined lines that the raw reading keeps apart (an
    opening quote that was text). A file that reads neither way is refused, naming the first bad line of each."""
    _, compression = strip_compression(path)
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"

    def read(quoting: int) -> tuple[str | None, int, int]:
        """(the first problem or None, rows, lines) of one reading."""
        with _OPEN.get(compression, open)(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
            rows, n = csv.reader(fh, delimiter=delimiter, quoting=quoting, strict=quoting != csv.QUOTE_NONE), 0
            try:
                width = len(next(rows, []))
                for row in rows:
                    n += bool(row)
                    if row and len(row) != width:
                        return f"line {rows.line_num} has {len(row)} fields where the header has {width}", n, 0
            except csv.Error as e:
                return f"line {rows.line_num}: {e}", n, 0
            return None, n, rows.line_num

    quoted, n_quoted, lines = read(csv.QUOTE_MINIMAL)
    if quoted is None and lines - 1 == n_quoted:  # no record spans lines: the raw reading could only do worse
        return csv.QUOTE_MINIMAL
    raw, n_raw, _ = read(csv.QUOTE_NONE)
    if quoted is None and (raw is not None or n_quoted == n_raw):
        return csv.QUOTE_MINIMAL
    if raw is None:
        return csv.QUOTE_NONE
    raise PipelineError(
        f"cannot read {path!r} as {kind}: with quoted fields (as pandas, Excel and Python's csv module write them), "
        f"{quoted}; with quotes as plain text (GLUE style), {raw}. Fix that line (a field holding the delimiter or a "
        f"newline must be quoted, with its quotes doubled), or convert the file to JSON lines or parquet.")


def load_source(cfg: Config) -> datasets.Dataset:
    """The split `cfg.split` (slicing allowed, e.g. "train[:10000]") of a local file, local folder or Hub dataset."""
    path = cfg.dataset
    fmt = file_format(cfg)
    if fmt and not os.path.isfile(path):
        hint = " Run `make data` to fetch the default corpus." if path.endswith("rotten_tomatoes_corpus_full.csv.bz2") else ""
        raise PipelineError(f"dataset file {path!r} does not exist.{hint}")
    if fmt in ("conll", "conllu"):
        return _load_conll(cfg, fmt)
    try:
        if fmt in ("csv", "tsv"):  # quoted fields (pandas, Excel, csv module) or raw text with stray quotes (GLUE)
            delimiter = "\t" if fmt == "tsv" else ","
            ds = datasets.load_dataset("csv", data_files=path, split=cfg.split, delimiter=delimiter,
                                       quoting=quoting_of(path, delimiter))
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
    labels: np.ndarray | None  # int64 class ids or float32 targets; None for per-token tasks (tags stay in ds)
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


def read_example_labels(ds: datasets.Dataset, cfg: Config, numeric: bool) -> tuple[np.ndarray, list | None]:
    """One label per row, in one pass over the label column, one batch of values at a time: class ids and their
    names, or (numeric) float targets and None."""
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
        if numeric or isinstance(feature, datasets.ClassLabel):
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
    if numeric:
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


def _fingerprint(ds: datasets.Dataset, cfg: Config, labels: np.ndarray | None, names) -> str:
    """sha256 of the texts, pairs, labels and label names actually used, streamed batch by batch (per-token tasks:
    the tag column, hashed with the words)."""
    h = hashlib.sha256()
    cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    if labels is None:
        cols.append(cfg.label_column)
    for _, batch in _batches(ds, *cols):
        h.update(json.dumps([batch[c] for c in cols], ensure_ascii=False).encode())
    if labels is not None:
        h.update(np.ascontiguousarray(labels))
    h.update(json.dumps(names).encode())
    return h.hexdigest()


def load_labeled(cfg: Config) -> LabeledData:
    """Load, clean, label and split the data. Memory: the rows stay in Arrow (on disk, memory-mapped); this holds
    a few numbers per example (labels, split indices) and one batch of Python values at a time."""
    ds = _clean(cfg)
    labels = task_for(cfg.task).read_labels(ds, cfg)
    splits = split_indices(len(ds), cfg, labels.values if labels.stratify else None)
    return LabeledData(ds, cfg.text_column, cfg.text_pair_column, labels.values, labels.names, splits,
                       _fingerprint(ds, cfg, labels.values, labels.names))


def load_for_eval(cfg: Config, label_names: list | None) -> tuple[datasets.Dataset, np.ndarray | None]:
    """Every row of an external labeled file (an official test set), cleaned like training data, with its labels
    mapped onto the run's classes by name (the task's eval_labels; per-token tasks map tags when encoding)."""
    ds = _clean(cfg)
    return ds, task_for(cfg.task).eval_labels(ds, cfg, label_names)


def known_labels(names: list, label_names: list, cfg: Config, what: str = "labels") -> None:
    """Refuse labels of an external file that the run does not have, naming them and the run's."""
    unknown = sorted(set(names) - set(label_names))
    if unknown:
        raise PipelineError(f"{what} {unknown[:10]} in {cfg.label_column!r} of {cfg.dataset!r} are not classes of "
                            f"the run ({', '.join(label_names)}); use the run's label names (or drop those rows "
                            f"with --exclude-labels).")


def _tag_feature(ds: datasets.Dataset, column: str):
    """The ClassLabel of a list-of-tags column (the Hub's `ner_tags` convention), or None for string tags."""
    feature = ds.features[column]
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return inner if isinstance(inner, datasets.ClassLabel) else None


def read_tag_names(ds: datasets.Dataset, cfg: Config, quiet: bool = False) -> list:
    """Check a per-token dataset (each row: a list of words, a list of as many tags) and return its tag names
    (sorted; a ClassLabel's own names). Tags that break the IOB2 scheme are counted and reported."""
    words_col, tags_col = cfg.text_column, cfg.label_column
    feature = _tag_feature(ds, tags_col)
    seen, breaks, broken_rows = set(), 0, []
    for start, batch in _batches(ds, words_col, tags_col):
        for i, (words, tags) in enumerate(zip(batch[words_col], batch[tags_col])):
            row = start + i
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise PipelineError(
                    f"--task {cfg.task} needs a list of words per row in {words_col!r}; row {row} holds "
                    f"{type(words).__name__} {str(words)[:60]!r}. Give a list-of-words column (--text-column) and a "
                    f"list-of-tags column (--label-column), or a CoNLL file.")
            if not words:
                raise PipelineError(f"row {row} of {cfg.dataset!r} is a sentence with no words; drop it.")
            if any(not w.strip() for w in words):
                raise PipelineError(f"row {row} of {cfg.dataset!r} has an empty word (word "
                                    f"{next(j for j, w in enumerate(words) if not w.strip())}); every word needs "
                                    f"text.")
            if not isinstance(tags, list) or len(tags) != len(words):
                raise PipelineError(f"row {row} of {cfg.dataset!r} has {len(words)} words but "
                                    f"{len(tags) if isinstance(tags, list) else 'no list of'} tags in {tags_col!r}; "
                                    f"give one tag per word.")
            if feature is not None:
                tags = [feature.int2str(t) for t in tags]
            elif not all(isinstance(t, str) and t for t in tags):
                raise PipelineError(f"row {row} of {cfg.dataset!r}: tags must be non-empty strings (or ClassLabel "
                                    f"ids); got {tags[:8]!r}.")
            seen.update(tags)
            b = iob2_breaks(tags)
            if b:
                breaks += b
                broken_rows += [row][:5 - len(broken_rows)]
    names = list(feature.names) if feature is not None else sorted(seen)
    if len(names) < 2:
        raise PipelineError(f"{tags_col!r} holds only the tag(s) {names}; need at least 2.")
    scheme = entity_scheme(names)
    if breaks and scheme == "IOB2" and not quiet:
        print(f"data: {breaks} tags break the IOB2 scheme (an I-X that follows neither B-X nor I-X; first rows "
              f"{broken_rows}); seqeval's default mode counts each as the start of an entity")
    return names


def read_label_sets(ds: datasets.Dataset, cfg: Config) -> tuple[np.ndarray, list]:
    """Multi-label targets: float32 [N, C] of 0/1 and the label names, from several 0/1 columns (--label-columns),
    a delimited string column (--label-separator), or a list column (JSON lists or Arrow lists of names or ids;
    a list of ClassLabel ids uses the ClassLabel's names)."""
    if cfg.label_columns:
        columns = [c.strip() for c in cfg.label_columns.split(",")]
        out = np.zeros((len(ds), len(columns)), dtype=np.float32)
        for start, batch in _batches(ds, *columns):
            for j, c in enumerate(columns):
                values = batch[c]
                bad = [start + i for i, v in enumerate(values) if v not in (0, 1) or isinstance(v, str)]
                if bad:
                    raise PipelineError(f"--label-columns: column {c!r} must hold 0 or 1 in every row; row {bad[0]} "
                                        f"holds {values[bad[0] - start]!r} ({len(bad)} such rows in this batch).")
                out[start:start + len(values), j] = np.asarray(values, dtype=np.float32)
        return out, columns
    column = cfg.label_column
    feature = _tag_feature(ds, column)
    sets = []
    for start, batch in _batches(ds, column):
        for i, v in enumerate(batch[column]):
            if cfg.label_separator is not None:
                if v is not None and not isinstance(v, str):
                    raise PipelineError(f"--label-separator: row {start + i} of {column!r} holds {v!r}, not a "
                                        f"string of labels.")
                v = [p.strip() for p in (v or "").split(cfg.label_separator) if p.strip()]
            elif v is None:
                v = []
            elif not isinstance(v, list):
                raise PipelineError(
                    f"--task multi-label needs a list of labels per row in {column!r} (JSON list or Arrow list), "
                    f"or --label-separator for a delimited string, or --label-columns; row {start + i} holds "
                    f"{v!r}.")
            sets.append([feature.int2str(x) for x in v] if feature is not None else [str(x) for x in v])
    names = list(feature.names) if feature is not None else sorted({x for s in sets for x in s})
    if all(n.isdigit() for n in names) and feature is None and names:  # ids: every id up to the largest
        names = [str(i) for i in range(max(int(n) for n in names) + 1)]
    if len(names) < 2:
        raise PipelineError(f"{column!r} holds {len(names)} distinct label(s) {names}; multi-label needs at least 2.")
    index = {n: j for j, n in enumerate(names)}
    out = np.zeros((len(sets), len(names)), dtype=np.float32)
    for i, s in enumerate(sets):
        out[i, [index[x] for x in s]] = 1
    return out, names


def tag_index(ds: datasets.Dataset, cfg: Config, names: list) -> dict:
    """Raw tag value (a string, or a ClassLabel id) -> the id of that tag among `names` (the run's tags)."""
    feature = _tag_feature(ds, cfg.label_column)
    index = {n: i for i, n in enumerate(names)}
    if feature is None:
        return index
    return {i: index[n] for i, n in enumerate(feature.names) if n in index}


def _clean(cfg: Config) -> datasets.Dataset:
    """The needed columns of the source, with excluded labels, empty texts and non-texts dealt with."""
    ds = load_source(cfg)
    task = task_for(cfg.task)
    needed = [cfg.text_column] + task.label_columns(cfg) + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise PipelineError(
            f"dataset {cfg.dataset!r} has no column(s) {missing}; its columns are {ds.column_names}. "
            f"Set --text-column / --label-column{' / --label-columns' if cfg.label_columns else ''} (and "
            f"--text-pair-column) accordingly."
        )
    ds = ds.select_columns(needed)
    per_token = task.per_token  # lists of words and tags: checked by read_tag_names
    if cfg.exclude_labels and task.filters_by_label:
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
    if not per_token:
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


def split_indices(n: int, cfg: Config, labels: np.ndarray | None = None) -> dict:
    """Fixed-seed split into train/validation(/test), stratified by class where labels are given (classification)
    and every class can be."""
    idx = np.arange(n)
    n_val = max(1, round(n * cfg.val_fraction))
    n_test = round(n * cfg.test_fraction) if cfg.test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise PipelineError(f"only {n} examples: too few for a train/validation/test split; use more data.")
    rest, val = train_test_split(idx, test_size=n_val, random_state=cfg.split_seed,
                                 stratify=_stratify(labels, n_val))
    out = {"validation": np.sort(val)}
    if n_test:
        rest, test = train_test_split(rest, test_size=n_test, random_state=cfg.split_seed,
                                      stratify=_stratify(None if labels is None else labels[rest], n_test))
        out["test"] = np.sort(test)
    out["train"] = np.sort(rest)
    return out


def _stratify(labels: np.ndarray | None, test_size: int):
    """Labels to stratify on, or None where stratification is impossible (no labels, tiny classes)."""
    if labels is None:
        return None
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if counts.min() < 2 or test_size < len(counts) or len(labels) - test_size < len(counts):
        return None
    return labels
