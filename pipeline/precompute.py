"""Run the frozen embeddings + lower k layers once over the dataset and store the hidden states in HDF5.

Memory stays bounded: rows stay in Arrow (datasets), tokenisation is a batched `datasets.map` into Arrow on disk, and
only a few numbers per example are held (labels, split indices, lengths, offsets). The token ids are written into
the cache in storage order when its layout is made; the loop then reads each batch's ids back from the file.

Crash-safe and resumable (see the format notes in cache.py): the file is laid out in full first; a writer thread
writes each batch's rows with pwrite while the next batch is computed, and commits them (fsync, then their
batches' entries in /progress) every --commit-seconds or --commit-mb; a rerun of the same command skips every
committed batch. Several processes (torchrun / accelerate launch): the main process lays the file out, every
process computes and writes whole batches of that plan (batch b goes to process b % N) at their own offsets in the
one file, and the main process finishes it. One writer per cache at a time (a flock that dies with its holder)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, replace

import accelerate
import datasets
import h5py
import numpy as np
import pyarrow.compute as pc
import torch
import transformers
from tqdm.auto import tqdm

from . import cache as C
from .config import Config
from .data import load_labeled, tag_index
from .dist import lost_process_error, process_state, share
from .errors import PipelineError
from .fsutil import ensure_writable_dir, exclusive_lock, fsync_dir
from .memory import release_heap
from .tasks import task_for
from .model import (bottom_states, frozen_weights_sha256, load_bottom, load_model_config, load_tokenizer,
                    safetensors_files, tokenizer_sha256)

# what each identity entry means, for the "built from different inputs" message
_IDENTITY_WORDS = {
    "format_version": "the cache format version",
    "cache_key": "the config fields that shape the cache",
    "weights_sha256": "the model's frozen weights (embeddings + layers below each depth)",
    "tokenizer_sha256": "the tokenizer (vocabulary, normalisation or special tokens)",
    "tokenizer_settings": "the tokenizer settings (truncation side, model_max_length)",
    "dataset_fingerprint": "the dataset contents (texts, labels or rows)",
}


def library_versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


@dataclass
class Job:
    """What the main process hands to the loop and to finish: an up-to-date check has passed, the .tmp is laid out."""
    tmp: str
    out: str
    depths: list
    hidden_size: int
    itemsize: int  # bytes per stored value
    totals: dict
    t_start: float


def precompute(cfg: Config, force: bool = False, device: str | None = None, lock_timeout: float | None = None) -> str:
    out = cfg.cache_path()
    state = process_state(cfg.cpu)
    if not state.is_main_process:  # the main process checks and lays out; the others compute their batches
        job = share(state)  # the main process's Job, None (up to date) or "error" (it failed and says why)
        if not isinstance(job, Job):
            if torch.distributed.is_initialized():  # a clean goodbye: exiting with gloo's threads alive can abort
                torch.distributed.destroy_process_group()
            raise SystemExit(2 if job == "error" else 0)
        _loop(job, cfg, state, device)
        _wait_for_the_others(state, job)
        return out
    ensure_writable_dir(os.path.dirname(out), "cache folder", "--cache-dir")
    with exclusive_lock(out + ".lock", f"cache {out}", lock_timeout):
        try:
            job = _prepare(cfg, out, force)
        except BaseException:
            share(state, "error")
            raise
        share(state, job)
        if job is None:
            return out
        try:
            t0 = time.perf_counter()
            job.totals["loop_seconds"] = _loop(job, cfg, state, device)  # this process: forward + writes + commits
            _wait_for_the_others(state, job)
            job.totals["loop_wall_seconds"] = time.perf_counter() - t0  # also model loading and waiting for the rest
            _finish(job)
        except torch.OutOfMemoryError:
            raise PipelineError(
                f"the {device or 'device'} ran out of memory at --precompute-batch-size {cfg.precompute_batch_size}; "
                f"rerun with a smaller one (committed batches are kept in {job.tmp} and the rerun resumes from them)."
            ) from None
        except OSError as e:  # disk full, I/O error: keep what is committed
            committed = C.committed(job.tmp)
            if committed == 0:
                with contextlib.suppress(OSError):
                    os.remove(job.tmp)
                kept = "nothing was committed, so the temporary file was removed"
            else:
                kept = (f"{committed} of {job.totals['examples']} examples are committed in {job.tmp}; rerun the "
                        f"same command to resume from there")
            raise PipelineError(f"writing the cache failed: {e}. Free disk space or fix the storage problem; {kept}.") \
                from None
        except BaseException:
            print(f"\nprecompute stopped: committed batches stay in {job.tmp}; rerun the same command to resume.",
                  file=sys.stderr)
            raise
    return out


def _wait_for_the_others(state, job: Job) -> None:
    """The barrier after every process's batches. A process that died (a killed node, a lost machine) breaks the
    process group: say so, and how to resume, instead of the backend's traceback."""
    try:
        state.wait_for_everyone()
    except RuntimeError as e:  # gloo: "Connection closed by peer"; NCCL: a watchdog or communicator error
        raise lost_process_error("precompute", e, f"The batches of every process committed so far stay in {job.tmp} "
                                 f"({C.committed(job.tmp)} of {job.totals['examples']} examples); start the same "
                                 f"command again on every node (and process) to resume from them.") from None


def _prepare(cfg: Config, out: str, force: bool) -> Job | None:
    """Identity of the inputs, the up-to-date check, and the layout of `<out>.tmp` (reused when resuming)."""
    t_start = time.perf_counter()
    depths = cfg.cache_depths()
    deepest = replace(cfg, k=max(depths))
    _, mconf = load_model_config(deepest)  # fails fast: unknown model, unsupported architecture, depth > L
    data = load_labeled(cfg)
    release_heap()  # the batched passes' Python strings
    tokenizer = load_tokenizer(cfg)
    # non-safetensors checkpoints (Hub ids, .bin) are hashed from the loaded model; local safetensors from the file
    bottom = None if safetensors_files(deepest) else load_bottom(deepest)
    weights = {str(d): frozen_weights_sha256(replace(cfg, k=d), bottom) for d in depths}
    del bottom
    identity = {"format_version": C.FORMAT_VERSION, "cache_key": cfg.cache_key(),
                "weights_sha256": weights, "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "tokenizer_settings": {"truncation_side": tokenizer.truncation_side,
                                       "model_max_length": min(tokenizer.model_max_length, 10**9)},
                "dataset_fingerprint": data.fingerprint}
    if os.path.exists(out) and _up_to_date(out, cfg, identity, force):
        print(f"cache {out} is up to date (same config, weights, tokenizer and data); nothing to do "
              f"(--force rebuilds it).")
        return None
    tmp = out + ".tmp"
    if not (os.path.exists(tmp) and _resumable(tmp, identity)):
        plan, tokens, truncated = _plan(data, tokenizer, cfg)
        release_heap()
        n_total = sum(len(p.rows) for p in plan.values())
        if truncated:
            print(f"data: {truncated} of {n_total} examples are longer than max_length={cfg.max_length} tokens and "
                  f"are truncated ({tokenizer.truncation_side} side); raise --max-length to keep more.")
        _check_free_space(out, plan, mconf.hidden_size, C.STORAGE[cfg.cache_dtype][0])
        try:
            C.create(tmp, _attrs(cfg, identity, mconf, data, tokenizer, truncated), plan, data.labels, tokens,
                     depths, mconf.hidden_size, cfg.cache_dtype, cfg.precompute_batch_size, len(tokenizer))
        except (OSError, RuntimeError) as e:  # h5py raises either for a failed write
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise PipelineError(f"cannot write the cache layout to {tmp}: {e}. Free disk space or choose another "
                                f"--cache-dir.") from None
    summary = C.layout_summary(tmp)
    n_total, n_tokens, skipped, truncated = (sum(summary["sizes"]), summary["tokens"], summary["committed"],
                                             summary["truncated"])
    if skipped:
        print(f"resuming {tmp}: {skipped} of {n_total} examples ({skipped / n_total:.0%}) were committed before the "
              f"interruption; skipping them, computing the remaining {n_total - skipped}.")
    totals = {"examples": n_total, "tokens": n_tokens, "computed_examples": n_total - skipped,
              "resumed_examples": skipped, "truncated_examples": truncated,
              "prepare_seconds": time.perf_counter() - t_start}  # data, tokenisation, layout
    return Job(tmp, out, depths, mconf.hidden_size, C.STORAGE[cfg.cache_dtype][0].itemsize, totals, t_start)


def _up_to_date(out: str, cfg: Config, identity: dict, force: bool) -> bool:
    """True if `out` was built from exactly these inputs. An unusable or stale file is rebuilt only with --force."""
    try:
        info = C.open_cache(out, cfg)
        built = json.loads(info.attrs.get("identity_json", "{}"))
    except PipelineError as e:
        if force:
            print(f"rebuilding {out}: {str(e).splitlines()[0]}")
            return False
        raise PipelineError(f"{e}\n(existing file {out}; --force rebuilds it)") from None
    changed = [key for key in identity if built.get(key) != identity[key]]
    if not changed:
        return not force
    reasons = "\n  ".join(f"{_IDENTITY_WORDS[key]} changed ({key})" for key in changed)
    if force:
        print(f"rebuilding {out}: " + ", ".join(changed) + " changed")
        return False
    raise PipelineError(
        f"cache {out} exists for this config but was built from different inputs:\n  {reasons}\n"
        f"Rebuild it with `make precompute ARGS=--force` (the old file stays until the new one is complete), or "
        f"choose another --cache-dir to keep both."
    )



def _plan(data, tokenizer, cfg: Config):
    """Tokenise every row once (batched, into Arrow on disk) and fix the layout of each split: examples sorted by
    length (stable), ragged offsets. Returns (plan, tokenised dataset, truncated count)."""
    task = task_for(cfg.task)
    index = tag_index(data.ds, cfg, data.label_names) if task.per_token else None
    tokens = data.ds.map(task.encode, batched=True, batch_size=1000, remove_columns=data.ds.column_names,
                         fn_kwargs=dict(tokenizer=tokenizer, cfg=cfg, label_index=index), desc="tokenize")
    column = tokens.with_format("arrow").select_columns(["length", "truncated"])
    lengths_all = np.empty(len(tokens), dtype=np.int32)
    truncated = 0
    for start, batch in zip(range(0, len(tokens), C.ROWS_PER_WRITE), column.iter(batch_size=C.ROWS_PER_WRITE)):
        lengths_all[start:start + batch.num_rows] = batch.column("length").to_numpy()
        truncated += int(pc.sum(batch.column("truncated")).as_py() or 0)
    if "words_cut" in tokens.column_names and truncated:
        cut = int(pc.sum(tokens.with_format("arrow").select_columns(["words_cut"]).data.column(0)).as_py())
        print(f"data: max_length={cfg.max_length} cuts {cut} words off the end of {truncated} sentences; those words "
              f"get no prediction and are left out of every metric (evaluate reports them); raise --max-length to "
              f"keep them.")
    plan = {}
    for split, idx in data.splits.items():
        lengths = lengths_all[idx]
        order = np.argsort(lengths, kind="stable")  # similar lengths together: minimal padding, contiguous writes
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=offsets[1:])
        plan[split] = C.SplitPlan(rows=idx[order], lengths=lengths[order], offsets=offsets)
    return plan, tokens, truncated



def _attrs(cfg: Config, identity: dict, mconf, data, tokenizer, truncated: int) -> dict:
    """The file's descriptive attributes (cache.create adds the layout's own)."""
    return {
        "identity_json": json.dumps(identity, sort_keys=True), "config_json": cfg.to_json(),
        "cache_key_json": json.dumps(cfg.cache_key(), sort_keys=True), "model": cfg.model,
        "model_type": mconf.model_type, "num_layers": mconf.num_hidden_layers, "hidden_size": mconf.hidden_size,
        "weights_sha256_json": json.dumps(identity["weights_sha256"], sort_keys=True),
        "tokenizer_json": json.dumps({
            "class": type(tokenizer).__name__, "name_or_path": cfg.model, "sha256": identity["tokenizer_sha256"],
            "max_length": cfg.max_length, "truncation": True, "truncation_side": tokenizer.truncation_side,
            "padding": "none (ragged storage)", "text_column": cfg.text_column,
            "text_pair_column": cfg.text_pair_column}),
        "dataset_fingerprint": data.fingerprint, "num_labels": len(data.label_names) if data.label_names else 1,
        "label_names_json": json.dumps(data.label_names), "task": cfg.task,
        "versions_json": json.dumps(library_versions()), "created_unix": time.time(),
        "truncated_examples": truncated, "pad_token_id": tokenizer.pad_token_id or 0}


def _check_free_space(out: str, plan: dict, hidden_size: int, dtype: np.dtype) -> None:
    tokens = sum(int(p.offsets[-1]) for p in plan.values())
    need = tokens * (hidden_size * dtype.itemsize + 4) + sum(len(p.rows) for p in plan.values()) * 32
    folder = os.path.dirname(out) or "."
    free = shutil.disk_usage(folder).free
    if need > free:
        raise PipelineError(
            f"the cache needs about {need / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are free in {folder!r}; "
            f"free space or choose another --cache-dir (fp16 storage halves the size: --cache-dtype float16)."
        )



def _resumable(tmp: str, identity: dict) -> bool:
    """True if an interrupted `.tmp` was laid out (completely) for exactly these inputs; the plan is a pure function
    of them. Otherwise say why, remove it, start over."""
    try:
        summary = C.layout_summary(tmp)
        if summary["identity_json"] != json.dumps(identity, sort_keys=True):
            why = "it was started with other inputs (config, weights, tokenizer or data)"
        elif not summary["laid_out"]:
            why = "it was interrupted before its layout was complete"
        else:
            return True
    except (OSError, KeyError) as e:
        why = f"it cannot be read ({e})"
    print(f"found an interrupted precompute {tmp}, but {why}; starting over.")
    os.remove(tmp)
    return False


def _loop(job: Job, cfg: Config, state, device, bottom=None) -> float:
    """This process's share of the plan's uncommitted batches (batch b goes to process b % N): forward, cast to the
    storage dtype on the device, copy to the host, and hand the rows to the writer thread. Returns the
    seconds from the first batch to the last commit."""
    device = torch.device(device) if device else (state.device if state.num_processes > 1 else torch.device(
        "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"))
    bottom = (bottom or load_bottom(replace(cfg, k=max(job.depths)))).to(device)
    layout, batch_rows = C.open_layout(job.tmp)
    mine = [b for b in layout.batches(batch_rows)
            if layout.progress[b.index] == 0 and b.index % state.num_processes == state.process_index]
    storage = C.STORAGE[layout.dtype][1]
    fd = os.open(job.tmp, os.O_RDWR)
    writer = _Writer(fd, layout.progress_at, cfg.commit_seconds, cfg.commit_mb << 20)
    bar = tqdm(total=sum(b.end - b.start for b in mine), desc=f"precompute depths={','.join(map(str, job.depths))}",
               unit="ex", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15,
               disable=not state.is_main_process)
    t0, done_tok = time.perf_counter(), 0
    try:
        with torch.inference_mode():
            for b in mine:
                batch = {k: v.to(device, non_blocking=True) for k, v in layout.inputs(b).items()}
                mask = batch["attention_mask"].bool()
                writes = []
                # the state at depth d: the input of layer d (0: the embeddings' output)
                for d, h in zip(job.depths, bottom_states(bottom, batch, job.depths)):
                    rows = h[mask]
                    if storage == torch.float16:
                        _check_fp16_range(rows, d, b, layout.splits[b.split])
                    rows = rows.to(storage)  # [sum(len), H], example after example, cast on the device
                    if storage == torch.bfloat16:  # written as its raw 16 bits
                        rows = rows.view(torch.int16)
                    writes.append((*_to_host(rows), layout.hidden_at(b, d)))
                writer.put(writes, b.index, b.end - b.start)
                done_tok += rows.shape[0]
                bar.update(b.end - b.start)
                bar.set_postfix(tok_s=f"{done_tok / (time.perf_counter() - t0):.0f}", refresh=False)
            writer.close()  # the last commit
        return time.perf_counter() - t0
    finally:
        writer.close()
        bar.close()
        os.close(fd)


FP16_MAX = float(torch.finfo(torch.float16).max)


def _check_fp16_range(rows: torch.Tensor, depth: int, b: C.PlanBatch, split: str) -> None:
    """Refuse states float16 cannot hold (they would be stored as inf): decoders' hidden states often exceed it.
    One small reduction and host read per batch and depth."""
    peak = float(rows.abs().max()) if rows.numel() else 0.0
    if not peak <= FP16_MAX:  # also NaN
        raise PipelineError(
            f"the hidden states at depth {depth} of {split} examples {b.start}..{b.end - 1} (storage order) reach "
            f"|x| = {peak:.4g}, beyond float16's range (max {FP16_MAX:.0f}), so a float16 cache cannot hold them. "
            f"Use --cache-dtype bfloat16 (the size of float16, the range of float32) or float32.")


def _to_host(rows: torch.Tensor):
    """(host tensor, event to wait for): pinned memory and a non-blocking copy from a GPU; the tensor itself on CPU."""
    if rows.device.type != "cuda":
        return rows.contiguous(), None
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class _Writer:
    """Writes rows with pwrite in a background thread (pwrite releases the GIL: the next forward runs meanwhile)
    and commits them: fsync, then each written batch's entry in /progress (its example count). A commit happens
    when `seconds` have passed or `max_bytes` were written since the last one, and at close. A kill loses at most
    the uncommitted batches, which a rerun recomputes. Errors (a full disk) surface in the caller's next call."""

    def __init__(self, fd: int, progress_at, seconds: float, max_bytes: int):
        self.fd, self.progress_at, self.seconds, self.max_bytes = fd, progress_at, seconds, max_bytes
        self.queue: queue.Queue = queue.Queue(maxsize=4)  # bounds the rows held in memory
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def put(self, writes: list, batch: int, examples: int) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((writes, batch, examples))

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self) -> None:
        pending, written, last = [], 0, time.monotonic()
        while True:
            item = self.queue.get()
            if self.error is not None:  # failed earlier: drain until close
                if item is None:
                    return
                continue
            try:
                if item is None:
                    self._commit(pending)
                    return
                writes, batch, examples = item
                for host, event, at in writes:
                    if event is not None:
                        event.synchronize()
                    data = host.numpy()
                    _pwrite_all(self.fd, memoryview(data).cast("B"), at)
                    written += data.nbytes
                pending.append((batch, examples))
                if time.monotonic() - last >= self.seconds or written >= self.max_bytes:
                    self._commit(pending)
                    pending, written, last = [], 0, time.monotonic()
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self.error = e
                if item is None:
                    return

    def _commit(self, pending: list) -> None:
        if not pending:
            return
        os.fsync(self.fd)  # the rows reach the disk before /progress says so
        for batch, examples in pending:
            _pwrite_all(self.fd, np.int32(examples).tobytes(), self.progress_at(batch))


def _finish(job: Job) -> None:
    """Checksums of the bytes on disk, stats, `complete` last; then the atomic rename."""
    job.totals["seconds"] = time.perf_counter() - job.t_start  # before the checksums (as before format 4)
    C.finish(job.tmp, job.totals)
    fd = os.open(job.tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(job.tmp, job.out)
    fsync_dir(os.path.dirname(job.out))
    secs = time.perf_counter() - job.t_start
    size, n_tok, t = os.path.getsize(job.out), job.totals["tokens"], job.totals
    per_depth = n_tok * job.hidden_size * job.itemsize
    resumed = f", {t['resumed_examples']} resumed" if t["resumed_examples"] else ""
    print(f"precompute done: {t['examples']} examples, {n_tok} tokens, {size / 2**20:.1f} MiB "
          f"({size / max(n_tok, 1):.0f} B/token), {secs:.1f} s ({t['computed_examples'] / secs:.0f} ex/s computed"
          f"{resumed}) -> {job.out}")
    print(f"storage: {per_depth / 2**20:.1f} MiB per cached depth x {len(job.depths)} depth(s) {job.depths}, plus "
          f"{(size - per_depth * len(job.depths)) / 2**20:.1f} MiB of token ids and index")



def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
