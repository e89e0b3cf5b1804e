"""LoRA with peft on the course's own modules: no transformers wrapper, explicit ``target_modules`` regexes.

LoRA (Hu et al. 2021) freezes a weight W (d_out x d_in) and learns a low-rank update:

    y = W x + (alpha / r) · B (A x),     A: r x d_in (random),  B: d_out x r (zeros at init)

so at init the model is unchanged, and after training ``merge_and_unload`` folds W + (alpha / r)·B A back into
one plain ``nn.Linear`` (the released layout again).

What is adapted and why (the choice the course makes):

- LoRA on every projection of the LLM's 36 decoder layers (q, k, v, o, gate, up, down) and of the SRH's 28 CRQ
  layers: the two decoders hold 7.4 B of the 9.4 B parameters;
- trained in full (peft ``modules_to_save``): the small speech-side matching layers, the audio adapter
  ``audio_tower.output_matching`` / ``continual_output_matching`` and the SRH's ``pre_matching``,
  ``input_matching``, ``output_matching`` (about 0.13 B at full scale): they translate between the streams and
  are where the speech task lives;
- frozen: the audio encoder (its features are already trained for speech), both embedding tables and the text
  ``lm_head``. The speech table is *tied* to the SRH's output layer; a ``modules_to_save`` copy of either would
  untie them, and the released layout stores them as one tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model import FunAudioChat, FunAudioChatConfig
from ..released import build_on_meta, save_released
from ..released.checkpoint import recompute_buffers

__all__ = ["LORA_TARGETS", "LORA_MODULES_TO_SAVE", "lora_linear", "course_lora_config", "add_lora", "merge_lora",
           "merged_state_dict", "save_merged_released", "trainable_parameters", "lora_parameter_count"]

# Full-match regex over module names: the seven projections of every decoder layer of the LLM and the SRH.
LORA_TARGETS = (r"(language_model\.model|audio_invert_tower\.crq_transformer)\.layers\.\d+\."
                r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
LORA_MODULES_TO_SAVE = ["audio_tower.output_matching", "audio_tower.continual_output_matching",
                        "audio_invert_tower.pre_matching", "audio_invert_tower.input_matching",
                        "audio_invert_tower.output_matching"]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                alpha: float) -> torch.Tensor:
    """The LoRA forward of one linear layer without bias: x (..., d_in), weight (d_out, d_in), lora_a (r, d_in),
    lora_b (d_out, r) -> x W^T + (alpha / r) · (x A^T) B^T  (..., d_out). The low-rank path never forms B A."""
    rank = lora_a.shape[0]
    return x @ weight.T + (alpha / rank) * ((x @ lora_a.T) @ lora_b.T)


def course_lora_config(rank: int = 16, alpha: int = 32, dropout: float = 0.0, speech_modules: bool = True):
    """The course's ``peft.LoraConfig`` (no ``task_type``: a generic ``PeftModel`` around ``FunAudioChat``);
    ``speech_modules=False`` freezes the matching layers too (only the LoRA factors train)."""
    from peft import LoraConfig

    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"need rank >= 1, alpha > 0 and 0 <= dropout < 1, got {rank}, {alpha}, {dropout}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS,
                      modules_to_save=list(LORA_MODULES_TO_SAVE) if speech_modules else None)


def add_lora(model: FunAudioChat, config=None) -> nn.Module:
    """``peft.get_peft_model(model, config)``: adapters added, everything else frozen (``model`` is changed in
    place and wrapped). Adapters follow the base layer's device and are float32 (peft's default)."""
    from peft import get_peft_model

    if not isinstance(model, FunAudioChat):
        raise ValueError(f"add_lora expects a fac_mini FunAudioChat, got {type(model).__name__}")
    return get_peft_model(model, config or course_lora_config())


def merge_lora(peft_model: nn.Module) -> FunAudioChat:
    """``merge_and_unload``: W + (alpha / r)·B A folded into each target, ``modules_to_save`` copies put back in
    place: a plain ``FunAudioChat`` with the released names (the speech table and SRH head still tied)."""
    merged = peft_model.merge_and_unload()
    if merged.audio_invert_tower.lm_head.weight is not merged.audio_tower.embed_tokens.weight:
        raise RuntimeError("after merging, the SRH lm_head is no longer tied to the speech embedding table")
    return merged


def merged_state_dict(config: FunAudioChatConfig, peft_state: dict[str, torch.Tensor], lora_config
                      ) -> dict[str, torch.Tensor]:
    """The full state dict of a LoRA model (peft names, e.g. gathered from FSDP) and its ``LoraConfig`` -> the
    merged plain state dict (built on meta, filled by assignment, merged on CPU)."""
    model = add_lora(build_on_meta(config), lora_config)
    missing, unexpected = model.load_state_dict(peft_state, strict=False, assign=True)
    tied = "base_model.model.audio_invert_tower.lm_head.weight"
    if unexpected or set(missing) - {tied}:
        raise ValueError(f"the state dict does not fit the LoRA model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    inner = model.get_base_model()
    inner.audio_invert_tower.lm_head.weight = inner.audio_tower.embed_tokens.weight
    recompute_buffers(inner, torch.device("cpu"))
    return merge_lora(model).state_dict()


def save_merged_released(peft_model: nn.Module, path: str | Path) -> Path:
    """Merge the adapters and write the result in the released layout (``save_released``)."""
    return save_released(merge_lora(peft_model), path)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}``, each shared tensor counted once (works on meta models)."""
    seen: dict[int, nn.Parameter] = {}
    for parameter in model.parameters():
        seen.setdefault(id(parameter), parameter)
    return {"trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
            "total": sum(p.numel() for p in seen.values())}


def lora_parameter_count(config: FunAudioChatConfig, rank: int = 16, speech_modules: bool = True) -> dict[str, int]:
    """Trained parameters of the course's LoRA on ``config``, counted from shapes (no peft, meta device):
    r·(d_in + d_out) per targeted projection, plus every parameter of the ``modules_to_save``."""
    import re

    model = build_on_meta(config)
    pattern = re.compile(LORA_TARGETS)
    adapters = sum(rank * (module.in_features + module.out_features) for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and pattern.fullmatch(name))
    saved = sum(p.numel() for name in LORA_MODULES_TO_SAVE for p in model.get_submodule(name).parameters()) \
        if speech_modules else 0
    return {"adapters": adapters, "modules_to_save": saved, "trained": adapters + saved}
