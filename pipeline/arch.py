"""One small adapter per model family: what the bottom/top cut needs to know about it.

An adapter says where the layer list is, which other weights the frozen bottom uses (hashed with it, frozen in the
top when the top keeps them), which modules the top replaces by a pass-through of the cached states, what follows
the layers (a final norm: kept and trained in the top, never applied to the cached states), which config fields
are indexed by layer (cut like the layers), and how the head pools (the model's own, or the last real token found
from the attention mask for decoders). Precompute, train, verify, evaluate and export read only this table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from .errors import PipelineError

# a layer weight in a state dict or checkpoint file, with or without the base-model prefix ("bert.", "model.",
# "deberta.", ...): groups (prefix up to the layer list, layer index, rest of the name)
LAYER_KEY = re.compile(r"^((?:\w+\.)?(?:encoder\.layer|transformer\.layer|layers)\.)(\d+)\.(.+)$")


@dataclass(frozen=True)
class Arch:
    family: str  # the README's name for it
    model_types: tuple
    layers: str  # attribute path of the ModuleList of layers inside the base model
    embeddings: tuple  # base-model modules of the bottom only; the top replaces them by a pass-through of the states
    shared: tuple = ()  # modules every layer uses (DeBERTa's relative positions): frozen in the top when k > 0
    after_first: str = ""  # module applied after layer 0 only (DeBERTa's conv): part of the bottom when k > 0
    final_norm: str = ""  # module after the layers: identity in the bottom, kept (trained) in the top
    per_layer: tuple = ()  # config fields with one entry per layer, cut like the layers
    decoder: bool = False  # causal decoder with a score head: pooled at the last real token of the attention mask
    min_bottom_layers: int = 0  # the base model cannot run with fewer layers (the states are taken by hooks)
    first_layer_fix: Optional[Callable] = None  # (layer, config): give a model's layer 0 what original layer k has
    no_layers: Optional[Callable] = None  # (base model): make a top without layers (head only) run
    attention: tuple = ("eager", "sdpa")  # attention kernels whose results the cached top reproduces
    keeps: str = ""  # README: what the top keeps besides layers [k:]

    def layer_list(self, base: nn.Module) -> nn.ModuleList:
        return get_module(base, self.layers)

    def is_frozen(self, name: str, k: int) -> bool:
        """True if weight `name` (a state-dict or checkpoint key, with or without the base-model prefix) belongs to
        what the bottom at depth k computes with: hashed with the cache, never trained, and (when a model is merged
        or a stage starts lower) kept from the checkpoint."""
        m = LAYER_KEY.match(name)
        if m:
            return int(m.group(2)) < k
        first, _, rest = name.partition(".")
        if first in _ROOTS:
            rest = name
        modules = self.embeddings + ((*self.shared, self.after_first) if k > 0 else ())
        return any(m and rest.startswith(m + ".") for m in modules)

    def cut_config(self, config, start: int, stop: int) -> None:
        """Make `config` describe layers [start, stop) of the model it described (in place)."""
        config.num_hidden_layers = stop - start
        for field in self.per_layer:
            values = getattr(config, field, None)
            if values is not None:
                setattr(config, field, list(values)[start:stop])


def _modernbert_attn_norm(layer: nn.Module, config) -> None:
    """ModernBERT builds layer 0 without an attention norm (nn.Identity); every later layer has a LayerNorm."""
    layer.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class _StatesOnlyEncoder(nn.Module):
    """DeBERTa's encoder once no layer is left (head only): its input is its output. (The library's encoder
    cannot run without layers, and the relative positions it holds serve layers only.)"""

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=True, output_attentions=False,
                return_dict=True, **kwargs):
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=(hidden_states,))


def _deberta_no_layers(base: nn.Module) -> None:
    base.encoder = _StatesOnlyEncoder()


# first components of a name that are already inside the base model (no prefix to strip)
_ROOTS = {"embeddings", "embeddings_project", "encoder", "transformer", "embed_tokens", "layers", "norm",
          "final_norm", "rotary_emb", "pooler"}

ARCHS = (
    Arch("BERT", ("bert",), "encoder.layer", ("embeddings",), keeps="pooler + classifier"),
    Arch("RoBERTa / XLM-RoBERTa / CamemBERT", ("roberta", "xlm-roberta", "camembert"), "encoder.layer",
         ("embeddings",), keeps="classification head (dense + out_proj)"),
    Arch("ELECTRA", ("electra",), "encoder.layer", ("embeddings", "embeddings_project"),
         keeps="classification head; `embeddings_project` stays in the bottom"),
    Arch("DistilBERT", ("distilbert",), "transformer.layer", ("embeddings",), keeps="pre_classifier + classifier"),
    Arch("ModernBERT", ("modernbert",), "layers", ("embeddings",), final_norm="final_norm",
         per_layer=("layer_types",), first_layer_fix=_modernbert_attn_norm,
         keeps="`final_norm`, head + classifier (cls or mean pooling), the rotary module; `layer_types[k:]` "
               "(local/global pattern); original layer k's `attn_norm` (the model's layer 0 has none)"),
    Arch("DeBERTa-v2 / v3", ("deberta-v2",), "encoder.layer", ("embeddings",),
         shared=("encoder.rel_embeddings", "encoder.LayerNorm"), after_first="encoder.conv", min_bottom_layers=1,
         no_layers=_deberta_no_layers,
         attention=("eager",),
         keeps="`encoder.rel_embeddings` + its LayerNorm (shared by every layer: frozen for k > 0, since the bottom "
               "used them), pooler + classifier; the conv after layer 0 only when k = 0; head only (k = L): no encoder"),
    Arch("Llama / Mistral / Qwen2 / Qwen3", ("llama", "mistral", "qwen2", "qwen3"), "layers", ("embed_tokens",),
         final_norm="norm", per_layer=("layer_types",), decoder=True,
         keeps="final `norm`, `score`, the rotary module; `layer_types[k:]` (sliding/full); pooled at the last "
               "real token of the attention mask (left or right padding)"),
)
_BY_TYPE = {t: a for a in ARCHS for t in a.model_types}
SUPPORTED = tuple(sorted(_BY_TYPE))


def arch_for(model_type: str, model: str = "") -> Arch:
    if model_type not in _BY_TYPE:
        raise PipelineError(
            f"model {model!r} is a {model_type!r} model; the bottom/top split supports: {', '.join(SUPPORTED)}.")
    return _BY_TYPE[model_type]


def get_module(obj, path: str):
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def set_module(obj, path: str, value) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(get_module(obj, parent) if parent else obj, attr, value)
