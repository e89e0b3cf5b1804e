"""``torchrun ... -m fac_mini.scale.launch``: the FSDP2 training step on every GPU of one or many machines.

One process per GPU, started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):

    torchrun --standalone --nproc_per_node 8 -m fac_mini.scale.launch --checkpoint Fun-Audio-Chat-8B --steps 100
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id job1 \\
        -m fac_mini.scale.launch --checkpoint Fun-Audio-Chat-8B

(Slurm and the official recipe's numbers: docs/full_scale.md §5.) Rank 0 reads the released-layout checkpoint
(``load_released``) and broadcasts it into the shards; every ``--save-every`` steps a distributed checkpoint is
written to ``--out/step-N`` (``--resume`` continues from the newest, bit for bit); at the end the weights are
exported to ``--out/released`` in the released layout.

Data: the batches are synthetic packed dialogues (``fac_mini.scale.packing``, seeded by step and rank), enough
to bring a cluster up, measure it and test resumption. Training on real speech means producing
``packing.Dialogue`` objects from your corpus (speech ids from the CosyVoice 3 tokenizer, Whisper features from
``fac_mini.audio.log_mel``) and passing them through the same ``pack_dialogues`` / ``collate_rows``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import FunAudioChatConfig
from ..released.gpu_check import RELEASED_SPECIAL_IDS
from .fsdp import (RELEASE_RECIPE, ReleaseRecipe, Sharding, build_model, export_released, load_checkpoint,
                   make_mesh, release_optimizer, released_full_state, save_checkpoint, train_step)
from .packing import collate_rows, pack_dialogues, synthetic_dialogues

__all__ = ["main"]


def _batches(config: FunAudioChatConfig, recipe: ReleaseRecipe, step: int, rank: int, device: torch.device,
             im_start_id: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``step``: ``grad_accumulation`` x ``micro_batch`` packed rows."""
    needed = recipe.micro_batch * recipe.grad_accumulation
    dialogues = synthetic_dialogues(config, 10 * needed, 1_000_003 * step + rank, im_start_id,
                                    user_groups=(50, 250), reply_groups=(50, 250))
    rows = pack_dialogues([len(d) for d in dialogues], recipe.cutoff)[:needed]
    if len(rows) < needed:
        raise ValueError(f"packing gave {len(rows)} rows of {recipe.cutoff}, need {needed}")
    batches = []
    for start in range(0, needed, recipe.micro_batch):
        batch = collate_rows([[dialogues[i] for i in row] for row in rows[start:start + recipe.micro_batch]],
                             recipe.cutoff, config)
        batches.append({name: tensor.to(device) for name, tensor in batch.items()})
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun ... -m fac_mini.scale.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a released-layout checkpoint folder (load_released)")
    parser.add_argument("--out", default="runs/full_scale", help="distributed checkpoints and the final export")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps (the schedule spans them)")
    parser.add_argument("--micro-batch", type=int, default=RELEASE_RECIPE.micro_batch, help="packed rows per GPU")
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--cutoff", type=int, default=RELEASE_RECIPE.cutoff)
    parser.add_argument("--lr", type=float, default=RELEASE_RECIPE.lr)
    parser.add_argument("--zero2", action="store_true", help="reshard_after_forward=False (the recipe's ZeRO-2)")
    parser.add_argument("--lora", action="store_true", help="LoRA (fac_mini.scale.lora) instead of full fine-tuning")
    parser.add_argument("--save-every", type=int, default=0, help="distributed checkpoint every N steps (0: never)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest --out/step-N")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("start it with torchrun (RANK/WORLD_SIZE are not set), e.g. torchrun --standalone "
                     "--nproc_per_node 8 -m fac_mini.scale.launch --checkpoint DIR")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        recipe = ReleaseRecipe(gpus=world, micro_batch=args.micro_batch, grad_accumulation=args.grad_accumulation,
                               cutoff=args.cutoff, lr=args.lr)
        config = FunAudioChatConfig.from_dict(json.loads((Path(args.checkpoint) / "config.json").read_text()))
        im_start = RELEASED_SPECIAL_IDS["<|im_start|>"] if config.text_config.vocab_size > 151644 else 1
        lora_config = full_state = None
        if args.lora:
            from ..released import load_released
            from .lora import add_lora, course_lora_config

            lora_config = course_lora_config()
            if rank == 0:                     # the released weights plus freshly initialised adapters
                full_state = add_lora(load_released(args.checkpoint), lora_config).state_dict()
        elif rank == 0:
            full_state = released_full_state(args.checkpoint)
        model = build_model(config, make_mesh(world, device.type), Sharding(reshard_after_forward=not args.zero2,
                                                                            mixed_precision=cuda),
                            full_state, lora=lora_config, device=device)
        del full_state
        optimizer = release_optimizer(model, recipe)
        out = Path(args.out)
        start = 0
        saved = sorted(out.glob("step-*"), key=lambda path: int(path.name.split("-")[1])) if args.resume else []
        if saved:
            start = load_checkpoint(model, optimizer, saved[-1])
        for step in range(start, args.steps):
            began = time.perf_counter()
            result = train_step(model, optimizer, _batches(config, recipe, step, rank, device, im_start), config,
                                recipe.lr_at(step, args.steps), recipe.clip_norm)
            if rank == 0:
                print(json.dumps({"step": step + 1, "loss": round(result.loss, 5),
                                  "grad_norm": round(result.grad_norm, 4),
                                  "lr": recipe.lr_at(step, args.steps),
                                  "seconds": round(time.perf_counter() - began, 3)}), flush=True)
            if args.save_every and (step + 1) % args.save_every == 0:
                save_checkpoint(model, optimizer, step + 1, out / f"step-{step + 1}")
        export_released(model, config, out / "released", dtype=torch.bfloat16 if cuda else None)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
