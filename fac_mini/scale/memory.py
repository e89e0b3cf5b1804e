"""Memory and speed arithmetic of full-scale training, as code (docs/full_scale.md §3–§4).

Notation: Ψ parameters (trained ones Ψ_t), N data-parallel ranks, b micro-batch (rows), s positions per row,
h hidden size, L layers, V vocabulary.

**Model states per rank** (AdamW; mixed precision keeps fp32 master weights and Adam moments, 12 bytes per
parameter, next to 2-byte bf16 weights and gradients; Rajbhandari et al. 2019, "ZeRO"):

    DDP                  16 Ψ                      ZeRO-1    4 Ψ + 12 Ψ / N
    ZeRO-2 (paper)        2 Ψ + 14 Ψ / N           ZeRO-2 (DeepSpeed's estimator)   2 Ψ + 18 Ψ / N
    ZeRO-3               16 Ψ / N
    FSDP2 (fp32 shards, bf16 compute): 4 Ψ/N params + 4 Ψ/N grads + 8 Ψ/N Adam = 16 Ψ / N,
                         + 2 Ψ of gathered bf16 weights when reshard_after_forward=False (ZeRO-2-like)
    pure bf16            8 Ψ / N (bf16 weights, gradients and Adam moments, no fp32 master; torchtune's default)
    LoRA                 2 Ψ (frozen bf16 base) + 16 Ψ_t (trained adapters and modules, mixed precision)

**Activations per transformer layer** (bf16, fused attention, Korthikanti et al. 2022): about 34·s·b·h bytes
without checkpointing; with full activation checkpointing a layer keeps only its input, 2·s·b·h bytes, and one
layer at a time rebuilds its 34·s·b·h in the backward. **Logits**: b·s·V values, 2 bytes in bf16 plus 4 for the
float32 copy the cross-entropy takes plus 4 for its gradient, unless the loss is computed in chunks.

**FLOPs per token** (torchtitan's convention): 6·N_matmul + 12·L·n_heads·d_head·T for training (forward 2N,
backward 4N; the attention term for context T; embeddings excluded), 4·N for LoRA (no weight gradients of the
frozen matrices). MFU = tokens/s · FLOPs per token / peak FLOP/s.

The CPU validation (tests/test_scale.py): :func:`fsdp2_rank_bytes` predicts exactly the bytes of parameter shards
and AdamW state each rank of the 2-process dry run holds.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from ..model import FunAudioChatConfig

__all__ = ["ENGINES", "GiB", "GB", "state_bytes_per_rank", "fsdp2_shard_rows", "fsdp2_rank_bytes",
           "activation_bytes_per_layer", "logits_bytes", "Tower", "towers", "matmul_parameters",
           "training_flops_per_token", "mfu", "peak_memory_estimate", "ENGINE_LABELS", "engine_table",
           "frame_rate_cost"]

GB = 10 ** 9
GiB = 2 ** 30
ENGINES = ("ddp", "zero1", "zero2", "zero2_deepspeed", "zero3", "fsdp2", "fsdp2_zero2", "pure_bf16", "lora")


# ----------------------------------------------------------------------------------------------------------
# Model states
# ----------------------------------------------------------------------------------------------------------
def state_bytes_per_rank(engine: str, parameters: int, ranks: int = 1, trained: int | None = None) -> float:
    """Bytes of weights + gradients + AdamW state one rank holds (formulas in the module doc).

    parameters: Ψ; ranks: N; trained: Ψ_t for ``"lora"`` (adapters and fully trained modules; they are
    replicated on every rank, as DDP would keep them). Activations and buffers are not included.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} unknown; use one of {ENGINES}")
    if ranks < 1 or parameters < 0:
        raise ValueError(f"need ranks >= 1 and parameters >= 0, got {ranks}, {parameters}")
    psi, n = float(parameters), float(ranks)
    if engine == "ddp":
        return 16 * psi
    if engine == "zero1":
        return 4 * psi + 12 * psi / n
    if engine == "zero2":
        return 2 * psi + 14 * psi / n
    if engine == "zero2_deepspeed":
        return 2 * psi + 18 * psi / n
    if engine in ("zero3", "fsdp2"):
        return 16 * psi / n
    if engine == "fsdp2_zero2":
        return 16 * psi / n + 2 * psi
    if engine == "pure_bf16":
        return 8 * psi / n
    if trained is None:
        raise ValueError("engine 'lora' needs trained= (the number of trained parameters)")
    return 2 * (psi - trained) + 16 * float(trained)


def fsdp2_shard_rows(rows: int, ranks: int, rank: int) -> int:
    """Rows of a tensor's dim 0 that FSDP2 gives ``rank``: chunks of ceil(rows / N), the last ones shorter or
    empty (``torch.chunk``); e.g. 5 rows on 2 ranks -> 3 and 2, 1 row on 2 ranks -> 1 and 0."""
    if ranks < 1 or not 0 <= rank < ranks:
        raise ValueError(f"need 0 <= rank < ranks, got rank {rank} of {ranks}")
    chunk = math.ceil(rows / ranks)
    return max(0, min(chunk, rows - rank * chunk))


def fsdp2_rank_bytes(parameters: Iterable[nn.Parameter], ranks: int, rank: int,
                     dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Exact bytes of the parameter shards and AdamW state (two moments + a float32 step per tensor) on ``rank``
    when every parameter in ``parameters`` (shapes only: meta is fine; shared tensors once) is sharded on dim 0.

    Returns ``{"parameters": ..., "optimizer": ..., "trainable_parameters": ...}`` in bytes.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    seen: set[int] = set()
    params = optimizer = trainable = 0
    for parameter in parameters:
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        shape = tuple(parameter.shape)
        rows = fsdp2_shard_rows(shape[0], ranks, rank) if shape else 1
        size = rows * math.prod(shape[1:]) * itemsize
        params += size
        if parameter.requires_grad:
            trainable += size
            optimizer += 2 * size + 4                       # exp_avg, exp_avg_sq, step (0-d float32)
    return {"parameters": params, "optimizer": optimizer, "trainable_parameters": trainable}


# ----------------------------------------------------------------------------------------------------------
# Activations and logits
# ----------------------------------------------------------------------------------------------------------
def activation_bytes_per_layer(positions: int, batch: int, hidden: int, checkpointing: bool) -> float:
    """34·s·b·h bytes per transformer layer without checkpointing, 2·s·b·h (the saved input) with it."""
    return (2.0 if checkpointing else 34.0) * positions * batch * hidden


def logits_bytes(positions: int, batch: int, vocab: int, chunks: int = 1) -> float:
    """b·s·V·(2 + 4 + 4) bytes (bf16 logits, fp32 copy, fp32 gradient), divided by ``chunks`` when the loss is
    computed chunk by chunk (only one chunk's logits live at a time)."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    return 10.0 * positions * batch * vocab / chunks


# ----------------------------------------------------------------------------------------------------------
# The towers of the released model
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tower:
    """One stack of the model: its parameters, layers, width, attention heads x head size, and positions it
    runs per LLM position (LLM 1; SRH k = 5, at 25 Hz; encoder 10 = 50 Hz frames per 5 Hz group of user audio)."""
    name: str
    parameters: int
    matmul_parameters: int
    layers: int
    hidden: int
    heads: int
    head_dim: int
    positions_per_llm_position: int


def matmul_parameters(module: nn.Module) -> int:
    """Parameters of the ``nn.Linear`` layers (weights only) and convolutions in ``module``: the N of 6N."""
    total = 0
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv1d)):
            total += child.weight.numel()
    return total


def towers(config: FunAudioChatConfig | None = None) -> list[Tower]:
    """The LLM, the SRH and the encoder of ``config`` (default: the released 8B), counted on the meta device.
    The SRH's ``lm_head`` is counted as a matmul here (it is tied to the speech embedding table, a lookup)."""
    from ..released import build_on_meta, count_parameters

    config = config or FunAudioChatConfig.released_8b()
    model = build_on_meta(config)
    counts = count_parameters(config)
    text, crq, audio = config.text_config, config.crq_config, config.audio_config
    k = config.discrete.group_size
    return [
        Tower("llm", counts["language_model"], matmul_parameters(model.language_model), text.num_hidden_layers,
              text.hidden_size, text.num_attention_heads, text.head_dim, 1),
        Tower("srh", counts["audio_invert_tower"], matmul_parameters(model.audio_invert_tower),
              crq.num_hidden_layers, crq.hidden_size, crq.num_attention_heads, crq.head_dim, k),
        Tower("encoder", counts["continuous_audio_tower"], matmul_parameters(model.continuous_audio_tower),
              audio.encoder_layers, audio.d_model, audio.encoder_attention_heads, audio.head_dim, 2 * k),
    ]


def training_flops_per_token(matmul_params: int, layers: int, heads: int, head_dim: int, context: int,
                             lora: bool = False) -> float:
    """6·N + 12·L·n_heads·d_head·T (training, torchtitan's count; no recomputation, no causal discount);
    LoRA: 4·N + the same attention term."""
    return (4.0 if lora else 6.0) * matmul_params + 12.0 * layers * heads * head_dim * context


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the device's dense peak (H100/H200 SXM bf16: 989e12)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return tokens_per_second * flops_per_token / peak_flops


def peak_memory_estimate(engine: str, parameters: int, ranks: int, batch: int, positions: int,
                         tower_list: list[Tower], vocab: int, speech_vocab: int, checkpointing: bool = True,
                         trained: int | None = None, logits_chunks: int = 1,
                         audio_fraction: float = 0.5) -> dict[str, float]:
    """Bytes per rank, by part: model states (``state_bytes_per_rank``), activations kept by every tower at its
    own positions (the encoder runs on the user audio, ``audio_fraction`` of the LLM positions), the largest
    single layer rebuilt during the backward when checkpointing, and the text and speech logits. ``total`` is
    their sum; allocator fragmentation and communication buffers come on top (about 10-15 %)."""
    if not 0 <= audio_fraction <= 1:
        raise ValueError(f"audio_fraction must lie in [0, 1], got {audio_fraction}")
    states = state_bytes_per_rank(engine, parameters, ranks, trained)
    activations = recompute = 0.0
    for tower in tower_list:
        share = audio_fraction if tower.name == "encoder" else 1.0
        tower_positions = int(positions * tower.positions_per_llm_position * share)
        activations += tower.layers * activation_bytes_per_layer(tower_positions, batch, tower.hidden, checkpointing)
        if checkpointing:
            recompute = max(recompute, activation_bytes_per_layer(tower_positions, batch, tower.hidden, False))
    srh = next((tower for tower in tower_list if tower.name == "srh"), None)
    speech_positions = positions * (srh.positions_per_llm_position if srh else 0)
    logits = logits_bytes(positions, batch, vocab, logits_chunks) + logits_bytes(speech_positions, batch,
                                                                                 speech_vocab, logits_chunks)
    parts = {"states": states, "activations": activations, "recompute": recompute, "logits": logits}
    parts["total"] = sum(parts.values())
    return parts


ENGINE_LABELS = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero2_deepspeed": "ZeRO-2 (DeepSpeed est.)",
                 "zero3": "ZeRO-3", "fsdp2": "FSDP2 (reshard)", "fsdp2_zero2": "FSDP2 (no reshard)",
                 "pure_bf16": "pure bf16 FSDP2", "lora": "LoRA"}


def engine_table(config: FunAudioChatConfig | None = None, ranks: Iterable[int] = (1, 4, 8, 16, 64),
                 engines: Iterable[str] = ("ddp", "zero2", "zero2_deepspeed", "fsdp2", "fsdp2_zero2", "pure_bf16",
                                           "lora"), batch: int = 6, positions: int = 2048,
                 lora_trained: int | None = None, logits_chunks: int = 1) -> list[dict[str, float]]:
    """GB per GPU (10^9 bytes) for every engine and rank count: the released recipe's batch (6 rows of 2048
    positions per GPU), full activation checkpointing. One dict per (engine, ranks) with the parts of
    :func:`peak_memory_estimate` in GB; ``lora_trained`` is needed for ``"lora"`` (``fac_mini.scale.lora``), whose
    frozen encoder is left out of the activations."""
    config = config or FunAudioChatConfig.released_8b()
    from ..released import count_parameters

    parameters = count_parameters(config)["total"]
    tower_list = towers(config)
    table = []
    for engine in engines:
        if engine == "lora" and lora_trained is None:
            raise ValueError("engine 'lora' needs lora_trained (trained parameters of the LoRA model)")
        for count in ranks:
            # the course's LoRA freezes the encoder: no gradient flows into it, so it keeps no activations
            kept = [tower for tower in tower_list if tower.name != "encoder"] if engine == "lora" else tower_list
            parts = peak_memory_estimate(engine, parameters, count, batch, positions, kept,
                                         config.text_config.vocab_size, config.discrete.codebook_size,
                                         trained=lora_trained, logits_chunks=logits_chunks)
            table.append({"engine": engine, "ranks": count, **{key: value / GB for key, value in parts.items()}})
    return table


def frame_rate_cost(config: FunAudioChatConfig | None = None, seconds: float = 409.6,
                    lora: bool = False) -> dict[str, float]:
    """Training FLOPs for ``seconds`` of speech dialogue (default: one 2048-position row at 5 Hz), the released
    design (LLM at 5 Hz + SRH at 25 Hz) against the same LLM run at 25 Hz with a per-position speech head
    (no SRH). The LLM's FLOPs per token use the context of that row; the ratio is what grouping saves."""
    config = config or FunAudioChatConfig.released_8b()
    llm, srh, _ = towers(config)
    k = config.discrete.group_size
    positions_5hz = int(round(seconds * 5))
    positions_25hz = positions_5hz * k

    def tower_flops(tower: Tower, positions: int) -> float:
        return positions * training_flops_per_token(tower.matmul_parameters, tower.layers, tower.heads,
                                                    tower.head_dim, positions, lora)

    grouped = tower_flops(llm, positions_5hz) + tower_flops(srh, positions_25hz)
    ungrouped = tower_flops(llm, positions_25hz)
    return {"seconds": seconds, "positions_5hz": positions_5hz, "positions_25hz": positions_25hz,
            "flops_5hz_with_srh": grouped, "flops_25hz_llm": ungrouped, "ratio": grouped / ungrouped}
