"""A Qwen3-style decoder-only language model, from scratch.

One file holds every piece of the Qwen3 block, in the order the data flows:

    x ─► RMSNorm ─► GQA attention (q/k per-head RMSNorm, RoPE) ─► + ─► RMSNorm ─► SwiGLU MLP ─► +
    └──────────────────────────────────────────────────────────┘ └────────────────────────────┘

- ``RMSNorm``: y = w · x / sqrt(mean(x²) + eps), computed in float32.
- Rotary position embedding (RoPE): channel pair (i, i + d/2) of head vector at position m is rotated by the
  angle m · θ^(−2i/d); θ (``rope_theta``) is 1e6 for Qwen3 and the released SRH, 5e6 for the 8B text tower.
- Grouped-query attention (GQA): ``num_attention_heads`` query heads share ``num_key_value_heads`` key/value
  heads; Qwen3 normalises every query and key head vector with its own RMSNorm (``q_norm``/``k_norm``) before
  RoPE. Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with one boolean mask that
  combines causality and padding.
- SwiGLU MLP: down(silu(gate(x)) · up(x)).

Parameter names are those of ``transformers``' Qwen3 (``model.layers.0.self_attn.q_norm.weight`` ...), so a
transformers ``Qwen3ForCausalLM`` state dict loads with ``load_state_dict(strict=True)``. ``Qwen3Model`` also
runs without its embedding table (``with_embeddings=False``, pass ``inputs_embeds``): the Speech Refined Head
reuses it that way (see ``fac_mini.srh``).

Masks and positions: ``attention_mask`` is (batch, past + new) with 1 for real tokens and 0 for padding;
``position_ids`` is (batch, new). ``generate`` derives positions from the mask exactly like transformers
(``cumsum(mask) − 1``), so left-padded batches decode the same tokens as unpadded rows.

Bad input: ids or labels outside the vocabulary, non-integer lengths, NaN sampling settings, config values of
the wrong type, and decoding past ``max_position_embeddings`` raise ``ValueError``/``TypeError`` naming the
argument. Labels that score no token at all (every label -100 after the shift) give a loss of 0 that keeps
the graph (zero gradients), with a ``RuntimeWarning``, instead of cross-entropy's NaN mean over nothing.
"""
from __future__ import annotations

import json
import math
import operator
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LLMConfig", "llm_config_from_hf", "RMSNorm", "RotaryEmbedding", "rotate_half", "apply_rotary",
    "KVCache", "build_attention_mask", "Attention", "SwiGLU", "DecoderLayer", "Qwen3Model",
    "CausalLMOutput", "Qwen3ForCausalLM", "init_weights", "process_logits", "sample_next_token",
    "generate", "generate_greedy", "IGNORE_INDEX", "config_value", "check_token_ids", "check_labels",
    "check_generation_settings", "check_context_length", "causal_lm_loss",
]

IGNORE_INDEX = -100  # label value that the losses skip (PyTorch / transformers convention)


# ----------------------------------------------------------------------------------------------------------
# Checking inputs (cheap: a min/max over id tensors, never a pass over activations)
# ----------------------------------------------------------------------------------------------------------
_MISSING = object()
_KIND_NAMES = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def config_value(config: Mapping[str, Any], key: str, kind: type, default: Any = _MISSING, *, where: str = "config",
                 null_is_default: bool = False) -> Any:
    """``config[key]`` checked to be of ``kind`` (``int``: an int, not a bool or float; ``float``: an int or float,
    returned as float; ``bool``; ``str``); ``default`` when absent (and when null if ``null_is_default``).

    Raises ``ValueError`` naming ``where.key``, the value and the expected type, e.g.
    ``audio_config.d_model = "16" (str); expected an int``.
    """
    if key not in config:
        if default is _MISSING:
            raise ValueError(f"{where}.{key} is missing; expected {_KIND_NAMES[kind]}")
        return default
    value = config[key]
    if value is None and null_is_default and default is not _MISSING:
        return default
    if not _is_kind(value, kind):
        raise ValueError(f"{where}.{key} = {_shown(value)} ({type(value).__name__}); expected {_KIND_NAMES[kind]}")
    return float(value) if kind is float else value


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, what: str = "vocabulary") -> None:
    """Raise ``ValueError`` unless the integer tensor ``ids`` lies in [0, vocab_size) (one min and one max)."""
    if not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds id {bad}, outside the {what} [0, {vocab_size}) (vocab_size = {vocab_size}); "
                         "are the ids from this model's tokenizer?")


def check_labels(name: str, labels: torch.Tensor, vocab_size: int, shape: tuple[int, ...] | None = None) -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer tensor (of ``shape``) holding ids in [0, vocab_size)
    or ``IGNORE_INDEX`` (-100)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor of token ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (or {IGNORE_INDEX}), got dtype {labels.dtype}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must be (B, T) = {tuple(shape)}, got {tuple(labels.shape)}")
    if not labels.numel():
        return
    low, high = int(labels.min()), int(labels.max())
    if high >= vocab_size:
        raise ValueError(f"{name} holds id {high}, outside the vocabulary [0, {vocab_size}) (vocab_size = "
                         f"{vocab_size}); use {IGNORE_INDEX} for positions without a target")
    if low < 0:
        other = labels[(labels < 0) & (labels != IGNORE_INDEX)]
        if other.numel():
            raise ValueError(f"{name} holds {int(other[0])}, a negative label other than {IGNORE_INDEX}: use "
                             f"{IGNORE_INDEX} for positions without a target, ids in [0, {vocab_size}) elsewhere")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) at t against *unshifted* labels (B, T) at t + 1, skipping -100.

    When no label is scored (all -100 after the shift, or T = 1) the mean would be NaN; the loss is then 0
    (``logits.sum() * 0``, so ``backward`` gives zero gradients) and a ``RuntimeWarning`` says so.
    """
    targets = labels[:, 1:]
    if not (targets != IGNORE_INDEX).any():
        warnings.warn("labels score no token (every label after the first position is -100): the loss is 0 "
                      "(zero gradients); check the label masking", RuntimeWarning, stacklevel=3)
        return logits.float().sum() * 0.0 + 0.0          # + 0.0: a plain 0, not -0
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _check_number(name: str, value: Any, *, above: float | None = None, at_most: float | None = None) -> None:
    """A finite real number (NumPy and 0-d torch numbers included), > ``above`` and <= ``at_most`` when given."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}={number} must be a finite number")
    if above is not None and not number > above:
        raise ValueError(f"{name}={number} must be > {above:g}")
    if at_most is not None and number > at_most:
        raise ValueError(f"{name}={number} must be <= {at_most:g}")


def check_generation_settings(max_new_tokens: Any, *, do_sample: bool = False, temperature: Any = 1.0,
                              top_k: Any = 0, top_p: Any = 1.0, repetition_penalty: Any = 1.0) -> int:
    """Validate the decoding arguments; return ``max_new_tokens`` as an int.

    max_new_tokens: an int >= 0 (NumPy and 0-d torch integers are accepted; floats, strings and bools are
    not). temperature (> 0 when sampling), top_p (in (0, 1]), repetition_penalty (> 0): finite numbers (NaN and
    inf are rejected whether or not ``do_sample``). top_k: an int >= 0.
    """
    if isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r} (bool)")
    try:
        steps = operator.index(max_new_tokens)
    except TypeError:
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r} ({type(max_new_tokens).__name__}); "
                        "pass a whole number of tokens, e.g. int(...)") from None
    if steps < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {steps}")
    _check_number("temperature", temperature)
    if do_sample and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0 when sampling (use do_sample=False for greedy), got {temperature}")
    _check_number("top_p", top_p, above=0.0, at_most=1.0)
    _check_number("repetition_penalty", repetition_penalty, above=0.0)
    if isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    try:
        top_k = operator.index(top_k)
    except TypeError:
        raise TypeError(f"top_k must be an int >= 0 (0 = off), got {top_k!r} ({type(top_k).__name__})") from None
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    return steps


def check_context_length(prompt_length: int, max_new_tokens: int, limit: int, what: str) -> None:
    """Raise ``ValueError`` when prompt + new tokens exceed ``limit`` positions (RoPE past the trained context)."""
    if prompt_length + max_new_tokens > limit:
        raise ValueError(f"the prompt ({prompt_length} positions) + max_new_tokens={max_new_tokens} needs "
                         f"{prompt_length + max_new_tokens} positions, more than {what}={limit}; pass "
                         f"max_new_tokens <= {max(0, limit - prompt_length)} or a shorter prompt")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LLMConfig:
    """Shape of a Qwen3 decoder. Defaults are the released SRH backbone (= Qwen3-0.6B dims, rope θ = 1e6)."""

    vocab_size: int = 151936            # rows of embed_tokens / lm_head
    hidden_size: int = 1024             # residual-stream width d
    intermediate_size: int = 3072       # SwiGLU inner width
    num_hidden_layers: int = 28
    num_attention_heads: int = 16       # query heads
    num_key_value_heads: int = 8        # key/value heads shared by groups of query heads (GQA)
    head_dim: int = 128                 # per-head width; heads · head_dim may differ from hidden_size
    rope_theta: float = 1_000_000.0     # RoPE base θ (transformers' Qwen3Config default is 10000!)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False   # lm_head shares embed_tokens' weight
    initializer_range: float = 0.02     # std of the normal init of Linear/Embedding weights

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LLMConfig.{name} must be a positive int, got {value!r} ({type(value).__name__})")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_kind(value, float) or not math.isfinite(value):
                raise ValueError(f"LLMConfig.{name} must be a finite number, got {value!r} ({type(value).__name__})")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"LLMConfig.tie_word_embeddings must be True or False, got {self.tie_word_embeddings!r} "
                             f"({type(self.tie_word_embeddings).__name__})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (each key/value head serves a group of query heads)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates channel pairs")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be > 0")

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers ``config.json``-style dict: ``transformers.Qwen3Config(**cfg.to_hf_dict())`` builds the
        same architecture (rope θ under ``rope_parameters``, as transformers 5.x stores it)."""
        config = {k: v for k, v in self.to_dict().items() if k != "rope_theta"}
        config.update(model_type="qwen3", hidden_act="silu", attention_bias=False, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)})
        return config


# "mrope" (and Qwen3-VL's "default" with ``mrope_section``): multimodal RoPE gives the time, height and width axes
# their own slices of the frequencies, but for text (and Fun-Audio-Chat's audio placeholders) all three position
# ids are the same, and then it is exactly plain RoPE (cross-checked against transformers' Qwen3-VL rotary
# embedding in tests/test_llm.py). The released backbone is initialised from Qwen3-VL-8B's text tower.
_SUPPORTED_ROPE_TYPES = (None, "default", "mrope")


def llm_config_from_hf(config: Any, *, where: str = "config") -> LLMConfig:
    """Build an ``LLMConfig`` from a transformers ``Qwen3Config`` (or any object with ``to_dict()``) or from a
    ``config.json``-style mapping.

    RoPE θ is read from ``rope_theta`` (transformers 4.x) or ``rope_parameters["rope_theta"]`` (5.x); a missing
    ``head_dim`` means ``hidden_size // num_attention_heads``, a missing ``num_key_value_heads`` means plain
    multi-head attention (null means missing for these two, as in transformers). Features this decoder does not
    implement (attention bias, sliding windows, non-default RoPE scaling, an activation other than SiLU) raise
    ``ValueError`` instead of being silently ignored, and so does a value of the wrong type (a string, a null, a
    float where an int belongs), naming ``where.key`` (e.g. ``text_config.hidden_size``), the value and the type.
    """
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a transformers config or a dict, got {type(config).__name__}")
    config = dict(config)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
        raise ValueError(f"{where} lacks the keys {missing}; is this the text config of a Qwen3 model?")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"{where}.rope_parameters = {_shown(rope)}; expected an object such as "
                         '{"rope_type": "default", "rope_theta": 1000000.0}')
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (only plain RoPE); config rope: {rope}")
    if config.get("rope_theta") is not None:
        rope_theta = config_value(config, "rope_theta", float, where=where)
    elif rope.get("rope_theta") is not None:
        rope_theta = config_value(rope, "rope_theta", float, where=f"{where}.rope_parameters")
    else:
        raise ValueError(f"{where} has no rope_theta (neither top-level nor in rope_parameters); set it explicitly")
    if config.get("attention_bias", False):
        raise ValueError("attention_bias=True is not supported by this Qwen3 decoder")
    if config.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported by this Qwen3 decoder")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported (Qwen3 uses silu)")
    def read(key: str, kind: type, default: Any = _MISSING, null_is_default: bool = False) -> Any:
        return config_value(config, key, kind, default, where=where, null_is_default=null_is_default)

    num_heads, hidden_size = read("num_attention_heads", int), read("hidden_size", int)
    if num_heads <= 0:
        raise ValueError(f"{where}.num_attention_heads = {num_heads}; expected a positive int")
    return LLMConfig(
        vocab_size=read("vocab_size", int),
        hidden_size=hidden_size,
        intermediate_size=read("intermediate_size", int),
        num_hidden_layers=read("num_hidden_layers", int),
        num_attention_heads=num_heads,
        num_key_value_heads=read("num_key_value_heads", int, num_heads, null_is_default=True),
        head_dim=read("head_dim", int, hidden_size // num_heads, null_is_default=True),
        rope_theta=rope_theta,
        rms_norm_eps=read("rms_norm_eps", float, 1e-6),
        max_position_embeddings=read("max_position_embeddings", int, 32768),
        tie_word_embeddings=read("tie_word_embeddings", bool, False),
        initializer_range=read("initializer_range", float, 0.02),
    )


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = weight · x / sqrt(mean(x², last dim) + eps); statistics in float32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (..., dim) -> (..., dim)
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm expects last dim {self.weight.shape[0]}, got shape {tuple(x.shape)}")
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for arbitrary (explicit) positions: angle(m, i) = m · θ^(−2i/head_dim)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (head_dim/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)     # not in the state dict (as in transformers)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, head_dim); angles in float32, then cast like transformers
        angles = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)                     # (B, T, head_dim): pairs (i, i + d/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (−x2, x1) on the two halves of the last dim: the 90° turn of every (i, i + d/2) pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate head vectors x (B, heads, T, head_dim) by the angles whose cos/sin are (B, T, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]                                # (B, 1, T, head_dim)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys (after RoPE) and values of every layer seen so far, so each new token costs O(T) instead of O(T²).

    ``layers[i]`` is ``(keys, values)`` of layer i, each (B, num_key_value_heads, T_seen, head_dim).
    """

    def __init__(self, num_layers: int):
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def seq_length(self) -> int:
        """Number of positions cached (0 for a fresh cache)."""
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values (B, kv_heads, T_new, head_dim) to layer ``layer_idx``; return all of them."""
        cached = self.layers[layer_idx]
        if cached is not None:
            if cached[0].shape[0] != keys.shape[0]:
                raise ValueError(f"cache holds batch {cached[0].shape[0]}, new keys have batch {keys.shape[0]}")
            keys = torch.cat((cached[0], keys), dim=2)
            values = torch.cat((cached[1], values), dim=2)
        self.layers[layer_idx] = (keys, values)
        return keys, values

    def __repr__(self) -> str:
        return f"KVCache(num_layers={self.num_layers}, seq_length={self.seq_length})"


def build_attention_mask(attention_mask: torch.Tensor | None, batch: int, new_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor:
    """Boolean SDPA mask (B or 1, 1, new_len, past_len + new_len): True where query i may attend to key j.

    Query i sits at cache index past_len + i; it sees key j when j <= past_len + i (causal) and key j is a real
    token (``attention_mask[b, j] == 1``). A query row with no visible key (a left-padding position) is opened
    to every key so softmax stays finite; such rows are padding, and no real query ever attends to them.
    """
    total = past_len + new_len
    query_index = torch.arange(past_len, total, device=device)[:, None]    # (new_len, 1)
    key_index = torch.arange(total, device=device)[None, :]                 # (1, total)
    allowed = (key_index <= query_index)[None, None]                        # (1, 1, new_len, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)             # fully masked rows -> all keys
    return allowed.expand(batch, -1, -1, -1)


class Attention(nn.Module):
    """Grouped-query self-attention with Qwen3's per-head q/k RMSNorm, RoPE and an optional KV cache."""

    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d, q_width, kv_width = config.hidden_size, config.num_attention_heads * config.head_dim, \
            config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(d, q_width, bias=False)
        self.k_proj = nn.Linear(d, kv_width, bias=False)
        self.v_proj = nn.Linear(d, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, d, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)    # over head_dim, shared by all heads
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        batch, new_len, _ = x.shape                                                          # x (B, T, d)
        q = self.q_norm(self.q_proj(x).view(batch, new_len, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, new_len, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, new_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)           # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                         # (B, kv_heads, past + T, head_dim)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)                                # (B, heads, S, head_dim)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)         # (B, heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, new_len, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """Qwen3's MLP: down_proj(silu(gate_proj(x)) · up_proj(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (..., d) -> (..., d)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """transformers-style init: Linear/Embedding weights ~ N(0, std²), biases 0, norm weights 1."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)


# ----------------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------------
class Qwen3Model(nn.Module):
    """Embedding table (optional) + decoder layers + final RMSNorm; returns the normed last hidden state.

    ``with_embeddings=False`` builds no ``embed_tokens`` (no such state-dict key); then only ``inputs_embeds``
    is accepted. This is how the Speech Refined Head uses it.
    """

    def __init__(self, config: LLMConfig, with_embeddings: bool = True):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if with_embeddings else None
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        init_weights(self, config.initializer_range)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) or inputs_embeds (B, T, d) -> last hidden state after the final norm (B, T, d).

        attention_mask: (B, past + T), 1 = token, 0 = padding (default: no padding).
        position_ids: (B, T) or (1, T) (default: past, past + 1, ..., past + T − 1).
        cache: a ``KVCache`` that this call extends in place with the new keys/values.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, hidden_size)")
        if input_ids is not None:
            if getattr(self, "embed_tokens", None) is None:
                raise ValueError("this Qwen3Model has no embedding table; pass inputs_embeds (B, T, hidden_size)")
            if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be an integer tensor (B, T), got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}")
            check_token_ids("input_ids", input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be (B, T, {self.config.hidden_size}), got "
                             f"{tuple(inputs_embeds.shape)}")
        batch, new_len, _ = inputs_embeds.shape
        if new_len == 0:
            raise ValueError("the input sequence is empty (T = 0)")
        if cache is not None and cache.num_layers != len(self.layers):
            raise ValueError(f"cache has {cache.num_layers} layers, the model {len(self.layers)}")
        past_len = 0 if cache is None else cache.seq_length
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_len + new_len):
            raise ValueError(f"attention_mask must be (B, past + T) = ({batch}, {past_len + new_len}), got "
                             f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + new_len, device=inputs_embeds.device)[None]
        elif position_ids.dim() != 2 or position_ids.shape[1] != new_len or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be (B, T) or (1, T) with T = {new_len}, got "
                             f"{tuple(position_ids.shape)}")
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)          # (B or 1, T, head_dim)
        if cos.shape[0] != batch:
            cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        mask = build_attention_mask(attention_mask, batch, new_len, past_len, inputs_embeds.device)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, cache)
        return self.norm(hidden)                                               # (B, T, d)


@dataclass
class CausalLMOutput:
    """logits (B, T, V); last_hidden_state (B, T, d) after the final norm; loss (scalar) when labels were given."""

    logits: torch.Tensor
    last_hidden_state: torch.Tensor
    loss: torch.Tensor | None = None


class Qwen3ForCausalLM(nn.Module):
    """``model`` (Qwen3Model) + ``lm_head`` (d -> V, no bias; tied to the embeddings if the config says so)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_weights(self.lm_head, config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self) -> KVCache:
        return self.model.new_cache()

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, labels: torch.Tensor | None = None) -> CausalLMOutput:
        """Arguments as ``Qwen3Model.forward``; ``labels`` (B, T) are *unshifted* (transformers convention):
        the loss scores logits at t against labels at t + 1 and skips ``IGNORE_INDEX`` (-100). Labels outside
        [0, vocab_size) other than -100 raise ``ValueError``; labels that score nothing give loss 0 with a
        warning (``causal_lm_loss``)."""
        hidden = self.model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, cache=cache)             # (B, T, d)
        logits = self.lm_head(hidden)                                            # (B, T, V)
        loss = None
        if labels is not None:
            check_labels("labels", labels, self.config.vocab_size, tuple(logits.shape[:2]))
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, last_hidden_state=hidden, loss=loss)


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------
def process_logits(logits: torch.Tensor, history: torch.Tensor | None = None, *, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> torch.Tensor:
    """transformers' logits processors, in their order: repetition penalty -> temperature -> top-k -> top-p.

    logits (B, V) -> new float32 tensor (B, V) with filtered entries at −inf. ``history`` (B, n) holds the ids
    generated so far (for the repetition penalty: a seen token's logit is divided by the penalty if positive,
    multiplied if negative). ``top_k=0`` and ``top_p=1.0`` disable those filters.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got {tuple(logits.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):       # `not >` also catches NaN
        raise ValueError(f"temperature must be a finite number > 0 (use do_sample=False for greedy), got {temperature}")
    if not (0 < top_p <= 1 and top_k >= 0 and repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise ValueError(f"need 0 < top_p <= 1, top_k >= 0, finite repetition_penalty > 0; got top_p={top_p}, "
                         f"top_k={top_k}, repetition_penalty={repetition_penalty}")
    scores = logits.float().clone()                                       # never modify the caller's logits
    if repetition_penalty != 1.0 and history is not None and history.numel():
        seen = torch.gather(scores, 1, history)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores.scatter_(1, history, seen)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        kth_best = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)                   # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - top_p                             # the low tail outside the nucleus
        remove_sorted[:, -1] = False                                        # always keep the best token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def sample_next_token(logits: torch.Tensor, history: torch.Tensor | None = None, *, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,): argmax of the processed logits, or a draw from their softmax."""
    if not do_sample:
        if repetition_penalty != 1.0:
            logits = process_logits(logits, history, repetition_penalty=repetition_penalty)
        return logits.argmax(dim=-1)
    scores = process_logits(logits, history, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Qwen3ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """KV-cached autoregressive decoding; returns prompt + new tokens (B, T + n), n <= max_new_tokens.

    Batches are left-padded (``attention_mask`` 0 on the left); positions are ``cumsum(mask) − 1`` as in
    transformers. A row that emitted ``eos_token_id`` is continued with ``pad_token_id`` (default: eos), and
    decoding stops early once every row has finished. Sampling uses ``generator`` when given, so draws are
    reproducible. ``top_k=0`` disables top-k (transformers' own default is 50). Prompt + ``max_new_tokens``
    must fit in ``config.max_position_embeddings`` (else ``ValueError``); the settings are checked by
    ``check_generation_settings`` (NaN, non-integer lengths).
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch tensor (B, T), got {type(input_ids).__name__}; use "
                        "torch.tensor([ids])")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) with T >= 1, got {tuple(input_ids.shape)}")
    max_new_tokens = check_generation_settings(max_new_tokens, do_sample=do_sample, temperature=temperature,
                                               top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    check_context_length(input_ids.shape[1], max_new_tokens, model.config.max_position_embeddings,
                         "config.max_position_embeddings")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    if pad_token_id is None:
        pad_token_id = eos_token_id
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)   # (B, T)
    sequences, cache = input_ids, model.new_cache()
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache).logits
        next_ids = sample_next_token(logits[:, -1], sequences, do_sample=do_sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                     generator=generator)                                # (B,)
        if eos_token_id is not None:
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_token_id))
            unfinished = unfinished & (next_ids != eos_token_id)
        sequences = torch.cat((sequences, next_ids[:, None]), dim=1)
        if not unfinished.any():
            break
        step_ids = next_ids[:, None]                                                     # (B, 1)
        attention_mask = torch.cat((attention_mask, torch.ones_like(step_ids)), dim=1)
        position_ids = position_ids[:, -1:] + 1
    return sequences


def generate_greedy(model: Qwen3ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
                    **kwargs: Any) -> torch.Tensor:
    """``generate`` with ``do_sample=False``: the argmax token at every step."""
    return generate(model, input_ids, max_new_tokens, do_sample=False, **kwargs)
