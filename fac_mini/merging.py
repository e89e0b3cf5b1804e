"""Core-Cocktail's intermediate merge (paper eq. 7): pull the fine-tuned LLM part of the way back to the base LLM.

After Stage 1 (full fine-tuning at a high learning rate) the model M_1 speaks and listens, but its LLM has lost
part of the text knowledge of the base M_0. The merge

    M_r = α · M_1 + (1 − α) · M_0                                   paper eq. (7), α = 0.5 in Fun-Audio-Chat

interpolates every weight the two share; Stage 2 then fine-tunes M_r at a low learning rate. The base is the
*text* LLM, so only the LLM's tensors have a counterpart: the audio encoder, the adapter, the speech embeddings
and the Speech Refined Head exist in M_1 alone and keep their Stage-1 values (α = 0 resets the LLM to M_0 and
keeps everything Stage 1 learned around it). The α sweep of :func:`core_cocktail_merge` over [0, 1] is the
WiSE-FT picture: α = 0 is the base, α = 1 the fine-tuned model, and the points between trade text knowledge for
the new skill (docs/core_cocktail.md).

mergekit's ``linear`` method computes the same interpolation for two models with weights (w_1, w_0): it divides
by their sum (``normalize: true``), i.e. α = w_1 / (w_1 + w_0) (checked in ``tests/test_merging.py``).
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch

__all__ = ["core_cocktail_merge", "merge_weights_to_alpha", "prefix_state_dict"]


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)) \
            or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (0 = the base LLM, 1 = the Stage-1 model), got {alpha!r}")
    return float(alpha)


def core_cocktail_merge(stage1_state: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """M_r = α·M_1 + (1 − α)·M_0 on state dicts; returns a new dict, the inputs are never modified.

    stage1_state: the whole Stage-1 model (name -> tensor). base_state: the base LLM's tensors under the *same
    names* (e.g. M0's weights with the ``language_model.`` prefix, :func:`prefix_state_dict`). For every name of
    the Stage-1 model:

    - the base has it: α·stage1 + (1 − α)·base, computed in float32 (float64 for float64 tensors) and cast back
      to the Stage-1 dtype;
    - the base lacks it (encoder, adapter, speech table, SRH): a copy of the Stage-1 tensor.

    Integer or bool tensors the base has must be equal in both (they cannot be interpolated) and are copied.
    ``ValueError`` for alpha outside [0, 1], a base tensor the Stage-1 model lacks, or a shape mismatch (naming
    the key); ``TypeError`` for values that are not tensors.
    """
    alpha = _check_alpha(alpha)
    for name, states in (("stage1_state", stage1_state), ("base_state", base_state)):
        if not isinstance(states, Mapping):
            raise TypeError(f"{name} must be a state dict (a mapping of names to tensors), got {type(states).__name__}")
        for key, value in states.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] is a {type(value).__name__}, expected a torch.Tensor")
    extra = sorted(set(base_state) - set(stage1_state))
    if extra:
        raise ValueError(f"base_state has {len(extra)} tensors the Stage-1 model lacks, e.g. {extra[0]!r}; give the "
                         "base under the Stage-1 names (e.g. prefix_state_dict(m0_state, 'language_model.'))")
    merged: dict[str, torch.Tensor] = {}
    for key, tuned in stage1_state.items():
        if key not in base_state:
            merged[key] = tuned.detach().clone()
            continue
        base = base_state[key]
        if base.shape != tuned.shape:
            raise ValueError(f"{key}: Stage-1 shape {tuple(tuned.shape)} differs from the base's {tuple(base.shape)}")
        if not tuned.is_floating_point() or not base.is_floating_point():
            if not torch.equal(tuned, base.to(tuned.dtype)):
                raise ValueError(f"{key}: integer/bool tensors differ between Stage 1 and the base and cannot be "
                                 "interpolated")
            merged[key] = tuned.detach().clone()
            continue
        work = torch.float64 if tuned.dtype == torch.float64 else torch.float32
        value = alpha * tuned.detach().to(work) + (1.0 - alpha) * base.detach().to(device=tuned.device, dtype=work)
        merged[key] = value.to(tuned.dtype)
    return merged


def merge_weights_to_alpha(stage1_weight: float, base_weight: float) -> float:
    """The α of mergekit's normalised ``linear`` merge with weights (w_1 for M_1, w_0 for M_0): w_1 / (w_1 + w_0)."""
    for name, value in (("stage1_weight", stage1_weight), ("base_weight", base_weight)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if stage1_weight + base_weight <= 0:
        raise ValueError("the two weights sum to 0; mergekit's normalised linear merge is undefined then")
    return float(stage1_weight) / float(stage1_weight + base_weight)


def prefix_state_dict(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix + name: tensor}`` (the tensors themselves, not copies): e.g. M0's LLM weights under the names
    they have inside ``FunAudioChat`` (``"language_model."``)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string, got {type(prefix).__name__}")
    return {prefix + name: tensor for name, tensor in state.items()}
