"""DeepSpeed ZeRO-2, the official recipe's engine, on the same training step (optional: ``pip install -r
requirements-deepspeed.txt``; the course's own engine is FSDP2, ``fac_mini.scale.fsdp``).

``python -m fac_mini.scale.deepspeed [--json]`` is a 2-process gloo dry run like ``fac_mini scale dry-run``: the
tiny model and the global batches of the FSDP2 dry run, under ``deepspeed.initialize`` with a configuration that
mirrors the release's ``ds_z2_config.json`` (:func:`zero2_config`). torch's AdamW is passed in as the client
optimiser (as the HF Trainer does), so nothing is compiled. It reports

- ``fp32``: loss and weights against the single-process reference on the same global batches;
- ``bf16``: a smoke test of the recipe's precision (bf16 weights and compute, fp32 partitions of the master
  weights and Adam state);
- ``step_s``: seconds per optimiser step of ZeRO-2 and of FSDP2 (``reshard_after_forward=False``) in the same
  processes, and each rank's bytes of weights + optimiser state against ``fac_mini.scale.memory``.

DeepSpeed divides gradients by the world size (an average) and by the accumulation steps; the step below
multiplies the loss by the world size and backpropagates without that division, so the objective is the same
global-token-weighted sum as ``fac_mini.scale.fsdp.train_step``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..model import FunAudioChat, FunAudioChatConfig
from ..released import count_parameters, save_released
from ..train.store import read_safetensors, save_safetensors
from .dry_run import DryRunSettings, dry_run_config, free_port, rank_micro_batches, single_process_reference
from .fsdp import (RELEASE_RECIPE, ReleaseRecipe, Sharding, build_model, make_mesh, release_optimizer,
                   released_full_state, train_step)
from .packing import scored_token_counts

__all__ = ["zero2_config", "deepspeed_train_step", "run_deepspeed_dry_run", "main"]


def zero2_config(micro_batch: int, grad_accumulation: int, world_size: int, bf16: bool = True,
                 recipe: ReleaseRecipe = RELEASE_RECIPE) -> dict[str, Any]:
    """The release's ``ds_z2_config.json`` with the trainer's "auto" values filled in."""
    return {
        "train_batch_size": micro_batch * grad_accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": recipe.clip_norm,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                              "overlap_comm": False, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                              "contiguous_gradients": True, "round_robin_gradients": True},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def deepspeed_train_step(engine, micro_batches: list[dict[str, torch.Tensor]], config: FunAudioChatConfig,
                         lr: float) -> float:
    """One optimiser step of a DeepSpeed engine over this rank's micro-batches; returns the global loss."""
    counts = torch.tensor([scored_token_counts(config, batch) for batch in micro_batches], dtype=torch.float64)
    totals = counts.sum(dim=0)
    dist.all_reduce(totals)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    world = dist.get_world_size()
    total = torch.zeros((), dtype=torch.float64)
    for batch, (text_count, speech_count) in zip(micro_batches, counts.tolist()):
        out = engine(**batch)
        loss = out.text_loss.float() * (text_count / float(totals[0])) + \
            out.speech_loss.float() * (speech_count / float(totals[1]))
        engine.backward(loss * world, scale_wrt_gas=False)     # DeepSpeed averages over ranks: undo it
        engine.step()
        total += loss.detach().double()
    dist.all_reduce(total)
    return float(total)


def _held_bytes(engine) -> int:
    """Bytes of the module's weights plus the optimiser's fp32 partitions and Adam state on this rank."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in engine.module.parameters()}.values())
    optimizer = engine.optimizer
    partitions = sum(t.numel() * t.element_size() for t in getattr(optimizer, "single_partition_of_fp32_groups", []))
    state = sum(v.numel() * v.element_size() for s in optimizer.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return weights + partitions + state


def _worker(rank: int, world: int, port: int, workdir: str, settings: DryRunSettings) -> None:
    import os

    import deepspeed

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    try:
        config = dry_run_config()
        folder = Path(workdir)
        initial = released_full_state(folder / "initial")
        results: dict[str, Any] = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            model = FunAudioChat(config)
            model.load_state_dict(initial)
            optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=RELEASE_RECIPE.betas,
                                          eps=RELEASE_RECIPE.eps, weight_decay=RELEASE_RECIPE.weight_decay)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero2_config(
                settings.rows_per_micro_batch, settings.micro_batches, world, bf16))
            steps = settings.steps if name == "fp32" else 2
            losses, seconds = [], []
            for step in range(steps):
                batches = rank_micro_batches(config, settings, step, rank, settings.micro_batches)
                start = time.perf_counter()
                lr = settings.recipe.lr_at(step, settings.steps)
                losses.append(deepspeed_train_step(engine, batches, config, lr))
                seconds.append(time.perf_counter() - start)
            results[name] = {"losses": losses, "step_s": sum(seconds[1:]) / max(1, len(seconds) - 1),
                             "held_bytes": _held_bytes(engine)}
            if name == "fp32" and rank == 0:
                save_safetensors({k: v.detach().float().clone() for k, v in engine.module.state_dict().items()},
                                 folder / "deepspeed_fp32.safetensors")
            del engine, optimizer, model
        # FSDP2 with ZeRO-2 semantics in the same processes, for the step time
        mesh = make_mesh(world, "cpu")
        model = build_model(config, mesh, Sharding(reshard_after_forward=False), initial if rank == 0 else None)
        optimizer = release_optimizer(model, settings.recipe)
        seconds = []
        for step in range(settings.steps):
            batches = rank_micro_batches(config, settings, step, rank, settings.micro_batches)
            start = time.perf_counter()
            train_step(model, optimizer, batches, config, settings.recipe.lr_at(step, settings.steps))
            seconds.append(time.perf_counter() - start)
        results["fsdp2_step_s"] = sum(seconds[1:]) / max(1, len(seconds) - 1)
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            (folder / "deepspeed.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def run_deepspeed_dry_run(settings: DryRunSettings = DryRunSettings()) -> dict[str, Any]:
    """Both DeepSpeed scenarios on ``settings.world_size`` processes, compared with the single-process reference."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fac_deepspeed_") as temporary:
        folder = Path(temporary)
        config = dry_run_config()
        torch.manual_seed(settings.seed)
        save_released(FunAudioChat(config), folder / "initial")
        initial = released_full_state(folder / "initial")
        reference_log, reference = single_process_reference(config, settings, initial, lora=False, steps=settings.steps)
        reference_state = {k: v.detach() for k, v in reference["model"].state_dict().items()}
        mp.start_processes(_worker, args=(settings.world_size, free_port(), str(folder), settings),
                           nprocs=settings.world_size, join=True, start_method="spawn")
        ranks = json.loads((folder / "deepspeed.json").read_text())
        trained = read_safetensors(folder / "deepspeed_fp32.safetensors")
    reference_losses = [row["loss"] for row in reference_log]
    fp32, bf16 = ranks[0]["fp32"], ranks[0]["bf16"]
    parameters = count_parameters(config)["total"]
    return {
        "world_size": settings.world_size, "backend": "gloo", "engine": "deepspeed zero-2",
        "loss_diff": max(abs(a - b) for a, b in zip(fp32["losses"], reference_losses)),
        "max_param_diff": max(float((trained[k] - reference_state[k]).abs().max()) for k in reference_state),
        "bf16": {"losses": bf16["losses"], "relative_loss_diff": abs(bf16["losses"][0] - reference_losses[0])
                 / reference_losses[0]},
        "step_s": {"deepspeed_zero2": round(fp32["step_s"], 4), "fsdp2_zero2": round(ranks[0]["fsdp2_step_s"], 4)},
        "held_bytes": [rank["fp32"]["held_bytes"] for rank in ranks],
        # fp32 ZeRO-2 between steps: full fp32 weights + this rank's fp32 copy and Adam m, v (no gradients),
        # + Adam's 4-byte step counter of the one flat parameter group
        "predicted_fp32_zero2_bytes": 4 * parameters + 12 * parameters / settings.world_size + 4,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fac_mini.scale.deepspeed [--json]``; exit 2 when DeepSpeed is not installed."""
    parser = argparse.ArgumentParser(prog="python -m fac_mini.scale.deepspeed", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        print("DeepSpeed is not installed: pip install -r requirements-deepspeed.txt", file=sys.stderr)
        return 2
    summary = run_deepspeed_dry_run()
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
