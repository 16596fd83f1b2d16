"""A newcomer's own data: the field's conventions as defaults (`text` / `label` columns, nothing excluded) once
--dataset names another file, and tab-separated files read as their writer meant: quoted fields with tabs, quotes
and newlines inside (pandas, Python's csv module) and raw GLUE-style files with unbalanced quotes; a file that reads
neither way is refused naming the line. Real files, the real default corpus."""
import bz2
import csv

import pandas as pd
import pytest

from pipeline import make_config
from pipeline.data import load_labeled, load_source
from pipeline.errors import PipelineError

from conftest import CORPUS, corpus_rows, write_csv


def test_own_csv_with_text_and_label_trains_with_dataset_alone(tmp_path, tiny_model, cli):
    path = write_csv(tmp_path / "mine.csv", ["text", "label"],
                     ([r["text"], "plot" if i % 10 == 0 else r["category"]] for i, r in enumerate(corpus_rows(80))))
    cfg = make_config("default", dataset=str(path))
    assert (cfg.label_column, cfg.exclude_labels) == ("label", None)  # the default corpus's specifics stay with it
    assert make_config("default").label_column == "category" and make_config("default").exclude_labels == "plot"
    data = load_labeled(cfg)
    assert data.label_names == ["fresh", "plot", "rotten"] and len(data.ds) == 80  # a 'plot' label is a label here
    where = ["--cache-dir", tmp_path / "cache", "--runs-dir", tmp_path / "runs", "--model", tiny_model(), "--k", 1]
    cli("precompute", "--dataset", path, *where)
    out = cli("train", "--dataset", path, *where, "--run-name", "mine").stdout
    assert "accuracy=" in out and (tmp_path / "runs" / "mine" / "results.json").exists()
    other = tmp_path / "reviews.csv"
    other.write_text("review,sentiment\ngood,pos\nbad,neg\n")
    r = cli("precompute", "--dataset", other, *where, check=False)
    assert r.returncode == 2 and "['review', 'sentiment']" in r.stderr  # the columns the file has


def _texts(path, **kw):
    cfg = make_config("default", dataset=str(path), exclude_labels=None, max_examples=0, **kw)
    return load_source(cfg)


def test_a_pandas_tsv_of_the_default_corpus_reads_whole(tmp_path):
    with bz2.open(CORPUS, "rt", encoding="utf-8") as fh:
        frame = pd.read_csv(fh)
    tricky = frame["text"].str.contains('"|\\n|\\t', regex=True)
    assert tricky.sum() > 0  # the real texts hold quotes / newlines / tabs, so pandas quotes those fields
    path = tmp_path / "corpus.tsv"
    frame.to_csv(path, sep="\t", index=False)
    ds = _texts(path)
    assert len(ds) == len(frame)
    assert list(ds["text"]) == [None if pd.isna(t) else t for t in frame["text"]]
    assert list(ds["category"]) == frame["category"].tolist()
    data = load_labeled(make_config("default", dataset=str(path), label_column="category", exclude_labels="plot"))
    assert sorted(data.label_names) == ["fresh", "rotten"]


def test_python_csv_module_quoted_tsv(tmp_path):
    rows = [("a film with a\ttab", "fresh"), ('he said "wow"', "rotten"), ("two\nlines", "fresh")]
    path = tmp_path / "quoted.tsv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["text", "category"])
        w.writerows(rows)
    ds = _texts(path)
    assert list(zip(list(ds["text"]), list(ds["category"]))) == rows


def test_a_glue_style_tsv_keeps_its_stray_quotes(tmp_path):
    lines = ['"Yes, he said.', "it's a \"fine\" film", '"quoted" at the start', 'a lone " in the middle']
    path = tmp_path / "glue.tsv"
    path.write_text("text\tcategory\n" + "".join(f"{t}\t{'fresh' if i % 2 else 'rotten'}\n"
                                                 for i, t in enumerate(lines)))
    ds = _texts(path)
    assert list(ds["text"]) == lines and len(ds) == 4


def test_a_tsv_that_reads_neither_way_names_the_line(tmp_path, cli):
    path = tmp_path / "broken.tsv"
    path.write_text('text\tcategory\ngood\tfresh\n"an open\tquote\tand\ttoo many\tfields\nok\trotten\n')
    with pytest.raises(PipelineError, match=r"line 3 has 5 fields where the header has 2"):
        _texts(path)
    r = cli("precompute", "--dataset", path, "--exclude-labels", "none", check=False)
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_csv_in_either_dialect(tmp_path):
    frame = pd.DataFrame({"text": ['she said "no, thanks"', "a, b and c", "two\nlines"], "label": ["x", "y", "x"]})
    frame.to_csv(tmp_path / "pandas.csv", index=False)  # quoted where needed
    ds = _texts(tmp_path / "pandas.csv")
    assert list(ds["text"]) == frame["text"].tolist()
    raw = tmp_path / "raw.csv"  # hand-written, quotes as text, no comma inside a text
    raw.write_text('text,label\n"Yes he said.,x\nit\'s "fine",y\n')
    assert list(_texts(raw)["text"]) == ['"Yes he said.', 'it\'s "fine"']
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\nfine,x\n"open, quote, and, more,y\n')
    with pytest.raises(PipelineError, match=r"cannot read .* as comma-separated: .*line 3 has 5 fields"):
        _texts(bad)
