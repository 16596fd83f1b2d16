"""Multi-label classification: labels from a list column, a delimited string or 0/1 columns, BCE, thresholds (0.5,
one tuned, one per label) stored with the run and used by evaluate, predict and the export; micro/macro F1 and
subset accuracy with intervals. Real data: WNUT-2016 tweets, each labeled with the entity types it mentions (rows
with none kept)."""
import csv
import json

import numpy as np
import pytest

from pipeline import make_config
from pipeline.data import load_for_eval, load_labeled
from pipeline.errors import PipelineError
from pipeline.tasks import TASKS, Outputs

from conftest import cli_args, options
from test_tokens import wnut_sentences

ML = "multi-label"


def topic_rows(n=200):
    """(text, sorted entity types) of n real tweets."""
    out = []
    for s in wnut_sentences(n):
        types = sorted({t[2:] for _, t in s if t != "O"})
        out.append((" ".join(w for w, _ in s), types))
    return out


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    """The same 200 tweets three ways: JSON lines with a list column, a CSV with a ';'-separated column (written
    by the csv module: quotes and commas inside texts), and a CSV of 0/1 columns."""
    folder = tmp_path_factory.mktemp("topics")
    rows = topic_rows()
    names = sorted({t for _, ts in rows for t in ts})
    with open(folder / "topics.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": t, "labels": ts}) + "\n" for t, ts in rows)
    with open(folder / "topics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "labels"])
        w.writerows([t, ";".join(ts)] for t, ts in rows)
    with open(folder / "onehot.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text"] + names)
        w.writerows([t] + [int(n in ts) for n in names] for t, ts in rows)
    return folder, names


def ml_opts(tmp_path, model, dataset, **kw):
    return options(tmp_path, model, dataset, task=ML, exclude_labels=None, label_column="labels", **kw)


def test_three_label_sources_give_the_same_targets(topics, capsys):
    folder, names = topics
    a = load_labeled(make_config(dataset=str(folder / "topics.jsonl"), task=ML, label_column="labels",
                                 exclude_labels=None))
    b = load_labeled(make_config(dataset=str(folder / "topics.csv"), task=ML, label_column="labels",
                                 label_separator=";", exclude_labels=None))
    c = load_labeled(make_config(dataset=str(folder / "onehot.csv"), task=ML, label_columns=",".join(names),
                                 exclude_labels=None))
    assert a.label_names == b.label_names == c.label_names == names
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.labels, c.labels)
    none = int((a.labels.sum(1) == 0).sum())
    assert a.labels.shape == (200, len(names)) and none > 50  # many tweets name nothing: kept, and counted
    assert f"data: {none} of 200 rows carry no label; kept" in capsys.readouterr().out
    assert all(np.array_equal(a.splits[s], c.splits[s]) for s in a.splits)


def test_bad_multilabel_input(tmp_path, topics):
    folder, names = topics
    p = tmp_path / "bad.csv"
    p.write_text("text,a,b\nfine,1,0\nmeh,2,0\n")
    with pytest.raises(PipelineError, match=r"--label-columns: column 'a' must hold 0 or 1.*row 1 holds 2"):
        load_labeled(make_config(dataset=str(p), task=ML, label_columns="a,b", exclude_labels=None))
    with pytest.raises(PipelineError, match="needs a list of labels per row"):
        load_labeled(make_config(dataset=str(folder / "topics.csv"), task=ML, label_column="labels",
                                 exclude_labels=None))
    ext = tmp_path / "ext.jsonl"
    ext.write_text(json.dumps({"text": "x", "labels": ["person", "weather"]}) + "\n")
    with pytest.raises(PipelineError, match=r"labels \['weather'\] .* are not classes of the run"):
        load_for_eval(make_config(dataset=str(ext), task=ML, label_column="labels", exclude_labels=None), names)


@pytest.mark.fast
def test_thresholds_decide_and_metrics():
    task = TASKS[ML]
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    probs = np.array([[0.4, 0.1], [0.2, 0.3], [0.45, 0.35], [0.1, 0.05]])
    out = Outputs(probs, labels, np.zeros(4))
    at_half, thr = task.decide(out)
    assert thr == [0.5, 0.5] and task.metrics(at_half, ["a", "b"])["f1"] == 0.0  # nothing predicted at 0.5
    tuned, thr = task.decide(out, "true")
    m = task.metrics(tuned, ["a", "b"])
    assert len(set(thr)) == 1 and thr[0] < 0.5 and m["f1"] == 1.0 and m["subset_accuracy"] == 1.0
    per, thr2 = task.decide(out, "per-label")
    assert thr2[0] != thr2[1] or thr2[0] <= 0.3
    again, _ = task.decide(out, thresholds=thr)  # a run's stored thresholds decide the same way
    assert np.array_equal(again.preds, tuned.preds)
    assert set(task.headline(m)) == {"f1", "macro_f1", "subset_accuracy", "loss"}


def test_cli_train_tuned_thresholds_evaluate_predict_export_pipeline(tmp_path, tiny_model, topics, cli):
    folder, names = topics
    opts = ml_opts(tmp_path, tiny_model("bert"), str(folder / "topics.jsonl"), run_name="ml", epochs=2, lr=2e-3,
                   threshold_tuning="true")
    cli("precompute", *cli_args(opts))
    last = cli("train", *cli_args(opts)).stdout.strip().splitlines()[-1]
    assert [kv.split("=")[0] for kv in last.split()] == ["f1", "macro_f1", "subset_accuracy", "loss"], last
    run = tmp_path / "runs" / "ml"
    res = json.loads((run / "results.json").read_text())
    assert len(res["thresholds"]) == len(names) and len(set(res["thresholds"])) == 1
    cli("evaluate", "--run", run, "--resamples", "50")
    ev = json.loads((run / "eval_test.json").read_text())
    assert ev["thresholds"] == dict(zip(names, res["thresholds"])) and 0 <= ev["metrics"]["f1"] <= 1
    assert ev["ci95"]["f1"][0] <= ev["metrics"]["f1"] <= ev["ci95"]["f1"][1]
    # evaluate decided at the run's thresholds, not at 0.5 (which here predicts another label set)
    from pipeline.evaluate import _cached
    from pipeline.rundir import RunDir

    scored = _cached(RunDir(str(run)), RunDir(str(run)).config(), "test", "cpu")[0]
    task = TASKS[ML]
    at_run, at_half = task.decide(scored, thresholds=res["thresholds"])[0], task.decide(scored)[0]
    assert task.metrics(at_run, names)["f1"] == ev["metrics"]["f1"] != task.metrics(at_half, names)["f1"]
    # the same test rows as an external file: the run's thresholds, the same scores
    cfg = make_config(**{k: v for k, v in opts.items() if k not in ("run_name", "threshold_tuning")})
    data = load_labeled(cfg)
    rows = [json.loads(line) for line in open(folder / "topics.jsonl")]
    ext = tmp_path / "heldout.jsonl"
    ext.write_text("".join(json.dumps(rows[int(i)]) + "\n" for i in data.splits["test"]))
    cli("evaluate", "--run", run, "--dataset", ext, "--resamples", "50")
    got = json.loads((run / "eval_heldout.json").read_text())
    assert got["metrics"]["f1"] == ev["metrics"]["f1"] and got["examples"] == ev["examples"]
    assert got["metrics"]["loss"] == pytest.approx(ev["metrics"]["loss"], abs=1e-3)  # fp16 cache vs exact
    assert "max_abs_logit_diff=" in cli("verify", *cli_args(opts)).stdout
    out = cli("export", "--run", run).stdout
    assert "AutoModelForSequenceClassification" in out
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(run / "export"), top_k=None)
    texts = ["Justin Bieber live at Madison Square Garden tonight", "ugh monday again"]
    scores = clf(texts)
    assert all(len(s) == len(names) for s in scores)  # every label scored (sigmoid: they need not sum to 1)
    printed = cli("predict", "--model-dir", run / "export", *texts).stdout.strip().splitlines()
    thr = res["thresholds"][0]
    for line, s in zip(printed, scores):
        want = sorted((d["label"], d["score"]) for d in s if d["score"] >= thr)
        got = [] if line.split("\t")[0] == "-" else sorted(
            (p.rsplit(" ", 1)[0], float(p.rsplit(" ", 1)[1])) for p in line.split("\t")[0].split(", "))
        assert [n for n, _ in got] == [n for n, _ in want], (line, s)
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want))
    cfg = json.loads((run / "export" / "config.json").read_text())
    assert cfg["problem_type"] == "multi_label_classification" and cfg["frozen_top"]["thresholds"] == res["thresholds"]
    assert f"{thr:g}" in (run / "export" / "README.md").read_text()
