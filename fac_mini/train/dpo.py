"""Multi-task DPO of the mini Fun-Audio-Chat (paper §2.4, the third training stage), on the shared loop.

Start: the Core-Cocktail model (``data/cocktail``), which is also the frozen reference π_ref. Data: the preference
pairs of ``fac_mini.preference`` (robustness, style, voice), built once from the reference's own replies. One loss
across all dimensions (the paper's "multi-task"): each batch mixes pairs of every task,

    L = L_DPO(β) + w · L_SFT(chosen) + λ · L_text          (w = λ = 1)

CosyVoice's recipe (DPO plus the chosen reply's cross-entropy) and a replay of M0's written training questions
(``L_text``), which keeps the LLM's text knowledge: without it, a first trial lost 38 points of T2T exact match.
log π(y|x) is the sum over the reply's text *and* speech labels (``fac_mini.dpo.funaudiochat_logps``).

What is trained: LoRA adapters (rank 16) on every projection of the LLM, the SRH and the audio encoder, plus the
small matching layers in full (``fac_mini.scale.lora``'s choice, with the encoder added: the voice task needs what
the encoder hears). Two reasons for LoRA: the reference is the same network with the adapters switched off (B = 0
at the start, so π_θ = π_ref exactly and the first loss is ln 2), and each trained model is a 1.2 MB float16 adapter, so
all three seeds ship and ``dpo eval`` re-measures the spread.

The recipe (``python -m fac_mini dpo train``, 400 steps per run): a β sweep at the first seed (β ∈ {0.01, 0.1}:
CosyVoice's and trl's default; a strong leash, 0.5, was worst on every task in the exploration of docs/dpo.md §9),
β chosen by the mean of the three tasks' primary dev metrics, two more seeds at that β, and an SFT-only baseline
(L_SFT + L_text alone, the same chosen replies) that shows what the preference term adds. Every run is measured on the held-out test prompts (``fac_mini.preference.evaluation_prompts``) and on
the guards: T2T knowledge (M0's held-out probe) and clean S2T answers to the held-out questions.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import CACHE_DIR, DATA_DIR
from ..dialogue import answer_has_fact
from ..dpo import dpo_loss, dpo_metrics, funaudiochat_logps, sft_loss
from ..model import FunAudioChat
from ..world import build_world
from ..preference import (DIMENSIONS, PREFERENCE_CACHE, PreferencePair, Prompt, build_pairs, collate_pairs,
                          evaluation_prompts, generate_replies, load_pairs, pair_summary, pairs_fingerprint,
                          prompt_tensors, reply_attribute, save_pairs, score_replies, training_prompts)
from .cli import (RecipeParser, add_eval_flags, add_train_flags, output_folder, positive_float, positive_int,
                  run_command, write_manifest)
from .cocktail import COCKTAIL_DIR
from .loop import TrainConfig, torch_threads, train
from .m0 import collate as collate_text, encode_qa, evaluate_knowledge
from .prealign import load_dialogue, load_mllm
from .seal import refresh_seal
from .srh_study import QueueSampler
from .store import (atomic_directory, atomic_write, atomic_write_json, file_sha256, read_json, read_safetensors,
                    save_safetensors)

__all__ = ["DPO_DIR", "TRAIN_COMMAND", "PRIMARY", "DPOPlan", "SHIPPED_PLAN", "PreferenceSet", "prepare",
           "sequence_logps", "DPORecipe", "measure", "load_dpo", "load_chat_model", "run_dpo", "summarize",
           "main_train", "main_eval"]

DPO_DIR = DATA_DIR / "dpo"
BASE_DIR = COCKTAIL_DIR
TRAIN_COMMAND = "python -m fac_mini dpo train"
RUNS_CACHE = CACHE_DIR / "dpo"
CONFIG_FILE = "config.json"
PAIRS_SAMPLE = "pairs_sample.jsonl"
SAMPLE_PER_GROUP = 8
ENCODER_TARGETS = r"continuous_audio_tower\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)"
PRIMARY = {"robustness": "attribute_accuracy", "style": "compliance", "voice": "accuracy"}
GUARD_DROP = 0.02                  # T2T and S2T may not fall by more than 2 points


@dataclass(frozen=True)
class DPOPlan:
    """Every run's hyper-parameters (seeds: the sweep's and the shipped run's seed first)."""

    steps: int = 400
    batch_size: int = 8                          # pairs per step: 16 chats per forward
    lr: float = 5e-3                             # LoRA's usual rates are ~10x full fine-tuning's
    betas: tuple[float, ...] = (0.01, 0.1)
    seeds: tuple[int, ...] = (0, 1, 2)
    sft_weight: float = 1.0                      # CosyVoice: unweighted
    replay_weight: float = 1.0                   # M0's written QA replayed beside the pairs (the T2T guard)
    rank: int = 16
    alpha: int = 32
    eval_every: int = 200

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=max(1, self.steps // 10),
                           min_lr_ratio=0.1, weight_decay=0.0, seed=seed, log_every=5, eval_every=self.eval_every,
                           checkpoint_every=100)

    def lora(self):
        """The course's LoRA (LLM and SRH projections, matching layers in full) plus LoRA on the audio encoder's
        projections: the voice task needs what the encoder hears, not only what the LLM reads."""
        from peft import LoraConfig

        from ..scale.lora import LORA_MODULES_TO_SAVE, LORA_TARGETS

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=f"(?:{LORA_TARGETS})|(?:{ENCODER_TARGETS})",
                          modules_to_save=list(LORA_MODULES_TO_SAVE))


SHIPPED_PLAN = DPOPlan()


# ----------------------------------------------------------------------------------------------------------
# Data: pairs, tensors and the reference's log-probabilities
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PreferenceSet:
    """Everything a DPO run reads: pairs ``{"train", "dev"}``, the dev and test prompts, the tensors of every clip,
    the reference's summed log-probs of each pair's chosen / rejected reply, and the tokenizer."""

    pairs: dict[str, list[PreferencePair]]
    reference: dict[str, dict[str, torch.Tensor]]
    dev_prompts: list[Prompt]
    test_prompts: list[Prompt]
    tensors: dict[str, dict[str, torch.Tensor]]
    tokenizer: Any
    data: Any
    key: str


@torch.no_grad()
def sequence_logps(model: FunAudioChat, pairs: Sequence[PreferencePair], tensors, tokenizer, *,
                   batch_size: int = 16) -> dict[str, torch.Tensor]:
    """log π(y|x) of every pair's chosen and rejected reply (text + speech streams), (N,) each, and the chosen
    reply's scored labels ``chosen_tokens`` (N,)."""
    chosen, rejected, tokens = [], [], []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        logps = funaudiochat_logps(model(**collate_pairs(part, tensors, tokenizer, model.config)))
        chosen.append(logps.total[:len(part)])
        rejected.append(logps.total[len(part):])
        tokens.append(logps.tokens[:len(part)])
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected), "chosen_tokens": torch.cat(tokens)}


def _spoken_sentences(data) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Every statement of the train split with a recording: sentence -> its first utterance id, and their ids."""
    from .srh_study import corpus_speech_tokens

    spoken, ids = {}, {}
    for row in sorted(corpus_speech_tokens("train"), key=lambda r: r["id"]):
        if row["text"] not in spoken:
            spoken[row["text"]] = row["id"]
            ids[row["id"]] = row["ids"]
    return spoken, ids


def prepare(*, progress: bool = False, build: bool = True, dimensions: Sequence[str] = DIMENSIONS) -> PreferenceSet:
    """The preference data, cached in ``data/cache/preference`` under the sha256 of the base model, the dialogue
    data and the pair-building code. ``build=False``: the test prompts of ``dimensions`` only (``pairs`` and
    ``reference`` empty): what ``dpo eval`` needs, from the shipped test split alone (without "robustness" no
    degraded clip is computed, which takes most of the time)."""
    unknown = sorted(set(dimensions) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"unknown dimensions {unknown}; choose from {DIMENSIONS}")
    from ..dialogue import build_dialogue, example_tensors
    from ..tokenizer import load_tokenizer

    data = build_dialogue()
    test_prompts = [p for p in evaluation_prompts(data) if p.dimension in dimensions]
    import inspect

    from .. import preference

    # the base model, the dialogue data and the code that builds the pairs fix them
    key = hashlib.sha256((file_sha256(BASE_DIR / "model.safetensors") + data.fingerprint() +
                          inspect.getsource(preference)).encode()).hexdigest()[:12]
    if not build:                     # the shipped test clips only (no answer speech: S2T prompts)
        clips = {p.clip[0]: dataclasses.replace(p.example, user_id=p.clip[0], answer_speech_id=None)
                 for p in test_prompts}
        tensors = prompt_tensors(test_prompts, example_tensors(list(clips.values())), progress=progress)
        return PreferenceSet({}, {}, [], test_prompts, tensors, load_tokenizer(), data, key)
    data, base_tensors, tokenizer = load_dialogue(progress=progress)
    prompts = training_prompts(data)
    spoken, spoken_ids = _spoken_sentences(data)
    base_tensors = {**base_tensors, "speech_ids": {**base_tensors["speech_ids"], **spoken_ids}}
    tensors = prompt_tensors([*test_prompts, *prompts["train"], *prompts["dev"]], base_tensors, progress=progress)
    folder = PREFERENCE_CACHE / key
    reference_path = folder / "reference.pt"
    pairs = {}
    if reference_path.is_file():
        pairs = {name: load_pairs(folder / f"{name}.jsonl") for name in ("train", "dev")}
        reference = torch.load(reference_path, weights_only=False)
    else:
        model = load_mllm(BASE_DIR)
        reference = {}
        for name in ("train", "dev"):
            pairs[name] = build_pairs(model, prompts[name], tensors, tokenizer, spoken, seed=0)
            save_pairs(pairs[name], folder / f"{name}.jsonl")
            reference[name] = sequence_logps(model, pairs[name], tensors, tokenizer)
        atomic_write(reference_path, lambda tmp: torch.save(reference, tmp))
    return PreferenceSet(pairs, reference, prompts["dev"], test_prompts, tensors, tokenizer, data, key)


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------
class DPORecipe:
    """A LoRA DPO run (``objective="dpo"``) or the SFT-only baseline (``objective="sft"``) on the train pairs."""

    def __init__(self, name: str, prefs: PreferenceSet, plan: DPOPlan, beta: float, objective: str = "dpo"):
        if objective not in ("dpo", "sft"):
            raise ValueError(f"objective must be 'dpo' or 'sft', got {objective!r}")
        self.name, self.prefs, self.plan, self.beta, self.objective = name, prefs, plan, beta, objective
        self.pairs = prefs.pairs["train"]
        if not self.pairs:
            raise ValueError("no training pairs: build the preference set with prepare(build=True)")
        world = build_world(0)
        self.replay = [encode_qa(prefs.tokenizer, t.text, t.answer) for t in world.questions("train")]

    def build_model(self):
        from ..scale.lora import add_lora

        return add_lora(load_mllm(BASE_DIR), self.plan.lora())

    def build_optimizer(self, model, config: TrainConfig):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                 weight_decay=config.weight_decay)

    def build_sampler(self, config: TrainConfig) -> QueueSampler:
        return QueueSampler(len(self.pairs), config.batch_size, config.seed)

    def loss(self, model, batch: list[int]):
        pairs = [self.pairs[i] for i in batch]
        out = model(**collate_pairs(pairs, self.prefs.tensors, self.prefs.tokenizer, model.config))
        logps = funaudiochat_logps(out)
        count = len(pairs)
        reference = self.prefs.reference["train"]
        index = torch.tensor(batch)
        preference, chosen_rewards, rejected_rewards = dpo_loss(
            logps.total[:count], logps.total[count:], reference["chosen"][index], reference["rejected"][index],
            beta=self.beta)
        supervised = sft_loss(logps.total[:count], logps.tokens[:count])
        total = self.plan.sft_weight * supervised + (preference if self.objective == "dpo" else 0.0)
        metrics = {**dpo_metrics(chosen_rewards, rejected_rewards), "dpo_loss": preference.item(),
                   "sft_loss": supervised.item()}
        if self.plan.replay_weight:
            # written QA of M0's training set, a fixed function of the batch (no extra sampler state to resume)
            rows = [self.replay[(index * 31 + k) % len(self.replay)] for k, index in enumerate(batch)]
            text = collate_text(rows, self.prefs.tokenizer.pad_token_id)
            replay = model.language_model(text["input_ids"], attention_mask=text["attention_mask"],
                                          labels=text["labels"]).loss
            total = total + self.plan.replay_weight * replay
            metrics["replay_loss"] = replay.item()
        return total, metrics

    def fingerprint(self) -> Any:
        return {"base": file_sha256(BASE_DIR / "model.safetensors"), "pairs": pairs_fingerprint(self.pairs),
                "beta": self.beta, "objective": self.objective, "sft_weight": self.plan.sft_weight,
                "replay_weight": self.plan.replay_weight, "rank": self.plan.rank, "alpha": self.plan.alpha,
                "targets": self.plan.lora().target_modules}


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def dev_pair_metrics(model, prefs: PreferenceSet, beta: float) -> dict[str, float]:
    """DPO loss, reward margin and accuracy of the dev pairs (β of the run), against the reference."""
    logps = sequence_logps(model, prefs.pairs["dev"], prefs.tensors, prefs.tokenizer)
    reference = prefs.reference["dev"]
    loss, chosen, rejected = dpo_loss(logps["chosen"], logps["rejected"], reference["chosen"], reference["rejected"],
                                      beta=beta)
    metrics = dpo_metrics(chosen, rejected)
    return {"dev_dpo_loss": round(loss.item(), 5), "dev_reward_margin": round(metrics["reward_margin"], 5),
            "dev_accuracy": round(metrics["accuracy"], 4)}


def primary_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each task's primary metric (``PRIMARY``) from ``score_replies`` output."""
    return {dimension: scores[dimension][PRIMARY[dimension]] for dimension in DIMENSIONS}


@torch.no_grad()
def measure(model: FunAudioChat, prefs: PreferenceSet) -> dict[str, Any]:
    """The held-out numbers of a checkpoint: every task's metrics on the test prompts, the guards (T2T on M0's
    held-out probe, clean S2T on the 160 held-out questions: fact and attribute accuracy)."""
    model.eval()
    replies = [r[0] for r in generate_replies(model, prefs.test_prompts, prefs.tensors, prefs.tokenizer)]
    tasks = score_replies(prefs.test_prompts, replies)
    questions = [Prompt("s2t", dataclasses.replace(p.example, user_id=p.clip[0])) for p in prefs.test_prompts
                 if p.dimension == "robustness"]
    clean = [r[0] for r in generate_replies(model, questions, prefs.tensors, prefs.tokenizer)]
    t2t = evaluate_knowledge(model.language_model, prefs.tokenizer, "heldout")
    return {"tasks": tasks, "primary": primary_scores(tasks),
            "t2t_exact_match": t2t["exact_match"], "t2t_fact_accuracy": t2t["fact_accuracy"],
            "s2t_fact_accuracy": round(float(np.mean([answer_has_fact(r, q.example) for q, r in zip(questions, clean)])), 4),
            "s2t_attribute_accuracy": round(float(np.mean([reply_attribute(r) == q.example.attribute
                                                           for q, r in zip(questions, clean)])), 4)}


def _dev_evaluator(prefs: PreferenceSet, beta: float):
    def evaluate(model) -> dict[str, float]:
        replies = [r[0] for r in generate_replies(model, prefs.dev_prompts, prefs.tensors, prefs.tokenizer)]
        dev = primary_scores(score_replies(prefs.dev_prompts, replies))
        return {**dev_pair_metrics(model, prefs, beta), **{f"dev_{k}": v for k, v in dev.items()},
                "dev_mean": round(float(np.mean(list(dev.values()))), 4)}
    return evaluate


# ----------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------
def _lora_dict(plan: DPOPlan) -> dict[str, Any]:
    config = plan.lora()
    return {"rank": config.r, "alpha": config.lora_alpha, "target_modules": config.target_modules,
            "modules_to_save": list(config.modules_to_save or [])}


def save_adapter(peft_model, path: Path) -> None:
    """The trained tensors (LoRA factors and the fully trained matching layers), float16, peft's names."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    save_safetensors({name: tensor.detach().to(torch.float16).contiguous() for name, tensor in state.items()}, path)


def load_dpo(folder: Path | str = DPO_DIR, adapter: str | None = None) -> FunAudioChat:
    """A DPO folder -> the merged FunAudioChat (eval mode, float32): the base checkpoint named in ``config.json``
    (its sha256 checked), the LoRA of the config, the adapter file (default: the shipped run's) merged in."""
    from peft import LoraConfig, set_peft_model_state_dict

    from ..scale.lora import add_lora, merge_lora

    folder = Path(folder)
    hint = f"rebuild it with `{TRAIN_COMMAND} --out data/dpo` or restore it with `git checkout -- data/dpo`"
    config = read_json(folder / CONFIG_FILE, "DPO config", hint)
    base = DATA_DIR / config["base"]
    if file_sha256(base / "model.safetensors") != config["base_sha256"]:
        raise ValueError(f"{folder / CONFIG_FILE}: its base is {base} with sha256 {config['base_sha256'][:12]}…, but "
                         f"{base / 'model.safetensors'} differs; restore it with `git checkout -- {base.relative_to(DATA_DIR.parent)}`")
    lora = config["lora"]
    peft_model = add_lora(load_mllm(base), LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                                      target_modules=lora["target_modules"],
                                                      modules_to_save=lora["modules_to_save"] or None))
    weights = read_safetensors(folder / (adapter or config["adapter"]), hint)
    result = set_peft_model_state_dict(peft_model, {name: tensor.float() for name, tensor in weights.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{folder / (adapter or config['adapter'])}: tensors the LoRA model lacks: {unexpected[:5]}")
    return merge_lora(peft_model).eval()


def load_chat_model(folder: Path | str = DPO_DIR) -> FunAudioChat:
    """A mini Fun-Audio-Chat checkpoint folder: a DPO folder (LoRA adapter over its base) or a full checkpoint of
    ``fac_mini.train.prealign.save_mllm`` (pre-aligned, Core-Cocktail)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if config_path.is_file() and "lora" in json.loads(config_path.read_text()):
        return load_dpo(folder)
    return load_mllm(folder)


# ----------------------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------------------
def _run(name: str, prefs: PreferenceSet, plan: DPOPlan, beta: float, seed: int, objective: str, *,
         threads: int, state_dir: Path | None, resume: bool) -> dict[str, Any]:
    """One run, cached in ``data/cache/dpo/<name>-<run key>/`` (adapter + result): rerunning it costs nothing."""
    from .loop import run_key

    recipe = DPORecipe(name, prefs, plan, beta, objective)
    config = plan.config(seed)
    with torch_threads(threads):
        key = run_key(config, recipe.fingerprint(), torch.get_num_threads())
    folder = RUNS_CACHE / f"{name}-{key}"
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text())
    result = train(recipe, config, state_dir=state_dir, resume=resume, threads=threads,
                   evaluate=_dev_evaluator(prefs, beta))
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(result.model, folder / "adapter.safetensors")
    atomic_write_json(folder / CONFIG_FILE, {"base": BASE_DIR.name, "base_sha256": file_sha256(
        BASE_DIR / "model.safetensors"), "lora": _lora_dict(plan), "adapter": "adapter.safetensors"})
    with torch_threads(threads):
        metrics = measure(load_dpo(folder), prefs)                   # what the stored float16 adapter gives
    row = {"name": name, "beta": beta, "seed": seed, "objective": objective, "run_key": key,
           "train_seconds": result.train_seconds, "log": result.log, "metrics": metrics,
           "folder": folder.name}
    atomic_write_json(folder / "result.json", row)
    return row


def pair_sample(pairs: Sequence[PreferencePair], per_group: int = SAMPLE_PER_GROUP) -> list[PreferencePair]:
    """The first ``per_group`` pairs of each (task, kind, source): what the shipped folder keeps of the pairs (all
    of them are rebuilt from the train split by the recipe; their counts are in the manifest)."""
    taken: dict[tuple[str, str, str], int] = {}
    sample = []
    for pair in pairs:
        group = (pair.prompt.dimension, pair.kind, pair.source)
        if taken.get(group, 0) < per_group:
            taken[group] = taken.get(group, 0) + 1
            sample.append(pair)
    return sample


def run_name(beta: float, seed: int, objective: str = "dpo") -> str:
    return f"sft_seed{seed}" if objective == "sft" else f"beta{beta:g}_seed{seed}"


def run_dpo(plan: DPOPlan = SHIPPED_PLAN, prefs: PreferenceSet | None = None, *, threads: int = 1,
            state_dir: Path | None = None, resume: bool = True) -> dict[str, Any]:
    """The β sweep at ``plan.seeds[0]``, the other seeds at the chosen β, the SFT-only baseline; every run's row,
    the chosen β and the base model's ("before") measurements."""
    prefs = prefs or prepare(progress=True)
    first = plan.seeds[0]
    runs = {}
    for beta in plan.betas:
        runs[run_name(beta, first)] = _run(run_name(beta, first), prefs, plan, beta, first, "dpo", threads=threads,
                                           state_dir=state_dir, resume=resume)
    final_dev = {beta: [row for row in runs[run_name(beta, first)]["log"] if "dev_mean" in row][-1]["dev_mean"]
                 for beta in plan.betas}
    chosen_beta = max(plan.betas, key=lambda beta: (final_dev[beta], -beta))
    for seed in plan.seeds[1:]:
        runs[run_name(chosen_beta, seed)] = _run(run_name(chosen_beta, seed), prefs, plan, chosen_beta, seed, "dpo",
                                                 threads=threads, state_dir=state_dir, resume=resume)
    runs[run_name(chosen_beta, first, "sft")] = _run(run_name(chosen_beta, first, "sft"), prefs, plan, chosen_beta,
                                                     first, "sft", threads=threads, state_dir=state_dir,
                                                     resume=resume)
    with torch_threads(threads):
        before = measure(load_mllm(BASE_DIR), prefs)
    return {"runs": runs, "chosen_beta": chosen_beta, "dev_mean_by_beta": {f"{b:g}": v for b, v in final_dev.items()},
            "before": before, "pairs": {name: pair_summary(p) for name, p in prefs.pairs.items()}}


def summarize(before: dict[str, Any], seeds: Sequence[dict[str, Any]], sft: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Per task: before, after (each seed, mean), the seed spread (max − min), the gain and whether it beats the
    spread; the guards (T2T exact match, clean S2T fact accuracy: largest drop over seeds ≤ 2 points)."""
    tasks = {}
    for dimension in DIMENSIONS:
        after = [run["primary"][dimension] for run in seeds]
        gain = float(np.mean(after)) - before["primary"][dimension]
        spread = max(after) - min(after)
        tasks[dimension] = {"metric": PRIMARY[dimension], "before": before["primary"][dimension],
                            "after_seeds": after, "after_mean": round(float(np.mean(after)), 4),
                            "seed_spread": round(spread, 4), "gain": round(gain, 4), "goal_met": gain > spread,
                            **({"sft_only": sft["primary"][dimension]} if sft else {})}
    guards = {}
    for guard in ("t2t_exact_match", "s2t_fact_accuracy"):
        drop = max(before[guard] - run[guard] for run in seeds)
        guards[guard] = {"before": before[guard], "after_seeds": [run[guard] for run in seeds],
                         "largest_drop": round(drop, 4), "goal_met": drop <= GUARD_DROP + 1e-9}
    return {"tasks": tasks, "guards": guards,
            "all_goals_met": all(t["goal_met"] for t in tasks.values()) and all(g["goal_met"] for g in guards.values())}


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every β must be > 0, got {text!r}")
    return values


def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini dpo train``: build the preference pairs, run the β sweep, the seeds and the SFT-only
    baseline, write the adapters of the chosen β's seeds and the manifest (the shipped ``data/dpo`` only with
    ``--out data/dpo`` and the defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = SHIPPED_PLAN
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    add_train_flags(parser, "dpo", p.config(p.seeds[0]))
    parser.add_argument("--betas", type=_floats, default=p.betas, help="the β sweep (0.01,0.1)")
    parser.add_argument("--num-seeds", type=positive_int, default=len(p.seeds),
                        help="seeds at the chosen β, from --seed on (%(default)s)")
    parser.add_argument("--sft-weight", type=positive_float, default=p.sft_weight, help="(%(default)s)")
    parser.add_argument("--rank", type=positive_int, default=p.rank, help="LoRA rank (%(default)s)")
    args = parser.parse_args(argv)
    shipped = {"steps": p.steps, "batch_size": p.batch_size, "lr": p.lr, "seed": p.seeds[0], "threads": 1,
               "betas": p.betas, "num_seeds": len(p.seeds), "sft_weight": p.sft_weight, "rank": p.rank}
    out = output_folder(parser, args, "dpo", DPO_DIR, shipped)
    plan = dataclasses.replace(p, steps=args.steps, batch_size=args.batch_size, lr=args.lr, betas=args.betas,
                               seeds=tuple(range(args.seed, args.seed + args.num_seeds)), sft_weight=args.sft_weight,
                               rank=args.rank, alpha=2 * args.rank)
    started = time.perf_counter()
    prefs = prepare(progress=True)
    result = run_dpo(plan, prefs, threads=args.threads, state_dir=args.state_dir, resume=not args.restart)
    beta = result["chosen_beta"]
    seed_runs = [result["runs"][run_name(beta, seed)] for seed in plan.seeds]
    summary = summarize(result["before"], [run["metrics"] for run in seed_runs],
                        result["runs"][run_name(beta, plan.seeds[0], "sft")]["metrics"])
    with atomic_directory(out) as folder:
        files = []
        for run in seed_runs:
            name = f"adapter_seed{run['seed']}.safetensors"
            (folder / name).write_bytes((RUNS_CACHE / run["folder"] / "adapter.safetensors").read_bytes())
            files.append(name)
        atomic_write_json(folder / CONFIG_FILE, {"base": BASE_DIR.name, "base_sha256": file_sha256(
            BASE_DIR / "model.safetensors"), "lora": _lora_dict(plan), "adapter": files[0], "adapters": files,
            "beta": beta})
        files.append(CONFIG_FILE)
        save_pairs(pair_sample(prefs.pairs["train"]), folder / PAIRS_SAMPLE)      # what notebook 12 shows
        files.append(PAIRS_SAMPLE)
        manifest = write_manifest(
            folder, "dpo", run_command(TRAIN_COMMAND, argv), files, plan=dataclasses.asdict(plan),
            threads=args.threads, preference_key=prefs.key, pairs=result["pairs"], chosen_beta=beta,
            dev_mean_by_beta=result["dev_mean_by_beta"], before=result["before"], summary=summary,
            train_seconds_all_runs=round(sum(r["train_seconds"] for r in result["runs"].values()), 1),
            wall_seconds_this_invocation=round(time.perf_counter() - started, 1), runs=result["runs"])
    refresh_seal(out)
    print(json.dumps({"out": str(out), "chosen_beta": beta, "summary": manifest["summary"]}, indent=1))
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini dpo eval``: re-measure the base model and every shipped seed's adapter on the held-out
    prompts (test split only) and print the before/after table with the seed spread."""
    parser = RecipeParser(prog="python -m fac_mini dpo eval", description=main_eval.__doc__)
    add_eval_flags(parser, DPO_DIR, limit=False)
    args = parser.parse_args(argv)
    config = read_json(Path(args.path) / CONFIG_FILE, "DPO config", f"rebuild it with `{TRAIN_COMMAND} --out data/dpo`")
    manifest = read_json(Path(args.path) / "manifest.json", "DPO manifest", f"rebuild it with `{TRAIN_COMMAND}`")
    prefs = prepare(progress=not args.json, build=False)
    with torch_threads(args.threads):
        before = measure(load_mllm(BASE_DIR), prefs)
        seeds = [measure(load_dpo(args.path, adapter), prefs) for adapter in config["adapters"]]
    summary = summarize(before, seeds)
    recorded = manifest["summary"]
    same = all(summary["tasks"][d]["after_seeds"] == recorded["tasks"][d]["after_seeds"] for d in DIMENSIONS)
    if args.json:
        print(json.dumps({"beta": config["beta"], "before": before, "seeds": seeds, "summary": summary,
                          "matches_manifest": same}))
        return 0
    print(f"DPO ({args.path}, β = {config['beta']:g}, {len(seeds)} seeds); identical to the manifest: {same}")
    for dimension, row in summary["tasks"].items():
        print(f"  {dimension:<11} {row['metric']:<19} before {row['before']:.3f}  after {row['after_mean']:.3f} "
              f"(seeds {', '.join(f'{v:.3f}' for v in row['after_seeds'])}; spread {row['seed_spread']:.3f})  "
              f"gain > spread: {row['goal_met']}")
    for guard, row in summary["guards"].items():
        print(f"  guard {guard:<19} before {row['before']:.3f}  largest drop {row['largest_drop']:.3f}  "
              f"(≤ {GUARD_DROP}: {row['goal_met']})")
    return 0
