"""The DRSR efficiency benchmark: one training step on the same audio, 25 Hz backbone vs 5 Hz backbone + SRH.

The paper's claim (section 3.7): grouping k = 5 speech tokens into one LLM position and putting the 25 Hz
work into a small Speech Refined Head roughly halves training GPU hours. Two models learn to predict the same
speech tokens of the same audio:

    baseline (25 Hz)   speech ids (B, T) -> embed -> backbone at T positions -> Linear H -> C     (next token)
    DRSR (5 Hz + SRH)  speech ids (B, T) -> embed -> mean-group k -> backbone at T/k positions
                       -> SpeechRefinedHead at T positions (teacher forcing, released 5-step shift)

One step = forward + backward + AdamW update. Sizes keep the released ratio of backbone to SRH: Qwen3-8B
(6.95 B non-embedding parameters, 8.2 B in all) : SRH 0.53 B is 13 : 1 (15 : 1); here a 12-layer x 384
backbone (20.7 M) : a SRH of 2 layers x 128 plus its projections (1.2 M, pre_matching 0.7 M of it) is
17 : 1. The CRQ is much narrower than the backbone in both (1024 vs 4096; 128 vs 384); the mini SRH has fewer
layers (2 vs 28) because thin layers run inefficiently on a CPU. The sizes are small enough for the default
run (16 s of audio, 1 warm-up + 3 timed steps per model) to finish within a minute on 2 shared CPU cores: at
these sizes AdamW over ~28 M parameters is a large, equal share of both steps, so the fwd+bwd ratio is
reported too. The text head is left out of both models (it would favour DRSR further).

Analytic FLOPs (``fac_mini.cost``: 2 FLOPs per parameter per position + causal attention; training = 3 x
forward) give the predicted ratio at the mini sizes and at the released sizes. Run it with
``python -m fac_mini bench drsr --json`` (or ``python -m fac_mini.course.bench drsr --json``).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import BackboneShape, linear_flops
from ..grouping import MeanGrouping, pad_to_multiple
from ..llm import IGNORE_INDEX, LLMConfig, Qwen3Model
from ..train.loop import torch_threads
from ..constants import CODEBOOK_SIZE, GROUP_SIZE, SPEECH_BOS_ID, SPEECH_PAD_ID, TOKEN_RATE_HZ
from ..srh import SpeechRefinedHead

__all__ = ["MINI_BACKBONE", "MINI_SRH", "RELEASED_BACKBONE", "RELEASED_SRH", "shape_of",
           "training_flops", "Baseline25Hz", "DRSRModel", "bench_drsr", "cost_vs_group_size", "main_bench"]

TRAINING_FLOPS_PER_FORWARD = 3   # backward costs about twice the forward

# Mini sizes (see the module doc). vocab_size is unused: inputs are speech embeddings.
MINI_BACKBONE = LLMConfig(vocab_size=1, hidden_size=384, intermediate_size=1152, num_hidden_layers=12,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=64, rope_theta=1e6)
MINI_SRH = LLMConfig(vocab_size=1, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=64, rope_theta=1e6)
# Released sizes (docs/released_model.md §1.3, §1.4).
RELEASED_BACKBONE = LLMConfig(vocab_size=1, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=5e6)
RELEASED_SRH = LLMConfig(vocab_size=1)                      # the defaults are the released CRQ (Qwen3-0.6B dims)


# ----------------------------------------------------------------------------------------------------------
# Analytic FLOPs
# ----------------------------------------------------------------------------------------------------------
def shape_of(config: LLMConfig, name: str = "") -> BackboneShape:
    """The ``fac_mini.cost`` view of a Qwen3 decoder: its non-embedding parameters (all layers + final norm)."""
    d, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = d * q + 2 * d * kv + q * d + 2 * config.head_dim                   # q, k, v, o + q/k norms
    per_layer = attention + 3 * d * config.intermediate_size + 2 * d             # + SwiGLU + two RMSNorms
    return BackboneShape(name, config.num_hidden_layers, d, config.num_attention_heads,
                         config.num_key_value_heads, config.head_dim, config.num_hidden_layers * per_layer + d)


def srh_parameters(backbone: LLMConfig, srh: LLMConfig, group_size: int = GROUP_SIZE) -> int:
    """SRH parameters besides its (tied) output table: pre_matching (+ bias), input/output matching, CRQ."""
    width = backbone.hidden_size
    return group_size * width * width + group_size * width + 2 * width * srh.hidden_size + \
        shape_of(srh).non_embedding_parameters


def training_flops(speech_tokens: int, group_size: int, backbone: LLMConfig, srh: LLMConfig,
                   codebook_size: int = CODEBOOK_SIZE) -> dict[str, float]:
    """Training FLOPs (3 x forward) of one sequence of ``speech_tokens`` 25 Hz tokens.

    ``group_size`` 1 is the 25 Hz baseline (backbone at every token + Linear H -> C). k > 1 is DRSR: grouping
    Linear H -> H and the backbone at ceil(T/k) positions, pre_matching H -> k·H there, and at all T 25 Hz
    positions the SRH (input/output matching, CRQ layers with causal attention, the tied H -> C head).
    """
    bone, width = shape_of(backbone), backbone.hidden_size
    positions = math.ceil(speech_tokens / group_size)
    backbone_forward = bone.forward_flops(positions)
    if group_size == 1:
        head_forward = linear_flops(speech_tokens, width * codebook_size)
    else:
        crq = shape_of(srh)
        head_forward = (linear_flops(positions, width * width)                                 # grouping
                        + linear_flops(positions, group_size * width * width)                  # pre_matching
                        + crq.forward_flops(speech_tokens)                                     # CRQ at 25 Hz
                        + linear_flops(speech_tokens, 2 * width * srh.hidden_size + width * codebook_size))
    backbone_flops = TRAINING_FLOPS_PER_FORWARD * backbone_forward
    head_flops = TRAINING_FLOPS_PER_FORWARD * head_forward
    return {"llm_positions": positions, "backbone_flops": float(backbone_flops), "head_flops": float(head_flops),
            "step_flops": float(backbone_flops + head_flops)}


def _flops_ratio(speech_tokens: int, group_size: int, backbone: LLMConfig, srh: LLMConfig) -> float:
    drsr = training_flops(speech_tokens, group_size, backbone, srh)["step_flops"]
    return drsr / training_flops(speech_tokens, 1, backbone, srh)["step_flops"]


# ----------------------------------------------------------------------------------------------------------
# The two models
# ----------------------------------------------------------------------------------------------------------
class Baseline25Hz(nn.Module):
    """Every speech token is a backbone position; a linear head predicts the next token."""

    def __init__(self, backbone: LLMConfig, codebook_size: int = CODEBOOK_SIZE):
        super().__init__()
        self.embed_tokens = nn.Embedding(codebook_size, backbone.hidden_size)
        self.backbone = Qwen3Model(backbone, with_embeddings=False)
        self.speech_head = nn.Linear(backbone.hidden_size, codebook_size, bias=False)

    def forward(self, speech_ids: torch.Tensor) -> torch.Tensor:
        """speech_ids (B, T) -> next-token cross-entropy."""
        logits = self.speech_head(self.backbone(inputs_embeds=self.embed_tokens(speech_ids)))    # (B, T, C)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), speech_ids[:, 1:].reshape(-1))


class DRSRModel(nn.Module):
    """Mean-group k tokens -> backbone at T/k positions -> Speech Refined Head back at T positions."""

    def __init__(self, backbone: LLMConfig, srh: LLMConfig, codebook_size: int = CODEBOOK_SIZE,
                 group_size: int = GROUP_SIZE):
        super().__init__()
        self.group_size = group_size
        self.embed_tokens = nn.Embedding(codebook_size, backbone.hidden_size)
        self.grouping = MeanGrouping(backbone.hidden_size, backbone.hidden_size, group_size)
        self.backbone = Qwen3Model(backbone, with_embeddings=False)
        self.srh = SpeechRefinedHead(backbone.hidden_size, srh, codebook_size, group_size, SPEECH_BOS_ID,
                                     SPEECH_PAD_ID, speech_embedding=self.embed_tokens)

    def forward(self, speech_ids: torch.Tensor) -> torch.Tensor:
        """speech_ids (B, T) -> SRH loss (padded to a multiple of k; padding is not scored)."""
        ids, real = pad_to_multiple(speech_ids, self.group_size, SPEECH_PAD_ID)                 # (B, k·L)
        hidden = self.backbone(inputs_embeds=self.grouping(self.embed_tokens(ids)))              # (B, L, H)
        return self.srh(hidden, ids.masked_fill(~real, IGNORE_INDEX)).loss


def _timed_steps(models: dict[str, nn.Module], speech_ids: torch.Tensor, repeats: int,
                 warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each training step ("step") and of its forward+backward part ("fwd_bwd"), per model; the
    models run interleaved (A B A B ...) so that load drifts on a shared machine hit both alike."""
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    times = {name: {"step": [], "fwd_bwd": []} for name in models}
    for step in range(warmup + repeats):
        for name, model in models.items():
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            model(speech_ids).backward()
            backward_done = time.perf_counter()
            optimizers[name].step()
            if step >= warmup:
                times[name]["step"].append(time.perf_counter() - start)
                times[name]["fwd_bwd"].append(backward_done - start)
    return times


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# Benchmark and the cost-vs-k table
# ----------------------------------------------------------------------------------------------------------
def bench_drsr(seconds: float = 16.0, batch: int = 1, repeats: int = 3, warmup: int = 1, threads: int | None = 2,
               backbone: LLMConfig = MINI_BACKBONE, srh: LLMConfig = MINI_SRH, group_size: int = GROUP_SIZE,
               flops_seconds_8b: float = 60.0, seed: int = 0) -> dict[str, Any]:
    """Median training-step time of the 25 Hz baseline and of DRSR on the same ``seconds`` of audio.

    Returns a JSON-ready dict: ``baseline_25hz_s``, ``drsr_5hz_s``, ``ratio`` (= drsr / baseline), the
    analytic ``flops_ratio_mini`` (these sizes) and ``flops_ratio_8b`` (released sizes, ``flops_seconds_8b``
    of audio), the forward+backward-only medians and ``ratio_fwd_bwd``, the sizes, thread count, repeats
    and every step time.
    """
    if seconds <= 0 or batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need seconds > 0, batch >= 1, repeats >= 1, warmup >= 0; got {seconds}, {batch}, "
                         f"{repeats}, {warmup}")
    speech_tokens = math.ceil(round(seconds * TOKEN_RATE_HZ, 9))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    speech_ids = torch.randint(0, SPEECH_BOS_ID, (batch, speech_tokens), generator=generator)   # S3 codes only
    models = {"baseline": Baseline25Hz(backbone).train(),
              "drsr": DRSRModel(backbone, srh, group_size=group_size).train()}
    with torch_threads(threads) as used_threads:
        times = _timed_steps(models, speech_ids, repeats, warmup)
    baseline, drsr = (statistics.median(times[name]["step"]) for name in ("baseline", "drsr"))
    baseline_fwd_bwd, drsr_fwd_bwd = (statistics.median(times[name]["fwd_bwd"]) for name in ("baseline", "drsr"))
    backbone_params = shape_of(backbone).non_embedding_parameters
    srh_params = srh_parameters(backbone, srh, group_size)
    released_tokens = math.ceil(flops_seconds_8b * TOKEN_RATE_HZ)
    return {
        "baseline_25hz_s": baseline, "drsr_5hz_s": drsr, "ratio": drsr / baseline,
        "baseline_fwd_bwd_s": baseline_fwd_bwd, "drsr_fwd_bwd_s": drsr_fwd_bwd,
        "ratio_fwd_bwd": drsr_fwd_bwd / baseline_fwd_bwd,
        "flops_ratio_mini": _flops_ratio(speech_tokens, group_size, backbone, srh),
        "flops_ratio_8b": _flops_ratio(released_tokens, group_size, RELEASED_BACKBONE, RELEASED_SRH),
        "seconds": seconds, "batch": batch, "speech_tokens": speech_tokens, "group_size": group_size,
        "llm_positions_baseline": speech_tokens, "llm_positions_drsr": math.ceil(speech_tokens / group_size),
        "threads": used_threads, "repeats": repeats, "warmup": warmup, "step": "forward+backward+AdamW",
        "backbone": {"layers": backbone.num_hidden_layers, "hidden": backbone.hidden_size,
                     "non_embedding_params": backbone_params},
        "srh": {"layers": srh.num_hidden_layers, "hidden": srh.hidden_size, "params": srh_params},
        "backbone_to_srh_params": backbone_params / srh_params,
        "released_backbone_to_srh_params": shape_of(RELEASED_BACKBONE).non_embedding_parameters
        / srh_parameters(RELEASED_BACKBONE, RELEASED_SRH),
        "flops_seconds_8b": flops_seconds_8b,
        "model_params": {name: _parameters(model) for name, model in models.items()},
        "baseline_times_s": times["baseline"]["step"], "drsr_times_s": times["drsr"]["step"],
        "torch": torch.__version__, "device": "cpu",
    }


def cost_vs_group_size(group_sizes: Iterable[int] = range(1, 11), seconds: float = 60.0,
                       backbone: LLMConfig = RELEASED_BACKBONE, srh: LLMConfig = RELEASED_SRH, *,
                       measure: bool = False, batch: int = 1, repeats: int = 3, warmup: int = 1,
                       threads: int | None = 2, seed: int = 0) -> list[dict[str, Any]]:
    """The data of a "backbone cost vs k" plot: one row per group size k.

    Each row: ``group_size``, ``llm_positions``, analytic training ``backbone_flops``, ``head_flops``,
    ``step_flops`` and their ratios to k = 1 (``relative_backbone_flops``, ``relative_step_flops``); with
    ``measure=True`` also ``step_s``, the median measured training step on ``seconds`` of random speech (k = 1:
    ``Baseline25Hz``; k > 1: ``DRSRModel``; keep the sizes small on a CPU, e.g. ``MINI_BACKBONE``/``MINI_SRH``
    and a few seconds).
    """
    group_sizes = list(group_sizes)
    if not group_sizes or any(not isinstance(k, int) or k < 1 for k in group_sizes):
        raise ValueError(f"group_sizes must be positive ints, got {group_sizes}")
    speech_tokens = math.ceil(round(seconds * TOKEN_RATE_HZ, 9))
    reference = training_flops(speech_tokens, 1, backbone, srh)
    speech_ids = torch.randint(0, SPEECH_BOS_ID, (batch, speech_tokens), generator=torch.Generator().manual_seed(seed))
    rows = []
    for k in group_sizes:
        row = {"group_size": k, **training_flops(speech_tokens, k, backbone, srh)}
        row["relative_backbone_flops"] = row["backbone_flops"] / reference["backbone_flops"]
        row["relative_step_flops"] = row["step_flops"] / reference["step_flops"]
        if measure:
            torch.manual_seed(seed)
            model = Baseline25Hz(backbone) if k == 1 else DRSRModel(backbone, srh, group_size=k)
            with torch_threads(threads):
                times = _timed_steps({"model": model.train()}, speech_ids, repeats, warmup)["model"]["step"]
            row["step_s"] = statistics.median(times)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def main_bench(argv: list[str] | None = None) -> int:
    """``bench drsr [--json] [--seconds S] [--batch B] [--repeats N] [--warmup W] [--threads T]``."""
    parser = argparse.ArgumentParser(prog="python -m fac_mini bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="benchmark", required=True)
    drsr = commands.add_parser("drsr", help="training step time: 25 Hz backbone vs 5 Hz backbone + SRH")
    drsr.add_argument("--json", action="store_true", help="print one JSON object")
    drsr.add_argument("--seconds", type=float, default=16.0, help="seconds of audio per sequence (25 tokens/s)")
    drsr.add_argument("--batch", type=int, default=1, help="sequences per step")
    drsr.add_argument("--repeats", type=int, default=3, help="timed steps per model (median reported)")
    drsr.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    drsr.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    result = bench_drsr(seconds=args.seconds, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                        threads=args.threads)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"DRSR benchmark: {args.seconds:g} s of audio = {result['speech_tokens']} speech tokens, batch "
          f"{args.batch}, {result['threads']} threads, median of {args.repeats} steps (forward+backward+AdamW)")
    print(f"  backbone {MINI_BACKBONE.num_hidden_layers} x {MINI_BACKBONE.hidden_size}, SRH "
          f"{MINI_SRH.num_hidden_layers} x {MINI_SRH.hidden_size}: parameters "
          f"{result['backbone_to_srh_params']:.1f} : 1 (released {result['released_backbone_to_srh_params']:.1f} : 1)")
    print(f"  baseline 25 Hz   {result['baseline_25hz_s']:.3f} s/step")
    print(f"  DRSR 5 Hz + SRH  {result['drsr_5hz_s']:.3f} s/step")
    print(f"  ratio {result['ratio']:.2f}, forward+backward only {result['ratio_fwd_bwd']:.2f}")
    print(f"  analytic FLOPs ratio {result['flops_ratio_mini']:.2f} at these sizes, "
          f"{result['flops_ratio_8b']:.2f} at the released 8B sizes over {result['flops_seconds_8b']:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
