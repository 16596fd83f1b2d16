"""A run directory: every file a run writes, named and read here (train, evaluate, sweep, export, benchmarks).

<runs_dir>/<name>/
  config.json          the run's Config, its cache and the cache's identity (written when the run starts)
  metrics.jsonl        one record per validation evaluation
  checkpoints/<step>/  the newest resumable checkpoint (Accelerate save_state + trainer_state.json); removed at the end
  best.safetensors     the best evaluation's top so far (while training)
  top.safetensors      the run's result: the best evaluation's top (+ top_config.json); marks nothing by itself
  top_last.safetensors the last weights, only with --save-last
  results.json         written last: the run has finished
  eval_<split>.json    `evaluate` results (test split, external files)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field

from safetensors.torch import save_file

from .config import Config
from .errors import PipelineError

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
TOP, TOP_LAST, BEST, TOP_CONFIG = "top.safetensors", "top_last.safetensors", "best.safetensors", "top_config.json"
CHECKPOINTS, STATE = "checkpoints", "trainer_state.json"
# Config fields that may differ when a run is resumed: they do not change what is computed.
RESUME_MAY_DIFFER = ("num_workers", "in_memory", "cpu", "runs_dir", "checkpoint_every")


@dataclass
class TrainerState:
    """Where a run stands: the resume point in a checkpoint, and the progress the loop updates."""
    epoch: int = 1  # current epoch (1-based, counted over all stages)
    step: int = 0  # optimizer steps done
    batches_done: int = 0  # batches of the current epoch done
    loss_sum: float = 0.0  # this epoch so far (this process's share)
    tokens: int = 0  # this epoch so far (all processes)
    seconds: float = 0.0  # this epoch so far
    total_seconds: float = 0.0  # finished epochs
    metrics: dict = field(default_factory=dict)  # the last evaluation
    best_metrics: dict = field(default_factory=dict)  # the best evaluation
    best_step: int = -1
    best_epoch: int = 0
    best_depth: int = -1
    best_thresholds: list | None = None  # multi-label: the decision thresholds of the best evaluation
    evals_since_best: int = 0
    stopped_early: bool = False

    def next_epoch(self, epoch: int) -> None:
        """Close the current epoch and stand at the start of `epoch` (nothing of it done yet)."""
        self.total_seconds += self.seconds
        self.epoch, self.batches_done, self.loss_sum, self.tokens, self.seconds = epoch, 0, 0.0, 0, 0.0

    def improved(self, best: tuple, metrics: dict) -> bool:
        """best: (metric name, True if higher is better), from Config.best_metric."""
        name, higher = best
        value, best = metrics[name], self.best_metrics.get(name)
        return best is None or best != best or (value > best if higher else value < best)  # best != best: NaN

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        return cls(**json.loads(text))


class RunDir:
    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/"))

    # --- reading a run ---
    def exists(self) -> bool:
        return os.path.exists(self.file(CONFIG))

    def finished(self) -> bool:
        return os.path.exists(self.file(RESULTS))

    def read_json(self, name: str) -> dict:
        try:
            with open(self.file(name)) as fh:
                return json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise PipelineError(f"{self.path} is not a finished run ({name}: {getattr(e, 'strerror', None) or e}); "
                                f"pass a run directory cache/runs/<name> whose training finished.") from None

    def config(self) -> Config:
        return Config.from_dict(self.read_json(CONFIG)["config"])

    def results(self) -> dict:
        return self.read_json(RESULTS)

    def thresholds(self) -> list | None:
        """The decision thresholds of a finished multi-label run (one per label), or None."""
        return self.results().get("thresholds") if self.finished() else None

    def metrics(self) -> list:
        if not os.path.exists(self.file(METRICS)):
            return []
        with open(self.file(METRICS)) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def latest_checkpoint(self) -> tuple[str, TrainerState] | None:
        """The newest complete checkpoint (trainer_state.json is written after Accelerate's save_state has finished,
        so a checkpoint cut short by a kill is never picked) and its state."""
        root = self.file(CHECKPOINTS)
        for name in sorted(os.listdir(root) if os.path.isdir(root) else [], reverse=True):
            state_file = os.path.join(root, name, STATE)
            if os.path.isfile(state_file):
                with open(state_file) as fh:
                    return os.path.join(root, name), TrainerState.from_json(fh.read())
        return None

    def config_diff(self, cfg: Config) -> list:
        """The settings in which the run here differs from `cfg` (those a resume may change left out)."""
        saved, now = self.read_json(CONFIG)["config"], cfg.to_dict()
        return [f"{k}: run has {saved.get(k)!r}, now {now[k]!r}" for k in now
                if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k]]

    # --- starting or resuming ---
    def prepare(self, cfg: Config, resume: bool) -> tuple[str | None, TrainerState | None]:
        """Fresh runs need a new directory; --resume continues one with the same config. Returns (checkpoint, state)
        to resume from, or (None, None) for a fresh start (or a finished run: see finished())."""
        if not resume:
            if self.exists():
                raise PipelineError(
                    f"run directory {self.path} already holds a run; continue it with `--resume --run-name "
                    f"{self.name}`, or choose another --run-name (nothing is overwritten).")
            return None, None
        if not cfg.run_name:
            raise PipelineError("--resume needs --run-name: the name of the run directory to continue.")
        if not self.exists():
            raise PipelineError(f"--resume: {self.path} holds no run to continue (no {CONFIG}); drop --resume to "
                                f"start it fresh.")
        diff = self.config_diff(cfg)
        if diff:
            raise PipelineError(f"--resume: the run in {self.path} was started with another config:\n  " +
                                "\n  ".join(diff) + "\nResume with the original options, or start a new --run-name.")
        found = None if self.finished() else self.latest_checkpoint()
        return found if found else (None, None)

    def start(self, cfg: Config, info: dict) -> None:
        """A fresh run: its config and an empty metrics log."""
        with open(self.file(CONFIG), "w") as fh:
            json.dump({"config": cfg.to_dict(), **info}, fh, indent=2, default=str)
        open(self.file(METRICS), "w").close()

    def keep_metrics_upto(self, step: int) -> None:
        """Resumed from a checkpoint at `step`: drop the records of evaluations that are redone."""
        records = [r for r in self.metrics() if r["step"] <= step]
        with open(self.file(METRICS), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)

    def append_metrics(self, record: dict) -> None:
        with open(self.file(METRICS), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # --- weights ---
    def save_top(self, name: str, state_dict: dict, metadata: dict) -> None:
        """Atomically (a kill never leaves half a file) and world-readable like any save_pretrained output."""
        tmp = self.file(name + ".tmp")
        save_file({n: t.detach().cpu().contiguous() for n, t in state_dict.items()}, tmp,
                  metadata={k: str(v) for k, v in metadata.items()})
        os.chmod(tmp, readable_mode())
        os.replace(tmp, self.file(name))

    def checkpoint_dir(self, state: TrainerState) -> str:
        return self.file(f"{CHECKPOINTS}/step_{state.step:08d}_epoch_{state.epoch:03d}_{state.batches_done:06d}")

    def write_state(self, ckpt: str, state: TrainerState) -> None:
        """Marks `ckpt` complete, then removes the older checkpoints."""
        tmp = os.path.join(ckpt, STATE + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(state.to_json())
        os.replace(tmp, os.path.join(ckpt, STATE))
        root = self.file(CHECKPOINTS)
        for name in os.listdir(root):
            if os.path.join(root, name) != ckpt:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def finish(self, results: dict, top_config) -> None:
        """The best top becomes top.safetensors; results.json (written last) marks the run finished."""
        os.replace(self.file(BEST), self.file(TOP))
        top_config.to_json_file(self.file(TOP_CONFIG))
        with open(self.file(RESULTS), "w") as fh:
            json.dump(results, fh, indent=2)
        shutil.rmtree(self.file(CHECKPOINTS), ignore_errors=True)

    def write_eval(self, name: str, result: dict) -> str:
        path = self.file(f"eval_{name}.json")
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)
        return path


def readable_mode() -> int:
    """rw-r--r-- under the usual umask: the mode a plain open() would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
