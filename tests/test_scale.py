"""The scale paths: memory-mapped batches equal the stored arrays, the batch order equals transformers' sampler,
several processes for precompute (two nodes: equal to one process, a killed node resumes) and for training (DDP
equal to one process, gradual unfreezing and a SIGKILLed run resumed under 2 processes; two nodes)."""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.trainer_pt_utils import get_length_grouped_indices

from pipeline.cache import Batches, CachedSplit
from pipeline.config import PACKAGED_MINILM
from pipeline.model import resolve_model_path
from pipeline.precompute import precompute

from conftest import ROOT, TINY, cache_arrays, cli_args, committed_examples, run_cli, tiny_cfg

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torchrun gives each process one thread: the reference runs alike


def _torchrun(*args, env=None, check=True, popen=False):
    # --standalone: a rendezvous on a free local port (not the fixed 29500 another job may hold)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline",
           *map(str, args)]
    kw = dict(cwd=ROOT, env={**os.environ, **ONE_THREAD, **(env or {})}, text=True, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    if popen:
        return subprocess.Popen(cmd, start_new_session=True, **kw)
    proc = subprocess.run(cmd, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_memmap_batches_equal_the_stored_arrays(tmp_path, tiny_model, small_csv):
    cfg = tiny_cfg(tmp_path, tiny_model(), small_csv, depths="0,1")
    path = precompute(cfg)
    idx = [5, 0, 17, 3, 90, 3]  # any order, repeats allowed
    with h5py.File(path) as f:
        offsets, hidden, labels = f["train/offsets"][:], f["train/layer_0/hidden"][:], f["train/labels"][:]
    for in_memory, from_disk in ((False, False), (True, False), (False, True)):
        ds = CachedSplit(path, "train", 0, in_memory=in_memory)
        ds._from_disk = from_disk  # the path of a split larger than half the RAM: madvise the batch's rows first
        assert isinstance(ds._map(), np.ndarray) and (isinstance(ds._hidden, np.memmap) != in_memory)
        batch = ds.__getitems__(idx)
        x, mask = batch["inputs_embeds"], batch["attention_mask"]
        assert x.dtype == torch.float16 and x.shape == (6, int(np.diff(offsets)[idx].max()), 32)
        for row, i in enumerate(idx):
            n = offsets[i + 1] - offsets[i]
            assert np.array_equal(x[row, :n].numpy(), hidden[offsets[i]:offsets[i + 1]])
            assert (x[row, n:] == 0).all() and mask[row].sum() == n and mask[row, :n].all()
        assert batch["labels"].tolist() == labels[idx].tolist()
    # a ring of reused buffers (the training loop's) gives the same values, and DataLoader workers map the file
    ring = CachedSplit(path, "train", 0, reuse_buffers=True)
    for _ in range(5):
        assert torch.equal(ring.__getitems__(idx)["inputs_embeds"], batch["inputs_embeds"])
    from pipeline.train import make_loader
    from dataclasses import replace

    loaders = [make_loader(CachedSplit(path, "train", 0), replace(cfg, num_workers=w), True, False,
                           torch.Generator().manual_seed(3)) for w in (0, 2)]
    for a, b in zip(*loaders):
        assert torch.equal(a["inputs_embeds"], b["inputs_embeds"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.fast
def test_batch_order_is_transformers_length_grouped_order():
    lengths = np.random.default_rng(0).integers(1, 60, size=1000)
    lengths[123] = 500  # one longest example: outside the first megabatch for most seeds, so it is swapped first
    for bs in (8, 32):
        for seed in range(4):
            ours = [i for b in Batches(lengths, bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
                    for i in b]
            ref = get_length_grouped_indices(lengths.tolist(), bs, generator=torch.Generator().manual_seed(seed))
            assert ours == ref and ours[0] == 123
    plain = [i for b in Batches(lengths, 8, shuffle=True, grouped=False, generator=torch.Generator().manual_seed(1))
             for i in b]
    assert plain == torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    assert [len(b) for b in Batches(lengths[:20], 8)] == [8, 8, 4]


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("no-dropout-bert")
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", **TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM)).save_pretrained(path)
    return str(path)


def _weights(tmp_path, name):
    return load_file(tmp_path / "runs" / name / "top.safetensors")


def _assert_close(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def assert_two_processes_train_like_one(tmp_path, opts, cli):
    """Precompute, then train runs "one" (1 process) and "two" (torchrun, 2): the same validation line and weights."""
    cli("precompute", *opts)
    single = run_cli("train", *opts, "--run-name", "one", env=ONE_THREAD).stdout
    ddp = _torchrun("train", *opts, "--run-name", "two").stdout
    assert "2 process(es)" in ddp and "1 process(es)" in single
    assert single.strip().splitlines()[-1] == ddp.strip().splitlines()[-1]  # the same validation metrics
    _assert_close(_weights(tmp_path, "one"), _weights(tmp_path, "two"))


def test_ddp_equals_one_process_with_gradual_unfreezing_and_resume(tmp_path, no_dropout_model, small_csv, cli):
    # 128 train examples, global batch 8: 16 full batches per epoch, each split 4 + 4 over the processes
    opts = cli_args(dict(model=no_dropout_model, dataset=small_csv, cache_dir=tmp_path / "cache",
                         runs_dir=tmp_path / "runs", depths="1,2,3", stages="3,2,1", epochs=2, max_length=64,
                         batch_size=8, eval_batch_size=16, lr=1e-3, checkpoint_every=5))
    assert_two_processes_train_like_one(tmp_path, opts, cli)

    # killed mid-stage 2 after a checkpoint, then resumed with 2 processes: still the single-process result
    proc = _torchrun("train", *opts, "--run-name", "killed", popen=True)
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    t0 = time.time()
    while not any("_epoch_003_" in p.name and not p.name.endswith("_000000") and (p / "trainer_state.json").exists()
                  for p in (ckpts.iterdir() if ckpts.exists() else [])):
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.01)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGKILL)  # torchrun and its workers (which run in sessions of their own)
    proc.communicate()
    assert not (tmp_path / "runs" / "killed" / "results.json").exists()
    resumed = _torchrun("train", *opts, "--run-name", "killed", "--resume").stdout
    assert "resuming" in resumed and "epoch 3" in resumed
    _assert_close(_weights(tmp_path, "one"), _weights(tmp_path, "killed"))


def test_global_batch_must_split_evenly(tmp_path, tiny_model, small_csv, cli):
    opts = cli_args(dict(model=tiny_model(), dataset=small_csv, cache_dir=tmp_path / "cache", k=1, max_length=64,
                         batch_size=7, runs_dir=tmp_path / "runs"))
    cli("precompute", *opts)
    proc = _torchrun("train", *opts, check=False)
    assert proc.returncode != 0 and "make both multiples of 2" in proc.stderr


def _node(tmp_path, rank: int, port: int, *args):
    """One "machine" of a two-node torchrun launch (static rendezvous on 127.0.0.1), started in a working
    directory of its own; the cache and runs folders given in `args` are the shared filesystem. This is the
    README's several-machines recipe with --master-addr 127.0.0.1."""
    cwd = tmp_path / f"node{rank}"
    cwd.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
           "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "pipeline",
           *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **ONE_THREAD}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _two_nodes(tmp_path, *args, check=True):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [_node(tmp_path, r, port, *args) for r in (0, 1)]
    if not check:
        return nodes
    outs = [n.communicate(timeout=300) for n in nodes]
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, out[-2000:] + err[-4000:]
    return [o for o, _ in outs]


def _kill_node_1(tmp_path, ready, *args) -> str:
    """Start `args` on two nodes and SIGKILL node 1's worker as soon as ready() holds; both nodes must fail.
    Returns what node 0 wrote to stderr."""
    nodes, t0 = _two_nodes(tmp_path, *args, check=False), time.time()
    while not ready():
        assert nodes[1].poll() is None and time.time() - t0 < 180, nodes[1].communicate()
        time.sleep(0.01)
    (worker,) = psutil.Process(nodes[1].pid).children(recursive=True)
    worker.send_signal(signal.SIGKILL)
    _, err0 = nodes[0].communicate(timeout=120)
    nodes[1].communicate(timeout=120)
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    return err0


def test_two_nodes_precompute_and_train_like_one_process_and_a_killed_node_resumes(tmp_path, no_dropout_model,
                                                                                   corpus_csv, cli):
    data = corpus_csv(600)
    opts = dict(model=no_dropout_model, dataset=data, runs_dir=tmp_path / "shared" / "runs", k=1, max_length=64,
                batch_size=8, eval_batch_size=16, epochs=1, lr=1e-3, precompute_batch_size=4, commit_seconds=0,
                depths="1")
    one = cli_args({**opts, "cache_dir": tmp_path / "one"})
    run_cli("precompute", *one, env=ONE_THREAD)
    (ref,) = (tmp_path / "one").glob("*.h5")

    # the first launch loses node 1 mid-precompute (SIGKILL): node 0 stops with a message, the work stays
    shared = cli_args({**opts, "cache_dir": tmp_path / "shared" / "cache"})
    tmp = str(tmp_path / "shared" / "cache" / ref.name) + ".tmp"
    err0 = _kill_node_1(tmp_path, lambda: committed_examples(tmp) >= 100, "precompute", *shared)
    # what the surviving node's user reads: where the work is and how to resume, not the backend's traceback
    assert "error: another process of this precompute stopped before the end" in err0 and tmp in err0
    assert "start the same command again on every node" in err0 and "[rank0]: Traceback" not in err0
    committed = committed_examples(tmp)
    assert 100 <= committed < 600

    # both nodes started again: they resume, and the cache equals the one-process cache array for array
    out0, _ = _two_nodes(tmp_path, "precompute", *shared)
    assert f"resuming {tmp}: {committed} of 600 examples" in out0
    a, b = cache_arrays(ref), cache_arrays(tmp[:-4])
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert "passed all checks" in cli("check", *shared).stdout

    # training on two nodes (global batch 8 = 4 + 4) gives the one-process result
    single = run_cli("train", *shared, "--run-name", "one", env=ONE_THREAD).stdout
    out0, _ = _two_nodes(tmp_path, "train", *shared, "--run-name", "two")
    assert "2 process(es)" in out0 and single.strip().splitlines()[-1] == out0.strip().splitlines()[-1]
    _assert_close(load_file(tmp_path / "shared" / "runs" / "one" / "top.safetensors"),
                  load_file(tmp_path / "shared" / "runs" / "two" / "top.safetensors"))

    # a node killed mid-training: the other stops with where the run is and the --resume command, not the
    # backend's traceback; both nodes started again with --resume finish the run from its checkpoint
    longer = [*shared, "--run-name", "killed", "--epochs", 4, "--checkpoint-every", 10]
    ckpts = tmp_path / "shared" / "runs" / "killed" / "checkpoints"
    err0 = _kill_node_1(tmp_path, lambda: list(ckpts.glob("*/trainer_state.json")), "train", *longer)
    assert "error: another process of this training stopped before the end" in err0
    assert "--resume on every node" in err0 and "[rank0]: Traceback" not in err0, err0[-3000:]
    assert not (tmp_path / "shared" / "runs" / "killed" / "results.json").exists()
    out0, _ = _two_nodes(tmp_path, "train", *longer, "--resume")
    assert "resuming" in out0 and (tmp_path / "shared" / "runs" / "killed" / "results.json").exists()
