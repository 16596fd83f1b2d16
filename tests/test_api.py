"""The Python API, used as in a notebook: each step returns a small result object that agrees with the files the
run leaves (real tiny model, real data, real cache, real SQLite study)."""
import json

import pytest

import pipeline
from pipeline import PipelineError, evaluate, make_config, precompute, predict, search, train

from conftest import options


def test_notebook_flow(tmp_path, tiny_model, small_csv):
    import pipeline.train  # noqa: F401  importing a submodule leaves the package's API names alone

    assert pipeline.train is train and callable(pipeline.precompute)
    cfg = make_config("default", **options(tmp_path, tiny_model("bert"), small_csv, depths="1,2"))
    cache = precompute(cfg)
    assert cache.depths == [1, 2] and cache.label_names == ["fresh", "rotten"] and cache.splits["train"] > 0
    assert precompute(cfg).path == cache.path  # up to date: found, not rebuilt

    run = train(cfg, k=2, run_name="notebook")  # keyword overrides of the config's fields
    saved = json.loads(open(f"{run.run_dir}/results.json").read())
    assert run.metrics == saved["metrics"] and run.best_step == saved["best"]["step"]
    assert json.loads(open(f"{run.run_dir}/config.json").read())["config"]["k"] == 2

    scores = evaluate(run.run_dir, resamples=50)
    assert scores.split == "test" and scores.examples > 0
    low, high = scores.ci95["accuracy"]
    assert low <= scores.metrics["accuracy"] <= high

    out = predict(run.run_dir, ["a gripping film", "flat and dull"])
    assert out.task == "classification" and [r[0] in ("fresh", "rotten") for r in out.results] == [True, True]

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"name": "nb", "base": {"epochs": 1},
                                 "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                           "k": {"type": "categorical", "choices": [1, 2]}}}))
    found = search(cfg, str(space), trials=3, pruner="none")
    assert len(found.study.trials) == 3 and found.metric == "accuracy"
    assert found.best_value == found.study.best_value and found.best_params == found.study.best_params
    best = json.loads(open(f"{found.best_run}/results.json").read())
    assert best["metrics"]["accuracy"] == found.best_value

    with pytest.raises(PipelineError, match="is neither a run directory"):
        predict(str(tmp_path), ["x"])
