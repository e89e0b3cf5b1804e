"""Finite scalar quantisation (FSQ, Mentzer et al. 2023): a codebook-free quantiser, the one inside the course's
speech tokenizer (notebook 03) as inside CosyVoice's S3Tokenizer.

Every dimension ``i`` of a vector ``z`` is squashed into a bounded range and rounded to one of ``L_i`` integers;
the id is the mixed-radix number of those integers, ``id = sum_i q_i * prod_{j<i} L_j`` (the first dimension is
the least significant digit). ``round`` has no useful gradient, so the rounding is straight-through:
``z + (round(z) - z).detach()`` is ``round(z)`` forward and the identity backward.

Cross-checked against ``vector_quantize_pytorch.FSQ`` in ``tests/test_fsq.py``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["FSQ_EPS", "fsq_levels", "fsq_bound", "fsq_quantize", "fsq_codes_to_indices", "fsq_indices_to_codes", "FSQ"]

FSQ_EPS = 1e-3                  # bound slightly past the outer levels, as vector_quantize_pytorch does


def fsq_levels(levels, device=None) -> torch.Tensor:
    """Validate ``levels`` and return them as an int32 tensor ``(dims,)``."""
    values = list(levels.tolist() if isinstance(levels, torch.Tensor) else levels)
    if not values or any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 2 for v in values):
        raise ValueError(f"levels must be a non-empty list of integers >= 2, got {levels!r}")
    return torch.tensor(values, dtype=torch.int32, device=device)


def _check_last_dim(z: torch.Tensor, levels: torch.Tensor, name: str) -> None:
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() == 0 or z.shape[-1] != levels.numel():
        raise ValueError(f"{name} has shape {tuple(z.shape)}; its last axis must have one entry per level "
                         f"({levels.numel()} for levels {levels.tolist()})")


def fsq_bound(z: torch.Tensor, levels, eps: float = FSQ_EPS) -> torch.Tensor:
    """Squash ``z`` ``(..., dims)`` into the range each dimension is rounded in, before rounding.

    With ``L`` levels, ``half_l = (L - 1)(1 + eps) / 2`` and ``offset = 0.5`` for even ``L`` (0 for odd):
    ``bounded = tanh(z + atanh(offset / half_l)) * half_l - offset``. Odd ``L`` rounds to
    ``{-(L-1)/2, ..., (L-1)/2}``, symmetric around 0; even ``L`` rounds to ``{-L/2, ..., L/2 - 1}`` (one
    more level below 0), and the shift inside ``tanh`` keeps ``z = 0`` on the level 0. This is exactly
    ``vector_quantize_pytorch.FSQ.bound`` (same operations in the same order, so the same floats).
    """
    levels = fsq_levels(levels, z.device if isinstance(z, torch.Tensor) else None)
    _check_last_dim(z, levels, "z")
    half_l = (levels - 1) * (1 + eps) / 2                               # (dims,) float32
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)                     # (dims,)
    shift = torch.atanh(offset / half_l)                                # (dims,)
    return torch.tanh(z + shift) * half_l - offset                      # (..., dims)


def fsq_quantize(z: torch.Tensor, levels) -> torch.Tensor:
    """FSQ codes of ``z`` ``(..., dims)``: same shape, values ``q / (L // 2)`` for integer ``q`` per dimension.

    ``round`` has zero gradient almost everywhere, so the rounding is straight-through: the forward value is
    ``round(bounded)``, the backward pass sees the identity (``bounded + (round(bounded) - bounded).detach()``).
    float32/float64 stay as they are; other float dtypes are computed in float32 and cast back.
    """
    levels = fsq_levels(levels, z.device if isinstance(z, torch.Tensor) else None)
    _check_last_dim(z, levels, "z")
    if not z.dtype.is_floating_point:
        raise ValueError(f"z must be floating point, got {z.dtype}")
    dtype = z.dtype
    work = z if dtype in (torch.float32, torch.float64) else z.float()
    bounded = fsq_bound(work, levels)
    rounded = bounded + (bounded.round() - bounded).detach()            # straight-through estimator
    return (rounded / (levels // 2)).to(dtype)


def fsq_codes_to_indices(codes: torch.Tensor, levels) -> torch.Tensor:
    """Mixed-radix ids of FSQ codes: ``(..., dims)`` -> ``(...,)`` long, ``id = sum_i q_i * prod_{j<i} L_j``
    with ``q_i = code_i * (L_i // 2) + L_i // 2`` in ``[0, L_i)``."""
    levels = fsq_levels(levels, codes.device if isinstance(codes, torch.Tensor) else None)
    _check_last_dim(codes, levels, "codes")
    half_width = (levels // 2).to(codes.dtype)
    digits = (codes * half_width + half_width).round().long()                        # (..., dims)
    if (digits < 0).any() or (digits >= levels.long()).any():
        raise ValueError(f"codes lie outside the grid of levels {levels.tolist()}; pass fsq_quantize() output")
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]).long(), dim=0)  # (dims,)
    return (digits * basis).sum(dim=-1)


def fsq_indices_to_codes(indices: torch.Tensor, levels) -> torch.Tensor:
    """Inverse of :func:`fsq_codes_to_indices`: ids ``(...,)`` -> float32 codes ``(..., dims)``."""
    levels = fsq_levels(levels, indices.device if isinstance(indices, torch.Tensor) else None)
    indices = torch.as_tensor(indices)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    size = int(levels.long().prod())
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"indices must lie in [0, {size}) for levels {levels.tolist()}, got range "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]).long(), dim=0)  # (dims,)
    digits = (indices.long()[..., None] // basis) % levels.long()                    # (..., dims)
    half_width = levels // 2
    return ((digits - half_width) / half_width).float()


class FSQ(nn.Module):
    """Finite scalar quantiser with no parameters: ``forward(z)`` -> ``(codes, indices)``.

    ``z`` ``(..., dims)`` with ``dims = len(levels)``; ``codes`` has the same shape (straight-through
    gradients), ``indices`` ``(...,)`` long in ``[0, codebook_size)``.
    """

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        self.levels = tuple(int(v) for v in fsq_levels(levels).tolist())
        self.codebook_size = math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = fsq_quantize(z, self.levels)
        return codes, fsq_codes_to_indices(codes.detach(), self.levels)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return fsq_indices_to_codes(indices, self.levels)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}"
