"""Real tiny models (random weights, saved with save_pretrained) and small real data files for the tests."""
import bz2
import csv
import os
import subprocess
import sys

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
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: model_type -> folder with a tiny random encoder + the packaged MiniLM WordPiece tokenizer."""
    made = {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))

    def make(model_type="bert"):
        if model_type not in made:
            path = tmp_path_factory.mktemp(f"tiny-{model_type}")
            torch.manual_seed(0)
            config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
            AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[model_type] = str(path)
        return made[model_type]

    return make


def corpus_rows(n=160):
    """The first n fresh/rotten rows of the real Rotten Tomatoes corpus."""
    with bz2.open(CORPUS, "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    return rows[:n]


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = corpus_rows()
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "category"])
        w.writeheader()
        for r in rows:
            w.writerow({"text": r["text"], "category": r["category"]})
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
                w = csv.DictWriter(fh, fieldnames=["text", "category"])
                w.writeheader()
                for r in corpus_rows(n):
                    w.writerow({"text": r["text"], "category": r["category"]})
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
