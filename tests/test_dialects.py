"""Tab-separated files read as their writer meant: quoted fields with tabs, quotes and newlines inside (pandas,
Python's csv module) and raw GLUE-style files with unbalanced quotes; a file that reads neither way is refused
naming the line. Real files, the real default corpus."""
import bz2
import csv

import pandas as pd
import pytest

from pipeline import make_config
from pipeline.data import load_labeled, load_source
from pipeline.errors import PipelineError

from conftest import CORPUS


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
    data = load_labeled(make_config("default", dataset=str(path)))  # the default preset's columns, on the TSV
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
