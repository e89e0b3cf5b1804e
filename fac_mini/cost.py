"""Back-of-the-envelope costs of a decoder that reads speech: positions, attention FLOPs, KV-cache memory.

These formulas are what the course measures against (notebook 01, and the DRSR benchmark later). Conventions:
one multiply-add = 2 FLOPs; causal attention, so query i attends to i + 1 keys (on average about T/2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["speech_tokens", "attention_flops", "linear_flops", "kv_cache_bytes", "BackboneShape", "QWEN3_8B",
           "PAPER_CONTEXT_TOKENS", "PAPER_CONTEXT_SECONDS"]

PAPER_CONTEXT_TOKENS = 2048      # the report's maximum context ...
PAPER_CONTEXT_SECONDS = 6 * 60   # ... which it equates with about 6 minutes of speech at 5 Hz


def speech_tokens(duration_s: float, frame_rate_hz: float, group_size: int = 1) -> int:
    """LLM positions for ``duration_s`` seconds of speech tokenised at ``frame_rate_hz`` and grouped by ``group_size``.

    ``ceil(ceil(duration_s * frame_rate_hz) / group_size)``: a partial last frame or group still takes a position.
    """
    if duration_s < 0 or frame_rate_hz <= 0 or group_size < 1:
        raise ValueError(f"need duration_s >= 0, frame_rate_hz > 0, group_size >= 1; got "
                         f"{duration_s}, {frame_rate_hz}, {group_size}")
    frames = math.ceil(round(duration_s * frame_rate_hz, 9))  # round: 0.04 s * 25 Hz must be 1 frame, not 1.0000001
    return math.ceil(frames / group_size)


def attention_flops(seq_len: int, num_layers: int, attention_dim: int) -> int:
    """FLOPs of the two attention matmuls (QK^T and AV) for a causal forward pass over ``seq_len`` positions.

    Query i meets i + 1 keys, so each matmul costs ``attention_dim * T (T + 1) / 2`` multiply-adds per layer.
    """
    return 2 * 2 * num_layers * attention_dim * seq_len * (seq_len + 1) // 2


def linear_flops(seq_len: int, num_parameters: int) -> int:
    """FLOPs of every weight matrix applied to every position: 2 per parameter per position."""
    return 2 * num_parameters * seq_len


def kv_cache_bytes(seq_len: int, num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """Memory of the KV cache: a key and a value vector per layer, position and KV head."""
    return 2 * num_layers * seq_len * num_kv_heads * head_dim * bytes_per_value


@dataclass(frozen=True)
class BackboneShape:
    """The numbers of a decoder that these formulas need."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    non_embedding_parameters: int

    @property
    def attention_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    def forward_flops(self, seq_len: int) -> int:
        return linear_flops(seq_len, self.non_embedding_parameters) + attention_flops(
            seq_len, self.num_layers, self.attention_dim)

    def kv_cache_bytes(self, seq_len: int, bytes_per_value: int = 2) -> int:
        return kv_cache_bytes(seq_len, self.num_layers, self.num_kv_heads, self.head_dim, bytes_per_value)


def _qwen3_8b_non_embedding() -> int:
    hidden, inter, layers, heads, kv, head_dim = 4096, 12288, 36, 32, 8, 128
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 2 * head_dim
    mlp = 3 * hidden * inter
    return layers * (attention + mlp + 2 * hidden) + hidden


# The released model's backbone (docs/released_model.md §1.4): 36 layers, width 4096, GQA 32/8 heads of 128.
QWEN3_8B = BackboneShape("Qwen3-8B backbone", 36, 4096, 32, 8, 128, _qwen3_8b_non_embedding())
