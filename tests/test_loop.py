"""The experiment loop: best evaluation kept, early stopping, evaluation every N steps, `evaluate` on cached and
external data with confidence intervals, a tab-separated .txt pair corpus end to end, predict on pairs and
regression, no lock files left, world-readable exports. Real tiny models, real files, the real CLI."""
import csv
import json
import os
import stat

import h5py
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.precompute import precompute
from pipeline.rundir import RunDir
from pipeline.train import train

from conftest import cli_args, corpus_rows, options, tiny_cfg

HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]  # the MSR paraphrase corpus's layout


def _pair_rows(start, n):
    """Sentence pairs from the real corpus: label 1 when both reviews have the same verdict. Quotes stay as they are
    (tab-separated text is read with quoting off, like GLUE's files)."""
    rows = corpus_rows(start + 2 * n)[start:]
    out = []
    for i in range(n):
        a, b = rows[2 * i], rows[2 * i + 1]
        out.append([str(int(a["category"] == b["category"])), str(2 * i), str(2 * i + 1),
                    a["text"], ('"' if i % 5 == 0 else "") + b["text"]])  # an unbalanced quote opens a field
    return out


def _write_tsv(path, rows):
    with open(path, "w") as fh:
        fh.writelines("\t".join(" ".join(cell.split()) for cell in row) + "\n" for row in [HEADER, *rows])
    return str(path)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("msrp")
    return _write_tsv(d / "pairs_train.txt", _pair_rows(0, 300)), _write_tsv(d / "pairs_test.txt", _pair_rows(600, 40))


def _pair_opts(tmp_path, model, data, **kw):
    return cli_args(options(tmp_path, model, data, batch_size=16, precompute_batch_size=32, cache_dtype="float32",
                            text_column="#1 String", text_pair_column="#2 String", label_column="Quality", **kw))


def test_txt_pair_corpus_precomputes_trains_evaluates_and_predicts(tmp_path, tiny_model, pair_files, cli):
    train_file, test_file = pair_files
    opts = _pair_opts(tmp_path, tiny_model("bert"), train_file)
    cli("precompute", *opts)
    (cache,) = (tmp_path / "cache").glob("*.h5")
    assert cache.name.startswith("pairs_train-k1-float32-")  # named after the data, not "default"
    assert not list((tmp_path / "cache").glob("*.lock"))
    with h5py.File(cache) as f:
        assert set(f["train/token_type_ids"][:].tolist()) == {0, 1}
        test_ids = f["test/example_ids"][:]

    out = cli("train", *opts, "--epochs", 3, "--lr", "1e-3", "--metric-for-best", "loss", "--save-last",
                  "true", "--run-name", "p").stdout
    run = RunDir(str(tmp_path / "runs" / "p"))
    records, results = run.metrics(), run.results()
    best = min(records, key=lambda r: r["val_loss"])
    assert len(records) == 3 and results["best"]["step"] == best["step"] and results["best"]["metric"] == "loss"
    assert results["metrics"]["loss"] == pytest.approx(best["val_loss"]) and f"best: step {best['step']}" in out
    with safe_open(run.file("top.safetensors"), "pt") as st:
        assert st.metadata()["step"] == str(best["step"])
    with safe_open(run.file("top_last.safetensors"), "pt") as st:
        assert st.metadata()["step"] == str(records[-1]["step"])

    # evaluate the validation split again: exactly the best record (top.safetensors is the best evaluation)
    val = cli("evaluate", "--run", run.path, "--split", "validation").stdout
    got = json.load(open(run.file("eval_validation.json")))
    assert got["metrics"]["accuracy"] == best["val_accuracy"] and got["metrics"]["loss"] == pytest.approx(
        best["val_loss"], abs=1e-5) and "95% bootstrap CI" in val
    # the cached test split, with confidence intervals
    cli("evaluate", "--run", run.path, "--save-predictions")
    test = json.load(open(run.file("eval_test.json")))
    assert test["examples"] == len(test_ids) == 30 and test["split"] == "test"
    for name in ("accuracy", "f1"):
        low, high = test["ci95"][name]
        assert 0 <= low <= test["metrics"][name] <= high <= 1 and high > low
    # the same rows as an external file go through the bottom + top: the same predictions
    all_rows = _pair_rows(0, 300)
    same = _write_tsv(tmp_path / "same_as_test.txt", [all_rows[i] for i in test_ids])
    cli("evaluate", "--run", run.path, "--dataset", same, "--save-predictions")
    ext = json.load(open(run.file("eval_same_as_test.json")))
    assert ext["metrics"]["accuracy"] == test["metrics"]["accuracy"] and ext["examples"] == 30
    assert ext["metrics"]["loss"] == pytest.approx(test["metrics"]["loss"], abs=1e-6), (ext, test)
    # example by example: file row j is cached example test_ids[j]
    cached = {int(r["example"]): r for r in csv.DictReader(open(run.file("predictions_test.csv")))}
    direct = list(csv.DictReader(open(run.file("predictions_same_as_test.csv"))))
    assert [int(r["example"]) for r in direct] == list(range(30)) and sorted(cached) == sorted(test_ids.tolist())
    for j, r in enumerate(direct):
        c = cached[int(test_ids[j])]
        assert (r["label"], r["prediction"]) == (c["label"], c["prediction"]) and r["label"] in ("0", "1")
        assert float(r["loss"]) == pytest.approx(float(c["loss"]), abs=1e-6), (j, r, c)
    out = cli("evaluate", "--run", run.path, "--dataset", test_file).stdout  # the "official" test file
    assert "40 examples" in out and os.path.exists(run.file("eval_pairs_test.json"))
    bad = cli("evaluate", "--run", run.path, "--label-column", "x", check=False)
    assert bad.returncode == 2 and "only apply with --dataset" in bad.stderr

    # export: world-readable like any save_pretrained output; predict takes pairs and refuses single texts
    cli("export", "--run", run.path)
    for name in os.listdir(run.file("export")):
        assert os.stat(os.path.join(run.file("export"), name)).st_mode & stat.S_IROTH, name
    a, b = "A gripping, beautifully acted film.", "Flat, dull and far too long."
    lines = cli("predict", "--model-dir", run.file("export"), a, "--text-pair", b).stdout.splitlines()
    label, score, first, second = lines[0].split("\t")
    assert len(lines) == 1 and label in ("0", "1") and 0.5 <= float(score) <= 1 and (first, second) == (a, b)
    (tmp_path / "pairs.tsv").write_text(f"{a}\t{b}\n{b}\t{a}\n")
    from_file = cli("predict", "--model-dir", run.path, "--file", tmp_path / "pairs.tsv").stdout.splitlines()
    assert len(from_file) == 2 and from_file[0] == lines[0]
    single = cli("predict", "--model-dir", run.file("export"), a, check=False)
    assert single.returncode == 2 and "trained on text pairs" in single.stderr and "--text-pair" in single.stderr


def test_failed_precompute_leaves_no_lock_and_odd_files_are_sniffed_or_named(tmp_path, tiny_model, pair_files, cli):
    train_file, _ = pair_files
    renamed = tmp_path / "corpus.dat"
    renamed.write_text(open(train_file).read())
    opts = _pair_opts(tmp_path, tiny_model("bert"), renamed, max_examples=40)
    bad = cli("precompute", *opts, "--label-column", "nope", check=False)
    assert bad.returncode == 2 and "no column(s) ['nope']" in bad.stderr
    assert not list((tmp_path / "cache").glob("*.lock"))
    cli("precompute", *opts)  # an unknown extension: sniffed as tab-separated
    assert [p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.h5")] == ["corpus"]
    prose = tmp_path / "notes.txt"
    prose.write_text("just some prose\nwithout columns\n")
    bad = cli("precompute", *_pair_opts(tmp_path, tiny_model("bert"), prose), check=False)
    assert bad.returncode == 2 and "--dataset-format csv|tsv|json|parquet" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def _simulate(records, higher, patience):
    """The rule the trainer must follow: (index of the best record, stopped early)."""
    best, since = None, 0
    for i, r in enumerate(records):
        v = r["val_accuracy"]
        if best is None or (v > records[best]["val_accuracy"] if higher else v < records[best]["val_accuracy"]):
            best, since = i, 0
        else:
            since += 1
            if patience and since >= patience:
                return best, True
    return best, False


def test_early_stopping_and_evaluation_every_n_steps(tmp_path, tiny_model, small_csv):
    cfg = tiny_cfg(tmp_path, tiny_model("bert"), small_csv, epochs=8, lr=1e-3, early_stopping_patience=1,
                   run_name="es", checkpoint_every=-1)
    precompute(cfg)
    result = train(cfg)
    run = RunDir(str(tmp_path / "runs" / "es"))
    records, results = run.metrics(), run.results()
    best, stopped = _simulate(records, True, 1)
    assert stopped and results["stopped_early"] and len(records) < 8  # 8 strict improvements on 16 examples: no
    assert results["best"]["step"] == records[best]["step"] and result["accuracy"] == records[best]["val_accuracy"]
    assert records[-1]["step"] < 8 * 16 and [r["best"] for r in records].count(True) >= 1

    from dataclasses import replace

    for name, every in (("every5", 5), ("epochs", 0)):
        train(replace(cfg, early_stopping_patience=0, epochs=2, eval_every=every, run_name=name, save_last=True))
    steps = [r["step"] for r in RunDir(str(tmp_path / "runs" / "every5")).metrics()]
    assert steps == [5, 10, 15, 20, 25, 30, 32]  # 16 steps an epoch; the end of training is always evaluated
    # when the run evaluates never changes what it trains (dropout on from the first batch, no RNG drawn)
    a, b = (load_file(tmp_path / "runs" / n / "top_last.safetensors") for n in ("every5", "epochs"))
    assert all(torch.equal(a[n], b[n]) for n in a)
