"""``python -m fac_mini.scale.gpu_check``: the full-scale training step on one GPU, measured (about 5 minutes on an
H100/H200; ``--tiny`` runs the same code on a tiny config on the CPU in seconds).

(a) ``lora``: the whole 9.4 B architecture from random bf16 weights, LoRA (``fac_mini.scale.lora``, adapters and
    speech modules in fp32, bf16 autocast), activation checkpointing, the release's batch (6 packed rows of 2048
    LLM positions): tokens/s, MFU (4·N for the adapted towers, 2·N for the frozen encoder), peak memory.
    Targets: MFU >= 25 %, peak <= 40 GB.
(b) ``fsdp2_truncated``: full fine-tuning under FSDP2 at world size 1 (``fully_shard`` per block, bf16 compute,
    fp32 masters, AdamW) of a depth-truncated model at true width (LLM 8 of 36 blocks, SRH 6 of 28, encoder 8 of
    32), same batch: tokens/s, MFU (6·N), peak memory. Target: MFU >= 35 % (torchtitan: 34 % eager for
    Llama-3.1-8B on H100).
(c) ``memory``: ``fac_mini.scale.memory.peak_memory_estimate`` against ``torch.cuda.max_memory_allocated`` for
    both (target: within 15 %).

Tokens are LLM positions (5 Hz, padding excluded). MFU uses the device's dense bf16 peak (``--peak-tflops``,
default 989: H100/H200 SXM; see ``nvidia-smi`` for PCIe/NVL parts). Prints one JSON object; exit 2 when no GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import torch

from ..model import FunAudioChatConfig
from ..released import count_parameters
from ..released.gpu_check import RELEASED_SPECIAL_IDS, build_random_model
from . import memory
from .fsdp import Sharding, apply_activation_checkpointing, make_mesh, release_optimizer, shard_model, train_step
from .packing import collate_rows, pack_dialogues, synthetic_dialogues

__all__ = ["GPUCheckError", "truncated_config", "step_flops", "run_scale_gpu_check", "main"]

TARGETS = {"lora_mfu": 0.25, "lora_peak_gb": 40.0, "fsdp2_mfu": 0.35, "memory_relative_error": 0.15}


class GPUCheckError(RuntimeError):
    """The check cannot run here (no CUDA device)."""


def _log(message: str) -> None:
    print(f"[scale.gpu_check] {message}", file=sys.stderr, flush=True)


def truncated_config(config: FunAudioChatConfig, llm_layers: int, srh_layers: int,
                     encoder_layers: int) -> FunAudioChatConfig:
    """``config`` with fewer blocks in each tower, every width unchanged."""
    return dataclasses.replace(
        config, text_config=dataclasses.replace(config.text_config, num_hidden_layers=llm_layers),
        crq_config=dataclasses.replace(config.crq_config, num_hidden_layers=srh_layers),
        audio_config=dataclasses.replace(config.audio_config, encoder_layers=encoder_layers))


def step_flops(config: FunAudioChatConfig, llm_positions: int, audio_positions: int, context: int,
               lora: bool) -> float:
    """Model FLOPs of one training step: LLM positions x (6N or 4N + attention at ``context``), 5 SRH positions
    per LLM position (attention over 5·context), the encoder on ``audio_positions`` user-audio LLM positions
    (10 frames of 50 Hz each, 2-s windows of 100 frames; 6N when trained, 2N forward only when frozen by LoRA)."""
    llm, srh, encoder = memory.towers(config)
    k = config.discrete.group_size
    total = llm_positions * memory.training_flops_per_token(llm.matmul_parameters, llm.layers, llm.heads,
                                                            llm.head_dim, context, lora)
    total += k * llm_positions * memory.training_flops_per_token(srh.matmul_parameters, srh.layers, srh.heads,
                                                                 srh.head_dim, k * context, lora)
    encoder_flops = memory.training_flops_per_token(encoder.matmul_parameters, encoder.layers, encoder.heads,
                                                    encoder.head_dim, config.audio_config.n_window)
    total += 2 * k * audio_positions * (encoder_flops / 3 if lora else encoder_flops)
    return total


def _batches(config: FunAudioChatConfig, rows: int, cutoff: int, im_start_id: int, groups: tuple[int, int],
             device: torch.device, seed: int) -> list[dict[str, torch.Tensor]]:
    """One micro-batch of ``rows`` packed rows, on ``device`` (a list: the train_step's micro-batches)."""
    dialogues = synthetic_dialogues(config, 10 * rows, seed, im_start_id, user_groups=groups, reply_groups=groups)
    packed = pack_dialogues([len(d) for d in dialogues], cutoff)
    if len(packed) < rows:
        raise GPUCheckError(f"packing gave {len(packed)} rows, need {rows}")
    batch = collate_rows([[dialogues[i] for i in row] for row in packed[:rows]], cutoff, config)
    return [{name: tensor.to(device) for name, tensor in batch.items()}]


def _positions(batch: dict[str, torch.Tensor], config: FunAudioChatConfig) -> tuple[int, int]:
    """(real LLM positions, user-audio LLM positions) of a batch."""
    user_groups = int(batch["speech_attention_mask"][batch["feature_exist_mask"]].sum()) // config.discrete.group_size
    return int(batch["attention_mask"].sum()), user_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(model, optimizer, batches, config, device, steps: int, autocast: torch.dtype | None) -> dict:
    """One warm-up step (allocates the optimiser state), then ``steps`` timed steps with peak memory."""
    train_step(model, optimizer, batches, config, lr=1e-5, autocast_dtype=autocast)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(train_step(model, optimizer, batches, config, lr=1e-5, autocast_dtype=autocast).loss)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_s": seconds, "losses": losses, "peak_bytes": peak}


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def _result(name: str, config: FunAudioChatConfig, batches, measured: dict, lora: bool, peak_flops: float,
            predicted: dict[str, float], trained: int) -> dict[str, Any]:
    llm_positions, audio_positions = _positions(batches[0], config)
    rows, cutoff = batches[0]["input_ids"].shape
    flops = step_flops(config, llm_positions, audio_positions, cutoff, lora)
    peak = measured["peak_bytes"]
    result = {
        "parameters": count_parameters(config)["total"], "trained_parameters": trained,
        "rows": rows, "cutoff": cutoff, "llm_positions": llm_positions, "audio_positions": audio_positions,
        "step_s": round(measured["step_s"], 4), "tokens_per_s": round(llm_positions / measured["step_s"], 1),
        "model_tflops_per_step": _significant(flops / 1e12),
        "mfu": _significant(memory.mfu(llm_positions / measured["step_s"], flops / llm_positions, peak_flops)),
        "losses": [round(x, 4) for x in measured["losses"]],
        "predicted_gb": {key: _significant(value / memory.GB) for key, value in predicted.items()},
        "peak_gb": None if peak is None else _significant(peak / memory.GB),
    }
    if peak is not None:
        result["memory_relative_error"] = round((predicted["total"] - peak) / peak, 3)
    _log(f"{name}: {result['tokens_per_s']} tokens/s, MFU {result['mfu']:.1%}, peak {result['peak_gb']} GB "
         f"(predicted {result['predicted_gb']['total']} GB)")
    return result


def _init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    from .dry_run import free_port

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{free_port()}")


def run_scale_gpu_check(tiny: bool = False, rows: int = 6, cutoff: int = 2048, steps: int = 2,
                        peak_tflops: float = 989.0, scenarios: tuple[str, ...] = ("lora", "fsdp2_truncated"),
                        seed: int = 0, bf16: bool | None = None) -> dict[str, Any]:
    """Run the scenarios (see the module doc) and return the measurements. ``bf16``: bf16 weights and compute
    (default: on the GPU yes, in the tiny CPU mode no; ``bf16=True`` runs the GPU's precision path on the CPU)."""
    from .dry_run import dry_run_config
    from .lora import add_lora, course_lora_config, trainable_parameters

    if tiny:
        device = torch.device("cpu")
        dtype, autocast = (torch.bfloat16, torch.bfloat16) if bf16 else (torch.float32, None)
        config, im_start, groups = dry_run_config(), 1, (3, 8)
        rows, cutoff = min(rows, 2), min(cutoff, 64)
        depth = (1, 1, 1)
    else:
        if not torch.cuda.is_available():
            raise GPUCheckError("no CUDA device: this check trains the 9.4 B architecture on a GPU; run "
                                "`python -m fac_mini.scale.gpu_check --tiny` for the CPU version of the same code")
        device = torch.device("cuda")
        dtype, autocast = (torch.float32, None) if bf16 is False else (torch.bfloat16, torch.bfloat16)
        config, im_start, groups = FunAudioChatConfig.released_8b(), RELEASED_SPECIAL_IDS["<|im_start|>"], (50, 250)
        depth = (8, 6, 8)
    started = time.perf_counter()
    results: dict[str, Any] = {"mode": "tiny" if tiny else "gpu", "device": str(device), "torch": torch.__version__,
                               "dtype": str(dtype).removeprefix("torch."),
                               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "peak_tflops": peak_tflops, "targets": TARGETS}
    batches = _batches(config, rows, cutoff, im_start, groups, device, seed)
    peak_flops = peak_tflops * 1e12

    if "lora" in scenarios:
        _log(f"(a) LoRA on the {count_parameters(config)['total'] / 1e9:.2f} B model, {rows} x {cutoff}")
        model = build_random_model(config, device, dtype, seed).train()
        model = add_lora(model, course_lora_config())
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()          # fp32 adapters and speech modules
        apply_activation_checkpointing(model)
        optimizer = release_optimizer(model)
        trained = trainable_parameters(model)["trainable"]
        measured = _measure(model, optimizer, batches, config, device, steps, autocast)
        adapted = [tower for tower in memory.towers(config) if tower.name != "encoder"]   # frozen: no saved acts
        predicted = memory.peak_memory_estimate("lora", count_parameters(config)["total"], 1, rows, cutoff,
                                                adapted, config.text_config.vocab_size,
                                                config.discrete.codebook_size, trained=trained)
        results["lora"] = _result("lora", config, batches, measured, True, peak_flops, predicted, trained)
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "fsdp2_truncated" in scenarios:
        short = truncated_config(config, *depth)
        _log(f"(b) FSDP2 world size 1, full fine-tuning, {short.text_config.num_hidden_layers} LLM blocks "
             f"({count_parameters(short)['total'] / 1e9:.2f} B)")
        _init_single_process_group(device)
        model = build_random_model(short, device, torch.float32, seed).train()
        apply_activation_checkpointing(model)
        shard_model(model, make_mesh(1, device.type), Sharding(mixed_precision=dtype == torch.bfloat16))
        optimizer = release_optimizer(model)
        measured = _measure(model, optimizer, batches, short, device, steps, None)
        total = count_parameters(short)["total"]
        predicted = memory.peak_memory_estimate("fsdp2", total, 1, rows, cutoff, memory.towers(short),
                                                short.text_config.vocab_size, short.discrete.codebook_size)
        results["fsdp2_truncated"] = _result("fsdp2_truncated", short, batches, measured, False, peak_flops,
                                             predicted, total)
        del model, optimizer
    results["memory"] = [{"scenario": name, "predicted_gb": results[name]["predicted_gb"]["total"],
                          "measured_gb": results[name]["peak_gb"],
                          "relative_error": results[name].get("memory_relative_error")}
                         for name in scenarios if name in results]
    results["total_s"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m fac_mini.scale.gpu_check [--tiny] [--rows 6] [--cutoff 2048] [--steps 2] [--peak-tflops 989]``"""
    parser = argparse.ArgumentParser(prog="python -m fac_mini.scale.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (the same code path)")
    parser.add_argument("--rows", type=int, default=6, help="packed rows per step (the release: 6 per GPU)")
    parser.add_argument("--cutoff", type=int, default=2048, help="LLM positions per row (the release: 2048)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--only", choices=("lora", "fsdp2_truncated"), default=None, help="run one scenario")
    parser.add_argument("--bf16", action="store_true", help="with --tiny: bf16 weights and compute, as on the GPU")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.cutoff < 16 or args.steps < 1:
        parser.error("need --rows >= 1, --cutoff >= 16 and --steps >= 1")
    scenarios = (args.only,) if args.only else ("lora", "fsdp2_truncated")
    try:
        result = run_scale_gpu_check(tiny=args.tiny, rows=args.rows, cutoff=args.cutoff, steps=args.steps,
                                     peak_tflops=args.peak_tflops, scenarios=scenarios,
                                     bf16=True if args.bf16 else None)
    except GPUCheckError as error:
        print(f"scale.gpu_check: {error}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
