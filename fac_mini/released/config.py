"""The released Fun-Audio-Chat-8B configuration as data, and the model built from it without memory.

``released_config()`` is the released ``config.json`` as a dict (docs/released_model.md §1); ``build_on_meta``
builds ``FunAudioChat`` on the ``meta`` device (no memory, no random init); ``tied_parameter_groups`` lists the
names that share one tensor; ``count_parameters`` reproduces the released split (about 9.42 B in all,
docs/released_model.md §2.6).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..model import FunAudioChat, FunAudioChatConfig

__all__ = ["RELEASED_UNCONFIRMED", "released_config", "build_on_meta", "tied_parameter_groups", "count_parameters"]


# ----------------------------------------------------------------------------------------------------------
# The released configuration
# ----------------------------------------------------------------------------------------------------------
# Values of released_config() that no excerpt of the real config.json confirmed (docs/released_model.md §1).
RELEASED_UNCONFIRMED = {
    "audio_token_index": "151669 (<|AUDIO|>) from three ports; the code default 151646 is a stale Qwen2-Audio value",
    "audio_config.pad_token_id": "6563 from the MLX port; one vllm-omni file guesses 6564",
    "audio_config.output_dim": "4096 from ports, and required (audio groups become 4096-d LLM inputs)",
    "audio_config.n_window": "100 from ports (= code default)",
    "audio_config.num_mel_bins": "128 from ports (= code default, Whisper-large-v3)",
    "text_config": "the whole text_config is not visible in the config.json excerpt; values from ports",
    "text_config.rope_theta": "5e6 likely (Qwen3-VL-8B text tower, MLX port); plain Qwen3-8B would be 1e6",
    "text_config.max_position_embeddings": "262144 likely (MLX port, Qwen3-VL-8B)",
    "text_config.pad_token_id": "unknown; 151643 (<|endoftext|>) is what the generation examples pass",
    "text_config.eos_token_id": "unknown; 151645 (<|im_end|>) is what the generation examples pass",
    "text_config.sil_index": "151673 (<|sil|>) from the MLX port",
}


def released_config() -> dict[str, Any]:
    """The released ``config.json`` of Fun-Audio-Chat-8B as a dict (docs/released_model.md §1).

    Built from ``FunAudioChatConfig.released_8b().to_dict()`` plus the bookkeeping fields the release carries.
    Values not confirmed by the visible part of the real file are listed in ``RELEASED_UNCONFIRMED``; the most
    consequential is ``text_config.rope_theta`` (5e6 likely; it changes every output if wrong).
    """
    config = copy.deepcopy(FunAudioChatConfig.released_8b().to_dict())
    config.pop("speech_text_fusion", None)          # not a released key (the released code always averages)
    config["torch_dtype"] = "bfloat16"              # the release is stored in bfloat16
    audio = config["audio_config"]
    # confirmed by the config.json excerpt [HF-CFG]: activation gelu, dropouts 0, bos 6561, eos 6562,
    # codebook 6565, continuous_features_mode "replace", d_model 1280, 32 layers, 20 heads, ffn 5120,
    # enable_audio_invert_tower, group_size 5, initializer_range 0.02, max_source_positions 1500
    audio["num_hidden_layers"] = audio["encoder_layers"]   # the released config class stores both
    # the whole crq_transformer_config is confirmed [HF-CFG] (Qwen3-0.6B dims, rope_theta 1e6, bf16)
    audio["crq_transformer_config"]["torch_dtype"] = "bfloat16"
    text = config["text_config"]
    text["torch_dtype"] = "bfloat16"
    text["rope_theta"] = 5_000_000.0                # likely (see RELEASED_UNCONFIRMED)
    return config


# ----------------------------------------------------------------------------------------------------------
# Building without memory, and the parameter count
# ----------------------------------------------------------------------------------------------------------
_INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "trunc_normal_")


@contextmanager
def _no_init() -> Iterator[None]:
    """Turn ``torch.nn.init`` functions into no-ops (as transformers' ``no_init_weights``): on the meta device
    they do nothing useful, and they cost seconds for a 9 B-parameter model."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def build_on_meta(config: FunAudioChatConfig) -> FunAudioChat:
    """``FunAudioChat(config)`` on the meta device: shapes only, no memory, no random init."""
    with _no_init(), torch.device("meta"):
        return FunAudioChat(config)


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one shared Parameter, in module order (the first name is the one that is saved);
    for the released model ``[["audio_tower.embed_tokens.weight", "audio_invert_tower.lm_head.weight"]]``."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def count_parameters(config: FunAudioChatConfig | None = None) -> dict[str, int]:
    """Parameters per tower, each counted once (built on the meta device; the default is the released 8B).

    Keys: ``continuous_audio_tower``, ``audio_tower``, ``audio_invert_tower`` (without its tied ``lm_head``,
    which is ``audio_tower.embed_tokens``), ``language_model``, ``total``. Released: about 0.640 B, 0.060 B,
    0.533 B, 8.191 B and 9.424 B.
    """
    model = build_on_meta(config or FunAudioChatConfig.released_8b())
    seen: set[int] = set()
    counts: dict[str, int] = {}
    for name, tower in model.named_children():
        counts[name] = 0
        for parameter in tower.parameters():
            if id(parameter) not in seen:          # a tied parameter belongs to the tower that owns it first
                seen.add(id(parameter))
                counts[name] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


