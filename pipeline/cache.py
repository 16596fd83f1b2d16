"""The HDF5 cache, owned here both ways: its layout (created here), the writer's view of it (Layout), validation, a
full integrity check, the rows verify reads back, and a ragged-array torch Dataset for training and evaluation.
No other module names an array of the file.

Layout (format_version 4), one file per (model, depths, data, task, tokenizer settings, dtype):
  /                       attrs: format_version, complete, identity_json, config_json, cache_key_json, model,
                                 model_type, num_layers, hidden_size, depths_json, dtype, weights_sha256_json,
                                 tokenizer_json, dataset_fingerprint, num_labels, label_names_json, task,
                                 splits_json, versions_json, created_unix, stats_json, checksums_json,
                                 batch_rows, pad_token_id, truncated_examples
  /progress               int32 [n_batches]  per batch of the precompute plan (batch_rows examples of a split, split
                                 after split): its example count once its rows are committed, else 0; resume point
  /<split>/offsets        int64 [N+1]  example i owns rows offsets[i]:offsets[i+1] of every flat array
  /<split>/lengths        int32 [N]    real tokens per example (no padding is stored)
  /<split>/labels         int64 [N] (classification) | float32 [N] (regression) | float32 [N, C] of 0/1
                                 (multi-label): per-example tasks only
  /<split>/example_ids    int64 [N]    row of the example in the loaded source data
  /<split>/words_cut      int32 [N]    per-token tasks: words of the example that --max-length cut off (unscored)
  /<split>/input_ids      uint16|int32 [T]  token ids (lets `verify`/`check` recompute rows without the source)
  /<split>/token_type_ids int8  [T]    only for text pairs (absent means all zeros)
  /<split>/token_labels   int16 [T]    per-token tasks: the tag id of each token, -100 where it is not scored
  /<split>/word_ids       int32 [T]    per-token tasks: the word of each token in its example, -1 for special tokens
  /<split>/layer_<d>/hidden  float16|float32|bfloat16 (as uint16) [T, hidden]: hidden state after layer d, one array per cached depth d
                             (depths_json), all from one pass of the bottom up to the deepest; contiguous
Examples are stored sorted by length (stable), so contiguous rows have similar lengths. Every array is contiguous
and unfiltered: training memory-maps the hidden arrays at their file offsets (map_array).

Crash safety: precompute writes `<name>.tmp`. Every array is allocated when the file is laid out, so later writes
touch raw data only (never HDF5 metadata) and a killed writer leaves a readable file; a batch's /progress entry is
written only after its rows are fsynced. `complete` and the sha256 of every array (checksums_json) are
written last, then the file is renamed to `<name>`: a file under the final name is always whole.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np
import psutil
import torch

from .config import Config
from .errors import PipelineError
from .memory import release_heap

IGNORE = -100  # the target of a token that is not scored (stored in token_labels; the loss ignores it)

FORMAT_VERSION = 4
# storage dtype name -> (numpy dtype of the HDF5 array, torch dtype of the values). numpy has no bfloat16: those
# arrays hold the raw 16-bit patterns as uint16, and the `dtype` attribute says how to read them.
STORAGE = {"float16": (np.dtype("float16"), torch.float16), "float32": (np.dtype("float32"), torch.float32),
           "bfloat16": (np.dtype("uint16"), torch.bfloat16)}


def as_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored hidden states as float32 (bfloat16: the 16 bits are the top half of a float32)."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


EXAMPLE_ARRAYS = ("offsets", "lengths", "example_ids", "input_ids")
PER_EXAMPLE = ("labels",)  # the targets of a per-example task
PER_TOKEN = ("words_cut", "token_labels", "word_ids")  # the targets of a per-token task
TOKEN_LEVEL = ("input_ids", "token_type_ids", "token_labels", "word_ids")  # arrays with one entry per token


def hidden_key(split: str, depth: int) -> str:
    return f"{split}/layer_{depth}/hidden"


def split_arrays(task: str) -> tuple:
    """The arrays every split of a cache for this task holds (besides token_type_ids and the hidden states)."""
    from .tasks import task_for

    return EXAMPLE_ARRAYS + (PER_TOKEN if task_for(task).per_token else PER_EXAMPLE)


@dataclass
class CacheInfo:
    path: str
    depths: list  # depths whose hidden states the file holds
    num_layers: int
    hidden_size: int
    num_labels: int
    label_names: list | None
    weights_sha256: dict  # depth -> sha256 of the frozen weights below it
    splits: dict  # name -> number of examples
    attrs: dict


def read_attrs(f: h5py.File) -> dict:
    return {key: (v.decode() if isinstance(v, bytes) else v) for key, v in f.attrs.items()}


def _rebuild_hint(path: str) -> str:
    return (f"Run `python -m pipeline check --cache {path}` for a full report; rebuild it with "
            f"`make precompute ARGS=--force` (with the options that built it).")


def _open_h5(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise PipelineError(
            f"{path} is not a readable cache: HDF5 cannot open it ({e}); it is truncated, corrupted or not an HDF5 "
            f"file. Delete it and run `make precompute`."
        ) from None


def structure_problems(f: h5py.File, attrs: dict) -> list:
    """Cheap consistency checks of a finished cache (reads only the small per-example arrays): every array
    present, shapes and offsets agreeing with each other and with the hidden states, labels in range."""
    problems = []
    for key in ("splits_json", "depths_json", "hidden_size", "num_labels", "dtype", "task", "label_names_json",
                "num_layers", "weights_sha256_json", "cache_key_json"):
        if key not in attrs:
            problems.append(f"attribute {key!r} is missing")
    if problems:
        return problems
    depths, hidden_size, num_labels = json.loads(attrs["depths_json"]), int(attrs["hidden_size"]), int(attrs["num_labels"])
    for split in json.loads(attrs["splits_json"]):
        if split not in f:
            problems.append(f"split group /{split} is missing")
            continue
        g = f[split]
        names = list(split_arrays(attrs["task"])) + [hidden_key(split, d)[len(split) + 1:] for d in depths]
        absent = [n for n in names if n not in g]
        if absent:
            problems.append(f"/{split} lacks dataset(s) {absent}")
            continue
        offsets, lengths = g["offsets"][:], g["lengths"][:]
        n = len(lengths)
        if offsets.shape != (n + 1,) or len(offsets) == 0 or offsets[0] != 0 or np.any(np.diff(offsets) != lengths):
            problems.append(f"/{split}/offsets ({offsets.shape[0]} entries) do not match /{split}/lengths ({n})")
            continue
        total = int(offsets[-1])
        for d in depths:
            hid = f[hidden_key(split, d)]
            if hid.shape != (total, hidden_size):
                problems.append(f"{hid.name} has shape {hid.shape}, offsets say ({total}, {hidden_size})")
            if attrs["dtype"] not in STORAGE or hid.dtype != STORAGE[attrs["dtype"]][0]:
                problems.append(f"{hid.name} has dtype {hid.dtype}, attributes say {attrs['dtype']}")
        for name in TOKEN_LEVEL:
            if name in g and g[name].shape != (total,):
                problems.append(f"/{split}/{name} has shape {g[name].shape}, offsets say ({total},)")
        for name in ("labels", "example_ids", "words_cut"):  # labels: [N] or, multi-label, [N, labels]
            if name in g and g[name].shape[:1] != (n,):
                problems.append(f"/{split}/{name} has shape {g[name].shape}, expected ({n}, ...)")
        classes = json.loads(attrs["label_names_json"]) is not None
        for name in ("labels", "token_labels"):
            if classes and name in g and g[name].shape[0] and not problems:
                v = g[name][:]
                v = v[v != IGNORE]
                if len(v) and (v.min() < 0 or v.max() >= num_labels):
                    problems.append(f"/{split}/{name} range {v.min()}..{v.max()} is outside 0..{num_labels - 1}")
    return problems


def _same_setup_elsewhere(path: str, cfg: Config) -> list:
    """Finished caches in the same folder built for the same setup (model, data, tokenizer settings, dtype) whose
    depths include every depth this config trains at: what the user most likely meant."""
    wanted = {k: v for k, v in cfg.cache_key().items() if k != "depths"}
    found, folder = [], os.path.dirname(path) or "."
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".h5"):
            continue
        try:
            with h5py.File(os.path.join(folder, name), "r") as f:
                key = json.loads(read_attrs(f).get("cache_key_json", "{}"))
        except (OSError, ValueError):
            continue
        if {k: v for k, v in key.items() if k != "depths"} == wanted and set(cfg.stage_depths()) <= set(
                key.get("depths", [])):
            found.append((os.path.join(folder, name), key["depths"]))
    return found


def open_cache(path: str, cfg: Config) -> CacheInfo:
    """Validate a finished cache against the config that wants to use it; clear errors for every mismatch."""
    if not os.path.exists(path):
        extra = (" (an interrupted precompute left a .tmp file beside it: rerun the same `make precompute` to "
                 "resume it)") if os.path.exists(path + ".tmp") else ""
        hint = "".join(f"\nA cache for the same setup with depths {d} exists: pass --depths "
                       f"{','.join(map(str, d))} (or --cache {p})." for p, d in _same_setup_elsewhere(path, cfg))
        raise PipelineError(
            f"no cache at {path}{extra}. Run `make precompute` with the same options first "
            f"(the cache file name is derived from the model, data, depths, tokenizer settings and dtype).{hint}"
        )
    with _open_h5(path) as f:
        attrs = read_attrs(f)
        if attrs.get("format_version") != FORMAT_VERSION:
            raise PipelineError(
                f"{path} has cache format version {attrs.get('format_version')}, this code reads version "
                f"{FORMAT_VERSION}; rebuild it with `make precompute ARGS=--force`."
            )
        if not attrs.get("complete"):
            raise PipelineError(f"{path} is incomplete (no 'complete' flag); delete it and run `make precompute`.")
        try:
            problems = structure_problems(f, attrs)
        except (OSError, KeyError, ValueError) as e:
            problems = [f"reading it failed: {e}"]
        if problems:
            raise PipelineError(f"{path} is corrupt:\n  " + "\n  ".join(problems) + "\n" + _rebuild_hint(path))
        split_sizes = {s: int(f[s]["lengths"].shape[0]) for s in json.loads(attrs["splits_json"])}
    built = json.loads(attrs["cache_key_json"])
    wanted = cfg.cache_key()
    diff = [f"{key}: cache has {built.get(key)!r}, config wants {wanted[key]!r}"
            for key in wanted if key != "depths" and built.get(key) != wanted[key]]
    if diff:
        raise PipelineError(
            f"cache {path} was built for a different setup:\n  " + "\n  ".join(diff) +
            "\nRun `make precompute` with the training options (or train with the options the cache was built with)."
        )
    depths = json.loads(attrs["depths_json"])
    missing = [d for d in cfg.stage_depths() if d not in depths]
    if missing:
        raise PipelineError(
            f"cache {path} holds the hidden states at depths {depths}; this run trains from depth(s) {missing} "
            f"(k / --stages). Train with --k set to one of {depths}, or precompute with --depths "
            f"{','.join(map(str, sorted(set(depths) | set(missing))))}."
        )
    return CacheInfo(
        path=path, depths=depths, num_layers=int(attrs["num_layers"]), hidden_size=int(attrs["hidden_size"]),
        num_labels=int(attrs["num_labels"]), label_names=json.loads(attrs["label_names_json"]),
        weights_sha256={int(d): h for d, h in json.loads(attrs["weights_sha256_json"]).items()},
        splits=split_sizes, attrs=attrs,
    )


BLOCK_ROWS = 1 << 16


def dataset_sha256(ds: h5py.Dataset) -> str:
    """sha256 of an array's raw bytes, read in blocks of rows (memory stays small for any cache size)."""
    h = hashlib.sha256()
    for lo in range(0, ds.shape[0], BLOCK_ROWS):
        h.update(np.ascontiguousarray(ds[lo:lo + BLOCK_ROWS]).tobytes())
    return h.hexdigest()


def array_names(f: h5py.File) -> list:
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and name != "progress" else None)
    return sorted(names)


def check_cache(path: str) -> tuple[list, list]:
    """Full integrity check of a cache file, independent of any config: attributes, structure, checksums of every
    array, finite hidden states, disjoint splits. Returns (passed checks, problems)."""
    if not os.path.exists(path):
        raise PipelineError(f"no cache at {path}.")
    ok, problems = [], []
    with _open_h5(path) as f:
        attrs = read_attrs(f)
        if attrs.get("format_version") != FORMAT_VERSION:
            return ok, [f"format version {attrs.get('format_version')}, this code reads {FORMAT_VERSION}"]
        if not attrs.get("complete"):
            problems.append("no 'complete' flag: precompute did not finish writing this file")
        try:
            structure = structure_problems(f, attrs)
        except (OSError, KeyError, ValueError) as e:
            structure = [f"reading the structure failed: {e}"]
        if structure:
            return ok, problems + structure
        ok.append(f"structure: splits {json.loads(attrs['splits_json'])}, offsets, shapes, dtypes, label range")
        try:
            stored = json.loads(attrs.get("checksums_json", "{}"))
            names = array_names(f)
            if set(stored) != set(names):
                problems.append(f"checksums cover {sorted(stored)}, the file holds {names}")
            bad = [n for n in names if n in stored and dataset_sha256(f[n]) != stored[n]]
            if bad:
                problems.append(f"sha256 mismatch (the bytes changed after precompute): {bad}")
            else:
                ok.append(f"sha256 of {len(names)} arrays match")
            splits = json.loads(attrs["splits_json"])
            nonfinite = []
            for split in splits:
                for d in json.loads(attrs["depths_json"]):
                    ds = f[hidden_key(split, d)]
                    for lo in range(0, ds.shape[0], BLOCK_ROWS):
                        if not np.isfinite(as_float32(ds[lo:lo + BLOCK_ROWS], attrs["dtype"])).all():
                            nonfinite.append(f"{split}/layer_{d}")
                            break
            if nonfinite:
                problems.append(f"NaN/Inf hidden states in {nonfinite}")
            else:
                ok.append("hidden states are finite")
            ids = [f[f"{s}/example_ids"][:] for s in splits]
            all_ids = np.concatenate(ids) if ids else np.zeros(0)
            if len(np.unique(all_ids)) != len(all_ids):
                problems.append("example_ids repeat: splits overlap or rows are duplicated")
            else:
                ok.append(f"{len(all_ids)} examples, splits disjoint")
            progress = f["progress"][:] if "progress" in f else None
            total = sum(f[s]["lengths"].shape[0] for s in splits)
            if progress is None or not (progress > 0).all() or int(progress.sum()) != total:
                done = None if progress is None else f"{int((progress > 0).sum())} of {len(progress)} batches"
                problems.append(f"/progress says {done} committed, not all {total} examples")
        except (OSError, KeyError, ValueError) as e:
            problems.append(f"reading the arrays failed: {e}")
    return ok, problems


def map_array(path: str, ds: h5py.Dataset) -> np.ndarray:
    """A read-only memory map of an HDF5 array's bytes. The format allocates every array contiguous and unfiltered,
    so its bytes start at one file offset: reading it is a plain memory access, served from the OS page cache that
    every process mapping the file shares."""
    if ds.size == 0:
        return np.zeros(ds.shape, ds.dtype)
    offset = ds.id.get_offset()
    if offset is None or ds.chunks is not None or ds.compression is not None:
        raise PipelineError(f"{path}: {ds.name} is not a contiguous, unfiltered array, so it cannot be memory-mapped; "
                            f"rebuild the cache with `make precompute ARGS=--force`.")
    return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)


class CachedSplit(torch.utils.data.Dataset):
    """One split of the cache at one depth. `split.__getitems__(indices)` (what a DataLoader with a batch_sampler
    calls) is a whole padded batch, gathered in one vectorised step from the memory-mapped hidden array:
    {"inputs_embeds" [B, L, H] in the storage dtype, "attention_mask", "labels"} (labels [B], or [B, L] for a
    per-token task, -100 where not scored); collate with single_batch.

    Memory: the hidden states are never copied into the process (unless in_memory=True, which copies the split into
    RAM when it fits in half the available memory); the per-example arrays (offsets, lengths, labels, ids) are.
    The map is opened lazily in whichever process reads first (DataLoader workers map the file themselves).
    reuse_buffers=True gathers into a ring of 4 reused buffers: a batch's tensors are overwritten 4 batches later,
    which suits a training loop (at most one batch prefetched), not a caller that keeps batches."""

    RING = 4
    THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    _pool: tuple | None = None  # (pid, ThreadPoolExecutor) of the process that made it (never used after a fork)

    def __init__(self, path: str, split: str, k: int, in_memory: bool = False, reuse_buffers: bool = False):
        self.path, self.split, self.key = path, split, hidden_key(split, k)
        with h5py.File(path, "r") as f:
            g = f[split]
            self.offsets = g["offsets"][:]
            self.lengths = g["lengths"][:]
            # per-example targets [N], or per-token targets [T] gathered like the states
            self.per_token = "token_labels" in g
            self.labels = g["token_labels"][:] if self.per_token else g["labels"][:]
            self.example_ids = g["example_ids"][:]
            self.hidden_size, self.dtype = f[self.key].shape[1], f[self.key].dtype
            self.values = STORAGE[read_attrs(f)["dtype"]][1]  # what the stored bits mean (bfloat16 in uint16)
            map_array(path, f[self.key])  # fails now, with the fix, if the array cannot be mapped
        self._hidden, self._ring, self._next = None, None, 0
        self.reuse_buffers = reuse_buffers
        # a split larger than half the RAM will not stay in the page cache: batches come from the disk, so each
        # batch's reads are issued together (_prefetch)
        split_bytes = int(self.offsets[-1]) * self.hidden_size * self.dtype.itemsize
        self._from_disk = split_bytes > 0.5 * psutil.virtual_memory().total
        if in_memory:
            available = psutil.virtual_memory().available
            if split_bytes > 0.5 * available:
                print(f"cache: {split} states need {split_bytes / 2**30:.1f} GiB, more than half the available "
                      f"memory ({available / 2**30:.1f} GiB); memory-mapping {path} instead of copying it into RAM")
            else:
                self._hidden = np.array(self._map())

    def __len__(self):
        return len(self.lengths)

    def _map(self) -> np.ndarray:
        if self._hidden is None:
            with h5py.File(self.path, "r") as f:
                self._hidden = map_array(self.path, f[self.key])
        return self._hidden

    def _buffer(self, rows: int) -> np.ndarray:
        """[rows, H] to gather into: fresh, or the next slot of the ring (grown when a batch is larger)."""
        if not self.reuse_buffers or torch.utils.data.get_worker_info() is not None:
            return np.empty((rows, self.hidden_size), self.dtype)
        if self._ring is None:
            self._ring = [np.empty((0, self.hidden_size), self.dtype)] * self.RING
        slot = self._next = (self._next + 1) % self.RING
        if self._ring[slot].shape[0] < rows:
            self._ring[slot] = np.empty((rows, self.hidden_size), self.dtype)
        return self._ring[slot][:rows]

    def _prefetch(self, idx: np.ndarray, lengths: np.ndarray) -> None:
        """Ask the kernel to read every example's rows of the batch at once (madvise WILLNEED: asynchronous
        readahead of all of them) before the gather touches them one by one: random batches from a cache larger
        than RAM then keep the disk busy instead of waiting for one page fault after another."""
        hidden = self._map()
        mm, base = hidden._mmap, hidden.offset - hidden.offset % mmap.ALLOCATIONGRANULARITY  # np.memmap internals
        row_bytes, page = self.hidden_size * hidden.dtype.itemsize, mmap.PAGESIZE
        for s, n in zip((self.offsets[idx] * row_bytes + hidden.offset - base).tolist(),
                        (lengths * row_bytes).tolist()):
            start = s - s % page
            mm.madvise(mmap.MADV_WILLNEED, start, s + n - start)

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = hidden[rows[i]]: np.take (vectorised, clip mode: no extra buffer) in THREADS contiguous pieces
        at once (np.take releases the GIL; one thread reaches about half of memcpy on random rows)."""
        src, pieces = self._map(), min(self.THREADS, max(1, len(rows) // 2048))
        if pieces == 1:
            np.take(src, rows, axis=0, out=out, mode="clip")
            return
        pool = CachedSplit._pool
        if pool is None or pool[0] != os.getpid():
            pool = CachedSplit._pool = (os.getpid(), ThreadPoolExecutor(self.THREADS, "cache-gather"))
        bounds = np.linspace(0, len(rows), pieces + 1).astype(int)
        jobs = [pool[1].submit(np.take, src, rows[a:b], 0, out[a:b], "clip") for a, b in zip(bounds, bounds[1:])]
        for job in jobs:
            job.result()

    def __getitem__(self, i) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, indices) -> dict:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lengths = self.lengths[idx]
        rows, mask = pad_index(self.offsets[idx], lengths)
        rows = rows.ravel()  # padding reads row 0 ...
        out = self._buffer(len(rows))
        if self._from_disk:
            self._prefetch(idx, lengths)
        self._gather(rows, out)
        out[~mask.ravel()] = 0  # ... and is zeroed
        out = out.reshape(len(idx), mask.shape[1], self.hidden_size)
        states = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16) if self.values == torch.bfloat16 \
            else torch.from_numpy(out)
        if self.per_token:
            labels = np.where(mask, self.labels[rows].reshape(mask.shape), IGNORE).astype(np.int64)
        else:
            labels = self.labels[idx]
        return {"inputs_embeds": states,
                "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                "labels": torch.from_numpy(labels)}

    def __getstate__(self):  # workers map the file themselves; a memory map is never pickled
        state = self.__dict__.copy()
        if isinstance(self._hidden, np.memmap):
            state["_hidden"] = None
        state["_ring"] = None
        return state


def pad_index(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right padding of ragged rows, the one place it is done: (flat index of every cell [B, W], 0 in the padding;
    mask [B, W] of the real cells). Example i owns flat[starts[i]:starts[i] + lengths[i]]."""
    width = int(lengths.max())
    mask = np.arange(width) < lengths[:, None]
    return np.where(mask, starts[:, None] + np.arange(width), 0), mask


def pad_ragged(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, value) -> tuple[np.ndarray, np.ndarray]:
    """(padded [B, W] int64 rows of a ragged array, with `value` in the padding; mask [B, W])."""
    rows, mask = pad_index(starts, lengths)
    return np.where(mask, flat[rows], value).astype(np.int64), mask


def pad_lists(rows: dict, pads: dict) -> dict:
    """A batch of encoded rows (column -> one list per example, and "length") as padded int64 [B, W] arrays, one per
    column named in `pads` (column -> padding value; input_ids first) that the rows have, plus attention_mask."""
    lengths = np.asarray(rows["length"])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out = {}
    for column, value in pads.items():
        if column in rows:
            out[column], mask = pad_ragged(np.concatenate(rows[column]), starts, lengths, value)
    out["attention_mask"] = mask.astype(np.int64)
    return out


def single_batch(batch):
    """collate_fn for a dataset that returns whole batches (CachedSplit with a batch sampler)."""
    return batch


class Batches(torch.utils.data.BatchSampler):
    """Lists of example indices, one per batch. shuffle: a new order per epoch from `generator`, either
    transformers' LengthGroupedSampler order (grouped: random megabatches of 50 batches, each sorted by length, the
    longest batch first; the same generator calls, so the same batches) or a plain permutation (RandomSampler's);
    else in storage order. Computed with numpy: no Python object per example. The order is drawn at the first batch
    (as torch's BatchSampler does), so a DataLoader sharing the generator draws in the same sequence as before."""

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool = False, grouped: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__(range(len(lengths)), batch_size, drop_last=False)
        self.lengths, self.shuffle, self.grouped, self.generator = np.asarray(lengths), shuffle, grouped, generator

    def order(self) -> np.ndarray:
        n = len(self.lengths)
        if not self.shuffle:
            return np.arange(n)
        perm = torch.randperm(n, generator=self.generator).numpy()
        if not self.grouped:
            return perm
        size = (min(n // (self.batch_size * 4), 50) or 1) * self.batch_size
        megabatches = [perm[i:i + size] for i in range(0, n, size)]
        megabatches = [m[np.argsort(-self.lengths[m], kind="stable")] for m in megabatches]  # longest first, stable
        longest = int(np.argmax([self.lengths[m[0]] for m in megabatches]))
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
        return np.concatenate(megabatches)

    def __iter__(self):
        order, bs = self.order(), self.batch_size
        for i in range(0, len(order), bs):
            yield order[i:i + bs].tolist()

    def __len__(self):
        return -(-len(self.lengths) // self.batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Writing: precompute lays the file out here (create), then writes rows into the byte ranges Layout names.


@dataclass
class SplitPlan:
    rows: np.ndarray  # the split's examples as row indices into the cleaned data, sorted by token length (stable)
    lengths: np.ndarray  # int32 tokens per example, in that order
    offsets: np.ndarray  # int64 [n+1] ragged row offsets


ROWS_PER_WRITE = 1 << 16  # examples per block when per-token arrays are written into the layout


def create(tmp: str, attrs: dict, plan: dict, labels: np.ndarray | None, tokens, depths: list, hidden_size: int,
           dtype: str, batch_rows: int, vocab_size: int) -> None:
    """Lay out the whole file: attributes, per-example arrays, per-token arrays (token ids, and a per-token task's
    targets) in storage order from the tokenised Arrow table `tokens`, and every hidden array allocated up front (so
    later writes are raw data only). /progress (one entry per batch of the plan: examples committed) is created
    last: a file without it is not resumable and is redone."""
    f = h5py.File(tmp, "w", libver="earliest")
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["complete"] = False
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["depths_json"] = json.dumps(depths)
    f.attrs["dtype"] = dtype
    f.attrs["splits_json"] = json.dumps(list(plan))
    f.attrs["batch_rows"] = batch_rows  # the plan's batches; a resume keeps them whatever its option says
    kinds = {"input_ids": np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32,
             "token_type_ids": np.int8, "token_labels": np.int16, "word_ids": np.int32}
    columns = [c for c in kinds if c in tokens.column_names]
    rows_of = tokens.with_format("arrow").select_columns(columns)
    for split, p in plan.items():
        g = f.create_group(split)
        g["offsets"] = p.offsets
        g["lengths"] = p.lengths
        g["example_ids"] = p.rows  # int64 already
        if labels is not None:
            g["labels"] = labels[p.rows]
        else:
            g["words_cut"] = np.asarray(tokens.select_columns(["words_cut"]).with_format("numpy")[p.rows]
                                        ["words_cut"], dtype=np.int32).reshape(-1)
        total = int(p.offsets[-1])
        flat = {c: _contiguous(g, c, (total,), kinds[c]) for c in columns}
        for lo in range(0, len(p.rows), ROWS_PER_WRITE):  # per-token arrays in storage order, a block at a time
            block = rows_of[p.rows[lo:lo + ROWS_PER_WRITE]]
            s, e = int(p.offsets[lo]), int(p.offsets[min(lo + ROWS_PER_WRITE, len(p.rows))])
            for c in columns:
                flat[c][s:e] = block.column(c).combine_chunks().flatten().to_numpy().astype(flat[c].dtype)
            del block
            release_heap()
        for d in depths:
            _contiguous(f, hidden_key(split, d), (total, hidden_size), STORAGE[dtype][0])
    n_batches = sum(-(-len(p.rows) // batch_rows) for p in plan.values())
    f.create_dataset("progress", data=np.zeros(n_batches, dtype=np.int32))
    f.close()


def _contiguous(group, name, shape, dtype) -> h5py.Dataset:
    """A contiguous, unfiltered array allocated now (so its bytes can be written with pwrite and memory-mapped)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl, fill_time="never")


@dataclass
class PlanBatch:
    index: int  # position in /progress
    split: int
    start: int  # first example (storage order) of the split
    end: int


@dataclass
class Layout:
    """The writer's view of a laid-out file: the plan's batches, their model inputs, and the byte ranges to write."""
    splits: list
    depths: list
    dtype: str
    pad: int
    row_bytes: int  # bytes of one stored hidden state
    progress: np.ndarray  # examples committed per batch
    progress_offset: int
    offsets: list  # per split
    lengths: list
    hidden_offset: dict  # (split index, depth) -> file offset of the hidden array
    ids: list  # per split: memory-mapped token ids
    types: list  # per split: memory-mapped token types, or None

    def batches(self, batch_rows: int) -> list:
        """The plan's batches, split after split, batch_rows examples each."""
        out = [(si, lo, min(lo + batch_rows, len(self.lengths[si])))
               for si in range(len(self.splits)) for lo in range(0, len(self.lengths[si]), batch_rows)]
        return [PlanBatch(b, *x) for b, x in enumerate(out)]

    def inputs(self, b: PlanBatch) -> dict:
        """The padded model inputs of one batch, from the token ids stored in the file (right padding)."""
        lengths, offsets = self.lengths[b.split][b.start:b.end], self.offsets[b.split]
        s, e = int(offsets[b.start]), int(offsets[b.end])
        starts = offsets[b.start:b.end] - s
        ids, mask = pad_ragged(np.asarray(self.ids[b.split][s:e]), starts, lengths, self.pad)
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self.types[b.split] is not None:
            out["token_type_ids"] = torch.from_numpy(pad_ragged(np.asarray(self.types[b.split][s:e]), starts,
                                                                lengths, 0)[0])
        return out

    def hidden_at(self, b: PlanBatch, depth: int) -> int:
        """File offset of the batch's first row of hidden states at `depth`."""
        return self.hidden_offset[b.split, depth] + int(self.offsets[b.split][b.start]) * self.row_bytes

    def progress_at(self, b: int) -> int:
        """File offset of batch b's /progress entry (int32: its example count once committed)."""
        return self.progress_offset + 4 * b


def open_layout(tmp: str) -> tuple[Layout, int]:
    """(the layout of a laid-out file, its batch_rows)."""
    with h5py.File(tmp, "r") as f:
        attrs = read_attrs(f)
        splits, depths = json.loads(attrs["splits_json"]), json.loads(attrs["depths_json"])
        first = f[hidden_key(splits[0], depths[0])]
        layout = Layout(
            splits=splits, depths=depths, dtype=attrs["dtype"], pad=int(attrs["pad_token_id"]),
            row_bytes=first.shape[1] * first.dtype.itemsize, progress=f["progress"][:],
            progress_offset=f["progress"].id.get_offset(), offsets=[f[s]["offsets"][:] for s in splits],
            lengths=[f[s]["lengths"][:] for s in splits],
            hidden_offset={(i, d): f[hidden_key(s, d)].id.get_offset() for i, s in enumerate(splits) for d in depths},
            ids=[map_array(tmp, f[s]["input_ids"]) for s in splits],
            types=[map_array(tmp, f[s]["token_type_ids"]) if "token_type_ids" in f[s] else None for s in splits])
        return layout, int(attrs["batch_rows"])


def committed(tmp: str) -> int:
    """Examples a (possibly interrupted) precompute has committed."""
    try:
        with h5py.File(tmp, "r") as f:
            return int(f["progress"][:].sum())
    except (OSError, KeyError):
        return 0


def layout_summary(tmp: str) -> dict:
    """Sizes of a laid-out file: examples per split, tokens, committed examples, truncated examples."""
    with h5py.File(tmp, "r") as f:
        splits = json.loads(f.attrs["splits_json"])
        return {"sizes": [int(f[s]["lengths"].shape[0]) for s in splits],
                "tokens": sum(int(f[s]["offsets"][-1]) for s in splits),
                "committed": int(f["progress"][:].sum()), "truncated": int(f.attrs["truncated_examples"]),
                "identity_json": read_attrs(f).get("identity_json"), "laid_out": "progress" in f}


def finish(tmp: str, stats: dict) -> None:
    """Checksums of the bytes on disk, stats, `complete` last (the caller then renames the file into place)."""
    try:
        with h5py.File(tmp, "r+") as f:
            checksums = {name: dataset_sha256(f[name]) for name in array_names(f)}
            f.attrs["checksums_json"] = json.dumps(checksums, sort_keys=True)
            f.attrs["stats_json"] = json.dumps(stats)
            f.attrs["complete"] = True  # written last: a file without it is never used
    except RuntimeError as e:  # h5py reports some failed writes (a flush) as RuntimeError
        raise OSError(str(e)) from None


def read_examples(path: str, split: str, picks, depth: int) -> list:
    """[(token features {input_ids, token_type_ids?}, stored hidden states at depth as float32 [len, H])] of the
    given examples (storage order), for verify and check."""
    with h5py.File(path, "r") as f:
        g, dtype = f[split], read_attrs(f)["dtype"]
        offsets, hidden = g["offsets"][:], f[hidden_key(split, depth)]
        rows = []
        for i in picks:
            s, e = offsets[i], offsets[i + 1]
            ex = {"input_ids": g["input_ids"][s:e].astype(np.int64).tolist()}
            if "token_type_ids" in g:
                ex["token_type_ids"] = g["token_type_ids"][s:e].astype(np.int64).tolist()
            rows.append((ex, torch.from_numpy(as_float32(hidden[s:e], dtype))))
        return rows


def split_column(path: str, split: str, name: str) -> np.ndarray:
    """A per-example array of a split (zeros where the cache has none: words_cut of a per-example task)."""
    with h5py.File(path, "r") as f:
        g = f[split]
        return g[name][:] if name in g else np.zeros(g["lengths"].shape[0], dtype=np.int64)
