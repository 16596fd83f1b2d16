"""Fine-tune the top encoder layers + head on cached hidden states with an explicit Accelerate loop."""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .cache import Batches, CachedSplit, open_cache, single_batch
from .config import Config
from .dist import lost_a_process, lost_process_error, process_state, share
from .errors import PipelineError, first_line
from .fsutil import ensure_writable_dir
from .memory import release_heap
from .tasks import IGNORE, Outputs, Task, task_for
from .rundir import BEST, TOP_LAST, RunDir, TrainerState
from .model import LAYER_KEY, carry_over, check_frozen_weights, input_dtype, load_top


def make_loader(ds: CachedSplit, cfg: Config, train: bool, pin: bool, g: torch.Generator) -> DataLoader:
    """Whole batches gathered by the dataset (one vectorised read each); g drives the shuffling and the DataLoader's
    worker seeds (never the global RNG). Accelerate splits each batch across processes (split_batches)."""
    batches = Batches(ds.lengths, cfg.batch_size if train else cfg.eval_batch_size, shuffle=train,
                      grouped=cfg.group_by_length, generator=g)
    return DataLoader(ds, batch_sampler=batches, collate_fn=single_batch, num_workers=cfg.num_workers,
                      pin_memory=pin, persistent_workers=cfg.num_workers > 0, generator=g)


def epoch_seed(cfg: Config, epoch: int) -> int:
    """Seed of an epoch's batch order: a pure function of (seed, epoch), so a resumed run rebuilds it."""
    return cfg.seed * 1000 + epoch


def build_optimizer(model, cfg: Config, total_steps: int, depth: int | None = None, num_layers: int | None = None):
    """AdamW (no weight decay on biases and norm weights) + linear warmup/decay over total_steps. With
    cfg.layer_lr_decay < 1 (discriminative lr), top layer i (original layer depth + i) gets
    lr * decay^(num_layers - depth - i); pooler and head get lr."""
    def no_decay(name):  # biases and every norm's weight (LayerNorm, layer_norm, RMSNorm's norm, q_norm, ...)
        return name.endswith("bias") or name.lower().endswith("norm.weight")

    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = LAYER_KEY.match(n)
        scale = 1.0
        if m and cfg.layer_lr_decay != 1.0:
            scale = cfg.layer_lr_decay ** (num_layers - depth - int(m.group(2)))
        wd = 0.0 if no_decay(n) else cfg.weight_decay
        groups.setdefault((scale, wd), []).append(p)
    # fused: one kernel per step without foreach's full-size temporaries (the HF Trainer's default, adamw_torch_fused)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": cfg.lr * scale, "weight_decay": wd}
                                   for (scale, wd), ps in sorted(groups.items(), reverse=True)], lr=cfg.lr, fused=True)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


def predictions(model, loader, accelerator, task: Task) -> Outputs:
    """The task's scored items (predictions, labels, per-item losses) over exactly the split's examples from every
    process (gather_for_metrics drops the duplicates that even out the last batch; per-token batches are padded to
    one width across processes first); all stay on the device until the end. accelerator=None: one process, a
    plain loader. The one inference loop of training and evaluate (cached splits and external files)."""
    model.eval()
    preds, refs, losses = [], [], []
    dtype = input_dtype(model)
    with torch.no_grad():
        for batch in loader:  # cached states (inputs_embeds) for a top, token ids for a whole model
            inputs = {k: v.to(dtype) if k == "inputs_embeds" else v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            y = batch["labels"]
            p, loss = task.score(logits, y)
            if accelerator is not None:
                if task.per_token:
                    p, y, loss = (accelerator.pad_across_processes(t, dim=1, pad_index=v)
                                  for t, v in ((p, 0), (y, IGNORE), (loss, 0)))
                p, y, loss = accelerator.gather_for_metrics((p, y, loss))
            preds.append(p)
            refs.append(y)
            losses.append(loss)
            if len(preds) % LOG_EVERY == 0:
                release_heap()
    model.train()
    return task.collect(preds, refs, losses)


def evaluate(model, loader, accelerator, task: Task, label_names, tuning: str = "false") -> tuple[dict, list | None]:
    """(metrics, decision thresholds or None): multi-label thresholds are 0.5 or tuned on these outputs."""
    out, thresholds = task.decide(predictions(model, loader, accelerator, task), tuning)
    return task.metrics(out, label_names), thresholds


def _tracker_config(cfg: Config) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}


def _check_tracker(name: str) -> None:
    from accelerate.tracking import get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    if name not in available:
        raise PipelineError(f"--report-to {name}: that tracker is not installed here (available: "
                            f"{', '.join(available) or 'none'}). For TensorBoard: pip install tensorboard.")


@dataclass
class Session:
    """What a run sets up once: its config, cache, process group, Accelerator and run directory."""
    cfg: Config
    path: str  # the cache file
    info: object  # cache.CacheInfo
    accelerator: Accelerator | None  # None for a run that has already finished
    run: RunDir
    stages: list  # depth of each stage
    shared: dict | None  # sweeps: cached split readers kept across runs
    on_evaluate: object = None  # callable(metrics, step) after each validation (search: report, maybe prune)

    @property
    def tracking(self) -> bool:
        return self.cfg.report_to != "none"

    @property
    def task(self) -> Task:
        return task_for(self.cfg.task)

    @property
    def best(self) -> tuple:
        """(metric that picks the best evaluation, True if higher is better)."""
        return self.cfg.best_metric(self.info.label_names)


@dataclass
class Stage:
    """One depth of a run: the top, its optimizer and loaders (gradual unfreezing has several)."""
    index: int
    depth: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_dl: DataLoader
    val_dl: DataLoader
    shuffle_gen: torch.Generator
    total_steps: int
    trainable: int

    def last_epoch(self, cfg: Config) -> int:
        return (self.index + 1) * cfg.epochs


def train(cfg: Config, cache_path: str | None = None, resume: bool = False, shared: dict | None = None,
          on_evaluate=None) -> dict:
    """Train the top on cached states. With cfg.stages, gradual unfreezing: one stage per depth, cfg.epochs each,
    every stage starting from the previous stage's weights. The best validation evaluation is the run's result.
    `shared` (sweeps) keeps the cached split readers across runs; on_evaluate(metrics, step) is called after each
    validation (a search reports to its study there, and may stop the run by raising)."""
    s, ckpt, state = setup(cfg, cache_path, resume, shared)
    s.on_evaluate = on_evaluate
    if s.run.finished():
        return already_finished(s)
    state = state or TrainerState()
    set_seed(cfg.seed)  # before building the top: a fresh classification head is drawn from this RNG
    try:
        stage, prev = run_stages(s, ckpt, state)
    except RuntimeError as e:
        if s.accelerator.num_processes > 1 and lost_a_process(e):
            raise lost_process_error("training", e, f"The run keeps {s.run.path} and its last checkpoint "
                                     f"({last_checkpoint_words(s.run)}); start the same command with --resume on "
                                     f"every node (and process) to continue from it.") from None
        raise
    return save_result(s, stage, state, prev)


def last_checkpoint_words(run: RunDir) -> str:
    found = run.latest_checkpoint()
    return f"{found[0]}, step {found[1].step}" if found else "none yet: --resume starts the run again"


def run_stages(s: Session, ckpt: str | None, state: TrainerState):
    """The stages from `state` on (gradual unfreezing: one per depth; otherwise one). Returns the last stage and
    the top it ended with."""
    cfg, prev = s.cfg, None
    for si in range((state.epoch - 1) // cfg.epochs, len(s.stages)):
        stage = build_stage(s, si, prev)
        start_stage(s, stage, ckpt, state)
        ckpt = None
        while not train_epoch(s, stage, state):  # False: the stage goes on with another epoch
            state.next_epoch(state.epoch + 1)
            if cfg.checkpoint_every >= 0:
                save_checkpoint(s, state)
        state.next_epoch(stage.last_epoch(cfg) + 1)  # a resumed epoch's progress is used up
        prev = s.accelerator.unwrap_model(stage.model)
        if state.stopped_early:
            s.accelerator.print(f"early stopping: {cfg.early_stopping_patience} evaluation(s) in a row without a "
                                f"better validation {s.best[0]}")
            break
    return stage, prev


def setup(cfg: Config, cache_path: str | None, resume: bool, shared: dict | None):
    """Check the cache and the process count, open the run directory (fresh or resumed) and the Accelerator.
    Returns (session, checkpoint to resume from or None, its TrainerState or None)."""
    path = cache_path or cfg.cache_path()
    info = open_cache(path, cfg)
    if "train" not in info.splits or "validation" not in info.splits:
        raise PipelineError(f"cache {path} lacks a train or validation split; rebuild it with `make precompute`.")
    cfg.best_metric(info.label_names)  # --metric-for-best names a metric of this task and these labels
    tracking = cfg.report_to != "none"
    if tracking:
        _check_tracker(cfg.report_to)
    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA: Accelerate only picks
    # its gloo CPU backend when told cpu=True; otherwise each process would silently train alone.
    procs = process_state(cfg.cpu)
    if cfg.batch_size % procs.num_processes or cfg.eval_batch_size % procs.num_processes:
        raise PipelineError(f"--batch-size {cfg.batch_size} and --eval-batch-size {cfg.eval_batch_size} are global "
                            f"batches split across the {procs.num_processes} processes: make both multiples of "
                            f"{procs.num_processes}.")
    name = share(procs, cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))  # every process: the main one's timestamp
    run = RunDir(os.path.join(cfg.runs_dir, name))
    ckpt, state = run.prepare(cfg, resume)
    if run.finished():  # nothing to train: no Accelerator, no trackers
        return Session(cfg, path, info, None, run, cfg.stage_depths(), shared), None, None
    ensure_writable_dir(run.path, "run directory", "--runs-dir")  # every process: each fails alike, none hangs
    # Several runs in one process (tests, sweeps) may differ in mixed precision: Accelerate keeps that in a
    # singleton, so start each run from a fresh one (the process group, kept in PartialState, stays).
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=procs.device.type == "cpu", mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum, project_dir=run.path,
                              log_with=cfg.report_to if tracking else None,
                              dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True))
    if tracking:
        accelerator.init_trackers(cfg.report_to, config=_tracker_config(cfg))
    return Session(cfg, path, info, accelerator, run, cfg.stage_depths(), shared), ckpt, state


def already_finished(s: Session) -> dict:
    results = s.run.results()
    print(f"run {s.run.path} has already finished; its best evaluation:")
    print(" ".join(f"{k}={v:.4f}" for k, v in task_for(s.cfg.task).headline(results["metrics"]).items()))
    return {"run_dir": s.run.path, **results["metrics"]}


def build_stage(s: Session, si: int, prev) -> Stage:
    """The top at the stage's depth (the previous stage's weights carried over), its loaders, optimizer and
    schedule, prepared by Accelerate."""
    cfg, info, depth = s.cfg, s.info, s.stages[si]
    model, digest = load_top(replace(cfg, k=depth), info.num_labels, info.label_names)
    check_frozen_weights(digest, info.weights_sha256[depth], cfg, depth, s.path,
                         "Rebuild the cache with `make precompute ARGS=--force`.")
    if prev is not None:
        carry_over(prev.state_dict(), model, s.stages[si - 1] - depth)
    pin = s.accelerator.device.type == "cuda"
    # The shuffling generator is reseeded with (seed, epoch) at every epoch start, so the order of any epoch can
    # be rebuilt on resume; the loaders' own generators keep DataLoader seeding off the global RNG (dropout's).
    shuffle_gen = torch.Generator()
    train_dl = make_loader(_split(s.shared, s.path, "train", depth, cfg.in_memory), cfg, True, pin, shuffle_gen)
    val_dl = make_loader(_split(s.shared, s.path, "validation", depth, cfg.in_memory), cfg, False, pin,
                         torch.Generator())
    total_steps = math.ceil(len(train_dl) / cfg.grad_accum) * cfg.epochs
    if cfg.max_steps > 0:
        total_steps = min(cfg.max_steps, total_steps)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps, depth, info.num_layers)
    s.accelerator.free_memory()  # forget the previous stage's prepared objects (save_state saves what is held)
    model, optimizer, train_dl, val_dl, scheduler = s.accelerator.prepare(model, optimizer, train_dl, val_dl,
                                                                          scheduler)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Stage(si, depth, model, optimizer, scheduler, train_dl, val_dl, shuffle_gen, total_steps, trainable)


def start_stage(s: Session, stage: Stage, ckpt: str | None, state: TrainerState) -> None:
    """Resume from `ckpt`, or start the run's files (first stage), or checkpoint the handed-over weights."""
    acc, run = s.accelerator, s.run
    if ckpt is not None:
        try:  # Accelerate reads the model from safetensors and the rest with torch.load(weights_only=True)
            acc.load_state(ckpt)
        except Exception as e:  # an unpickling refusal, a damaged file
            raise PipelineError(
                f"cannot load checkpoint {ckpt}: {first_line(e)}. Only plain tensors and numbers are accepted "
                f"(no pickled code). Delete that checkpoint folder to resume from an earlier one, or start a "
                f"new run.") from None
        acc.print(f"resuming {run.path} from {ckpt}: epoch {state.epoch}, step {state.step}, "
                  f"{state.batches_done} batches of the epoch done")
        if acc.is_main_process:
            run.keep_metrics_upto(state.step)
    elif stage.index == 0:
        if acc.is_main_process:
            run.start(s.cfg, {"cache": s.path, "cache_attrs": {
                k: s.info.attrs[k] for k in ("weights_sha256_json", "dataset_fingerprint", "depths_json", "dtype",
                                             "num_layers")},
                "label_names": s.info.label_names, "trainable_params": stage.trainable, "stages": s.stages,
                "num_processes": acc.num_processes, "device": str(acc.device)})
    elif s.cfg.checkpoint_every >= 0:  # a new stage: checkpoint the handed-over weights and the new optimizer
        save_checkpoint(s, state)
    layers = s.info.num_layers
    what = (f"stage {stage.index + 1}/{len(s.stages)}: " if len(s.stages) > 1 else "") + (
        f"top {layers - stage.depth} of {layers} layers + head" if stage.depth < layers
        else "head only (no layer: what follows the layers + the classifier)")
    acc.print(f"train: {len(stage.train_dl.dataset)} train / {len(stage.val_dl.dataset)} validation examples from "
              f"{s.path}; {what}, {stage.trainable / 1e6:.2f}M trainable params, {acc.num_processes} process(es) on "
              f"{acc.device}")


def train_epoch(s: Session, stage: Stage, state: TrainerState) -> bool:
    """Train state.epoch from state.batches_done on, evaluating at its end (or every cfg.eval_every steps) and
    checkpointing every cfg.checkpoint_every steps. True when the stage ends (its last epoch, max_steps, early
    stopping)."""
    cfg, acc, model = s.cfg, s.accelerator, stage.model
    model.train()  # from_pretrained gives eval mode: dropout on from the first batch
    stage.shuffle_gen.manual_seed(epoch_seed(cfg, state.epoch))
    skip, prior_s, t0 = state.batches_done, state.seconds, time.perf_counter()
    totals = _Totals(acc, state.loss_sum, state.tokens)

    def sync():  # the running totals into the state (a host sync: only at logs, evaluations, checkpoints)
        state.loss_sum, state.tokens = totals.read()
        state.seconds = prior_s + time.perf_counter() - t0

    loader = acc.skip_first_batches(stage.train_dl, skip) if skip else stage.train_dl
    total_epochs = cfg.epochs * len(s.stages)
    bar = tqdm(loader, desc=f"epoch {state.epoch}/{total_epochs}", unit="batch", dynamic_ncols=True, initial=skip,
               total=len(stage.train_dl), mininterval=0.5 if sys.stderr.isatty() else 15,
               disable=not acc.is_local_main_process)
    max_steps_hit, dtype = False, input_dtype(model)
    for batch in bar:
        with acc.accumulate(model):
            logits = model(inputs_embeds=batch["inputs_embeds"].to(dtype),
                           attention_mask=batch["attention_mask"]).logits
            items = None
            if s.task.per_token and acc.num_processes > 1:  # processes hold different numbers of scored tokens
                items = acc.reduce(s.task.scored_items(batch["labels"]), "sum") / acc.num_processes
            loss = s.task.loss(logits, batch["labels"], items)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            stage.optimizer.step()
            stage.scheduler.step()
            stage.optimizer.zero_grad()
        totals.add(loss, batch["attention_mask"])  # on the device: no host sync per step
        state.batches_done += 1
        if state.batches_done % LOG_EVERY == 0:
            release_heap()
            sync()
            bar.set_postfix(loss=f"{state.loss_sum / state.batches_done:.4f}",
                            tok_s=f"{state.tokens / state.seconds:.0f}", refresh=False)
        if not acc.sync_gradients:
            continue
        state.step += 1
        max_steps_hit = cfg.max_steps > 0 and state.step - stage.index * stage.total_steps >= cfg.max_steps
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            sync()
            validate(s, stage, state)
        if max_steps_hit or state.stopped_early:
            break
        if cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0 and \
                state.batches_done < len(stage.train_dl):
            sync()
            save_checkpoint(s, state)
    sync()
    stage_ends = max_steps_hit or state.stopped_early or state.epoch == stage.last_epoch(cfg)
    if not cfg.eval_every or (stage_ends and state.step % cfg.eval_every):  # not evaluated at this step yet
        validate(s, stage, state)
    return stage_ends


def validate(s: Session, stage: Stage, state: TrainerState) -> None:
    """Evaluate on the validation split; log the record; keep the top if it is the best so far; count evaluations
    without improvement for early stopping."""
    cfg, acc = s.cfg, s.accelerator
    metrics, thresholds = evaluate(stage.model, stage.val_dl, acc, s.task, s.info.label_names,
                                   cfg.threshold_tuning)  # back in train mode after it
    state.metrics = metrics
    if state.improved(s.best, metrics):
        state.best_metrics, state.best_step, state.best_epoch, state.best_depth = metrics, state.step, state.epoch, \
            stage.depth
        state.best_thresholds = thresholds
        state.evals_since_best = 0
        if acc.is_main_process:
            s.run.save_top(BEST, acc.unwrap_model(stage.model).state_dict(), top_metadata(s, stage.depth, state))
    else:
        state.evals_since_best += 1
        state.stopped_early = 0 < cfg.early_stopping_patience <= state.evals_since_best
    record = {"epoch": state.epoch, "stage": stage.index + 1, "depth": stage.depth, "step": state.step,
              "train_loss": state.loss_sum / max(state.batches_done, 1), "train_seconds": state.seconds,
              "train_tokens_per_s": state.tokens / max(state.seconds, 1e-9),
              **{f"val_{k}": v for k, v in metrics.items()}, "best": state.best_step == state.step}
    acc.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if s.tracking:
        acc.log({k: v for k, v in record.items() if k not in ("epoch", "best")}, step=state.step)
    if acc.is_main_process:
        s.run.append_metrics(record)
    if s.on_evaluate is not None:
        s.on_evaluate(metrics, state.step)


def top_metadata(s: Session, depth: int, state: TrainerState) -> dict:
    return {"config_json": s.cfg.to_json(), "k": depth, "num_layers": s.info.num_layers,
            "label_names_json": json.dumps(s.info.label_names), "cache": s.path, "step": state.step,
            "epoch": state.epoch}


def save_checkpoint(s: Session, state: TrainerState) -> None:
    """Accelerate save_state (model as safetensors, optimizer, scheduler, RNG of every process) + the TrainerState
    as JSON, written last; older checkpoints are removed once the new one is complete."""
    ckpt = s.run.checkpoint_dir(state)
    s.accelerator.save_state(ckpt, safe_serialization=True)
    s.accelerator.wait_for_everyone()
    if s.accelerator.is_main_process:
        s.run.write_state(ckpt, state)
    s.accelerator.wait_for_everyone()


def save_result(s: Session, stage: Stage, state: TrainerState, last) -> dict:
    """top.safetensors = the best evaluation's top (top_last.safetensors = the last, with --save-last);
    results.json marks the run finished."""
    acc, cfg = s.accelerator, s.cfg
    acc.wait_for_everyone()
    name, _ = s.best
    if acc.is_main_process:
        if cfg.save_last:
            s.run.save_top(TOP_LAST, last.state_dict(), top_metadata(s, stage.depth, state))
        top_config = copy.deepcopy(last.config)
        top_config.num_hidden_layers = s.info.num_layers - state.best_depth
        s.run.finish({"metrics": state.best_metrics, "best": {
            "metric": name, "value": state.best_metrics[name], "step": state.best_step, "epoch": state.best_epoch,
            "depth": state.best_depth}, "last_metrics": state.metrics, "step": state.step,
            "stopped_early": state.stopped_early, "trainable_params": stage.trainable, "k": state.best_depth,
            "train_seconds": state.total_seconds,
            **({"thresholds": state.best_thresholds} if state.best_thresholds else {})}, top_config)
    if s.tracking:
        acc.end_training()
    acc.print(f"run dir: {s.run.path}")
    acc.print(f"best: step {state.best_step} (epoch {state.best_epoch}) of {state.step}, by validation {name}"
              + ("; last: " + " ".join(f"{k}={v:.4f}" for k, v in state.metrics.items())
                 if state.best_step != state.step else ""))
    acc.print(" ".join(f"{k}={v:.4f}" for k, v in s.task.headline(state.best_metrics).items()))
    return {"run_dir": s.run.path, **state.best_metrics}


LOG_EVERY = 50  # batches between reads of the running loss and token count (each read is a host sync)


class _Totals:
    """Running loss sum and token count of an epoch, accumulated on the device and read only when needed."""

    def __init__(self, accelerator, loss_sum: float, tokens: int):
        self.accelerator, self.loss0, self.tokens0 = accelerator, loss_sum, tokens
        self.loss = torch.zeros((), device=accelerator.device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=accelerator.device)

    def add(self, loss: torch.Tensor, mask: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.tokens += mask.sum()

    def read(self) -> tuple[float, int]:
        """(this process's loss sum, tokens of every process); every process must call it at the same point."""
        tokens = self.accelerator.reduce(self.tokens.clone(), "sum")
        return self.loss0 + float(self.loss), self.tokens0 + int(tokens)


def _split(shared: dict | None, path: str, split: str, depth: int, in_memory: bool) -> CachedSplit:
    """The split's reader; sweeps (shared) keep one per split and depth: a map costs no memory, so this only saves
    reopening the file."""
    if shared is None:
        return CachedSplit(path, split, depth, in_memory, reuse_buffers=True)
    key = (os.path.abspath(path), split, depth, in_memory)
    if key not in shared:
        shared[key] = CachedSplit(path, split, depth, in_memory, reuse_buffers=True)
    return shared[key]
