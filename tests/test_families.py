"""Every supported family (the six encoders of before, ModernBERT, DeBERTa-v2/v3, Llama, Mistral, Qwen2, Qwen3):
the top from the cache equals the full model with the bottom frozen, at every depth, with each attention kernel the
family has; gradual unfreezing equals requires_grad on the full model; the export gives the same logits.
Real tiny random models (save_pretrained), the real precompute -> HDF5 -> reader -> top path."""
import copy
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from pipeline.arch import LAYER_KEY, arch_for
from pipeline.cache import CachedSplit, check_cache, open_cache
from pipeline.export import export
from pipeline.model import _load_top_lean, load_full_model, load_tokenizer, load_top, safetensors_files
from pipeline.precompute import precompute
from pipeline.train import train
from pipeline.verify import verify

from conftest import TINY_CONFIGS, VARIANTS, TokenSplit, cli_args, options, reference_training, tiny_cfg

FAMILIES = sorted(TINY_CONFIGS) + sorted(VARIANTS)  # 12 model types (+ the DeBERTa-v3 layout)
L = 3  # layers of every tiny model


def _arch(model_type):
    return arch_for(VARIANTS.get(model_type, (model_type,))[0])


KERNELS = [(m, a) for m in FAMILIES for a in _arch(m).attention]  # (family, attention kernel) pairs


def _to_full_name(name, k):
    """A top parameter's name in the full model: layer i of the top is layer i + k."""
    m = LAYER_KEY.match(name)
    return f"{m.group(1)}{int(m.group(2)) + k}.{m.group(3)}" if m else name


def _token_batch(cfg, path, n, padding_side="right"):
    """The first n validation examples as the full model's input (the tokenizer's padding)."""
    tokens = TokenSplit(path, "validation")
    feats = {"input_ids": [tokens.ids[tokens.offsets[i]:tokens.offsets[i + 1]].tolist() for i in range(n)]}
    tokenizer = load_tokenizer(cfg)
    tokenizer.padding_side = padding_side
    return tokenizer.pad(feats, return_tensors="pt")


@pytest.mark.parametrize("model_type,attn", KERNELS)
def test_every_depth_from_one_cache_equals_the_full_model(tmp_path, tiny_model, small_csv, model_type, attn,
                                                         record_property):
    """One precompute caches depths 0..L; at each k the lean top (what training loads) gives the full model's
    logits and, for every trainable parameter, its gradient with the bottom frozen by requires_grad=False. The
    largest differences over all depths are recorded (pytest --junitxml shows them as properties)."""
    arch = _arch(model_type)
    cfg = tiny_cfg(tmp_path, tiny_model(model_type), small_csv, depths="0,1,2,3", k=1, cache_dtype="float32",
                   attn_implementation=attn)
    path = precompute(cfg)
    info = open_cache(path, cfg)
    full = load_full_model(cfg, info.num_labels, info.label_names).eval()
    enc = _token_batch(cfg, path, 12)
    worst = {"logits": 0.0, "grads": 0.0}
    with torch.no_grad():
        ref_logits = full(**enc).logits
    for k in range(L + 1):
        at = replace(cfg, k=k)
        batch = CachedSplit(path, "validation", k).__getitems__(list(range(12)))
        assert torch.equal(batch["attention_mask"], enc["attention_mask"])
        assert _load_top_lean(at, info.num_labels, info.label_names, safetensors_files(at)) is not None, k
        top, digest = load_top(at, info.num_labels, info.label_names)  # the lean path: no frozen layer loaded
        assert digest == info.weights_sha256[k]
        top.eval()
        got = top(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"])
        worst["logits"] = max(worst["logits"], (got.logits - ref_logits).abs().max().item())
        assert worst["logits"] <= 1e-5, k
        # the usual recipe: the full model with what the bottom computes with frozen
        ref = copy.deepcopy(full)
        for name, p in ref.named_parameters():
            p.requires_grad_(not arch.is_frozen(name, k))
        ref(**enc, labels=batch["labels"]).loss.backward()
        got.loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        top_grads = {_to_full_name(n, k): p.grad for n, p in top.named_parameters() if p.requires_grad}
        assert set(ref_grads) == set(top_grads), (k, set(ref_grads) ^ set(top_grads))
        for name, g in ref_grads.items():
            assert g is not None and top_grads[name] is not None, (k, name)
            worst["grads"] = max(worst["grads"], (g - top_grads[name]).abs().max().item())
            assert worst["grads"] <= 1e-5, (k, name)
        r = verify(at, path, samples=16)
        assert r["max_abs_hidden_diff"] <= 1e-5 and r["max_abs_logit_diff"] <= 1e-5, (k, r)
    assert ref_grads  # k = L still trains the head
    for name, value in worst.items():
        record_property(f"max_abs_{name}_diff", value)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradual_unfreezing_equals_requires_grad_and_export_gives_the_same_logits(tmp_path, tiny_model, small_csv,
                                                                                  model_type):
    """Head only (depth 3), then one block (2), then everything above the embeddings (0), discriminative lr: the
    trained top equals the full model trained with requires_grad flags; the exported folder loads with
    AutoModelForSequenceClassification and gives the top's logits."""
    model = tiny_model(model_type, dropout=False)
    cfg = tiny_cfg(tmp_path, model, small_csv, stages="3,2,0", layer_lr_decay=0.8, lr=1e-3, cache_dtype="float32",
                   checkpoint_every=-1, run_name="ours", save_last=True)
    path = precompute(cfg)
    train(cfg)
    run = tmp_path / "runs" / "ours"
    ours = load_file(run / "top_last.safetensors")
    ref = reference_training(cfg, path, model).state_dict()
    original = AutoModelForSequenceClassification.from_pretrained(model).state_dict()
    for name, t in ours.items():
        torch.testing.assert_close(t, ref[name], rtol=1e-4, atol=1e-5, msg=name)  # depth 0: same names
        assert not torch.equal(t, original[name]), f"{name} did not train"

    out = export(str(run))
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with safe_open(run / "top.safetensors", "pt") as st:
        k = int(st.metadata()["k"])  # the best evaluation's depth
    info = open_cache(path, cfg)
    top, _ = load_top(replace(cfg, k=k, stages=""), info.num_labels, info.label_names)
    top.load_state_dict(load_file(run / "top.safetensors"))
    states = CachedSplit(path, "validation", k)
    batch = states.__getitems__(list(range(len(states))))
    ids = TokenSplit(path, "validation").__getitems__(list(range(len(states))))["inputs_embeds"]
    with torch.no_grad():
        a = exported(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        b = top.eval()(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_decoder_pools_the_last_real_token_with_left_or_right_padding(tmp_path, tiny_model, small_csv, model_type):
    """The Hugging Face head finds the last real token from input_ids; the top, given states, from the attention
    mask. A left-padded batch to the full model (rotary positions shift with the padding) gives the same logits as
    the right-padded cache to the top."""
    cfg = tiny_cfg(tmp_path, tiny_model(model_type), small_csv, k=2, cache_dtype="float32")
    path = precompute(cfg)
    info = open_cache(path, cfg)
    full = load_full_model(cfg, info.num_labels, info.label_names).eval()
    top, _ = load_top(cfg, info.num_labels, info.label_names)
    n = 16  # the whole validation split (stored shortest first)
    batch = CachedSplit(path, "validation", 2).__getitems__(list(range(n)))
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1  # lengths differ: there is padding
    with torch.no_grad():
        got = top.eval()(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
        for side in ("left", "right"):
            enc = _token_batch(cfg, path, n, padding_side=side)
            ref = full(**enc).logits
            assert (ref - got).abs().max().item() <= 1e-5, side
        # pooling the last position instead (what Hugging Face does given states) is visibly wrong
        last = full.score(full.model(**_token_batch(cfg, path, n)).last_hidden_state[:, -1])
        assert (last - got).abs().max().item() > 1e-3


def test_bf16_cache_and_fp16_overflow_is_refused_naming_bf16(tmp_path, tiny_model, small_csv, cli):
    """A decoder whose states exceed float16: the float16 precompute stops with a message naming bfloat16 (exit 2,
    no traceback); --cache-dtype bfloat16 stores raw 16-bit values (dtype recorded), which read back as the states
    rounded to bfloat16, pass `check`, train and verify."""
    folder = tmp_path / "loud-llama"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model("llama"))
    with torch.no_grad():
        model.model.embed_tokens.weight *= 1e7  # states of order 1e5 > 65504
    model.save_pretrained(folder)
    load_tokenizer(tiny_cfg(tmp_path, tiny_model("llama"), small_csv)).save_pretrained(folder)
    opts = options(tmp_path, str(folder), small_csv, k=1)
    bad = cli("precompute", *cli_args(opts), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "beyond float16's range" in bad.stderr and "--cache-dtype bfloat16" in bad.stderr

    cfg16 = tiny_cfg(tmp_path, str(folder), small_csv, k=1, cache_dtype="bfloat16", run_name="bf16", max_steps=3)
    cfg32 = replace(cfg16, cache_dtype="float32")
    p16, p32 = precompute(cfg16), precompute(cfg32)
    with h5py.File(p16) as a, h5py.File(p32) as b:
        assert a.attrs["dtype"] == "bfloat16" and a["train/layer_1/hidden"].dtype == np.uint16
        raw = torch.from_numpy(a["train/layer_1/hidden"][:].view(np.int16)).view(torch.bfloat16)
        full = torch.from_numpy(b["train/layer_1/hidden"][:])
    assert full.abs().max() > 65504
    torch.testing.assert_close(raw.float(), full, rtol=2 ** -8, atol=0)
    x = CachedSplit(p16, "train", 1).__getitems__([0, 1])["inputs_embeds"]
    assert x.dtype == torch.bfloat16
    ok, problems = check_cache(p16)
    assert not problems and any("finite" in line for line in ok)
    r = verify(cfg16, p16, samples=16)
    assert r["hidden_within_tolerance"], r
    assert 0 <= train(cfg16)["accuracy"] <= 1


def test_refusals_name_the_fix(tmp_path, tiny_model, small_csv):
    """Kernels that cannot be exact are refused, and so is a kernel the family lacks; unsupported families list
    the supported ones."""
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="flash attention unpads"):
        tiny_cfg(tmp_path, tiny_model("llama"), small_csv, attn_implementation="flash_attention_2")
    with pytest.raises(PipelineError, match=r"runs with attention eager, not 'sdpa'"):
        precompute(tiny_cfg(tmp_path, tiny_model("deberta-v2"), small_csv, attn_implementation="sdpa"))
    gemma = tmp_path / "gemma"
    AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "gemma", vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, head_dim=8)).save_pretrained(gemma)
    with pytest.raises(PipelineError, match=r"'gemma' model; the bottom/top split supports: .*deberta-v2.*llama.*"
                                            r"modernbert.*qwen3"):
        precompute(tiny_cfg(tmp_path, str(gemma), small_csv))
