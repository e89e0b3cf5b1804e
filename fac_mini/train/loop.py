"""The one training loop of the course: every recipe (M0, the speech tokenizer, the SRH study, and the later
stages) is a :class:`Recipe` handed to :func:`train`.

What the loop owns, so that no recipe writes it again:

- seeding: ``set_seed(seed)`` right before ``recipe.build_model()`` (the initial weights), and the batch order from
  the recipe's sampler, which draws only from its own ``torch.Generator``;
- the schedule: linear warm-up to the peak learning rate, cosine decay to ``min_lr_ratio · peak``
  (:func:`warmup_cosine_lr`), written into every parameter group before each step; gradient clipping;
- periodic evaluation on held-out data with best-on-dev selection (the weights with the lowest ``select`` metric
  are returned);
- a tqdm bar; a log of mean training loss and learning rate every ``log_every`` steps;
- an atomic, resumable state (model, optimiser, sampler, global RNG, step, log, best weights, elapsed time) every
  ``checkpoint_every`` steps, keyed by a hash of the config, hyper-parameters and data: rerunning the same command
  continues from it and ends with bit-identical weights (same machine and thread count).

The recipe's manifest (metrics, seconds, command, library versions, sha256 of every artefact) is written by
:func:`fac_mini.train.cli.write_manifest` after the artefacts are saved.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from .. import set_seed
from .store import atomic_write

__all__ = ["TrainConfig", "Recipe", "Sampler", "TrainResult", "train", "warmup_cosine_lr", "run_key", "adamw", "torch_threads"]


def warmup_cosine_lr(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Learning rate of 0-based ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to
    ``floor · peak`` at ``steps``.

    $$\\eta_s = \\eta\\,\\frac{s+1}{w}\\ (s < w), \\qquad
      \\eta_s = \\eta\\left(f + (1-f)\\,\\tfrac12\\left(1+\\cos\\pi\\,\\min(1, \\tfrac{s-w}{S-w})\\right)\\right)$$
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The hyper-parameters every recipe shares (a recipe's own live in its model config)."""
    steps: int
    batch_size: int
    lr: float                       # peak learning rate
    warmup: int = 100               # warm-up steps
    min_lr_ratio: float = 0.1       # the cosine decays to min_lr_ratio * lr
    weight_decay: float = 0.01
    clip_norm: float = 1.0          # gradient clipping (global L2 norm)
    seed: int = 0
    log_every: int = 10             # one log row per log_every steps
    eval_every: int = 100           # steps between held-out evaluations (if the recipe has any)
    checkpoint_every: int = 100     # steps between state saves

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not self.clip_norm > 0 or self.weight_decay < 0:
            raise ValueError(f"need clip_norm > 0 and weight_decay >= 0, got {self.clip_norm}, {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Sampler(Protocol):
    """Batches of example indices, drawn only from the sampler's own generator, with a resumable state."""

    def next_batch(self) -> list[int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Recipe(Protocol):
    """What a recipe gives the loop. ``evaluate`` and ``select`` are optional (``select=None``: no selection)."""
    name: str

    def build_model(self) -> torch.nn.Module: ...
    def build_optimizer(self, model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer: ...
    def build_sampler(self, config: TrainConfig) -> Sampler: ...
    def loss(self, model: torch.nn.Module, batch: list[int]) -> torch.Tensor: ...   # or (loss, {name: float})
    def fingerprint(self) -> Any: ...   # JSON-able, or bytes: everything besides TrainConfig that fixes the run


def adamw(model: torch.nn.Module, config: TrainConfig, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, decay_matrices_only: bool = False) -> torch.optim.AdamW:
    """AdamW at ``config.lr`` with ``config.weight_decay``; with ``decay_matrices_only`` norms and biases
    (tensors of dimension < 2) are not decayed, as in LLM pretraining."""
    if not decay_matrices_only:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=betas, eps=eps,
                                 weight_decay=config.weight_decay)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=betas, eps=eps)


def run_key(config: TrainConfig, fingerprint: Any, threads: int) -> str:
    """12 hex digits of a hash of everything that fixes a run (a state is resumed only by the same run)."""
    digest = hashlib.sha256(json.dumps([config.to_dict(), threads], sort_keys=True).encode())
    digest.update(fingerprint if isinstance(fingerprint, bytes) else
                  json.dumps(fingerprint, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


@dataclasses.dataclass
class TrainResult:
    model: torch.nn.Module
    log: list[dict[str, Any]]       # {"step", "loss", "lr"} rows and, with evaluation, {"step", <metrics>} rows
    step: int                       # steps done (< config.steps when stopped early)
    train_seconds: float
    run_key: str
    best_step: int | None = None    # the step whose weights were returned (best on dev), if the recipe selects


def train(recipe: Recipe, config: TrainConfig, *, state_dir: Path | str | None = None, resume: bool = True,
          stop_after: int | None = None, threads: int | None = 1, progress: bool = True,
          evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          select: str | None = None) -> TrainResult:
    """Train ``recipe`` for ``config.steps`` steps; return a :class:`TrainResult`.

    ``evaluate(model) -> {metric: value}`` runs every ``config.eval_every`` steps and at the last step (model in
    eval mode, then back to train mode); its rows go into the log. With ``select`` (a metric name, lower is
    better) the weights of the best evaluation are returned and a row ``{"best_step", select}`` closes the log.
    ``state_dir``: where the resumable state ``<recipe>-<run key>.pt`` is written (None: no state).
    ``stop_after``: stop after that many steps in all, as if interrupted (state saved, model returned as is).
    ``threads``: torch threads while training (restored after); bitwise reproduction needs the same count.
    ``recipe.loss`` may return ``(loss, {name: float})``: those values are averaged over each log window and
    logged beside the loss (e.g. DPO's reward margin and accuracy).
    """
    from tqdm.auto import tqdm

    if select is not None and evaluate is None:
        raise ValueError("select needs an evaluate function")
    if stop_after is not None and stop_after <= 0:
        raise ValueError(f"stop_after must be positive, got {stop_after}")
    with torch_threads(threads):
        key = run_key(config, recipe.fingerprint(), torch.get_num_threads())
        state_path = None if state_dir is None else Path(state_dir) / f"{recipe.name}-{key}.pt"
        set_seed(config.seed)                          # the initial weights come from the global RNG
        model = recipe.build_model().train()
        optimizer = recipe.build_optimizer(model, config)
        sampler = recipe.build_sampler(config)
        step, log, window, best, elapsed = 0, [], [], None, 0.0
        extras: dict[str, list[float]] = {}                # the recipe's own training metrics of the window
        if resume and state_path is not None and state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            step, log, window, best, elapsed = (state["step"], state["log"], state["window"], state["best"],
                                                state["elapsed_s"])
            extras = state.get("extras", {})

        def save_state() -> None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(), "step": step,
                     "log": log, "window": window, "extras": extras, "best": best, "elapsed_s": elapsed,
                     "run_key": key,
                     "config": config.to_dict()}
            atomic_write(state_path, lambda tmp: torch.save(state, tmp))

        last = config.steps if stop_after is None else min(config.steps, stop_after)
        started = time.perf_counter()
        bar = tqdm(total=config.steps, initial=step, desc=recipe.name, disable=not progress, dynamic_ncols=True)
        while step < last:
            batch = sampler.next_batch()
            lr = warmup_cosine_lr(step, config.steps, config.lr, config.warmup, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = recipe.loss(model, batch)
            if isinstance(loss, tuple):
                loss, train_metrics = loss
                for name, value in train_metrics.items():
                    extras.setdefault(name, []).append(float(value))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            step += 1
            window.append(loss.item())
            if step % config.log_every == 0 or step == config.steps:
                log.append({"step": step, "loss": round(sum(window) / len(window), 5), "lr": round(lr, 8),
                            **{name: round(sum(values) / len(values), 5) for name, values in extras.items()}})
                window, extras = [], {}
                bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
            if evaluate is not None and (step % config.eval_every == 0 or step == config.steps):
                model.eval()
                measured = evaluate(model)
                model.train()
                log.append({"step": step, **measured})
                if select is not None and (best is None or measured[select] < best[0]):
                    best = (measured[select], step, copy.deepcopy(model.state_dict()))
            bar.update(1)
            if state_path is not None and (step % config.checkpoint_every == 0 or step == last):
                elapsed += time.perf_counter() - started
                started = time.perf_counter()
                save_state()
        bar.close()
        elapsed += time.perf_counter() - started
    best_step = None
    if step == config.steps and best is not None:
        model.load_state_dict(best[2])
        best_step = best[1]
        log = log + [{"best_step": best_step, select: best[0]}]
    return TrainResult(model.eval(), log, step, round(elapsed, 1), key, best_step)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(threads)`` (None: leave the setting), restored afterwards; the
    block receives the thread count in use."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
