"""Faults performed for real: a SIGKILLed precompute, a disk that fills up mid-run, changed inputs, damaged files,
a held lock, concurrent writers and readers. Nothing may be lost or silently wrong."""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline import make_config
from pipeline.cache import open_cache
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.fsutil import exclusive_lock
from pipeline.precompute import precompute

from conftest import ROOT, cache_arrays, cli_args, committed_examples, options, run_cli, tiny_cfg

N_BIG = 1200  # enough tiny-model batches (size 2) for a kill to land mid-run


def _big(tmp_path, model, dataset, sub="cache", **kw):  # many small batches, each committed: kills land mid-run
    return options(tmp_path, model, dataset, sub, **{"precompute_batch_size": 2, "commit_seconds": 0, **kw})


def _popen_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_committed(tmp, proc, at_least, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        n = committed_examples(tmp)
        if n >= at_least:
            return n
        assert proc.poll() is None, f"precompute ended before committing {at_least}: {proc.communicate()}"
        time.sleep(0.005)
    raise AssertionError("precompute made no progress")


def _assert_same_arrays(a_path, b_path):
    a, b = cache_arrays(a_path), cache_arrays(b_path)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_sigkilled_precompute_resumes_to_identical_cache(tmp_path, tiny_model, corpus_csv, cli):
    opts = _big(tmp_path, tiny_model(), corpus_csv(N_BIG))
    ref = precompute(make_config(**{**opts, "cache_dir": str(tmp_path / "ref")}))

    proc = _popen_cli("precompute", *cli_args(opts))
    cfg = make_config(**opts)
    out = cfg.cache_path()
    tmp = out + ".tmp"
    _wait_committed(tmp, proc, 50)
    proc.send_signal(signal.SIGKILL)  # the holder of the lock dies too
    proc.wait()
    committed = committed_examples(tmp)
    assert 50 <= committed < N_BIG, committed  # killed in the middle
    assert not os.path.exists(out)  # never a final file from a killed run
    with pytest.raises(PipelineError, match="interrupted precompute left a .tmp"):
        open_cache(out, cfg)

    rerun = cli("precompute", *cli_args(opts)).stdout
    assert f"resuming {tmp}: {committed} of {N_BIG} examples" in rerun and "waiting" not in rerun
    assert f"{committed} resumed" in rerun
    assert not os.path.exists(tmp)
    _assert_same_arrays(ref, out)
    assert "passed all checks" in cli("check", *cli_args(opts)).stdout


MOUNT_AND_FILL = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from conftest import committed_examples
mnt, tmp, args = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt], check=True)
cli = [sys.executable, "-m", "pipeline", "precompute", *args]
proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
while committed_examples(tmp) < 50:
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.005)
with open(os.path.join(mnt, "filler"), "wb") as fh:  # another job fills the disk
    try:
        while True:
            fh.write(b"x" * (1 << 20)); fh.flush()
    except OSError:
        pass
out, err = proc.communicate()
res = {"rc": proc.returncode, "stderr": err, "tmp_exists": os.path.exists(tmp),
       "final_exists": os.path.exists(tmp[:-4]), "committed": committed_examples(tmp)}
os.remove(os.path.join(mnt, "filler"))  # the user frees space and reruns
again = subprocess.run(cli, capture_output=True, text=True)
res.update(rc2=again.returncode, stdout2=again.stdout, stderr2=again.stderr)
if again.returncode == 0:
    subprocess.run(["cp", tmp[:-4], sys.argv[5]], check=True)
print(json.dumps(res))
"""


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs unprivileged mount namespaces (unshare -rm) to mount a small tmpfs")
def test_disk_full_mid_precompute_keeps_a_resumable_file(tmp_path, tiny_model, corpus_csv):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    opts = _big(tmp_path, tiny_model(), corpus_csv(N_BIG), sub="small-disk")
    ref = precompute(make_config(**{**opts, "cache_dir": str(tmp_path / "ref")}))
    cfg = make_config(**opts)
    tmp = cfg.cache_path() + ".tmp"
    script = tmp_path / "fill.py"
    script.write_text(MOUNT_AND_FILL)
    copy = tmp_path / "resumed.h5"
    proc = subprocess.run(["unshare", "-rm", sys.executable, str(script), os.path.join(ROOT, "tests"), str(mnt), tmp,
                           json.dumps(cli_args(opts)), str(copy)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rc"] == 2 and "Traceback" not in res["stderr"], res["stderr"]
    assert "writing the cache failed" in res["stderr"] and "No space left on device" in res["stderr"]
    assert not res["final_exists"] and res["tmp_exists"] and 50 <= res["committed"] < N_BIG
    assert f"examples are committed in {tmp}; rerun the same command to resume" in res["stderr"]
    assert res["rc2"] == 0 and f"resuming {tmp}: {res['committed']} of {N_BIG}" in res["stdout2"], res["stderr2"]
    _assert_same_arrays(ref, copy)


def test_not_enough_free_space_is_refused_before_writing(tmp_path, tiny_model, small_csv, monkeypatch):
    P = importlib.import_module("pipeline.precompute")  # the package attribute is the API function

    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    cfg = tiny_cfg(tmp_path, tiny_model(), small_csv)
    with pytest.raises(PipelineError, match=r"needs about \d+ MiB but only 0 MiB are free"):
        precompute(cfg)
    assert not os.path.exists(cfg.cache_path() + ".tmp")


def test_changed_inputs_are_never_served_stale(tmp_path, tiny_model, corpus_csv, capsys):
    src = tmp_path / "reviews.csv"
    shutil.copy(corpus_csv(160), src)
    opts = cli_args(dict(model=tiny_model(), dataset=src, cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs",
                         k=1, max_length=32))
    main(["precompute", *opts])
    (cache,) = (tmp_path / "cache").glob("*.h5")
    before = cache.read_bytes()
    with h5py.File(cache) as f:
        old_fingerprint = f.attrs["dataset_fingerprint"]
    main(["precompute", *opts])
    assert "is up to date" in capsys.readouterr().out
    # the same file path, one review edited: the data changed under the same config
    text = src.read_text().splitlines()
    text[5] = text[5].replace("a", "the", 1) if "a" in text[5] else "edited," + text[5]
    src.write_text("\n".join(text) + "\n")
    with pytest.raises(SystemExit):
        main(["precompute", *opts])
    err = capsys.readouterr().err
    assert "built from different inputs" in err and "dataset contents" in err and "--force" in err
    assert cache.read_bytes() == before  # untouched without --force
    main(["precompute", "--force", *opts])
    assert "rebuilding" in capsys.readouterr().out
    with h5py.File(cache) as f:
        assert f.attrs["dataset_fingerprint"] != old_fingerprint
    # another config value gives another cache file, the first one stays
    main(["precompute", *opts, "--max-length", "24"])
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 2


def test_older_format_version_gets_a_clear_message(tmp_path, tiny_model, small_csv, capsys):
    cfg = tiny_cfg(tmp_path, tiny_model(), small_csv)
    path = precompute(cfg)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(PipelineError, match="cache format version 1, this code reads version 4; rebuild"):
        open_cache(path, cfg)


def _damaged(tmp_path, tiny_model, small_csv):
    cfg = tiny_cfg(tmp_path, tiny_model(), small_csv, max_length=32)
    return cfg, precompute(cfg)


def test_missing_dataset_and_bad_offsets_are_named(tmp_path, tiny_model, small_csv):
    cfg, path = _damaged(tmp_path, tiny_model, small_csv)
    with h5py.File(path, "r+") as f:
        del f["train/labels"]
    with pytest.raises(PipelineError) as e:
        open_cache(path, cfg)
    assert path in str(e.value) and "/train lacks dataset(s) ['labels']" in str(e.value) and "check" in str(e.value)

    cfg, path = _damaged(tmp_path / "b", tiny_model, small_csv)
    with h5py.File(path, "r+") as f:
        f["validation/offsets"][3] += 1
    with pytest.raises(PipelineError, match="/validation/offsets .* do not match /validation/lengths"):
        open_cache(path, cfg)

    cfg, path = _damaged(tmp_path / "c", tiny_model, small_csv)
    with h5py.File(path, "r+") as f:  # offsets consistent with lengths, but more rows than the hidden array has
        f["test/lengths"][-1] += 5
        f["test/offsets"][-1] += 5
    with pytest.raises(PipelineError, match=r"/test/layer_1/hidden has shape \(\d+, 32\), offsets say"):
        open_cache(path, cfg)


def test_check_finds_flipped_bytes_and_nan(tmp_path, tiny_model, small_csv, cli):
    cfg, path = _damaged(tmp_path, tiny_model, small_csv)
    opts = cli_args(dict(model=cfg.model, dataset=cfg.dataset, cache_dir=cfg.cache_dir, k=1, max_length=32))
    good = cli("check", *opts, "--recompute", 8).stdout
    assert "sha256 of" in good and "8 recomputed rows match" in good and "passed all checks" in good
    with h5py.File(path, "r") as f:
        offset = f["train/layer_1/hidden"].id.get_offset()  # contiguous: raw bytes sit at this file offset
    with open(path, "r+b") as fh:  # silent bit rot on disk: the file still opens and trains
        fh.seek(offset + 1000)
        fh.write(b"\x00\x7c\xff\xff")  # +Inf and NaN in fp16
    open_cache(path, cfg)  # structure is fine...
    bad = cli("check", "--cache", path, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "sha256 mismatch" in bad.stderr and "train/layer_1/hidden" in bad.stderr and "NaN/Inf" in bad.stderr


def test_check_recompute_detects_a_changed_model(tmp_path, tiny_model, small_csv, cli):
    model = tmp_path / "model"
    m = AutoModelForSequenceClassification.from_pretrained(tiny_model())
    m.save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_model()).save_pretrained(model)
    cfg = tiny_cfg(tmp_path, str(model), small_csv, max_length=32)
    path = precompute(cfg)
    torch.manual_seed(1)
    m.base_model.encoder.layer[0].output.dense.weight.data += 0.1 * torch.randn_like(
        m.base_model.encoder.layer[0].output.dense.weight)
    m.save_pretrained(model)
    proc = cli("check", "--cache", path, "--recompute", 8, check=False)
    assert proc.returncode == 2 and "recomputed rows differ from the cache" in proc.stderr
    assert "frozen weights" in proc.stderr


def test_held_lock_makes_a_second_writer_fail_clearly(tmp_path, tiny_model, small_csv):
    cfg = tiny_cfg(tmp_path, tiny_model(), small_csv)
    os.makedirs(cfg.cache_dir)
    opts = cli_args(dict(model=cfg.model, dataset=cfg.dataset, cache_dir=cfg.cache_dir, k=1, max_length=64))
    with exclusive_lock(cfg.cache_path() + ".lock", "test"):  # a real flock, held by this process
        proc = run_cli("precompute", *opts, "--lock-timeout", 1, check=False)
    assert proc.returncode == 2 and f"another process (pid {os.getpid()}" in proc.stderr
    assert "is writing cache" in proc.stderr and "--lock-timeout" in proc.stderr
    assert not os.path.exists(cfg.cache_path()) and not os.path.exists(cfg.cache_path() + ".tmp")


def test_two_writers_one_builds_the_other_waits(tmp_path, tiny_model, corpus_csv):
    opts = cli_args(_big(tmp_path, tiny_model(), corpus_csv(600)))
    a, b = _popen_cli("precompute", *opts), _popen_cli("precompute", *opts)
    outs = [p.communicate() for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    stdout = [o[0] for o in outs]
    assert sum("precompute done" in s for s in stdout) == 1
    assert sum("is up to date" in s for s in stdout) == 1
    assert any("waiting for another process" in s for s in stdout)


def test_concurrent_readers_share_one_cache(tmp_path, tiny_model, corpus_csv):
    cfg = tiny_cfg(tmp_path, tiny_model(), corpus_csv(400))
    precompute(cfg)
    opts = cli_args(dict(model=cfg.model, dataset=cfg.dataset, cache_dir=cfg.cache_dir, runs_dir=cfg.runs_dir, k=1,
                         max_length=64, batch_size=8, epochs=1, max_steps=12, in_memory=False, num_workers=2))
    procs = [_popen_cli("train", *opts, "--run-name", f"r{i}") for i in range(3)]
    procs.append(_popen_cli("check", *opts))
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    finals = {o[0].strip().splitlines()[-1] for o in outs[:3]}
    assert len(finals) == 1 and next(iter(finals)).startswith("accuracy=")  # same seed, same cache, same result
    assert "passed all checks" in outs[3][0]


def _checkpoints(run_dir):
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("*/trainer_state.json")) if root.exists() else []


def test_sigkilled_training_resumes_to_the_same_result(tmp_path, tiny_model, corpus_csv, cli):
    from safetensors.torch import load_file

    # evaluation every 20 steps, the best by validation loss, early stopping after 8 evaluations without a better
    # one: the resumed run must agree with the uninterrupted one on all of it
    base = dict(model=tiny_model(), dataset=corpus_csv(N_BIG), cache_dir=str(tmp_path / "cache"),
                runs_dir=str(tmp_path / "runs"), k=1, max_length=64, batch_size=8, epochs=2, lr=1e-3,
                checkpoint_every=5, eval_every=20, metric_for_best="loss", early_stopping_patience=8, save_last=True)
    precompute(make_config(**base))
    opts = cli_args(base)
    ref = cli("train", *opts, "--run-name", "ref").stdout.strip().splitlines()[-1]

    run = tmp_path / "runs" / "killed"
    proc = _popen_cli("train", *opts, "--run-name", "killed")
    steps_per_epoch = 960 // 8  # 80% of 1200 train examples
    t0 = time.time()
    while time.time() - t0 < 120:  # wait for a checkpoint in the middle of epoch 2, then kill
        states = [json.loads(p.read_text()) for p in _checkpoints(run)]
        if any(s["epoch"] == 2 and s["batches_done"] > 0 for s in states):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists() and not (run / "top.safetensors").exists()
    state = json.loads(_checkpoints(run)[-1].read_text())
    assert state["epoch"] == 2 and 0 < state["batches_done"] < steps_per_epoch and state["step"] > steps_per_epoch

    again = cli("train", *opts, "--run-name", "killed", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr  # a run dir is never silently overwritten
    resumed = cli("train", *opts, "--run-name", "killed", "--resume").stdout
    assert f"epoch 2, step {state['step']}, {state['batches_done']} batches of the epoch done" in resumed
    assert resumed.strip().splitlines()[-1] == ref  # same final metrics
    for top in ("top.safetensors", "top_last.safetensors"):  # the best and the last weights
        a, b = load_file(tmp_path / "runs" / "ref" / top), load_file(run / top)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{top} {name}")
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    ref_records = [json.loads(line) for line in open(tmp_path / "runs" / "ref" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [r["step"] for r in ref_records]  # each evaluation recorded once
    assert [r["step"] for r in records][:6] == [20, 40, 60, 80, 100, 120]
    for r, q in zip(records, ref_records):
        assert r["best"] == q["best"] and r["val_loss"] == pytest.approx(q["val_loss"], abs=1e-5)
    res, ref_res = (json.load(open(d / "results.json")) for d in (run, tmp_path / "runs" / "ref"))
    assert res["best"]["step"] == ref_res["best"]["step"] and res["stopped_early"] == ref_res["stopped_early"]
    assert not (run / "checkpoints").exists()  # removed once the run finished

    done = cli("train", *opts, "--run-name", "killed", "--resume").stdout
    assert "already finished" in done and done.strip().splitlines()[-1] == ref
    changed = cli("train", *opts, "--lr", "5e-4", "--run-name", "killed", "--resume", check=False)
    assert changed.returncode == 2 and "lr: run has 0.001, now 0.0005" in changed.stderr


@pytest.mark.parametrize("change", ["weights", "tokenizer"])
def test_precompute_refuses_a_cache_whose_model_or_tokenizer_changed(tmp_path, tiny_model, small_csv, change, capsys):
    model = tmp_path / "model"
    m = AutoModelForSequenceClassification.from_pretrained(tiny_model())
    m.save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(tiny_model())
    tok.save_pretrained(model)
    opts = cli_args(dict(model=model, dataset=small_csv, cache_dir=tmp_path / "cache", k=1, max_length=32))
    main(["precompute", *opts])
    capsys.readouterr()
    if change == "weights":
        with torch.no_grad():
            m.base_model.embeddings.word_embeddings.weight[7] += 1.0
        m.save_pretrained(model)
    else:
        tok.add_tokens(["frozentopword"])
        tok.save_pretrained(model)
    with pytest.raises(SystemExit):
        main(["precompute", *opts])
    err = capsys.readouterr().err
    word = "frozen weights" if change == "weights" else "the tokenizer (vocabulary"
    assert "built from different inputs" in err and word in err and "--force" in err
