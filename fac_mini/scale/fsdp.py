"""The full-scale training step of ``FunAudioChat``, sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

The recipe, torchtitan-style (docs/full_scale.md §2), in the order the transforms are applied:

1. build on the ``meta`` device (shapes only; ``fac_mini.released.build_on_meta``), optionally with LoRA adapters;
2. activation checkpointing per transformer block: the LLM's 36 decoder layers, the SRH's 28 CRQ layers and the
   encoder's 32 layers (``checkpoint_wrapper``; the state-dict names stay the released ones);
3. ``fully_shard`` per block, then the LLM embedding, then ``[final norm, lm_head]`` as one unit, then the root
   (which keeps the rest: the speech embedding table tied to the SRH's ``lm_head``, the adapters, the convs);
   ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` for mixed precision, the fp32 shards being the
   master weights; ``reshard_after_forward=True`` frees each block's gathered weights after its forward (ZeRO-3
   semantics), ``False`` keeps them until the backward (ZeRO-2 semantics, the official recipe's engine);
4. ``to_empty`` on the device, then the weights by a rank-0 full-state-dict broadcast (rank 0 read the released
   checkpoint with ``load_released``; the others allocate only their shards);
5. the training step: the global batch split over ranks and micro-batches, each part's loss re-weighted by its
   share of the global scored-token counts so the sum is the single-process loss of the whole batch; gradient
   sync only on the last micro-batch (``set_requires_gradient_sync``); FSDP's own division of gradients by the
   world size turned off (``set_gradient_divide_factor(1.0)``); gradient clipping, AdamW, the release's schedule
   (warm-up 2 %, cosine to 0.1 of the peak);
6. distributed checkpoints (``torch.distributed.checkpoint``): every rank writes its shards, a resumed run
   continues bit for bit; export back to the released layout (``save_released``) from a gathered full state.

The same functions run without a process group (``mesh=None``): that is the single-process reference.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..model import FunAudioChat, FunAudioChatConfig
from ..released import build_on_meta, load_released, save_released
from ..released.checkpoint import recompute_buffers
from ..train.loop import warmup_cosine_lr
from .packing import scored_token_counts

__all__ = ["ReleaseRecipe", "RELEASE_RECIPE", "Sharding", "transformer_blocks", "apply_activation_checkpointing",
           "shard_model", "make_mesh", "build_model", "released_full_state", "full_state_dict", "load_full_state",
           "release_optimizer", "StepResult", "train_step", "save_checkpoint", "load_checkpoint", "export_released",
           "local_bytes"]


# ----------------------------------------------------------------------------------------------------------
# The release's hyper-parameters
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ReleaseRecipe:
    """The official recipe (``training/configs/sft.yaml`` with LLaMA-Factory's and HF Trainer's defaults;
    docs/full_scale.md §1): full fine-tuning, bf16, DeepSpeed ZeRO-2 on 4 GPUs."""
    gpus: int = 4
    micro_batch: int = 6               # per device
    grad_accumulation: int = 1
    cutoff: int = 2048                 # LLM positions per packed row (5 Hz)
    lr: float = 1e-5                   # peak
    min_lr_ratio: float = 0.1          # cosine_with_min_lr
    warmup_ratio: float = 0.02
    weight_decay: float = 0.0          # HF Trainer default
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 1.0             # HF Trainer max_grad_norm

    @property
    def global_batch(self) -> int:
        """Packed rows per optimiser step: GPUs x micro-batch x accumulation (24 in the release)."""
        return self.gpus * self.micro_batch * self.grad_accumulation

    def lr_at(self, step: int, steps: int) -> float:
        """Learning rate of 0-based ``step`` of ``steps``: linear warm-up over ``ceil(0.02 · steps)``, cosine
        decay to ``min_lr_ratio · lr`` (``fac_mini.train.loop.warmup_cosine_lr``)."""
        return warmup_cosine_lr(step, steps, self.lr, math.ceil(self.warmup_ratio * steps), self.min_lr_ratio)


RELEASE_RECIPE = ReleaseRecipe()


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How the model is sharded. ``reshard_after_forward``: True = ZeRO-3-like, False = ZeRO-2-like."""
    reshard_after_forward: bool = True
    mixed_precision: bool = False          # bf16 compute and gathers, fp32 master weights and gradient reduction
    activation_checkpointing: bool = True


# ----------------------------------------------------------------------------------------------------------
# Blocks, checkpointing, sharding
# ----------------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> FunAudioChat:
    """The ``FunAudioChat`` inside a peft model (``base_model.model``) or the model itself."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, FunAudioChat):
        raise ValueError(f"{type(model).__name__} is not a fac_mini FunAudioChat (or a peft model of one)")
    return inner


def transformer_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The three stacks of repeated blocks: ``{"llm": ..., "srh": ..., "encoder": ...}`` (ModuleLists)."""
    inner = _unwrap(model)
    return {"llm": inner.language_model.model.layers, "srh": inner.audio_invert_tower.crq_transformer.layers,
            "encoder": inner.continuous_audio_tower.layers}


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every transformer block in a non-reentrant ``checkpoint_wrapper`` (in place): its activations are
    recomputed in the backward instead of kept. ``get_model_state_dict`` strips the wrapper from the names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for blocks in transformer_blocks(model).values():
        for index, block in enumerate(blocks):
            blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def make_mesh(world_size: int, device_type: str = "cpu"):
    """The 1-D data-parallel device mesh, always explicit (``"cpu"`` gives gloo groups, ``"cuda"`` NCCL)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def shard_model(model: nn.Module, mesh, sharding: Sharding) -> None:
    """``fully_shard`` per block, the LLM embedding, ``[final norm, lm_head]`` and the root (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if sharding.mixed_precision else MixedPrecisionPolicy()
    options = {"mesh": mesh, "mp_policy": policy}
    for blocks in transformer_blocks(model).values():
        for block in blocks:
            fully_shard(block, reshard_after_forward=sharding.reshard_after_forward, **options)
    llm = _unwrap(model).language_model
    fully_shard(llm.model.embed_tokens, reshard_after_forward=sharding.reshard_after_forward, **options)
    # the output group is needed again right at the start of the backward: never resharded after the forward
    fully_shard([llm.model.norm, llm.lm_head], reshard_after_forward=False, **options)
    fully_shard(model, reshard_after_forward=sharding.reshard_after_forward, **options)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor") and hasattr(module, "set_requires_gradient_sync"):
            module.set_gradient_divide_factor(1.0)       # the loss is normalised by global token counts instead
            module.set_force_sum_reduction_for_comms(True)   # plain SUM collectives (gloo has no PREMUL_SUM)


def released_full_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The float32 state dict of a released-layout checkpoint (``load_released``): what rank 0 broadcasts."""
    return load_released(path, dtype=torch.float32).state_dict()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded (or plain) model, gathered, on CPU, with the unwrapped names. Collective: every
    rank must call it; with ``torch.distributed`` the full tensors land on rank 0 only (the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Fill a sharded model (after ``to_empty``) from rank 0's full state dict, broadcast shard by shard
    (``broadcast_from_rank0``); the other ranks pass ``None``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # a shallow copy: the broadcast replaces the dict's entries with the sharded results
    set_model_state_dict(model, dict(state or {}), options=StateDictOptions(full_state_dict=True,
                                                                      broadcast_from_rank0=True))


def build_model(config: FunAudioChatConfig, mesh=None, sharding: Sharding = Sharding(),
                full_state: dict[str, torch.Tensor] | None = None, lora: Any = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """The model ready to train: on ``meta`` -> (LoRA: ``fac_mini.scale.lora.add_lora(model, lora)``) ->
    activation checkpointing -> ``fully_shard`` (when ``mesh``) -> ``to_empty(device)`` -> weights.

    full_state: the full state dict (of the LoRA model when ``lora``), needed on rank 0 (single process: the only
    rank); None on the other ranks. Without a mesh the model is plain (the single-process reference).
    """
    device = torch.device(device)
    model: nn.Module = build_on_meta(config)
    if lora is not None:
        from .lora import add_lora

        with torch.device("meta"):
            model = add_lora(model, lora)
    if sharding.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is not None:
        shard_model(model, mesh, sharding)
    model.to_empty(device=device)
    inner = _unwrap(model)
    speech_table, srh_head = inner.audio_tower.embed_tokens, inner.audio_invert_tower.lm_head
    if srh_head.weight is not speech_table.weight:
        if mesh is not None:      # FSDP2 keeps one sharded tensor for the two names; anything else is a bug
            raise RuntimeError("fully_shard untied audio_invert_tower.lm_head from audio_tower.embed_tokens")
        srh_head.weight = speech_table.weight           # to_empty from meta makes one tensor per name: re-tie
    recompute_buffers(inner, device)
    if mesh is not None:
        load_full_state(model, full_state)
    else:
        if full_state is None:
            raise ValueError("a single-process model needs full_state (the weights to start from)")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True))
    return model.train()


def release_optimizer(model: nn.Module, recipe: ReleaseRecipe = RELEASE_RECIPE,
                      lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with the release's betas, eps and weight decay over the trainable parameters (the sharded ones)."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(trainable, lr=recipe.lr if lr is None else lr, betas=recipe.betas, eps=recipe.eps,
                             weight_decay=recipe.weight_decay)


# ----------------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepResult:
    """The global loss of the step (text + speech means over the whole global batch), its two parts, the
    global scored-token counts and the gradient norm before clipping."""
    loss: float
    text_loss: float
    speech_loss: float
    text_tokens: int
    speech_tokens: int
    grad_norm: float


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if hasattr(module, "set_requires_gradient_sync")]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]],
               config: FunAudioChatConfig, lr: float, clip_norm: float = RELEASE_RECIPE.clip_norm,
               autocast_dtype: torch.dtype | None = None) -> StepResult:
    """One optimiser step over this rank's ``micro_batches`` (its part of the global batch).

    Each micro-batch's losses (means) are re-weighted by its share of the *global* scored-token counts
    (all-reduced first), so that summed over micro-batches and ranks the objective is exactly the single-process

        loss = mean_text_CE(whole batch) + mean_speech_CE(whole batch).

    Gradients are synchronised (reduce-scattered) only in the last micro-batch's backward.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    counts = torch.tensor([scored_token_counts(config, batch) for batch in micro_batches], dtype=torch.float64)
    totals = counts.sum(dim=0)                                                   # (2,) this rank
    if _distributed():
        dist.all_reduce(totals)
    if (totals == 0).any():
        raise ValueError(f"the global batch scores {int(totals[0])} text and {int(totals[1])} speech tokens; "
                         "both must be > 0")
    for group in optimizer.param_groups:
        group["lr"] = lr
    fsdp_modules = _fsdp_modules(model)
    parts = torch.zeros(2, dtype=torch.float64)
    for index, (batch, (text_count, speech_count)) in enumerate(zip(micro_batches, counts.tolist())):
        for module in fsdp_modules:
            module.set_requires_gradient_sync(index == len(micro_batches) - 1)
        with torch.autocast("cuda" if batch["input_ids"].is_cuda else "cpu", dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            out = model(**batch)
        text = out.text_loss * (text_count / float(totals[0]))
        speech = out.speech_loss * (speech_count / float(totals[1]))
        (text + speech).backward()
        parts += torch.tensor([text.item(), speech.item()], dtype=torch.float64)
    if _distributed():
        dist.all_reduce(parts)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:       # unused this step (e.g. audio_bos_eos_token): a zero gradient, as in
        if parameter.grad is None:    # DeepSpeed's flat buffers; every tensor then has AdamW state to checkpoint
            parameter.grad = torch.zeros_like(parameter)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=float(parts.sum()), text_loss=float(parts[0]), speech_loss=float(parts[1]),
                      text_tokens=int(totals[0]), speech_tokens=int(totals[1]), grad_norm=float(grad_norm))


# ----------------------------------------------------------------------------------------------------------
# Distributed checkpoints and export
# ----------------------------------------------------------------------------------------------------------
def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, path: str | Path) -> Path:
    """A distributed checkpoint (``torch.distributed.checkpoint``): each rank writes its own shards of the
    weights and the AdamW state into ``path``, plus the step. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(step)},
             checkpoint_id=str(path))
    return Path(path)


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> int:
    """Load a ``save_checkpoint`` folder into a model sharded the same way (any fresh set of processes of the
    same world size); returns the step to continue from. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (Path(path) / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (no .metadata); save one with "
                                "fac_mini.scale.fsdp.save_checkpoint")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(state["step"])


def export_released(model: nn.Module, config: FunAudioChatConfig, path: str | Path,
                    dtype: torch.dtype | None = None) -> Path | None:
    """Gather the full weights and write them in the released layout with ``save_released`` (rank 0 writes;
    collective). A LoRA model is merged first (``merge_and_unload``). Returns the folder on rank 0, else None."""
    state = full_state_dict(model)
    if _distributed() and dist.get_rank() != 0:
        return None
    if hasattr(model, "peft_config"):
        from .lora import merged_state_dict

        state = merged_state_dict(config, state, model.peft_config["default"])
    plain = build_on_meta(config)
    plain.load_state_dict({name: tensor if dtype is None else tensor.to(dtype) for name, tensor in state.items()},
                          assign=True)
    plain.audio_invert_tower.lm_head.weight = plain.audio_tower.embed_tokens.weight   # re-tie (one tensor)
    recompute_buffers(plain, torch.device("cpu"))
    return save_released(plain, path)


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor counts its local shard only)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total
