"""The HDF5 cache: format, validation on open, and a ragged-array torch Dataset with per-batch padding.

Layout (format_version 1), one file per (model, k, data, tokenizer settings, dtype):
  /                       attrs: format_version, complete, config_json, cache_key_json, model, model_type,
                                 num_layers, hidden_size, k, depths_json, dtype, weights_sha256, tokenizer_json,
                                 dataset_fingerprint, num_labels, label_names_json, task, splits_json, versions_json
  /<split>/offsets        int64 [N+1]  example i owns rows offsets[i]:offsets[i+1] of every flat array
  /<split>/lengths        int32 [N]    real tokens per example (no padding is stored)
  /<split>/labels         int64 [N] (classification) | float32 [N] (regression)
  /<split>/example_ids    int64 [N]    row of the example in the loaded source split
  /<split>/input_ids      uint16|int32 [T]  token ids (lets `verify` recompute rows without the source data)
  /<split>/token_type_ids int8  [T]    only for text pairs (absent means all zeros)
  /<split>/layer_<k>/hidden  float16|float32 [T, hidden], chunked by rows: hidden state after layer k
Examples are stored sorted by length (stable), so contiguous rows have similar lengths.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from .config import Config
from .errors import PipelineError

FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: large sequential reads, small enough for partial reads
RDCC_NBYTES = 64 << 20  # HDF5 chunk cache per open file (default is 1 MiB)


def chunk_shape(total_rows: int, hidden_size: int, itemsize: int) -> tuple:
    """Row chunks of at most ~1 MiB, sized so that they tile the array almost exactly (HDF5 allocates whole
    chunks: a fixed size would waste up to one chunk per split)."""
    target = max(1, CHUNK_BYTES // (hidden_size * itemsize))
    n_chunks = max(1, -(-total_rows // target))
    return (max(1, -(-total_rows // n_chunks)), hidden_size)


@dataclass
class CacheInfo:
    path: str
    k: int
    num_layers: int
    hidden_size: int
    num_labels: int
    label_names: list | None
    weights_sha256: str
    splits: dict  # name -> number of examples
    attrs: dict


def open_cache(path: str, cfg: Config) -> CacheInfo:
    """Validate a finished cache against the config that wants to use it; clear errors for every mismatch."""
    if not os.path.exists(path):
        extra = " (an interrupted precompute left a .tmp file beside it)" if os.path.exists(path + ".tmp") else ""
        raise PipelineError(
            f"no cache at {path}{extra}. Run `make precompute` with the same options first "
            f"(the cache file name is derived from the model, data, k, tokenizer settings and dtype)."
        )
    try:
        with h5py.File(path, "r") as f:
            attrs = {key: (v.decode() if isinstance(v, bytes) else v) for key, v in f.attrs.items()}
            split_sizes = {s: int(f[s]["lengths"].shape[0]) for s in json.loads(attrs.get("splits_json", "[]"))}
    except (OSError, KeyError) as e:
        raise PipelineError(f"{path} is not a readable cache ({e}); delete it and run `make precompute`.") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise PipelineError(
            f"{path} has cache format version {attrs.get('format_version')}, this code reads version "
            f"{FORMAT_VERSION}; rebuild it with `make precompute`."
        )
    if not attrs.get("complete"):
        raise PipelineError(f"{path} is incomplete (no 'complete' flag); delete it and run `make precompute`.")
    built = json.loads(attrs["cache_key_json"])
    wanted = cfg.cache_key()
    diff = [f"{key}: cache has {built.get(key)!r}, config wants {wanted[key]!r}"
            for key in wanted if built.get(key) != wanted[key]]
    if diff:
        raise PipelineError(
            f"cache {path} was built for a different setup:\n  " + "\n  ".join(diff) +
            "\nRun `make precompute` with the training options (or train with the options the cache was built with)."
        )
    return CacheInfo(
        path=path, k=int(attrs["k"]), num_layers=int(attrs["num_layers"]), hidden_size=int(attrs["hidden_size"]),
        num_labels=int(attrs["num_labels"]), label_names=json.loads(attrs["label_names_json"]),
        weights_sha256=attrs["weights_sha256"], splits=split_sizes, attrs=attrs,
    )


class CachedSplit(torch.utils.data.Dataset):
    """One split of the cache as a map-style dataset of (hidden [len, H], label).

    in_memory=True reads the split's hidden array once into RAM; otherwise rows are read from HDF5 per item and
    the file is opened lazily in whichever process (DataLoader worker) first reads, never before a fork."""

    def __init__(self, path: str, split: str, k: int, in_memory: bool = True):
        self.path, self.split, self.key = path, split, f"{split}/layer_{k}/hidden"
        with h5py.File(path, "r") as f:
            g = f[split]
            self.offsets = g["offsets"][:]
            self.lengths = g["lengths"][:]
            self.labels = g["labels"][:]
            self.example_ids = g["example_ids"][:]
            ds = f[self.key]
            need = ds.size * ds.dtype.itemsize
            if in_memory and need > 0.5 * _available_ram():
                print(f"cache: {split} states need {need / 2**30:.1f} GiB, more than half the free RAM; "
                      f"reading from {path} per batch instead of loading into memory")
                in_memory = False
            self._hidden = ds[:] if in_memory else None
        self._file = None

    def __len__(self):
        return len(self.lengths)

    def _rows(self):
        if self._hidden is not None:
            return self._hidden
        if self._file is None:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=RDCC_NBYTES)
        return self._file[self.key]

    def __getitem__(self, i):
        s, e = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(np.ascontiguousarray(self._rows()[s:e])), self.labels[i]

    def __getstate__(self):  # never pickle an open HDF5 handle into a worker
        state = self.__dict__.copy()
        state["_file"] = None
        return state


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown platform: trust the user's in_memory setting


def collate(items):
    """Pad a batch of ragged [len, H] states to the batch's longest; mask marks real tokens. Keeps the storage dtype
    (fp16 travels half the bytes); the training step upcasts on the device."""
    lengths = [h.shape[0] for h, _ in items]
    hidden = torch.nn.utils.rnn.pad_sequence([h for h, _ in items], batch_first=True)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    labels = torch.from_numpy(np.asarray([y for _, y in items]))
    return {"inputs_embeds": hidden, "attention_mask": mask.long(), "labels": labels}
