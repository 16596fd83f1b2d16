"""Run the frozen embeddings + lower k layers once over the dataset and store the hidden states in HDF5.

Crash-safe and resumable (see the format notes in cache.py): the file is laid out in full first, each batch is
committed (flushed, fsynced, then /progress advanced), and a rerun of the same command continues an interrupted
`.tmp` from its last committed batch. One writer per cache at a time (a flock that dies with its holder)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, replace

import accelerate
import datasets
import h5py
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from . import cache as C
from .config import Config
from .data import load_labeled
from .errors import PipelineError
from .fsutil import ensure_writable_dir, exclusive_lock, fsync_dir
from .model import frozen_weights_sha256, load_bottom, load_model_config, load_tokenizer, tokenizer_sha256

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
class SplitPlan:
    order: np.ndarray  # positions within the split, sorted by token length
    rows: np.ndarray  # the same examples as row indices into the loaded data (stored as example_ids)
    enc: dict  # tokenizer output for the split (unpadded lists), indexed like order's targets
    lengths: np.ndarray
    offsets: np.ndarray


def precompute(cfg: Config, force: bool = False, device: str | None = None, lock_timeout: float | None = None) -> str:
    out = cfg.cache_path()
    ensure_writable_dir(os.path.dirname(out), "cache folder", "--cache-dir")
    with exclusive_lock(out + ".lock", f"cache {out}", lock_timeout):
        return _precompute(cfg, out, force, device)


def _precompute(cfg: Config, out: str, force: bool, device: str | None) -> str:
    t_start = time.perf_counter()
    depths = cfg.cache_depths()
    deepest = replace(cfg, k=max(depths))
    _, mconf = load_model_config(deepest)  # fails fast: unknown model, unsupported architecture, depth > L
    data = load_labeled(cfg)
    tokenizer = load_tokenizer(cfg)
    bottom = load_bottom(deepest)  # one pass up to the deepest depth gives every shallower one on the way
    weights = {str(d): frozen_weights_sha256(replace(cfg, k=d), bottom) for d in depths}
    identity = {"format_version": C.FORMAT_VERSION, "cache_key": cfg.cache_key(),
                "weights_sha256": weights, "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "tokenizer_settings": {"truncation_side": tokenizer.truncation_side,
                                       "model_max_length": min(tokenizer.model_max_length, 10**9)},
                "dataset_fingerprint": data.fingerprint}
    if os.path.exists(out) and _up_to_date(out, cfg, identity, force):
        print(f"cache {out} is up to date (same config, weights, tokenizer and data); nothing to do "
              f"(--force rebuilds it).")
        return out

    plan, truncated = _plan(data, tokenizer, cfg)
    n_total = sum(len(p.order) for p in plan.values())
    if truncated:
        print(f"data: {truncated} of {n_total} examples are longer than max_length={cfg.max_length} tokens and are "
              f"truncated ({tokenizer.truncation_side} side); raise --max-length to keep more.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"))
    bottom.to(device)
    dtype = np.dtype(cfg.cache_dtype)
    tmp = out + ".tmp"
    if not (os.path.exists(tmp) and _resumable(tmp, identity, plan)):
        _check_free_space(out, plan, mconf.hidden_size, dtype)
        try:
            _create(tmp, cfg, identity, mconf, data, tokenizer, plan, dtype)
        except (OSError, RuntimeError) as e:  # h5py raises either for a failed write
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise PipelineError(f"cannot write the cache layout to {tmp}: {e}. Free disk space or choose another "
                                f"--cache-dir.") from None
    raw = _raw_layout(tmp, depths)
    skipped = int(raw["progress"].sum())
    if skipped:
        print(f"resuming {tmp}: {skipped} of {n_total} examples ({skipped / n_total:.0%}) were committed before the "
              f"interruption; skipping them, computing the remaining {n_total - skipped}.")
    t0 = time.perf_counter()
    totals = {"examples": n_total, "tokens": int(sum(p.offsets[-1] for p in plan.values())),
              "computed_examples": n_total - skipped, "resumed_examples": skipped, "truncated_examples": truncated}
    # Between layout and finish HDF5 does not hold the file: rows and /progress are written with plain pwrite()
    # into the space allocated for them, so a kill or a failed write can never leave HDF5 metadata half-written.
    fd = os.open(tmp, os.O_RDWR)
    try:
        bar = tqdm(total=n_total, initial=skipped, desc=f"precompute depths={','.join(map(str, depths))}", unit="ex",
                   dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15)
        for si, (split, p) in enumerate(plan.items()):
            _write_split(fd, raw, si, split, p, bottom, depths, cfg, tokenizer, dtype, device, bar)
        bar.close()
        try:
            with h5py.File(tmp, "r+") as f:
                checksums = {name: C.dataset_sha256(f[name]) for name in C.array_names(f)}  # of the bytes on disk
                totals["loop_seconds"] = time.perf_counter() - t0  # tokenize + forward + writes + checksums
                totals["seconds"] = time.perf_counter() - t_start  # also data and model loading
                f.attrs["checksums_json"] = json.dumps(checksums, sort_keys=True)
                f.attrs["stats_json"] = json.dumps({**totals, "device": str(device)})
                f.attrs["complete"] = True  # written last: a file without it is never used
        except RuntimeError as e:  # h5py reports some failed writes (a flush) as RuntimeError
            raise OSError(str(e)) from None
        os.fsync(fd)
    except torch.OutOfMemoryError:
        raise PipelineError(
            f"the {device} ran out of memory at --precompute-batch-size {cfg.precompute_batch_size}; rerun with a "
            f"smaller one (committed batches are kept in {tmp} and the rerun resumes from them).") from None
    except OSError as e:  # disk full, I/O error: keep what is committed
        committed = _committed(tmp)
        if committed == 0:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            kept = "nothing was committed, so the temporary file was removed"
        else:
            kept = (f"{committed} of {n_total} examples are committed in {tmp}; rerun the same command to resume "
                    f"from there")
        raise PipelineError(f"writing the cache failed: {e}. Free disk space or fix the storage problem; {kept}.") \
            from None
    except BaseException:
        print(f"\nprecompute stopped: committed batches stay in {tmp}; rerun the same command to resume.",
              file=sys.stderr)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, out)
    fsync_dir(os.path.dirname(out))
    secs = time.perf_counter() - t0
    size = os.path.getsize(out)
    n_tok = totals["tokens"]
    per_depth = n_tok * mconf.hidden_size * dtype.itemsize
    print(f"precompute done: {n_total} examples, {n_tok} tokens, {size / 2**20:.1f} MiB ({size / max(n_tok, 1):.0f} "
          f"B/token), {secs:.1f} s ({totals['computed_examples'] / secs:.0f} ex/s computed"
          f"{f', {skipped} resumed' if skipped else ''}) -> {out}")
    print(f"storage: {per_depth / 2**20:.1f} MiB per cached depth ({mconf.hidden_size * dtype.itemsize} B/token) x "
          f"{len(depths)} depth(s) {depths}, plus {(size - per_depth * len(depths)) / 2**20:.1f} MiB of token ids "
          f"and index")
    return out


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


def _plan(data, tokenizer, cfg: Config) -> tuple[dict, int]:
    """Tokenize every split and fix its layout: examples sorted by length (stable), ragged offsets."""
    plan, truncated = {}, 0
    for split, idx in data.splits.items():
        texts = [data.texts[i] for i in idx]
        pairs = [data.pairs[i] for i in idx] if data.pairs is not None else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        if enc.encodings is not None:  # fast tokenizers say what truncation cut
            truncated += sum(1 for e in enc.encodings if e.overflowing)
        else:
            truncated += sum(1 for x in enc["input_ids"] if len(x) >= cfg.max_length)
        lengths = np.fromiter((len(x) for x in enc["input_ids"]), dtype=np.int32, count=len(idx))
        order = np.argsort(lengths, kind="stable")  # similar lengths together: minimal padding, contiguous writes
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=offsets[1:])
        plan[split] = SplitPlan(order=order, rows=idx[order], enc=enc, lengths=lengths[order], offsets=offsets)
    return plan, truncated


def _check_free_space(out: str, plan: dict, hidden_size: int, dtype: np.dtype) -> None:
    tokens = sum(int(p.offsets[-1]) for p in plan.values())
    need = tokens * (hidden_size * dtype.itemsize + 4) + sum(len(p.order) for p in plan.values()) * 32
    folder = os.path.dirname(out) or "."
    free = shutil.disk_usage(folder).free
    if need > free:
        raise PipelineError(
            f"the cache needs about {need / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are free in {folder!r}; "
            f"free space or choose another --cache-dir (fp16 storage halves the size: --cache-dtype float16)."
        )


def _create(tmp, cfg, identity, mconf, data, tokenizer, plan, dtype) -> None:
    """Lay out the whole file: attributes, per-example arrays, and every hidden array allocated up front (so later
    writes are raw data only). /progress is created last: a file without it is not resumable and is redone."""
    f = h5py.File(tmp, "w", libver="earliest")
    a = f.attrs
    a["format_version"] = C.FORMAT_VERSION
    a["complete"] = False
    a["identity_json"] = json.dumps(identity, sort_keys=True)
    a["config_json"] = cfg.to_json()
    a["cache_key_json"] = json.dumps(cfg.cache_key(), sort_keys=True)
    a["model"] = cfg.model
    a["model_type"] = mconf.model_type
    a["num_layers"] = mconf.num_hidden_layers
    a["hidden_size"] = mconf.hidden_size
    a["depths_json"] = json.dumps(cfg.cache_depths())
    a["dtype"] = cfg.cache_dtype
    a["weights_sha256_json"] = json.dumps(identity["weights_sha256"], sort_keys=True)
    a["tokenizer_json"] = json.dumps({
        "class": type(tokenizer).__name__, "name_or_path": cfg.model, "sha256": identity["tokenizer_sha256"],
        "max_length": cfg.max_length, "truncation": True, "truncation_side": tokenizer.truncation_side,
        "padding": "none (ragged storage)", "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column})
    a["dataset_fingerprint"] = data.fingerprint
    a["num_labels"] = len(data.label_names) if data.label_names else 1
    a["label_names_json"] = json.dumps(data.label_names)
    a["task"] = cfg.task
    a["splits_json"] = json.dumps(list(plan))
    a["versions_json"] = json.dumps(library_versions())
    a["created_unix"] = time.time()
    id_dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    for split, p in plan.items():
        g = f.create_group(split)
        g["offsets"] = p.offsets
        g["lengths"] = p.lengths
        g["labels"] = data.labels[p.rows]
        g["example_ids"] = p.rows.astype(np.int64)
        ids = p.enc["input_ids"]
        g["input_ids"] = np.concatenate([np.asarray(ids[i], dtype=id_dtype) for i in p.order] or [np.zeros(0, id_dtype)])
        tt = p.enc.get("token_type_ids")
        if tt is not None and any(any(t) for t in tt):  # token types only where a text pair makes them
            g["token_type_ids"] = np.concatenate([np.asarray(tt[i], dtype=np.int8) for i in p.order])
        for d in cfg.cache_depths():
            g.create_dataset(f"layer_{d}/hidden", shape=(int(p.offsets[-1]), mconf.hidden_size), dtype=dtype,
                             dcpl=dcpl.copy(), fill_time="never")
    f.create_dataset("progress", data=np.zeros(len(plan), dtype=np.int64))
    f.close()


def _resumable(tmp: str, identity: dict, plan: dict) -> bool:
    """True if an interrupted `.tmp` was laid out for exactly these inputs; else say why, remove it, start over."""
    try:
        with h5py.File(tmp, "r") as f:
            attrs = C.read_attrs(f)
            if attrs.get("identity_json") != json.dumps(identity, sort_keys=True):
                why = "it was started with other inputs (config, weights, tokenizer or data)"
            elif "progress" not in f or attrs.get("splits_json") != json.dumps(list(plan)):
                why = "it was interrupted before its layout was complete"
            elif not all(np.array_equal(f[s]["offsets"][:], p.offsets) and
                         np.array_equal(f[s]["example_ids"][:], p.rows) for s, p in plan.items()):
                why = "its layout differs from this run's"
            else:
                return True
    except (OSError, KeyError) as e:
        why = f"it cannot be read ({e})"
    print(f"found an interrupted precompute {tmp}, but {why}; starting over.")
    os.remove(tmp)
    return False


def _raw_layout(tmp: str, depths: list) -> dict:
    """File offsets of the preallocated contiguous arrays that the loop writes, and the committed progress."""
    with h5py.File(tmp, "r") as f:
        splits = json.loads(f.attrs["splits_json"])
        hidden = {(s, d): f[f"{s}/layer_{d}/hidden"] for s in splits for d in depths}
        return {"progress": f["progress"][:], "progress_offset": f["progress"].id.get_offset(),
                "progress_dtype": f["progress"].dtype, "hidden_dtype": {s: d.dtype for s, d in hidden.items()},
                "hidden_offset": {s: d.id.get_offset() for s, d in hidden.items()}}


def _committed(tmp: str) -> int:
    try:
        with h5py.File(tmp, "r") as f:
            return int(f["progress"][:].sum())
    except (OSError, KeyError):
        return 0


def _write_split(fd, raw, si, split, p: SplitPlan, bottom, depths, cfg, tokenizer, dtype, device, bar) -> None:
    row_bytes = bottom.config.hidden_size * dtype.itemsize
    keys = ["input_ids"] + (["token_type_ids"] if "token_type_ids" in p.enc else [])
    t0, done_tok = time.perf_counter(), 0
    bs, n = cfg.precompute_batch_size, len(p.order)
    with torch.inference_mode():
        for start in range(int(raw["progress"][si]), n, bs):  # a committed batch boundary
            rows = p.order[start:start + bs]
            batch = tokenizer.pad({key: [p.enc[key][i] for i in rows] for key in keys}, return_tensors="pt")
            batch = {key: v.to(device) for key, v in batch.items() if key in keys + ["attention_mask"]}
            out = bottom(**batch, output_hidden_states=len(depths) > 1)
            mask = batch["attention_mask"].bool()
            for d in depths:  # hidden_states[d] is the output of layer d (0: the embeddings)
                h = out.hidden_states[d] if len(depths) > 1 else out.last_hidden_state
                real = h[mask]  # [sum(len), H], example after example
                data = real.to("cpu", torch.float32).numpy().astype(raw["hidden_dtype"][split, d], copy=False)
                _pwrite_all(fd, data.tobytes(), raw["hidden_offset"][split, d] + int(p.offsets[start]) * row_bytes)
            os.fsync(fd)  # commit: the rows reach the disk before /progress says so
            _pwrite_all(fd, np.asarray([start + len(rows)], raw["progress_dtype"]).tobytes(), raw["progress_offset"] + 8 * si)
            done_tok += real.shape[0]
            bar.update(len(rows))
            bar.set_postfix(split=split, tok_s=f"{done_tok / (time.perf_counter() - t0):.0f}", refresh=False)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
