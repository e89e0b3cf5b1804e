"""Speech token grouping: 25 Hz speech tokens -> 5 Hz LLM positions, and back ("ungrouping").

The S3 tokenizer emits 25 speech tokens per second; text runs at ~3 tokens per second. Feeding 25 Hz into the
LLM makes its sequences (and attention cost) huge, so Fun-Audio-Chat merges every k = 5 consecutive speech
tokens into one LLM position (5 Hz). Two versions of the merge exist:

- paper, eq. (1):   g_i = W_c · Concat(e_{ik}, ..., e_{ik+k−1}),   W_c ∈ R^{H × k·D}      (``ConcatGrouping``)
- released code:    g_i = W_m · mean(e_{ik}, ..., e_{ik+k−1}),     W_m ∈ R^{H × D}, no bias (``MeanGrouping``)

The mean is the special case W_c = [W_m/k, ..., W_m/k] of the concatenation, so the released model gives up
the ability to tell the *order* of the k tokens inside a group in exchange for k times fewer parameters.
Both modules are named ``output_matching`` inside, like the released ``audio_tower.output_matching``.

Sequences whose length is not a multiple of k are right-padded with the speech pad id (6563 in the released
model); a group is real when at least one of its tokens is (ceil(n/k) groups for n real tokens).
``ungroup``/``group_frames`` are the pure reshapes the Speech Refined Head uses: (B, L, k·H) <-> (B, k·L, H),
with LLM position p, sub-step s <-> 25 Hz position k·p + s.
"""
from __future__ import annotations

import torch
from torch import nn


__all__ = [
    "pad_to_multiple", "group_speech_ids", "group_frames", "ungroup", "group_mask_to_frame_mask",
    "mean_group", "MeanGrouping", "ConcatGrouping",
]


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


def pad_to_multiple(ids: torch.Tensor, group_size: int, pad_id: int,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ids (B, T) with ``pad_id`` to T' = k · ceil(T / k); returns (ids (B, T'), mask (B, T') bool).

    ``attention_mask`` (B, T) marks the real tokens (default: all of them); padding added here is never real.
    """
    _check_group_size(group_size)
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(ids, dtype=torch.bool)
    elif attention_mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match ids {tuple(ids.shape)}")
    extra = -ids.shape[1] % group_size
    padded_ids = torch.cat((ids, ids.new_full((ids.shape[0], extra), pad_id)), dim=1)                # (B, T')
    no_token = torch.zeros((ids.shape[0], extra), dtype=torch.bool, device=ids.device)
    padded_mask = torch.cat((attention_mask.bool(), no_token), dim=1)                                 # (B, T')
    return padded_ids, padded_mask


def group_speech_ids(ids: torch.Tensor, group_size: int, pad_id: int,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (grouped ids (B, L, k), group mask (B, L) bool), L = ceil(T / k).

    Group g holds tokens g·k ... g·k + k − 1 in order; the tail is padded with ``pad_id``. A group is real
    (mask True) when any of its tokens is real (``attention_mask``, default: the T given tokens).
    """
    padded_ids, padded_mask = pad_to_multiple(ids, group_size, pad_id, attention_mask)
    batch = ids.shape[0]
    grouped = padded_ids.view(batch, -1, group_size)                             # (B, L, k)
    group_mask = padded_mask.view(batch, -1, group_size).any(dim=-1)             # (B, L)
    return grouped, group_mask


def group_frames(frames: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, k·L, H) -> (B, L, k·H): concatenate each run of k consecutive frames (the inverse of ``ungroup``)."""
    _check_group_size(group_size)
    if frames.dim() != 3 or frames.shape[1] % group_size:
        raise ValueError(f"frames must be (B, T, H) with T a multiple of group_size={group_size}, got "
                         f"{tuple(frames.shape)}; pad the time axis first, e.g. F.pad(frames, (0, 0, 0, (-T) % k))")
    batch, length, width = frames.shape
    return frames.reshape(batch, length // group_size, group_size * width)


def ungroup(grouped: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, L, k·H) -> (B, k·L, H): slice [s·H, (s+1)·H) of position p becomes 25 Hz position k·p + s."""
    _check_group_size(group_size)
    if grouped.dim() != 3 or grouped.shape[-1] % group_size:
        raise ValueError(f"grouped must be (B, L, k·H) with last dim a multiple of group_size={group_size}, "
                         f"got {tuple(grouped.shape)}")
    batch, length, width = grouped.shape
    return grouped.reshape(batch, length * group_size, width // group_size)


def group_mask_to_frame_mask(group_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, L) -> (B, k·L): every group's mask value repeated for its k frames (the released SRH mask)."""
    _check_group_size(group_size)
    if group_mask.dim() != 2:
        raise ValueError(f"group_mask must be (B, L), got {tuple(group_mask.shape)}")
    return group_mask.repeat_interleave(group_size, dim=1)


def mean_group(frames: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, k·L, D) -> (B, L, D): the mean of each group's k frames (padding frames included, as released)."""
    _check_group_size(group_size)
    if frames.dim() != 3 or frames.shape[1] % group_size:
        raise ValueError(f"frames must be (B, T, D) with T a multiple of group_size={group_size}, got "
                         f"{tuple(frames.shape)}; pad the time axis first, e.g. F.pad(frames, (0, 0, 0, (-T) % k))")
    batch, length, width = frames.shape
    return frames.reshape(batch, length // group_size, group_size, width).mean(dim=2)


class MeanGrouping(nn.Module):
    """Released grouping: g = output_matching(mean of k embeddings); (B, k·L, D) -> (B, L, H)."""

    def __init__(self, embed_dim: int, hidden_size: int, group_size: int = 5):
        super().__init__()
        _check_group_size(group_size)
        self.group_size = group_size
        self.output_matching = nn.Linear(embed_dim, hidden_size, bias=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.output_matching(mean_group(embeddings, self.group_size))       # (B, L, H)


class ConcatGrouping(nn.Module):
    """Paper eq. (1): g = output_matching(Concat of k embeddings); (B, k·L, D) -> (B, L, H)."""

    def __init__(self, embed_dim: int, hidden_size: int, group_size: int = 5, bias: bool = False):
        super().__init__()
        _check_group_size(group_size)
        self.group_size = group_size
        self.output_matching = nn.Linear(group_size * embed_dim, hidden_size, bias=bias)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.output_matching(group_frames(embeddings, self.group_size))     # (B, L, H)
