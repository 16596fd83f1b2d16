"""Real tiny models (random weights, saved with save_pretrained) and small real data files for the tests."""
import bz2
import csv
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from pipeline import make_config
from pipeline.cli import quiet_libraries
from pipeline.model import resolve_model_path
from pipeline.config import PACKAGED_MINILM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "cache", "data", "rotten_tomatoes_corpus_full.csv.bz2")
quiet_libraries()

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128)
TINY_CONFIGS = {
    "bert": dict(TINY),
    "roberta": dict(TINY, pad_token_id=0),
    "xlm-roberta": dict(TINY, pad_token_id=0),
    "electra": dict(TINY, embedding_size=16),  # embedding_size != hidden: exercises embeddings_project
    "distilbert": dict(vocab_size=30522, dim=32, n_layers=3, n_heads=2, hidden_dim=64, max_position_embeddings=128),
    "camembert": dict(TINY, pad_token_id=0),
    # local (sliding, window 8) / global attention alternating, mean pooling: the cut must keep layer_types[k:]
    "modernbert": dict(TINY, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, classifier_pooling="mean"),
    # DeBERTa-v2 with the conv after layer 0 (v2-xlarge style) and relative positions with a LayerNorm
    "deberta-v2": dict(TINY, relative_attention=True, position_buckets=16, max_relative_positions=64,
                       norm_rel_ebd="layer_norm", conv_kernel_size=3, pos_att_type=["p2c", "c2p"],
                       position_biased_input=False, share_att_key=True, pad_token_id=0),
    "llama": dict(TINY, num_key_value_heads=1, pad_token_id=0),
    # sliding window (8 tokens) on the layers above max_window_layers: layer_types mixes full and sliding
    "qwen2": dict(TINY, num_key_value_heads=1, pad_token_id=0, use_sliding_window=True, sliding_window=8,
                  max_window_layers=1),
    "qwen3": dict(TINY, num_key_value_heads=1, head_dim=16, pad_token_id=0),
    "mistral": dict(TINY, num_key_value_heads=1, pad_token_id=0, sliding_window=8),
}
# DeBERTa-v3 style (no conv): the same model type, so a variant name of its own
VARIANTS = {"deberta-v3": ("deberta-v2", dict(TINY_CONFIGS["deberta-v2"], conv_kernel_size=0, norm_rel_ebd="layer_norm",
                                              position_buckets=32))}


def no_dropout(config):
    """Every dropout probability of a config set to 0 (names differ by family)."""
    for name, value in config.to_dict().items():
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: model_type -> folder with a tiny random encoder + the packaged MiniLM WordPiece tokenizer."""
    made = {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))

    def make(model_type="bert", dropout=True):
        """A folder for `model_type` (a key of TINY_CONFIGS or VARIANTS); dropout=False: every dropout 0."""
        key = (model_type, dropout)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{model_type}{'' if dropout else '-nodrop'}")
            torch.manual_seed(0)
            real_type, kw = VARIANTS.get(model_type, (model_type, TINY_CONFIGS.get(model_type)))
            config = AutoConfig.for_model(real_type, **kw)
            if not dropout:
                no_dropout(config)
            AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[key] = str(path)
        return made[key]

    return make


def corpus_rows(n=160):
    """The first n fresh/rotten rows of the real Rotten Tomatoes corpus."""
    with bz2.open(CORPUS, "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    return rows[:n]


def write_csv(path, header: list, rows) -> str:
    """A CSV file as Python's csv module writes it (quoted where needed): the header, then the rows."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = corpus_rows()
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])  # the field's convention: --dataset alone reads it
        w.writeheader()
        for r in rows:
            w.writerow({"text": r["text"], "label": r["category"]})
    return str(path)


def options(tmp_path, model, dataset, sub="cache", **kw) -> dict:
    """The options every test run shares (the one helper of the suite): a tiny model and data, the test's own cache
    folder (`sub`) and runs folder, k=1, short sequences, small batches, one epoch; kw overrides any of them.
    Config form: tiny_cfg(...); command-line form: cli_args(options(...))."""
    return {"model": model, "dataset": dataset, "cache_dir": str(tmp_path / sub), "runs_dir": str(tmp_path / "runs"),
            "k": 1, "max_length": 64, "batch_size": 8, "eval_batch_size": 16, "precompute_batch_size": 16,
            "epochs": 1, **kw}


def tiny_cfg(tmp_path, model, dataset, **kw):
    return make_config("default", **options(tmp_path, model, dataset, **kw))


def run_cli(*args, env=None, check=True):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return proc


@pytest.fixture
def cli(capsys):
    """The CLI's own entry point (argument parsing, errors as exit 2, printing) run in this process: the cheap form
    of run_cli for tests that do not need a separate process (no interpreter start-up, ~3.5 s each)."""
    from types import SimpleNamespace

    from pipeline.cli import main

    def call(*args, check=True):
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"CLI failed ({code}):\nSTDOUT:\n{out}\nSTDERR:\n{err}")
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return call


def cli_args(cfg_kwargs: dict):
    out = []
    for k, v in cfg_kwargs.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.fixture(scope="session")
def corpus_csv(tmp_path_factory):
    """Factory: n -> a CSV of the first n fresh/rotten rows of the real corpus."""
    made = {}

    def make(n):
        if n not in made:
            path = tmp_path_factory.mktemp(f"data{n}") / "reviews.csv"
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["text", "label"])
                w.writeheader()
                for r in corpus_rows(n):
                    w.writerow({"text": r["text"], "label": r["category"]})
            made[n] = str(path)
        return made[n]

    return make


def committed_examples(tmp_file) -> int:
    """Examples an in-progress precompute has committed, read from outside while it writes (HDF5 file locking off:
    the writer holds the file; /progress is a raw 8-byte-per-split array that is never moved)."""
    import h5py

    try:
        with h5py.File(tmp_file, "r", locking=False) as f:
            return int(f["progress"][:].sum()) if "progress" in f else 0
    except (OSError, KeyError):
        return 0


def cache_arrays(path) -> dict:
    """Every array of a cache file except /progress, by name."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[:]) if isinstance(o, h5py.Dataset) and n != "progress" else None)
    return out


class TokenSplit(torch.utils.data.Dataset):
    """The cached token ids of a split, as the full model's input, in the cache's example order."""

    def __init__(self, path, split):
        with h5py.File(path) as f:
            self.offsets, self.lengths = f[split]["offsets"][:], f[split]["lengths"][:]
            self.ids, self.labels = f[split]["input_ids"][:].astype(np.int64), f[split]["labels"][:]

    def __len__(self):
        return len(self.lengths)

    def __getitems__(self, idx):
        """A padded batch in CachedSplit's shape, token ids in place of states (the loader's batches stay the same)."""
        width = int(self.lengths[idx].max())
        ids = torch.zeros(len(idx), width, dtype=torch.int64)
        for row, i in enumerate(idx):
            ids[row, :self.lengths[i]] = torch.from_numpy(self.ids[self.offsets[i]:self.offsets[i + 1]])
        mask = (torch.arange(width)[None, :] < torch.from_numpy(self.lengths[idx])[:, None]).long()
        return {"inputs_embeds": ids, "attention_mask": mask, "labels": torch.from_numpy(self.labels[idx])}


def reference_training(cfg, path, model_path):
    """The same recipe done the usual way: the full model, requires_grad per stage by the family's adapter (what
    the bottom at each stage's depth computes with frozen), the same batches, the same optimizer and schedule."""
    from pipeline.arch import arch_for
    from pipeline.train import build_optimizer, epoch_seed, make_loader

    full = AutoModelForSequenceClassification.from_pretrained(model_path)
    arch = arch_for(full.config.model_type)
    data = TokenSplit(path, "train")
    epoch = 0
    for depth in cfg.stage_depths():
        for name, p in full.named_parameters():
            p.requires_grad = not arch.is_frozen(name, depth)
        gen = torch.Generator()
        loader = make_loader(data, cfg, True, False, gen)
        opt, sched = build_optimizer(full, cfg, len(loader) * cfg.epochs, depth=0,
                                     num_layers=full.config.num_hidden_layers)
        for _ in range(cfg.epochs):
            epoch += 1
            gen.manual_seed(epoch_seed(cfg, epoch))
            for batch in loader:
                loss = full(input_ids=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(full.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad()
    return full


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server for one test: initdb + pg_ctl on a free port in a temporary folder (as the postgres
    user when the tests run as root: initdb refuses root). Skipped, with the reason, where the server binaries or the
    psycopg2 driver are absent (.ci/run installs both)."""
    import glob
    import pwd
    import shutil
    import socket
    import tempfile

    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if not found:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the psycopg2 driver is not installed: pip install psycopg2-binary")
    bindir, as_user = os.path.dirname(found), []
    folder = tempfile.mkdtemp(prefix="pg-test-")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(folder, "data")
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(folder, "log"), "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
