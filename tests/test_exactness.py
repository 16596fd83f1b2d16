"""fp16 storage, the lean top, the frozen-weights hash and legacy checkpoints (the per-family logits and gradients at
every depth: test_families.py)."""
import copy

import h5py
import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from transformers import AutoModelForSequenceClassification

from pipeline.cache import CachedSplit, open_cache
from pipeline.model import (_load_top_lean, bottom_weights_sha256, frozen_weights_sha256,
                            load_full_model, load_tokenizer, load_top, safetensors_files, split_top)
from pipeline.precompute import precompute

from conftest import TINY_CONFIGS, VARIANTS, tiny_cfg


def _full_and_top(cfg, info):
    set_seed(0)
    full = load_full_model(cfg, info.num_labels, info.label_names).eval()
    top = split_top(copy.deepcopy(full), cfg.k).eval()
    return full, top


def _batch(cfg, path, n=12):
    """The same n validation examples two ways: token ids for the full model, cached states for the top."""
    ds = CachedSplit(path, "validation", cfg.k)
    with h5py.File(path) as f:
        ids = f["validation/input_ids"][:]
        tt = f["validation/token_type_ids"][:] if "validation/token_type_ids" in f else None
    feats = {"input_ids": [ids[ds.offsets[i]:ds.offsets[i + 1]].tolist() for i in range(n)]}
    if tt is not None:
        feats["token_type_ids"] = [tt[ds.offsets[i]:ds.offsets[i + 1]].tolist() for i in range(n)]
    enc = load_tokenizer(cfg).pad(feats, return_tensors="pt")
    return enc, ds.__getitems__(list(range(n)))


def test_fp16_cache_is_close_and_half_the_size(tmp_path, tiny_model, small_csv):
    cfg16 = tiny_cfg(tmp_path, tiny_model("bert"), small_csv, cache_dtype="float16")
    cfg32 = tiny_cfg(tmp_path, tiny_model("bert"), small_csv, cache_dtype="float32")
    p16, p32 = precompute(cfg16), precompute(cfg32)
    with h5py.File(p16) as a, h5py.File(p32) as b:
        h16, h32 = a["train/layer_1/hidden"], b["train/layer_1/hidden"]
        assert h16.dtype == np.float16 and h32.dtype == np.float32
        assert h16.shape == h32.shape
        np.testing.assert_allclose(h16[:].astype(np.float32), h32[:], atol=2e-3, rtol=1e-3)
    info = open_cache(p16, cfg16)
    full, top = _full_and_top(cfg16, info)
    enc, batch = _batch(cfg16, p16)
    with torch.no_grad():
        diff = (full(**enc).logits - top(inputs_embeds=batch["inputs_embeds"].float(),
                                         attention_mask=batch["attention_mask"]).logits).abs().max().item()
    assert diff < 1e-3


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS) + sorted(VARIANTS))
def test_lean_top_equals_top_cut_from_full_model(tmp_path, tiny_model, small_csv, model_type):
    """load_top reads only layers [k:] from the checkpoint; the result must equal split_top(full model)."""
    cfg = tiny_cfg(tmp_path, tiny_model(model_type), small_csv, k=2)
    lean = _load_top_lean(cfg, 2, ["fresh", "rotten"], safetensors_files(cfg))
    assert lean is not None  # the lean path is taken for save_pretrained folders
    top, digest = load_top(cfg, 2, ["fresh", "rotten"])
    full = load_full_model(cfg, 2, ["fresh", "rotten"])
    assert digest == frozen_weights_sha256(cfg)
    ref = split_top(copy.deepcopy(full), cfg.k).state_dict()
    for model in (lean, top):
        got = model.state_dict()
        assert set(got) == set(ref)
        for name, t in ref.items():
            assert torch.equal(got[name], t), name
    assert lean.config.num_hidden_layers == 1


def test_weights_hash_sees_only_frozen_weights(tmp_path, tiny_model, small_csv):
    src = tiny_model("bert")
    cfg = tiny_cfg(tmp_path, str(tmp_path / "m"), small_csv, k=1)
    model = AutoModelForSequenceClassification.from_pretrained(src)
    model.save_pretrained(tmp_path / "m")
    before = frozen_weights_sha256(cfg)
    assert before == frozen_weights_sha256(cfg)  # deterministic
    with torch.no_grad():
        model.bert.encoder.layer[2].output.dense.weight += 1  # a trained layer: not part of the cache
        model.classifier.weight += 1
    model.save_pretrained(tmp_path / "m")
    assert frozen_weights_sha256(cfg) == before
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] += 1e-3  # a frozen layer: the cache is stale
    model.save_pretrained(tmp_path / "m")
    assert frozen_weights_sha256(cfg) != before


def test_legacy_bin_checkpoint_takes_the_full_load_path(tmp_path, tiny_model, small_csv):
    """A folder with only pytorch_model.bin (older checkpoints): hashed from the loaded model, top cut from it."""
    src = tiny_model("bert")
    folder = tmp_path / "legacy"
    model = AutoModelForSequenceClassification.from_pretrained(src)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    load_tokenizer(tiny_cfg(tmp_path, src, small_csv)).save_pretrained(folder)
    cfg = tiny_cfg(tmp_path, str(folder), small_csv, k=1, cache_dtype="float32")
    assert safetensors_files(cfg) == []
    info = open_cache(precompute(cfg), cfg)
    assert info.weights_sha256 == {1: "model:" + bottom_weights_sha256(model.bert, 1)}
    top, digest = load_top(cfg, 2, ["fresh", "rotten"])
    assert digest == info.weights_sha256[1]
    ref = split_top(model, 1).state_dict()
    assert all(torch.equal(top.state_dict()[n], t) for n, t in ref.items())
