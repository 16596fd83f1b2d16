"""Cheap repeated experiments: multi-depth caches, freezing strategies vs requires_grad on the full model, sweeps,
export + predict, TensorBoard tracking. Real tiny models, real files, the real CLI."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import h5py
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.cache import CachedSplit, open_cache
from pipeline.errors import PipelineError
from pipeline.model import load_top
from pipeline.precompute import precompute
from pipeline.train import build_optimizer, train
from pipeline.verify import verify

from conftest import ROOT, TINY, TokenSplit, cli_args, reference_training, run_cli, tiny_cfg


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory, tiny_model):
    """A tiny BERT with its classifier saved (nothing random at load) and no dropout: training is deterministic
    and comparable step by step with the full model."""
    path = tmp_path_factory.mktemp("bert-nodrop")
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", **TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  classifier_dropout=0.0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model()).save_pretrained(path)
    return str(path)


def _cfg(tmp_path, model, data, **kw):  # fp32 cache: exact comparisons; no checkpoints: fast
    return tiny_cfg(tmp_path, model, data, **{"cache_dtype": "float32", "checkpoint_every": -1, **kw})


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "electra"])
def test_multi_depth_cache_round_trip(tmp_path, tiny_model, small_csv, capsys, model_type):
    cfg = _cfg(tmp_path, tiny_model(model_type), small_csv, depths="0,1,3", k=1)
    path = precompute(cfg)
    out = capsys.readouterr().out
    assert "MiB per cached depth" in out and "x 3 depth(s) [0, 1, 3]" in out
    with h5py.File(path) as f:
        assert json.loads(f.attrs["depths_json"]) == [0, 1, 3]
        assert all(f"train/layer_{d}/hidden" in f for d in (0, 1, 3)) and "train/layer_2/hidden" not in f
        assert set(json.loads(f.attrs["weights_sha256_json"])) == {"0", "1", "3"}
    for d in (0, 1, 3):  # each depth equals the full model's hidden_states[d]; the top on it gives its logits
        r = verify(replace(cfg, k=d), path, samples=16)
        assert r["max_abs_hidden_diff"] <= 1e-5 and r["max_abs_logit_diff"] <= 1e-5, (d, r)
    with pytest.raises(PipelineError, match=r"holds the hidden states at depths \[0, 1, 3\]; this run trains from "
                                            r"depth\(s\) \[2\]"):
        train(replace(cfg, k=2, depths=""), cache_path=path)
    # another k from the same cache: no precompute, head only (k = L) included
    for k in (3, 0):
        r = train(replace(cfg, k=k, max_steps=2, run_name=f"k{k}"))
        assert 0 <= r["accuracy"] <= 1
    if model_type == "bert":  # head only: pooler + classifier
        assert json.load(open(tmp_path / "runs" / "k3" / "results.json"))["trainable_params"] == 32 * 33 + 2 * 33


@pytest.mark.parametrize("strategy", [dict(k=3), dict(k=1, layer_lr_decay=0.5),
                                      dict(stages="3,2,1", layer_lr_decay=0.8)],
                         ids=["head-only", "top-2-discriminative-lr", "gradual-unfreezing"])
def test_strategies_equal_requires_grad_on_the_full_model(tmp_path, no_dropout_bert, small_csv, strategy):
    cfg = _cfg(tmp_path, no_dropout_bert, small_csv, lr=1e-3, run_name="ours", save_last=True, **strategy)
    path = precompute(cfg)
    train(cfg)
    ours = load_file(tmp_path / "runs" / "ours" / "top_last.safetensors")  # the last weights (top = the best)
    ref = reference_training(cfg, path, no_dropout_bert).state_dict()
    d = cfg.stage_depths()[-1]
    original = AutoModelForSequenceClassification.from_pretrained(no_dropout_bert).state_dict()
    for name, t in ours.items():
        parts = name.split("encoder.layer.")
        ref_name = f"{parts[0]}encoder.layer.{int(parts[1].split('.')[0]) + d}.{parts[1].split('.', 1)[1]}" \
            if len(parts) > 1 else name
        torch.testing.assert_close(t, ref[ref_name], rtol=1e-4, atol=1e-5, msg=ref_name)
        assert not torch.equal(t, original[ref_name]), f"{ref_name} did not train"


def test_export_gives_the_same_logits_and_predict_classifies_texts(tmp_path, tiny_model, small_csv, cli):
    cfg = _cfg(tmp_path, tiny_model("roberta"), small_csv, k=1, max_steps=3, lr=1e-3, run_name="r")
    path = precompute(cfg)
    train(cfg)
    run = tmp_path / "runs" / "r"
    out = cli("export", "--run", run).stdout
    assert "exported" in out
    exported = AutoModelForSequenceClassification.from_pretrained(run / "export").eval()
    assert exported.config.id2label == {0: "fresh", 1: "rotten"}
    assert any(n.endswith(".safetensors") for n in os.listdir(run / "export"))
    info = open_cache(path, cfg)
    top, _ = load_top(cfg, info.num_labels, info.label_names)
    top.load_state_dict(load_file(run / "top.safetensors"))
    top.eval()
    tokens, states = TokenSplit(path, "validation"), CachedSplit(path, "validation", 1)
    everything = list(range(len(states)))
    batch = states.__getitems__(everything)
    ids = tokens.__getitems__(everything)["inputs_embeds"]
    ids[batch["attention_mask"] == 0] = exported.config.pad_token_id
    with torch.no_grad():
        a = exported(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        b = top(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    texts = ["A gripping, beautifully acted film.", "Flat, dull and far too long."]
    from_export = cli("predict", "--model-dir", run / "export", *texts).stdout.strip().splitlines()
    from_run = cli("predict", "--model-dir", run, *texts).stdout.strip().splitlines()
    assert from_export == from_run and len(from_export) == 2
    for line, text in zip(from_export, texts):
        label, score, echoed = line.split("\t")
        assert label in ("fresh", "rotten") and 0.5 <= float(score) <= 1 and echoed == text
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert cli("predict", "--model-dir", run, "--file", tmp_path / "texts.txt").stdout.strip().splitlines() \
        == from_run
    piped = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model-dir", str(run)], cwd=ROOT,
                           input="\n".join(texts), capture_output=True, text=True)
    assert piped.stdout.strip().splitlines() == from_run
    bad = cli("predict", "--model-dir", tmp_path, "x", check=False)
    assert bad.returncode == 2 and "neither a run directory" in bad.stderr


def test_sweep_runs_a_grid_resumably_and_writes_table_and_plot(tmp_path, tiny_model, small_csv, cli):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"name": "tiny", "base": {"depths": "1,2,3", "epochs": 1, "max_steps": 2},
                                "grids": [{"k": [3, 1], "seed": [1, 2]}, {"stages": ["3,2"], "seed": [1, 2]}]}))
    opts = cli_args(dict(model=tiny_model(), dataset=small_csv, cache_dir=tmp_path / "cache",
                         runs_dir=tmp_path / "runs", max_length=64, batch_size=8, precompute_batch_size=16))
    out = run_cli("sweep", "--grid", grid, "--jobs", "2", *opts).stdout  # two worker processes on one study
    assert "sweep tiny: 6 runs from 1 cache(s), 2 worker process(es), 0 finished earlier" in out
    assert "precompute done" in out
    d = tmp_path / "runs" / "tiny"
    import csv

    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{d / 'study.db'}")  # the grid on Optuna
    assert sorted(t.params["point"] for t in study.trials) == sorted(
        ["k=3_seed=1", "k=3_seed=2", "k=1_seed=1", "k=1_seed=2", "seed=1_stages=3-2", "seed=2_stages=3-2"])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # each point once
    assert "| complete |" in (d / "trials.md").read_text()

    rows = list(csv.DictReader(open(d / "results.csv")))
    assert len(rows) == 6 and list(rows[0])[:3] == ["run", "strategy", "trainable_blocks"]
    assert {r["strategy"] for r in rows} == {"head only", "top 2 blocks", "gradual 3,2"}
    assert all(0 <= float(r["last_accuracy"]) <= float(r["val_accuracy"]) <= 1 for r in rows)  # best by accuracy
    picked = [r for r in rows if r["pick"] == "best"]
    assert len(picked) == 1 and float(picked[0]["val_accuracy"]) == max(float(r["val_accuracy"]) for r in rows)
    md = (d / "results.md").read_text()
    assert "| [k=3_seed=1](k=3_seed=1) | head only | 0 |" in md and "| gradual 3,2 | 1 |" in md
    hint = f"python -m pipeline evaluate --run {d / picked[0]['run']} --split test"
    assert hint in md and hint in out and "test_acc" not in out  # validation picks; test metrics never printed
    assert (d / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        assert (d / row["run"] / "results.json").exists() and (d / row["run"] / "top.safetensors").exists()
    again = cli("sweep", "--grid", grid, *opts).stdout  # the same command continues the study: nothing left
    assert "6 finished earlier" in again and ": training" not in again and "is up to date" in again
    assert hint in again and len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{d / 'study.db'}")
                                 .trials) == 6


def test_tensorboard_tracking(tmp_path, tiny_model, small_csv):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, tiny_model(), small_csv, k=1, epochs=2, max_steps=-1, run_name="tb",
               report_to="tensorboard")
    precompute(cfg)
    train(cfg)
    run = tmp_path / "runs" / "tb"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("val_accuracy")]
    assert len(steps) == 2 and steps == sorted(steps)
    assert len(open(run / "metrics.jsonl").readlines()) == 2  # the run dir keeps its own record as always
    with pytest.raises(PipelineError, match="not installed here"):
        train(replace(cfg, report_to="no-such-tracker", run_name="x"))


def test_discriminative_lr_per_layer(no_dropout_bert, small_csv, tmp_path):
    cfg = _cfg(tmp_path, no_dropout_bert, small_csv, k=1, lr=1e-3, layer_lr_decay=0.5)
    top, _ = load_top(cfg, 2, ["a", "b"])
    opt, _ = build_optimizer(top, cfg, 10, depth=1, num_layers=3)
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # before warmup
    named = dict(top.named_parameters())
    # original layers 1 and 2 (top-local 0 and 1): lr * 0.5^2 and lr * 0.5; pooler and head: lr
    assert lr_of[id(named["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(2.5e-4)
    assert lr_of[id(named["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(named["bert.pooler.dense.weight"])] == lr_of[id(named["classifier.weight"])] == 1e-3
