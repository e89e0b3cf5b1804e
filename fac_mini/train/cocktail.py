"""Core-Cocktail (paper §2.4, eq. 7): catastrophic forgetting measured on the mini Fun-Audio-Chat, then cured.

Every run starts from the pre-aligned model (``data/prealign``: M0's LLM frozen until now), trains on the same
dialogue data (``fac_mini.dialogue``: spoken questions about the speech facts -> text, and -> text + speech) and
sees the same batches in the same order (a run of stage 2 continues the sampler where stage 1 stopped):

    stage 1         full fine-tuning (LLM, encoder, adapter, grouping, SRH) at the high LR, cosine to 1/10
    merge           M_r = α·M_1 + (1 − α)·M_0 on the LLM tensors, M_1's values elsewhere (``fac_mini.merging``)
    stage 2         full fine-tuning of M_r at the low LR (1/10 of stage 1's), cosine to 1/10
    baselines       low LR only, high LR only (both one stage over stage 1 + stage 2 steps), and stage 1 + stage 2
                    without the merge (= α = 1)
    α sweep         α ∈ {0, 0.25, 0.5, 0.75, 1}, measured after the merge and after stage 2 (WiSE-FT style)

The paper's rates are 1e-4 -> 1e-5 and 1e-5 -> 1e-6 for an 8B model; "high" here is what measurably erases the
mini LLM's text knowledge within stage 1 (M0 itself was pretrained at a peak of 3e-3).

Every checkpoint is measured by :func:`fac_mini.train.prealign.evaluate_mllm` on its weights as shipped
(float16, the storage precision of ``data/cocktail``): T2T knowledge, S2T on trained and held-out facts, S2M
speech-token accuracy and the CTC read-back of the generated speech. Stage 1 and the two one-stage baselines
also log a cheap probe every ``eval_every`` steps (T2T answer NLL, S2T answer NLL and S2M speech loss on the
held-out phrasing): the forgetting curve of notebook 11.

Shipped (``--out data/cocktail``): the Core-Cocktail model (α = 0.5 after stage 2) and ``manifest.json`` with
every run's curves and metrics; the other checkpoints go to ``data/cache/cocktail/`` (rebuilt by the command).
Resumable: each run keeps its state in ``--state-dir``, and each measurement is cached under its run key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import CACHE_DIR, DATA_DIR
from ..dialogue import DialogueExample, collate_dialogue
from ..merging import core_cocktail_merge, prefix_state_dict
from ..model import FunAudioChat
from .cli import (RecipeParser, add_eval_flags, add_train_flags, output_folder, positive_float, positive_int,
                  run_command, write_manifest)
from .loop import TrainConfig, TrainResult, torch_threads, train
from .m0 import M0_DIR, collate as collate_text, encode_qa, evaluate_knowledge, load_m0
from .prealign import (EVAL_SETS, PREALIGN_DIR, TRAINED_SAMPLE, DialogueRecipe, add_sets_flag, evaluate_mllm,
                       load_dialogue, load_mllm, save_mllm)
from .seal import refresh_seal
from .srh_study import QueueSampler
from .store import atomic_directory, atomic_write_json, file_sha256, read_json

__all__ = [
    "COCKTAIL_DIR", "TRAIN_COMMAND", "ALPHAS", "MIX", "CocktailPlan", "SHIPPED_PLAN", "SkippingSampler",
    "forgetting_probe", "run_cocktail", "recovery", "main_train", "main_eval",
]

COCKTAIL_DIR = DATA_DIR / "cocktail"
RUNS_CACHE = CACHE_DIR / "cocktail"
TRAIN_COMMAND = "python -m fac_mini cocktail train"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIX = ("train_s2t", "train_s2m")
SHIPPED_ALPHA = 0.5                    # Fun-Audio-Chat's α
STORE_DTYPE = torch.float16            # the shipped model's storage precision; every checkpoint is measured so
MEASURED_SETS = (*EVAL_SETS, TRAINED_SAMPLE)     # the held-out sets, and a sample of the training chats (fit)


@dataclasses.dataclass(frozen=True)
class CocktailPlan:
    """Steps and rates of every run (batch, warm-up fraction and seed shared)."""

    stage1_steps: int = 200
    stage2_steps: int = 100
    high_lr: float = 1e-3              # stage 1 and the high-LR-only baseline (paper: 1e-4)
    low_lr: float = 1e-4               # stage 2 and the low-LR-only baseline (paper: 1e-5)
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 25               # steps between forgetting probes (stage 1 and the one-stage baselines)

    def config(self, steps: int, lr: float, probe: bool) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=lr, warmup=max(1, steps // 10),
                           min_lr_ratio=0.1, weight_decay=0.01, seed=self.seed, log_every=10,
                           eval_every=self.eval_every if probe else steps, checkpoint_every=50)

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


SHIPPED_PLAN = CocktailPlan()


class SkippingSampler(QueueSampler):
    """``QueueSampler`` that first draws and drops ``skip`` batches: stage 2 sees the batches that come after
    stage 1's, so stage 1 + stage 2 and a one-stage run over the same total steps see the same data."""

    def __init__(self, size: int, batch_size: int, seed: int, skip: int = 0):
        super().__init__(size, batch_size, seed)
        for _ in range(skip):
            self.next_batch()


class StageRecipe(DialogueRecipe):
    """A full fine-tuning run (nothing frozen) from a given state dict, sampler skipping ``skip`` batches."""

    def __init__(self, name: str, examples, tensors, tokenizer, start_state: dict[str, torch.Tensor], skip: int):
        digest = hashlib.sha256()
        for key, tensor in sorted(start_state.items()):
            digest.update(key.encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        super().__init__(name, examples, tensors, tokenizer, start=self._start, start_digest=digest.hexdigest(),
                         freeze_llm=False)
        self.start_state, self.skip = start_state, skip

    def _start(self) -> FunAudioChat:
        model = load_mllm(PREALIGN_DIR)               # the architecture (and the pre-aligned weights) ...
        model.load_state_dict(self.start_state, strict=False)      # ... replaced by the run's start
        return model

    def build_sampler(self, config: TrainConfig) -> SkippingSampler:
        return SkippingSampler(len(self.examples), config.batch_size, config.seed, self.skip)

    def fingerprint(self) -> Any:
        return {**super().fingerprint(), "skip": self.skip}


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------
def _stored(model: FunAudioChat) -> FunAudioChat:
    """The model with every tensor rounded to the storage precision (what the shipped file holds)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(STORE_DTYPE).float())
    return model


class ForgettingProbe:
    """Cheap teacher-forced measurements for the training curves: T2T answer NLL on M0's 160 held-out questions,
    S2T answer NLL and S2M speech loss on the spoken held-out phrasing about speech facts (80)."""

    def __init__(self, data, tensors, tokenizer):
        from ..world import build_world

        self.tokenizer, self.tensors = tokenizer, tensors
        questions = build_world(0).questions("heldout")
        self.text = collate_text([encode_qa(tokenizer, q.text, q.answer) for q in questions], tokenizer.pad_token_id)
        self.spoken = list(data["heldout_speech_facts"])

    @torch.no_grad()
    def __call__(self, model: FunAudioChat) -> dict[str, float]:
        text = model.language_model(self.text["input_ids"], attention_mask=self.text["attention_mask"],
                                    labels=self.text["labels"]).loss
        s2t, s2m = [], []
        for kind, losses in (("s2t", s2t), ("s2m", s2m)):
            for start in range(0, len(self.spoken), 40):
                chunk = [dataclasses.replace(e, kind=kind) for e in self.spoken[start:start + 40]]
                out = model(**collate_dialogue(chunk, self.tensors, self.tokenizer, model.config))
                losses.append(float(out.text_loss if kind == "s2t" else out.speech_loss))
        return {"t2t_nll": round(float(text), 4), "s2t_nll": round(sum(s2t) / len(s2t), 4),
                "s2m_speech_loss": round(sum(s2m) / len(s2m), 4)}


def forgetting_probe(data, tensors, tokenizer) -> ForgettingProbe:
    """The probe the runs log every ``eval_every`` steps (see :class:`ForgettingProbe`)."""
    return ForgettingProbe(data, tensors, tokenizer)


def recovery(base: float, cured: float, forgotten: float) -> float | None:
    """Share of the loss recovered: (cured − forgotten) / (base − forgotten) (DrVoice: (74.73 − 70.19) /
    (81.77 − 70.19) = 0.39); None when nothing was lost."""
    lost = base - forgotten
    return None if abs(lost) < 1e-12 else round((cured - forgotten) / lost, 4)


# ----------------------------------------------------------------------------------------------------------
# The whole recipe
# ----------------------------------------------------------------------------------------------------------
def _state_key(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        digest.update(key.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_cocktail(plan: CocktailPlan = SHIPPED_PLAN, *, state_dir=None, resume: bool = True, threads: int = 1,
                 progress: bool = True, runs_dir: Path | str = RUNS_CACHE, alphas: Sequence[float] = ALPHAS,
                 s2m_replies: int = 12, eval_limit: int | None = None) -> dict[str, Any]:
    """Train and measure every run of the module doc. Returns ``{"runs": {name: {"metrics", "log", ...}},
    "models": {name: FunAudioChat}}`` (models as stored, float16-rounded); checkpoints are written (float32) to
    ``runs_dir/<name>``, measurements cached there by weight hash, so an interrupted command resumes.
    ``eval_limit``: measure only the first N examples of each evaluation set (quick checks)."""
    data, tensors, tokenizer = load_dialogue(progress)
    examples: list[DialogueExample] = [e for name in MIX for e in data[name]]
    probe = forgetting_probe(data, tensors, tokenizer)
    runs_dir = Path(runs_dir)
    m0, _ = load_m0(M0_DIR)
    base_state = prefix_state_dict(m0.state_dict(), "language_model.")
    prealigned = load_mllm(PREALIGN_DIR)
    runs: dict[str, dict[str, Any]] = {}
    models: dict[str, FunAudioChat] = {}

    def measure(name: str, model: FunAudioChat, **extra) -> None:
        model = _stored(model)
        key = _state_key(model.state_dict())
        settings = hashlib.sha256(json.dumps([MEASURED_SETS, eval_limit, s2m_replies]).encode()).hexdigest()[:8]
        cache = runs_dir / name / f"metrics-{key}-{settings}.json"
        if cache.is_file():
            metrics = read_json(cache, "cached metrics")
        else:
            with torch_threads(threads):
                metrics = evaluate_mllm(model, data, tensors, tokenizer, s2m_replies=s2m_replies, limit=eval_limit,
                                        sets=MEASURED_SETS)
            save_mllm(model, runs_dir / name)
            atomic_write_json(cache, metrics)
        runs[name] = {"metrics": metrics, "weights_sha256_16": key, **extra}
        models[name] = model
        if progress:
            print(f"[cocktail] {name}: T2T exact {metrics['t2t']['exact_match']:.3f}, S2T held-out facts "
                  f"{metrics['heldout_text_facts']['s2t_fact_accuracy']:.3f}", file=sys.stderr)

    def run(name: str, start: dict[str, torch.Tensor], config: TrainConfig, skip: int, probed: bool) -> TrainResult:
        recipe = StageRecipe(f"cocktail-{name}", examples, tensors, tokenizer, start, skip)
        return train(recipe, config, state_dir=state_dir, resume=resume, threads=threads, progress=progress,
                     evaluate=probe if probed else None)

    start = {k: v.clone() for k, v in prealigned.state_dict().items()}
    measure("prealigned", load_mllm(PREALIGN_DIR), steps=0)
    with torch_threads(threads):
        start_probe = probe(prealigned)
    stage1 = run("stage1", start, plan.config(plan.stage1_steps, plan.high_lr, True), 0, True)
    stage1_state = {k: v.clone() for k, v in stage1.model.state_dict().items()}
    stage1_log = [{"step": 0, **start_probe}] + stage1.log
    for alpha in alphas:
        merged = core_cocktail_merge(stage1_state, base_state, alpha)
        model = load_mllm(PREALIGN_DIR)
        model.load_state_dict(merged, strict=False)
        measure(f"merge_a{alpha:g}", model, steps=plan.stage1_steps, alpha=alpha,
                **({"log": stage1_log, "train_seconds": stage1.train_seconds} if alpha == 1.0 else {}))
        stage2 = run(f"stage2_a{alpha:g}", merged, plan.config(plan.stage2_steps, plan.low_lr, False),
                     plan.stage1_steps, False)
        measure(f"stage2_a{alpha:g}", stage2.model, steps=plan.total_steps, alpha=alpha, log=stage2.log,
                train_seconds=stage2.train_seconds)
    for name, lr in (("low_lr_only", plan.low_lr), ("high_lr_only", plan.high_lr)):
        result = run(name, start, plan.config(plan.total_steps, lr, True), 0, True)
        measure(name, result.model, steps=plan.total_steps, log=[{"step": 0, **start_probe}] + result.log,
                train_seconds=result.train_seconds)
    return {"runs": runs, "models": models}


def _summary(runs: dict[str, Any], m0_t2t: dict[str, float]) -> dict[str, Any]:
    """The goals of the issue, computed from the runs (T2T on exact match and on answer NLL)."""
    cc, s1, hi, lo = (runs[n]["metrics"] for n in (f"stage2_a{SHIPPED_ALPHA:g}", "merge_a1", "high_lr_only",
                                                     "low_lr_only"))
    out: dict[str, Any] = {"m0_t2t_exact_match": m0_t2t["exact_match"], "m0_t2t_answer_nll": m0_t2t["answer_nll"]}
    for label, forgotten in (("stage1", s1), ("high_lr_only", hi)):
        out[f"recovery_exact_vs_{label}"] = recovery(m0_t2t["exact_match"], cc["t2t"]["exact_match"],
                                                     forgotten["t2t"]["exact_match"])
        out[f"recovery_nll_vs_{label}"] = recovery(m0_t2t["answer_nll"], cc["t2t"]["answer_nll"],
                                                   forgotten["t2t"]["answer_nll"])
        out[f"t2t_ordering_exact_vs_{label}"] = bool(m0_t2t["exact_match"] > cc["t2t"]["exact_match"]
                                                     > forgotten["t2t"]["exact_match"])
        out[f"t2t_ordering_nll_vs_{label}"] = bool(m0_t2t["answer_nll"] < cc["t2t"]["answer_nll"]
                                                   < forgotten["t2t"]["answer_nll"])
    out["heldout_s2t_fact_accuracy"] = {"core_cocktail": cc["heldout_text_facts"]["s2t_fact_accuracy"],
                                        "low_lr_only": lo["heldout_text_facts"]["s2t_fact_accuracy"]}
    out["heldout_s2t_at_least_low_lr"] = bool(cc["heldout_text_facts"]["s2t_fact_accuracy"]
                                              >= lo["heldout_text_facts"]["s2t_fact_accuracy"])
    out["trained_sample_s2t_fact_accuracy"] = {name: runs[name]["metrics"][TRAINED_SAMPLE]["s2t_fact_accuracy"]
                                               for name in ("prealigned", "merge_a1", f"stage2_a{SHIPPED_ALPHA:g}",
                                                            "low_lr_only", "high_lr_only")}
    return out


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def _plan_flags(parser) -> None:
    p = SHIPPED_PLAN
    parser.add_argument("--stage1-steps", type=positive_int, default=p.stage1_steps, help="(%(default)s)")
    parser.add_argument("--stage2-steps", type=positive_int, default=p.stage2_steps, help="(%(default)s)")
    parser.add_argument("--high-lr", type=positive_float, default=p.high_lr, help="stage 1 peak LR (%(default)s)")
    parser.add_argument("--low-lr", type=positive_float, default=p.low_lr, help="stage 2 peak LR (%(default)s)")
    parser.add_argument("--eval-every", type=positive_int, default=p.eval_every, help="(%(default)s)")


def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini cocktail train``: stage 1, the α sweep, stage 2, the baselines; writes the Core-Cocktail
    model and the manifest (the shipped ``data/cocktail`` only with ``--out data/cocktail`` and the defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = SHIPPED_PLAN
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    add_train_flags(parser, "cocktail", p.config(p.stage1_steps, p.high_lr, True))
    _plan_flags(parser)
    args = parser.parse_args(argv)
    if args.steps != p.stage1_steps or args.lr != p.high_lr:
        parser.error("use --stage1-steps/--stage2-steps and --high-lr/--low-lr (--steps and --lr are not used here)")
    shipped = {"batch_size": p.batch_size, "seed": p.seed, "threads": 1, "stage1_steps": p.stage1_steps,
               "stage2_steps": p.stage2_steps, "high_lr": p.high_lr, "low_lr": p.low_lr, "eval_every": p.eval_every}
    out = output_folder(parser, args, "cocktail", COCKTAIL_DIR, shipped)
    plan = CocktailPlan(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, high_lr=args.high_lr,
                        low_lr=args.low_lr, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every)
    started = time.perf_counter()
    result = run_cocktail(plan, state_dir=args.state_dir, resume=not args.restart, threads=args.threads)
    m0, tokenizer = load_m0(M0_DIR)
    with torch_threads(args.threads):
        m0_t2t = evaluate_knowledge(m0, tokenizer, "heldout")
    m0_t2t = {k: m0_t2t[k] for k in ("exact_match", "fact_accuracy", "answer_nll")}
    runs = result["runs"]
    shipped_name = f"stage2_a{SHIPPED_ALPHA:g}"
    with atomic_directory(out) as folder:
        files = save_mllm(result["models"][shipped_name], folder, dtype=STORE_DTYPE)
        manifest = write_manifest(
            folder, "cocktail", run_command(TRAIN_COMMAND, argv), files, plan=dataclasses.asdict(plan),
            threads=args.threads, shipped_run=shipped_name, alphas=list(ALPHAS), mix=list(MIX),
            prealign_sha256=file_sha256(PREALIGN_DIR / "model.safetensors"), m0_t2t=m0_t2t,
            train_seconds_all_runs=round(sum(run.get("train_seconds", 0.0) for run in runs.values()), 1),
            wall_seconds_this_invocation=round(time.perf_counter() - started, 1), summary=_summary(runs, m0_t2t),
            runs=runs)
    refresh_seal(out)
    print(json.dumps({"out": str(out), "train_seconds_all_runs": manifest["train_seconds_all_runs"],
                      "summary": manifest["summary"]}, indent=1))
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini cocktail eval``: re-measure the shipped Core-Cocktail model (default data/cocktail) and
    print it beside the manifest's numbers; ``--run NAME`` measures a cached checkpoint of ``data/cache/cocktail``."""
    parser = RecipeParser(prog="python -m fac_mini cocktail eval", description=main_eval.__doc__)
    add_eval_flags(parser, COCKTAIL_DIR)
    parser.add_argument("--run", default=None, help="a run of data/cache/cocktail (e.g. stage1 is merge_a1)")
    add_sets_flag(parser, MEASURED_SETS)
    args = parser.parse_args(argv)
    manifest = read_json(Path(args.path) / "manifest.json", "Core-Cocktail manifest",
                         f"rebuild it with `{TRAIN_COMMAND} --out data/cocktail`")
    name = args.run or manifest["shipped_run"]
    folder = Path(args.path) if args.run is None else RUNS_CACHE / args.run
    if name not in manifest["runs"]:
        parser.error(f"--run {name!r} is not a run of {args.path}; choose from {sorted(manifest['runs'])}")
    model = _stored(load_mllm(folder))
    data, tensors, tokenizer = load_dialogue(progress=not args.json)
    with torch_threads(args.threads):
        metrics = evaluate_mllm(model, data, tensors, tokenizer, limit=args.limit, sets=args.sets)
    recorded = manifest["runs"][name]["metrics"]
    same = all(metrics[key] == recorded.get(key) for key in metrics)
    if args.json:
        print(json.dumps({"run": name, "metrics": metrics, "matches_manifest": same}))
        return 0
    print(f"{name} ({folder}): T2T exact {metrics['t2t']['exact_match']:.3f} (manifest "
          f"{recorded['t2t']['exact_match']:.3f}); identical to the manifest on every set measured: {same}")
    for set_name in args.sets:
        row = metrics[set_name]
        print(f"  {set_name:<26} S2T exact {row['s2t_exact_match']:.3f} fact {row['s2t_fact_accuracy']:.3f} "
              f"NLL {row['s2t_answer_nll']:.3f} | S2M speech acc {row['s2m_speech_accuracy']:.3f}")
    return 0
