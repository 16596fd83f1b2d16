"""The packaged offline default: real all-MiniLM-L6-v2 and the real Rotten Tomatoes corpus."""
from dataclasses import replace

import numpy as np

from pipeline import make_config
from pipeline.data import load_labeled
from pipeline.model import load_model_config
from pipeline.precompute import precompute
from pipeline.verify import verify


def test_default_data_split_is_stratified_and_fixed():
    cfg = make_config()
    data = load_labeled(cfg)
    assert len(data.ds) == 12808 and data.label_names == ["fresh", "rotten"]
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 10246, "validation": 1281, "test": 1281}
    all_idx = np.concatenate(list(data.splits.values()))
    assert len(np.unique(all_idx)) == len(all_idx) == 12808
    fresh = (data.labels == 0).mean()
    assert abs(fresh - 0.578) < 0.001
    for idx in data.splits.values():
        assert abs((data.labels[idx] == 0).mean() - fresh) < 0.002  # stratified
    again = load_labeled(cfg)
    assert all(np.array_equal(again.splits[k], data.splits[k]) for k in data.splits)
    assert again.fingerprint == data.fingerprint
    other = load_labeled(replace(cfg, split_seed=1))
    assert not np.array_equal(other.splits["validation"], data.splits["validation"])


def test_default_model_is_minilm_with_six_layers():
    _, mconf = load_model_config(make_config())
    assert (mconf.model_type, mconf.num_hidden_layers, mconf.hidden_size) == ("bert", 6, 384)


def test_verify_on_real_minilm_cache(tmp_path):
    for dtype, bound in (("float32", 1e-5), ("float16", 1e-3)):
        cfg = make_config(cache_dir=str(tmp_path), split="train[-600:]", cache_dtype=dtype)
        precompute(cfg)
        result = verify(cfg, samples=24)
        assert result["examples"] == 24
        assert result["max_abs_logit_diff"] <= bound, (dtype, result)
    assert result["max_abs_logit_diff"] > 0  # fp16 storage does round: the check is not vacuous


def test_max_examples_takes_a_fixed_random_subset():
    cfg = make_config(max_examples=1000)
    data = load_labeled(cfg)
    assert len(data.ds) == 1000 and sum(len(v) for v in data.splits.values()) == 1000
    texts = data.texts_at(range(1000))[0]
    assert texts == load_labeled(cfg).texts_at(range(1000))[0]  # fixed seed
    assert texts != load_labeled(replace(cfg, split_seed=3)).texts_at(range(1000))[0]
    assert 0.5 < (data.labels == 0).mean() < 0.66  # a random subset, not the file's first rows
