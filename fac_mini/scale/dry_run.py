"""``python -m fac_mini scale dry-run [--json]``: the full-scale training step proven on 2 CPU processes over gloo.

A tiny ``FunAudioChat`` (every tower, the released label rules, packed 5 Hz dialogues) is written in the released
layout; then

- a **single-process reference** trains it on the whole global batch of every step (this process);
- ``world_size`` fresh processes (``torch.multiprocessing``, gloo, an explicit ``init_device_mesh("cpu", ...)``)
  build it on ``meta``, checkpoint and shard it with FSDP2, load it by a rank-0 broadcast, and train on the same
  global batches, split over ranks, in four scenarios:

  ``parity``        fp32, 1 micro-batch per rank, ``reshard_after_forward=True`` (ZeRO-3-like); a distributed
                    checkpoint after ``resume_at`` steps; exported to the released layout at the end;
  ``accumulation``  fp32, 2 micro-batches per rank (gradient sync on the last only), ``reshard_after_forward=False``
                    (ZeRO-2-like, the official recipe's semantics);
  ``bf16``          ``MixedPrecisionPolicy(bf16, fp32)``: a smoke test (finite, close to fp32, fp32 masters);
  ``lora``          peft LoRA (``fac_mini.scale.lora``) under FSDP2 against a single-process LoRA reference;

- more fresh processes load the distributed checkpoint and continue (``resume``): losses and weights must be
  bit-identical to the uninterrupted run;
- every exported folder is read back with ``load_released`` and compared with the reference.

The JSON (COURSE.md §6) has ``world_size``, ``loss_diff`` and ``max_param_diff`` (the parity scenario) and one
entry per scenario. Memory: each rank's parameter and AdamW bytes against ``fac_mini.scale.memory``'s prediction.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..encoder import AudioEncoderConfig
from ..llm import LLMConfig
from ..model import FunAudioChat, FunAudioChatConfig
from ..released import build_on_meta, count_parameters, load_released, save_released
from .fsdp import (ReleaseRecipe, Sharding, build_model, export_released, load_checkpoint, local_bytes, make_mesh,
                   release_optimizer, released_full_state, save_checkpoint, train_step, transformer_blocks)
from .memory import fsdp2_rank_bytes
from .packing import collate_rows, pack_dialogues, synthetic_dialogues

__all__ = ["dry_run_config", "DryRunSettings", "global_rows", "rank_micro_batches", "single_process_reference",
           "run_dry_run", "main_dry_run", "free_port"]

IM_START_ID = 1          # <|im_start|> of the course tokenizer (the tiny config uses its special ids)


def dry_run_config() -> FunAudioChatConfig:
    """The course's CPU toy sizes, smaller still: every tower present, two blocks each."""
    text = LLMConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6,
                     max_position_embeddings=4096)
    crq = LLMConfig(vocab_size=1, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, rope_theta=1e6, max_position_embeddings=20480)
    audio = AudioEncoderConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                               output_dim=32)
    return FunAudioChatConfig(audio_config=audio, crq_config=crq, text_config=text)


@dataclasses.dataclass(frozen=True)
class DryRunSettings:
    """Sizes of the dry run. ``lr`` is far above the release's 1e-5 so that the weights move enough for the
    parameter comparison to mean something (the release's schedule shape is kept)."""
    world_size: int = 2
    steps: int = 4
    resume_at: int = 2
    micro_batches: int = 2             # per rank, in the accumulation scenario
    rows_per_micro_batch: int = 1
    cutoff: int = 64
    lr: float = 1e-3
    lora_steps: int = 2
    seed: int = 0

    @property
    def rows_per_step(self) -> int:
        return self.world_size * self.micro_batches * self.rows_per_micro_batch

    @property
    def recipe(self) -> ReleaseRecipe:
        return ReleaseRecipe(gpus=self.world_size, micro_batch=self.rows_per_micro_batch,
                             grad_accumulation=self.micro_batches, cutoff=self.cutoff, lr=self.lr)


def global_rows(config: FunAudioChatConfig, settings: DryRunSettings, step: int):
    """The packed rows (lists of dialogues) of ``step``'s global batch, the same in every process."""
    dialogues = synthetic_dialogues(config, 3 * settings.rows_per_step, settings.seed * 1000 + step, IM_START_ID,
                                    user_groups=(3, 8), reply_groups=(4, 9))
    rows = pack_dialogues([len(d) for d in dialogues], settings.cutoff)
    if len(rows) < settings.rows_per_step:
        raise ValueError(f"packing gave {len(rows)} rows, the step needs {settings.rows_per_step}")
    return [[dialogues[index] for index in row] for row in rows[:settings.rows_per_step]]


def rank_micro_batches(config: FunAudioChatConfig, settings: DryRunSettings, step: int, rank: int,
                       micro_batches: int) -> list[dict[str, torch.Tensor]]:
    """Rank ``rank``'s contiguous share of the global rows, cut into ``micro_batches`` collated batches."""
    rows = global_rows(config, settings, step)
    share = len(rows) // settings.world_size
    mine = rows[rank * share:(rank + 1) * share]
    per = len(mine) // micro_batches
    return [collate_rows(mine[m * per:(m + 1) * per], settings.cutoff, config) for m in range(micro_batches)]


# ----------------------------------------------------------------------------------------------------------
# One training run (used by the reference and by every rank)
# ----------------------------------------------------------------------------------------------------------
def _run(config, settings: DryRunSettings, model, optimizer, steps: range, micro_batches: int, rank: int,
         world: int, checkpoint_at: int | None = None, checkpoint_dir: Path | None = None
         ) -> list[dict[str, float]]:
    """Train ``steps`` (world 1: the whole global batch at once; else this rank's share in ``micro_batches``),
    saving a distributed checkpoint after step ``checkpoint_at``; returns the per-step logs."""
    log = []
    for step in steps:
        if world == 1:
            batches = [collate_rows(global_rows(config, settings, step), settings.cutoff, config)]
        else:
            batches = rank_micro_batches(config, settings, step, rank, micro_batches)
        result = train_step(model, optimizer, batches, config, settings.recipe.lr_at(step, settings.steps),
                            settings.recipe.clip_norm)
        log.append(dataclasses.asdict(result))
        if checkpoint_at is not None and step + 1 == checkpoint_at:
            save_checkpoint(model, optimizer, step + 1, checkpoint_dir)
    return log


def single_process_reference(config, settings: DryRunSettings, initial: dict, lora: bool,
                             steps: int) -> tuple[list, dict]:
    """The reference: one process trains ``steps`` on the whole global batch of each step (LoRA: the course's
    LoRA at rank 4); returns the per-step logs and ``{"model": model}``."""
    from .lora import course_lora_config

    lora_config = course_lora_config(rank=4, alpha=8) if lora else None
    model = build_model(config, None, Sharding(), full_state=_lora_state(config, initial) if lora else initial,
                        lora=lora_config)
    optimizer = release_optimizer(model, settings.recipe)
    log = _run(config, settings, model, optimizer, range(steps), 1, 0, 1)
    return log, {"model": model}


def _lora_state(config, initial: dict) -> dict:
    """The full state of the LoRA model made from ``initial`` (seeded adapters: the same on every rank)."""
    from .lora import add_lora, course_lora_config

    model = FunAudioChat(config)
    model.load_state_dict(initial)
    torch.manual_seed(1234)                      # lora_A init
    peft_model = add_lora(model, course_lora_config(rank=4, alpha=8))
    with torch.no_grad():                        # B = 0 at init would make the test blind to the B path
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return {name: tensor.detach().clone() for name, tensor in peft_model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# The worker processes
# ----------------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, phase: str, workdir: str, settings: DryRunSettings) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = make_mesh(world, "cpu")
        config = dry_run_config()
        folder = Path(workdir)
        initial = released_full_state(folder / "initial") if rank == 0 else None
        results: dict[str, Any] = {}

        def timed(name, function):
            start = time.perf_counter()
            results[name] = function()
            results[name]["seconds"] = round(time.perf_counter() - start, 2)

        if phase == "train":
            def parity():
                model = build_model(config, mesh, Sharding(reshard_after_forward=True), initial)
                optimizer = release_optimizer(model, settings.recipe)
                log = _run(config, settings, model, optimizer, range(settings.steps), 1, rank, world,
                           settings.resume_at, folder / "dcp")
                held = {"parameters": local_bytes(model.parameters()),
                        "optimizer": sum(local_bytes(s.values()) for s in optimizer.state.values())}
                predicted = fsdp2_rank_bytes(build_model_meta(config), world, rank)
                memory = _gather({"held": held, "predicted": {k: predicted[k] for k in held}})
                export_released(model, config, folder / "export_parity")
                return {"log": log, "memory": memory}

            def accumulation():
                model = build_model(config, mesh, Sharding(reshard_after_forward=False), initial)
                optimizer = release_optimizer(model, settings.recipe)
                log = _run(config, settings, model, optimizer, range(settings.steps), settings.micro_batches,
                           rank, world)
                export_released(model, config, folder / "export_accumulation")
                return {"log": log}

            def bf16():
                model = build_model(config, mesh, Sharding(mixed_precision=True), initial)
                optimizer = release_optimizer(model, settings.recipe)
                seen = set()                       # dtypes of the LLM blocks' outputs: the compute dtype
                hooks = [block.register_forward_hook(lambda module, args, out: seen.add(str(out.dtype)))
                         for block in transformer_blocks(model)["llm"]]
                log = _run(config, settings, model, optimizer, range(2), 1, rank, world)
                for hook in hooks:
                    hook.remove()
                dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
                finite = all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters())
                return {"log": log, "master_dtypes": dtypes, "finite": finite,
                        "compute_dtypes": sorted(name.removeprefix("torch.") for name in seen)}

            def lora():
                from .lora import course_lora_config

                state = _lora_state(config, initial) if rank == 0 else None
                model = build_model(config, mesh, Sharding(), state, lora=course_lora_config(rank=4, alpha=8))
                optimizer = release_optimizer(model, settings.recipe)
                log = _run(config, settings, model, optimizer, range(settings.lora_steps), 1, rank, world)
                export_released(model, config, folder / "export_lora")
                return {"log": log}

            timed("parity", parity)
            timed("accumulation", accumulation)
            timed("bf16", bf16)
            timed("lora", lora)
        elif phase == "resume":
            def resume():
                model = build_model(config, mesh, Sharding(reshard_after_forward=True), initial)
                optimizer = release_optimizer(model, settings.recipe)
                start = load_checkpoint(model, optimizer, folder / "dcp")
                log = _run(config, settings, model, optimizer, range(start, settings.steps), 1, rank, world)
                export_released(model, config, folder / "export_resumed")
                return {"log": log, "start": start}

            timed("resume", resume)
        else:
            raise ValueError(f"unknown phase {phase!r}")
        if rank == 0:
            (folder / f"{phase}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def build_model_meta(config: FunAudioChatConfig):
    """The parameters of ``config``'s model on the meta device (what ``fsdp2_rank_bytes`` predicts from)."""
    return list(build_on_meta(config).parameters())


def _gather(value: dict) -> list:
    """Every rank's ``value``, in rank order (collective)."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn(phase: str, workdir: Path, settings: DryRunSettings) -> dict:
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(settings.world_size, free_port(), phase, str(workdir), settings),
                       nprocs=settings.world_size, join=True, start_method="spawn")
    return json.loads((workdir / f"{phase}.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------------
def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        raise ValueError(f"state dicts differ in keys: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def _losses(log: list[dict]) -> list[float]:
    return [row["loss"] for row in log]


def _loss_diff(log: list[dict], reference: list[dict]) -> float:
    return max(abs(a - b) for a, b in zip(_losses(log), _losses(reference)))


def _loaded(path: Path) -> dict[str, torch.Tensor]:
    return load_released(path, dtype=None).state_dict()


def run_dry_run(settings: DryRunSettings = DryRunSettings(), workdir: str | Path | None = None) -> dict[str, Any]:
    """Run every scenario and return the summary (see the module doc). ``workdir``: where the checkpoints go
    (default: a temporary folder, removed afterwards)."""
    from .lora import merge_lora

    if settings.world_size < 2 or settings.steps <= settings.resume_at or settings.resume_at < 1:
        raise ValueError(f"need world_size >= 2 and 1 <= resume_at < steps, got {settings}")
    started = time.perf_counter()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fac_scale_") as temporary:
        folder = Path(workdir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        config = dry_run_config()
        torch.manual_seed(settings.seed)
        save_released(FunAudioChat(config), folder / "initial")
        initial = released_full_state(folder / "initial")

        progress = tqdm(total=3, desc="scale dry-run", unit="phase", file=sys.stderr)
        start = time.perf_counter()
        progress.set_postfix_str("single-process reference")
        reference_log, reference = single_process_reference(config, settings, initial, lora=False,
                                                            steps=settings.steps)
        reference_state = {k: v.detach() for k, v in reference["model"].state_dict().items()}
        lora_log, lora_reference = single_process_reference(config, settings, initial, lora=True,
                                                            steps=settings.lora_steps)
        lora_merged = {k: v.detach() for k, v in merge_lora(lora_reference["model"]).state_dict().items()}
        reference_seconds = time.perf_counter() - start
        progress.update()

        start = time.perf_counter()
        progress.set_postfix_str(f"{settings.world_size} processes: parity, accumulation, bf16, LoRA")
        trained = _spawn("train", folder, settings)
        train_seconds = time.perf_counter() - start
        progress.update()
        start = time.perf_counter()
        progress.set_postfix_str(f"{settings.world_size} fresh processes: resume from the checkpoint")
        resumed = _spawn("resume", folder, settings)
        resume_seconds = time.perf_counter() - start
        progress.update()
        progress.close()

        parity = trained["parity"]
        parity_state = _loaded(folder / "export_parity")
        changed = max(float((reference_state[k] - initial[k]).abs().max()) for k in initial)
        accumulation_state = _loaded(folder / "export_accumulation")
        resumed_state = _loaded(folder / "export_resumed")
        lora_state = _loaded(folder / "export_lora")
        lora_base_change = max(float((lora_state[k] - initial[k]).abs().max()) for k in initial
                               if k.startswith("continuous_audio_tower") or "embed_tokens" in k)
        bf16 = trained["bf16"]
        fp32_first = reference_log[0]["loss"]
        tail = parity["log"][resumed["resume"]["start"]:]
        summary = {
            "world_size": settings.world_size,
            "backend": "gloo",
            "steps": settings.steps,
            "rows_per_step": settings.rows_per_step,
            "cutoff": settings.cutoff,
            "parameters": count_parameters(config)["total"],
            "loss_diff": _loss_diff(parity["log"], reference_log),
            "max_param_diff": _max_diff(parity_state, reference_state),
            "max_param_change": changed,
            "reference_losses": _losses(reference_log),
            "parity": {"losses": _losses(parity["log"]), "reshard_after_forward": True,
                       "seconds": parity["seconds"]},
            "accumulation": {"micro_batches": settings.micro_batches, "reshard_after_forward": False,
                             "loss_diff": _loss_diff(trained["accumulation"]["log"], reference_log),
                             "max_param_diff": _max_diff(accumulation_state, reference_state),
                             "seconds": trained["accumulation"]["seconds"]},
            "bf16": {"losses": _losses(bf16["log"]), "fp32_first_loss": fp32_first,
                     "relative_loss_diff": abs(bf16["log"][0]["loss"] - fp32_first) / fp32_first,
                     "master_dtypes": bf16["master_dtypes"], "compute_dtypes": bf16["compute_dtypes"],
                     "finite": bf16["finite"],
                     "seconds": bf16["seconds"]},
            "dcp_resume": {"resume_at": resumed["resume"]["start"],
                           "losses": _losses(resumed["resume"]["log"]),
                           "bit_identical": _losses(resumed["resume"]["log"]) == _losses(tail)
                           and _max_diff(resumed_state, parity_state) == 0.0,
                           "max_param_diff": _max_diff(resumed_state, parity_state),
                           "seconds": resumed["resume"]["seconds"]},
            "lora": {"loss_diff": _loss_diff(trained["lora"]["log"], lora_log),
                     "max_param_diff": _max_diff(lora_state, lora_merged),
                     "frozen_max_change": lora_base_change, "seconds": trained["lora"]["seconds"]},
            "memory": parity["memory"],
            "reference_seconds": round(reference_seconds, 2),
            "train_processes_seconds": round(train_seconds, 2),
            "resume_processes_seconds": round(resume_seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
        }
    return summary


def main_dry_run(argv: list[str] | None = None) -> int:
    """``python -m fac_mini scale dry-run [--json] [--steps N] [--workdir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m fac_mini scale dry-run", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=DryRunSettings.steps)
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = run_dry_run(DryRunSettings(steps=args.steps), args.workdir)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"FSDP2 over {summary['backend']}, {summary['world_size']} processes vs 1 process, "
          f"{summary['steps']} steps of {summary['rows_per_step']} packed rows x {summary['cutoff']} positions")
    print(f"  parity        loss diff {summary['loss_diff']:.2e}, max param diff {summary['max_param_diff']:.2e} "
          f"(params moved up to {summary['max_param_change']:.2e})")
    accumulation = summary["accumulation"]
    print(f"  accumulation  loss diff {accumulation['loss_diff']:.2e}, max param diff "
          f"{accumulation['max_param_diff']:.2e}")
    print(f"  bf16          relative loss diff {summary['bf16']['relative_loss_diff']:.2e}, finite "
          f"{summary['bf16']['finite']}")
    print(f"  DCP resume    bit-identical {summary['dcp_resume']['bit_identical']}")
    print(f"  LoRA          loss diff {summary['lora']['loss_diff']:.2e}, merged export vs reference "
          f"{summary['lora']['max_param_diff']:.2e}")
    print(f"  total {summary['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main_dry_run())
