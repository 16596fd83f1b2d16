"""Hyperparameter search on Optuna from one multi-depth cache: trials are ordinary runs that report every
evaluation and stop when the median pruner says so; the study lives in SQLite beside the runs and a rerun
continues it; bad spaces are refused before any trial. Real tiny model, real data, a real SQLite study."""
import json

import optuna
import pytest

from pipeline.errors import PipelineError

from conftest import cli_args, options


def _space(tmp_path, space, base=None, name="s"):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"name": name, "base": base or {}, "space": space}))
    return p


def test_search_prunes_reports_every_evaluation_and_continues(tmp_path, tiny_model, small_csv, cli):
    space = _space(tmp_path, {"lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
                              "k": {"type": "categorical", "choices": [1, 2]}},
                   base={"epochs": 2, "eval_every": 4, "checkpoint_every": -1})
    opts = cli_args(options(tmp_path, tiny_model("bert"), small_csv))
    out = cli("search", "--space", space, "--trials", 8, *opts).stdout
    db = tmp_path / "runs" / "s.db"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert len(states) == 8 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the median pruner stopped no trial"
    for t in study.trials:
        run = tmp_path / "runs" / f"s-{t.number:04d}"
        records = [json.loads(line) for line in open(run / "metrics.jsonl")]
        # every evaluation was reported to the study at its step
        assert {r["step"]: r["val_accuracy"] for r in records} == t.intermediate_values
        if t.state == optuna.trial.TrialState.PRUNED:
            assert json.loads((run / "pruned.json").read_text())["step"] == max(t.intermediate_values)
            assert not (run / "results.json").exists()
        else:
            assert json.loads((run / "results.json").read_text())["metrics"]["accuracy"] == t.value
    assert {t.params["k"] for t in study.trials} <= {1, 2}
    (cache,) = (tmp_path / "cache").glob("*.h5")
    assert "-k1_2-" in cache.name  # one cache holds every depth the space names
    best = study.best_trial
    assert f"best trial {best.number}: accuracy={best.value:.4f}" in out
    assert f"python -m pipeline evaluate --run {tmp_path / 'runs' / f's-{best.number:04d}'}" in out
    table = (tmp_path / "runs" / "s.md").read_text()
    assert table.count("| pruned |") == len(pruned) and "(s-0000)" in table
    # the same command with a larger --trials continues the study
    cli("search", "--space", space, "--trials", 9, *opts)
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials) == 9
    # --timeout: no trial starts after S seconds (the one running then finishes)
    cli("search", "--space", space, "--trials", 50, "--timeout", 1, *opts)
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials) <= 12
    # the same study name with another space is refused
    other = _space(tmp_path, {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, name="s")
    r = cli("search", "--space", other, "--trials", 10, *opts, check=False)
    assert r.returncode == 2 and "another search space" in r.stderr
    # its database removed, a new study of that name meets the old runs: refused, nothing overwritten
    before = (tmp_path / "runs" / "s-0000" / "metrics.jsonl").read_text()
    db.unlink()
    r = cli("search", "--space", other, "--trials", 1, *opts, check=False)
    assert r.returncode == 2 and "holds a run with other settings than trial 0" in r.stderr
    assert "--study-name" in r.stderr and (tmp_path / "runs" / "s-0000" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("space,message", [
    ({"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}}, "'learning_rate' is not a Config field"),
    ({"lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, "needs numbers low < high"),
    ({"lr": {"type": "float", "low": 0, "high": 1e-3, "log": True}}, "a log scale needs low > 0"),
    ({"k": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"lr": {"type": "normal"}}, "type must be one of float, int, categorical"),
])
def test_bad_spaces_are_refused_before_any_trial(tmp_path, space, message):
    from pipeline.search import read_space

    with pytest.raises(PipelineError, match=message):
        read_space(_space(tmp_path, space))


def test_a_depth_the_model_lacks_is_refused(tmp_path, tiny_model, small_csv, cli):
    space = _space(tmp_path, {"k": {"type": "categorical", "choices": [1, 7]}})
    r = cli("search", "--space", space, *cli_args(options(tmp_path, tiny_model("bert"), small_csv)), check=False)
    assert r.returncode == 2 and "depth 7 is out of range" in r.stderr
    assert not (tmp_path / "runs" / "s.db").exists()


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_two_worker_processes_share_one_study(tmp_path, tiny_model, small_csv, cli, storage, request):
    """--jobs 2: this process and one more worker process run trials of one study kept in a journal file (the
    storage for a shared filesystem) or on a real PostgreSQL server; together they finish exactly the trials asked,
    each once."""
    from pipeline.search import open_storage

    url = str(tmp_path / "study.log") if storage == "journal" else request.getfixturevalue("postgres_url")
    space = _space(tmp_path, {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                              "seed": {"type": "int", "low": 1, "high": 50}},
                   base={"epochs": 14, "checkpoint_every": -1})  # ~1 s a trial; the 2nd worker starts in ~5 s
    opts = cli_args(options(tmp_path, tiny_model("bert"), small_csv))
    out = cli("search", "--space", space, "--trials", 12, "--jobs", 2, "--storage", url, "--pruner", "none",
              *opts).stdout
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    assert len(study.trials) == 12 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both processes ran trials
    # the worker numbers offset the sampler's seed: the two did not draw the same values
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 12
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert runs == [f"s-{i:04d}" for i in range(12)]  # each trial once, in its own run directory
    assert all((tmp_path / "runs" / r / "results.json").exists() for r in runs)
    assert "best trial" in out and (tmp_path / "runs" / "s_history.png").stat().st_size > 0


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/no/such/folder/s.db",
                                 "postgresql+psycopg2://user@127.0.0.1:1/optuna"])  # nothing listens on port 1
def test_a_storage_that_cannot_be_opened_is_refused(tmp_path, tiny_model, small_csv, cli, url):
    if url.startswith("postgresql"):
        pytest.importorskip("psycopg2", reason="the psycopg2 driver is not installed: pip install psycopg2-binary")
    space = _space(tmp_path, {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    r = cli("search", "--space", space, "--storage", url.format(tmp=tmp_path),
            *cli_args(options(tmp_path, tiny_model("bert"), small_csv)), check=False)
    assert r.returncode == 2 and "cannot open --storage" in r.stderr
    assert not (tmp_path / "runs" / "s-0000").exists()  # no trial ran


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_worker_killed_mid_trial_is_retried_from_its_checkpoint(tmp_path, tiny_model, small_csv, storage):
    """Two search processes on one study (as on two machines); one is SIGKILLed in the middle of a trial that has a
    checkpoint. The other fails that trial (SQLite: its heartbeat went stale; journal file: its worker process on
    this machine is gone), retries it from the checkpoint, and the study ends with the trials asked, none lost."""
    import os
    import signal
    import subprocess
    import sys
    import time

    space = _space(tmp_path, {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                              "seed": {"type": "int", "low": 1, "high": 50}},
                   base={"epochs": 30, "checkpoint_every": 4})
    url = f"sqlite:///{tmp_path / 's.db'}" if storage == "sqlite" else str(tmp_path / "s.log")
    opts = cli_args(options(tmp_path, tiny_model("bert"), small_csv))
    cmd = [sys.executable, "-m", "pipeline", "search", "--space", str(space), "--trials", "3", "--pruner", "none",
           "--heartbeat", "1", "--storage", url, *map(str, opts)]
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from pipeline.search import open_storage

    def load():
        return optuna.load_study(study_name="s", storage=open_storage(url, 1))

    deadline, killed = time.time() + 120, None
    while killed is None and time.time() < deadline and victim.poll() is None:
        time.sleep(0.1)
        try:
            running = load().get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # the study is not created yet
            continue
        for t in running:
            # a complete checkpoint (trainer_state.json is written last): a checkpoint folder alone may be one the
            # kill cuts short, which the retry rightly passes over
            if t.user_attrs.get("worker", "").endswith(f":{victim.pid}") and \
                    any((tmp_path / "runs" / f"s-{t.number:04d}" / "checkpoints").glob("*/trainer_state.json")):
                os.kill(victim.pid, signal.SIGKILL)
                killed = t
                break
    assert killed is not None, "the victim never held a running trial with a checkpoint"
    victim.wait()
    out = other.communicate(timeout=240)[0]
    assert other.returncode == 0, out
    trials = load().trials
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and states.count(optuna.trial.TrialState.FAIL) == 1
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == killed.params
    run = tmp_path / "runs" / f"s-{killed.number:04d}"
    assert retry.user_attrs["run_dir"] == str(run) and f"resuming {run} from" in out  # from its checkpoint
    assert json.loads((run / "results.json").read_text())["metrics"]["accuracy"] == retry.value
    runs = {t.user_attrs["run_dir"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(runs) == 3  # three runs, none trained twice
