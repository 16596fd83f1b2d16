"""The real CLI end to end on tiny models and real files: precompute -> train (2 steps) -> verify."""
import json
from dataclasses import replace
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

from pipeline.cache import open_cache
from pipeline.precompute import precompute
from pipeline.train import train

from conftest import ROOT, cli_args, corpus_rows, options, run_cli, tiny_cfg


def _opts(tmp_path, model, dataset, **kw):
    return cli_args(options(tmp_path, model, dataset, **kw))


def test_cli_precompute_train_verify(tmp_path, tiny_model, small_csv, cli):
    opts = _opts(tmp_path, tiny_model("bert"), small_csv)
    out = run_cli("precompute", *opts).stdout
    assert "precompute done: 160 examples" in out
    (path,) = (tmp_path / "cache").glob("*.h5")
    assert not list((tmp_path / "cache").glob("*.tmp"))

    with h5py.File(path) as f:
        a = f.attrs
        assert a["complete"] and a["format_version"] == 4 and json.loads(a["depths_json"]) == [1]
        assert a["dtype"] == "float16"
        assert json.loads(a["config_json"])["k"] == 1 and json.loads(a["weights_sha256_json"])["1"].startswith("file:")
        assert json.loads(a["label_names_json"]) == ["fresh", "rotten"]
        assert json.loads(a["tokenizer_json"])["max_length"] == 64
        assert set(json.loads(a["versions_json"])) >= {"torch", "transformers", "h5py"}
        sizes = {s: f[s]["lengths"].shape[0] for s in ("train", "validation", "test")}
        assert sizes == {"train": 128, "validation": 16, "test": 16}
        all_ids = np.concatenate([f[s]["example_ids"][:] for s in sizes])
        assert sorted(all_ids.tolist()) == list(range(160))  # disjoint splits covering every row
        g = f["train"]
        lengths, offsets, hidden = g["lengths"][:], g["offsets"][:], g["layer_1/hidden"]
        # ragged storage: exactly one row per real token, no padding
        assert offsets[0] == 0 and offsets[-1] == lengths.sum() == hidden.shape[0] == g["input_ids"].shape[0]
        assert np.all(np.diff(offsets) == lengths) and np.all(np.diff(lengths) >= 0)  # stored sorted by length
        assert hidden.dtype == np.float16 and hidden.shape[1] == 32
        assert (f["progress"][:] > 0).all() and f["progress"][:].sum() == sum(sizes.values())
        assert "train/layer_1/hidden" in json.loads(a["checksums_json"])
        assert np.isfinite(hidden[:]).all()
        # labels are stratified: both classes in validation
        assert set(f["validation"]["labels"][:].tolist()) == {0, 1}

    assert "up to date" in cli("precompute", *opts).stdout

    proc = cli("train", *opts, "--max-steps", 2, "--run-name", "smoke")
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"accuracy=\d\.\d{4} f1=\d\.\d{4} loss=\d\.\d{4}", last), proc.stdout
    run = tmp_path / "runs" / "smoke"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert len(records) == 1 and records[0]["step"] == 2 and 0 <= records[0]["val_accuracy"] <= 1
    assert json.load(open(run / "config.json"))["config"]["k"] == 1
    with safe_open(str(run / "top.safetensors"), "pt") as st:
        meta = st.metadata()
        names = list(st.keys())
    assert json.loads(meta["config_json"])["max_steps"] == 2 and meta["k"] == "1"
    assert any(n.startswith("bert.encoder.layer.1.") for n in names)  # top holds layers 1, 2 renumbered 0, 1
    assert not any(n.startswith("bert.encoder.layer.2.") or "embeddings" in n for n in names)

    ver = cli("verify", *opts, "--samples", 16).stdout
    diff = float(re.search(r"max_abs_logit_diff=(\S+)", ver).group(1))
    assert diff < 1e-3


def test_reference_preset_with_local_standins(tmp_path, tiny_model, cli):
    """The bert-base-amazon preset's own loading path (load_dataset(name, config, split) + from_pretrained(id)),
    pointed at a local folder dataset and a tiny local BERT instead of the Hub. A stand-in dataset is another
    dataset: the preset's column names apply to amazon_polarity only, so the stand-in names its text column."""
    folder = tmp_path / "amazon_like"
    folder.mkdir()
    rows = corpus_rows(100)
    pd.DataFrame({"title": ["t"] * 100, "content": [r["text"] for r in rows],
                  "label": [int(r["category"] == "fresh") for r in rows]}).to_parquet(folder / "train.parquet")
    opts = cli_args(dict(model=tiny_model("bert"), dataset=folder, cache_dir=tmp_path / "cache",
                         runs_dir=tmp_path / "runs", k=2, max_length=64, precompute_batch_size=32,
                         text_column="content"))
    cli("precompute", "--preset", "bert-base-amazon", "--split", "train[:80]", *opts)
    (path,) = (tmp_path / "cache").glob("*.h5")
    assert path.name.startswith("amazon_like-k2-")  # named after the data (the preset's own dataset: the preset)
    with h5py.File(path) as f:
        assert json.loads(f.attrs["splits_json"]) == ["validation", "train"]  # 80/20, no test split
        assert f["validation/lengths"].shape[0] == 16 and f["train/lengths"].shape[0] == 64
        cfg = json.loads(f.attrs["config_json"])
        assert (cfg["lr"], cfg["batch_size"], cfg["text_column"], cfg["preset"]) == (2e-5, 16, "content",
                                                                                     "bert-base-amazon")
    out = cli("train", "--preset", "bert-base-amazon", "--split", "train[:80]", *opts, "--max-steps", 2).stdout
    assert re.search(r"^accuracy=\S+ f1=\S+ loss=\S+$", out, re.M)


def test_multiprocess_training_with_torchrun(tmp_path, tiny_model, small_csv, cli):
    opts = _opts(tmp_path, tiny_model("bert"), small_csv)
    cli("precompute", *opts)
    # --standalone: a rendezvous on a free local port (not the fixed 29500 another job may hold)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipeline", "train", *map(str, opts), "--max-steps", "3", "--run-name", "ddp"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    rec = json.loads(open(tmp_path / "runs" / "ddp" / "metrics.jsonl").readline())
    assert rec["step"] == 3
    # gather_for_metrics drops the duplicates padded into the last batch: accuracy over exactly 16 examples
    assert (rec["val_accuracy"] * 16) == round(rec["val_accuracy"] * 16)


def test_regression_jsonl_and_text_pair_parquet(tmp_path, tiny_model, cli):
    rows = corpus_rows(90)
    jsonl = tmp_path / "scores.jsonl"
    with open(jsonl, "w") as fh:
        for i, r in enumerate(rows):
            fh.write(json.dumps({"sentence": r["text"], "score": (i % 7) / 3.0}) + "\n")
    cfg = tiny_cfg(tmp_path, tiny_model("roberta"), str(jsonl), task="regression", text_column="sentence",
                   label_column="score", exclude_labels=None, max_steps=2, run_name="reg")
    info = open_cache(precompute(cfg), cfg)
    assert info.num_labels == 1 and info.label_names is None
    result = train(cfg)
    assert set(result) >= {"mse", "pearson", "spearman"} and result["mse"] >= 0
    texts = ["A gripping, beautifully acted film.", "Flat, dull and far too long."]
    lines = cli("predict", "--model-dir", tmp_path / "runs" / "reg", *texts).stdout.splitlines()
    assert [line.split("\t")[1] for line in lines] == texts  # one value per prediction, then the text
    assert all(float(line.split("\t")[0]) == float(line.split("\t")[0]) for line in lines)

    pq = tmp_path / "pairs.parquet"
    pd.DataFrame({"premise": [r["text"] for r in rows], "hypothesis": [r["text"][::-1] for r in rows],
                  "label": [i % 3 for i in range(90)]}).to_parquet(pq)
    cfg = tiny_cfg(tmp_path, tiny_model("electra"), str(pq), text_column="premise", text_pair_column="hypothesis",
                   label_column="label", exclude_labels=None, max_steps=2, run_name="pair")
    path = precompute(cfg)
    info = open_cache(path, cfg)
    assert info.label_names == ["0", "1", "2"] and info.num_labels == 3
    with h5py.File(path) as f:
        assert set(f["train/token_type_ids"][:].tolist()) == {0, 1}  # both segments present
    assert set(train(cfg)) >= {"accuracy", "f1"}


def test_training_is_deterministic_with_a_seed(tmp_path, tiny_model, small_csv):
    cfg = tiny_cfg(tmp_path, tiny_model("distilbert"), small_csv, max_steps=6, lr=1e-3)
    precompute(cfg)
    a = train(replace(cfg, run_name="a"))
    b = train(replace(cfg, run_name="b"))
    c = train(replace(cfg, run_name="c", seed=7))
    wa, wb, wc = (safe_open(str(tmp_path / "runs" / r / "top.safetensors"), "pt") for r in "abc")
    key = "classifier.weight"
    assert (wa.get_tensor(key) == wb.get_tensor(key)).all() and a == {**b, "run_dir": a["run_dir"]}
    assert not (wa.get_tensor(key) == wc.get_tensor(key)).all()


def test_bf16_autocast_and_gradient_accumulation(tmp_path, tiny_model, small_csv):
    cfg = tiny_cfg(tmp_path, tiny_model("bert"), small_csv, max_steps=3, grad_accum=2, mixed_precision="bf16",
                   run_name="bf16", group_by_length=False, num_workers=2, in_memory=False)
    precompute(cfg)
    result = train(cfg)
    rec = json.loads(open(tmp_path / "runs" / "bf16" / "metrics.jsonl").readline())
    assert rec["step"] == 3 and 0 <= result["accuracy"] <= 1  # 3 optimizer steps = 6 batches of 8
    assert rec["train_tokens_per_s"] > 0


@pytest.mark.fast
def test_each_command_shows_only_its_options_grouped_by_purpose(capsys):
    from dataclasses import fields

    from pipeline.cli import main
    from pipeline.config import OPTION_GROUPS, Config

    grouped = [n for names in OPTION_GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(f.name for f in fields(Config) if f.name != "preset")  # each field once

    def help_of(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return capsys.readouterr().out

    check, train = help_of("check"), help_of("train")
    def offers(text, option):  # an option's own help line (other options' help may mention it)
        return re.search(rf"^\s+{option}\b", text, re.M) is not None

    assert not offers(check, "--lr") and not offers(check, "--epochs") and not offers(check, "--run-name")
    assert offers(check, "--cache-dir") and offers(check, "--model") and offers(train, "--lr")
    assert "data options:" in check and "training options:" not in check
    for group in ("model and device", "data", "cache", "training", "evaluation", "runs"):
        assert f"{group} options:" in train
    body = train[train.index("training options:"):train.index("evaluation options:")]
    assert offers(body, "--lr") and offers(body, "--epochs") and not offers(body, "--eval-every")
    # an option a command does not read is still accepted (one option list for precompute and train)
    from pipeline.cli import build_parser

    assert build_parser().parse_args(["precompute", "--lr", "1e-4"]).lr == 1e-4
