"""Pre-alignment of the mini Fun-Audio-Chat (paper §2.4): the LLM frozen, everything around it trained.

The mini MLLM is the course's own ``FunAudioChat`` (the class that loads the released 8B) at mini size:

    language_model          M0 (``data/m0``), the text LLM that knows the mini world          frozen here
    continuous_audio_tower  the course encoder, initialised from the speech tokenizer's encoder (as the release
                            starts from Whisper); only its output projection (96 -> 192) is new
    audio_tower             the adapter (``continual_output_matching``: 5 Hz group means of the encoder) and the
                            grouping of the tokenizer's 25 Hz ids (speech table + ``output_matching``)
    audio_invert_tower      the Speech Refined Head, lm_head tied to the speech table

Speech ids are the shipped tokenizer's (243 codes + bos 243, eos 244, pad 245); inputs come from the released
processor's rules and chat template (``fac_mini.dialogue``), labels from the released construction inside
``FunAudioChat.forward``, the assistant's speech delayed by 10 ids.

Pre-alignment trains on the dialogue data of the speech facts (``fac_mini.dialogue``: spoken question -> text
answer, spoken question -> text + speech answer, spoken statement -> transcript) with the LLM's parameters
excluded from the optimiser and ``requires_grad`` off: the LLM's weights stay bit-identical to M0 and receive no
gradient (checked by the recipe and by ``tests/test_prealign.py``). The saved checkpoint therefore stores only
the trained parts and names M0 (with its sha256) as its LLM.

Measured (:func:`evaluate_mllm`): T2T knowledge of the LLM (M0's held-out probe: exact match, answer NLL),
S2T answers to the held-out phrasing about speech facts and about text facts (exact match, fact accuracy,
teacher-forced answer NLL), S2M: teacher-forced speech-token accuracy / perplexity of the SRH on the answers'
speech, and greedy S2M replies on a subset: text accuracy and the speech tokenizer's CTC read-back of the
generated speech ids against the generated text (character error rate, the paper's ASR-WER idea).

Commands: ``python -m fac_mini prealign train [--out data/prealign]`` and ``python -m fac_mini prealign eval``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import DATA_DIR
from ..dialogue import (DialogueData, DialogueExample, answer_has_fact, answer_is_exact, build_dialogue,
                        collate_dialogue, dialogue_tensors)
from ..encoder import AudioEncoderConfig
from ..llm import IGNORE_INDEX
from ..model import FunAudioChat, FunAudioChatConfig
from .cli import (RecipeParser, add_eval_flags, add_train_flags, config_from_flags, output_folder, run_command,
                  shipped_flags, write_manifest)
from .loop import TrainConfig, TrainResult, torch_threads, train
from .m0 import M0_CONFIG, M0_DIR, evaluate_knowledge, load_m0
from .metrics import character_error_rate, normalize_text
from .seal import refresh_seal
from .srh_study import QueueSampler, StudyConfig, head_metrics, summarize_metrics
from .store import (atomic_directory, atomic_write_json, check_state_dict, file_sha256, read_json, read_safetensors,
                    save_safetensors)

__all__ = [
    "PREALIGN_DIR", "TRAIN_COMMAND", "PREALIGN_TRAIN", "PREALIGN_MIX", "EVAL_SETS", "TRAINED_SAMPLE", "PARTS",
    "mllm_config", "evaluation_examples", "add_sets_flag",
    "build_mllm", "part_of", "parameter_counts", "DialogueRecipe", "train_prealign", "llm_fingerprint",
    "save_mllm", "load_mllm", "evaluate_mllm", "load_dialogue", "main_train", "main_eval",
]

PREALIGN_DIR = DATA_DIR / "prealign"
TRAIN_COMMAND = "python -m fac_mini prealign train"
WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE = "model.safetensors", "config.json", "manifest.json"
PARTS = ("llm", "encoder", "adapter", "grouping", "srh")
# The shipped run (one thread, ~0.8 s a step): 400 steps of 8 chats drawn from every kind of pair, LLM frozen.
PREALIGN_TRAIN = TrainConfig(steps=400, batch_size=8, lr=3e-3, warmup=40, min_lr_ratio=0.1, weight_decay=0.01,
                             seed=0, log_every=10, checkpoint_every=50)
PREALIGN_MIX = ("train_s2t", "train_s2m", "prealign_asr")      # dialogue sets pre-alignment draws from
EVAL_SETS = ("heldout_speech_facts", "heldout_text_facts", "seen_phrasing_text_facts")
TRAINED_SAMPLE = "trained_sample"      # diagnostic set: every 4th training S2T chat (80), i.e. how well it fits


# ----------------------------------------------------------------------------------------------------------
# The mini MLLM
# ----------------------------------------------------------------------------------------------------------
def mllm_config() -> FunAudioChatConfig:
    """The mini FunAudioChat: M0's sizes (context documented as 256), the speech tokenizer's encoder sizes with a
    192-wide output, the 243-code speech vocabulary and the SRH of notebook 07."""
    from ..speech_tokenizer import SpeechTokenizerConfig

    encoder = dataclasses.replace(SpeechTokenizerConfig().encoder, output_dim=M0_CONFIG.hidden_size)
    study = StudyConfig()
    return FunAudioChatConfig(audio_config=AudioEncoderConfig(**dataclasses.asdict(encoder)), discrete=study.discrete,
                              crq_config=study.crq,
                              text_config=dataclasses.replace(M0_CONFIG, max_position_embeddings=256))


def build_mllm(m0_dir: Path | str = M0_DIR, speech_tokenizer_dir: Path | str | None = None) -> FunAudioChat:
    """A fresh mini FunAudioChat (random SRH, adapter, grouping and encoder projection from the global RNG), its
    LLM loaded from M0 and its audio tower from the speech tokenizer's encoder (all but ``proj``)."""
    from ..speech_tokenizer import SPEECH_TOKENIZER_DIR, load_speech_tokenizer

    model = FunAudioChat(mllm_config())
    llm, _ = load_m0(m0_dir)
    model.language_model.load_state_dict(llm.state_dict())
    encoder = load_speech_tokenizer(speech_tokenizer_dir or SPEECH_TOKENIZER_DIR).encoder.state_dict()
    own = model.continuous_audio_tower.state_dict()
    shared = {name: tensor for name, tensor in encoder.items() if name in own and tensor.shape == own[name].shape}
    new = set(own) - set(shared)                       # the output-width tensors: proj and the unused bos/eos rows
    if new != {"proj.weight", "proj.bias", "audio_bos_eos_token.weight"}:
        raise ValueError(f"the speech tokenizer's encoder does not match the continuous audio tower's layout: "
                         f"{sorted(new)} would stay random")
    model.continuous_audio_tower.load_state_dict({**own, **shared})
    return model


def part_of(name: str) -> str:
    """Which part a parameter belongs to: llm, encoder, adapter, grouping or srh (see the module doc)."""
    if name.startswith("language_model."):
        return "llm"
    if name.startswith("continuous_audio_tower."):
        return "encoder"
    if name.startswith("audio_tower.continual_output_matching."):
        return "adapter"
    if name.startswith("audio_tower."):
        return "grouping"
    if name.startswith("audio_invert_tower."):
        return "srh"
    raise ValueError(f"parameter {name!r} belongs to no known part of FunAudioChat")


def parameter_counts(model: FunAudioChat) -> dict[str, dict[str, int]]:
    """Parameters per part (the tied SRH lm_head counted once, with the grouping's speech table) and whether
    they are trainable: ``{part: {"trainable": n, "frozen": n}}``."""
    counts = {part: {"trainable": 0, "frozen": 0} for part in PARTS}
    for name, parameter in model.named_parameters():          # named_parameters lists a tied tensor once
        counts[part_of(name)]["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    return counts


def llm_fingerprint(model: FunAudioChat) -> str:
    """sha256 over the LLM's tensors (names, dtypes, bytes): equal iff the LLM is bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.language_model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The recipe (shared with Core-Cocktail)
# ----------------------------------------------------------------------------------------------------------
def load_dialogue(progress: bool = False) -> tuple[DialogueData, dict[str, dict[str, torch.Tensor]], Any]:
    """The dialogue sets, their cached tensors and the course tokenizer."""
    from ..tokenizer import load_tokenizer

    data = build_dialogue()
    return data, dialogue_tensors(data, progress=progress), load_tokenizer()


class DialogueRecipe:
    """Train a mini FunAudioChat on a mix of dialogue examples with the course's loop.

    ``start``: builds the starting model (called after the loop seeded the global RNG). ``freeze_llm``: the LLM's
    parameters get ``requires_grad=False`` and stay out of the optimiser (pre-alignment). ``start_digest``
    identifies the starting weights in the run key. The loss is the released one, text + speech.
    """

    def __init__(self, name: str, examples: Sequence[DialogueExample], tensors, tokenizer, *,
                 start: Callable[[], FunAudioChat], start_digest: str, freeze_llm: bool):
        if not examples:
            raise ValueError(f"recipe {name!r} got no training examples")
        self.name, self.examples, self.tensors, self.tokenizer = name, list(examples), tensors, tokenizer
        self.start, self.start_digest, self.freeze_llm = start, start_digest, freeze_llm

    def build_model(self) -> FunAudioChat:
        model = self.start()
        if self.freeze_llm:
            model.language_model.requires_grad_(False)
        return model

    def build_optimizer(self, model: FunAudioChat, config: TrainConfig):
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    def build_sampler(self, config: TrainConfig) -> QueueSampler:
        return QueueSampler(len(self.examples), config.batch_size, config.seed)

    def batch(self, indices: Sequence[int], config: FunAudioChatConfig) -> dict[str, torch.Tensor]:
        return collate_dialogue([self.examples[i] for i in indices], self.tensors, self.tokenizer, config)

    def loss(self, model: FunAudioChat, batch: list[int]) -> torch.Tensor:
        return model(**self.batch(batch, model.config)).loss

    def fingerprint(self) -> Any:
        examples = hashlib.sha256(json.dumps([dataclasses.asdict(e) for e in self.examples]).encode()).hexdigest()
        return {"examples": examples, "start": self.start_digest, "freeze_llm": self.freeze_llm,
                "config": mllm_config().to_dict()}


def train_prealign(train_config: TrainConfig = PREALIGN_TRAIN, *, data=None, mix: Sequence[str] = PREALIGN_MIX,
                   state_dir=None, resume: bool = True, stop_after: int | None = None, threads: int | None = 1,
                   progress: bool = True) -> TrainResult:
    """Pre-align from M0 and the speech tokenizer's encoder on the dialogue sets ``mix``; checks afterwards that
    the LLM is bit-identical to M0 and holds no gradient (``RuntimeError`` otherwise)."""
    data, tensors, tokenizer = data or load_dialogue(progress)
    examples = [e for name in mix for e in data[name]]
    start_digest = hashlib.sha256((file_sha256(M0_DIR / "model.safetensors") + file_sha256(
        DATA_DIR / "speech_tokenizer" / "model.safetensors")).encode()).hexdigest()
    recipe = DialogueRecipe("prealign", examples, tensors, tokenizer, start=build_mllm, start_digest=start_digest,
                            freeze_llm=True)
    result = train(recipe, train_config, state_dir=state_dir, resume=resume, stop_after=stop_after, threads=threads,
                   progress=progress)
    reference, _ = load_m0(M0_DIR)
    for name, tensor in reference.state_dict().items():
        trained = result.model.language_model.state_dict()[name]
        if not torch.equal(trained, tensor):
            raise RuntimeError(f"pre-alignment changed the frozen LLM tensor {name}")
    if any(p.grad is not None for p in result.model.language_model.parameters()):
        raise RuntimeError("a frozen LLM parameter received a gradient during pre-alignment")
    return result


# ----------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------
def save_mllm(model: FunAudioChat, folder: Path | str, *, llm_from_m0: bool = False,
              dtype: torch.dtype = torch.float32) -> list[str]:
    """Write ``model.safetensors`` (tied lm_head stored once, as released; tensors in ``dtype``) and ``config.json``
    (the released config layout, plus ``"llm_from_m0"``: the sha256 of M0's weights when the LLM is not stored
    because it *is* M0). Returns the file names."""
    folder = Path(folder)
    state = {name: tensor for name, tensor in model.state_dict().items() if name != "audio_invert_tower.lm_head.weight"}
    config = model.config.to_dict()
    if llm_from_m0:
        if llm_fingerprint(model) != llm_fingerprint(_m0_as_mllm()):
            raise ValueError("llm_from_m0=True but the model's LLM differs from data/m0")
        state = {name: tensor for name, tensor in state.items() if not name.startswith("language_model.")}
        config["llm_from_m0"] = file_sha256(M0_DIR / "model.safetensors")
    save_safetensors({name: tensor.detach().to(dtype) for name, tensor in state.items()}, folder / WEIGHTS_FILE)
    atomic_write_json(folder / CONFIG_FILE, config)
    return [WEIGHTS_FILE, CONFIG_FILE]


def _m0_as_mllm() -> FunAudioChat:
    model = FunAudioChat(mllm_config())
    model.language_model.load_state_dict(load_m0(M0_DIR)[0].state_dict())
    return model


def load_mllm(folder: Path | str = PREALIGN_DIR) -> FunAudioChat:
    """A folder of :func:`save_mllm` -> FunAudioChat in eval mode, float32. A config with ``llm_from_m0`` takes
    its LLM from ``data/m0`` after checking M0's sha256. Missing/corrupt files, keys or shapes raise errors
    naming the file."""
    folder = Path(folder)
    hint = "rebuild it with its recipe's train command or restore it with `git checkout -- data/`"
    config_data = read_json(folder / CONFIG_FILE, "mini Fun-Audio-Chat config", hint)
    try:
        config = FunAudioChatConfig.from_dict(config_data)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{folder / CONFIG_FILE}: {error}") from None
    model = FunAudioChat(config)
    weights = read_safetensors(folder / WEIGHTS_FILE, hint)
    expected = model.state_dict()
    ignore = ["audio_invert_tower.lm_head.weight"]
    if "llm_from_m0" in config_data:
        if file_sha256(M0_DIR / "model.safetensors") != config_data["llm_from_m0"]:
            raise ValueError(f"{folder / CONFIG_FILE}: its LLM is M0 with sha256 {config_data['llm_from_m0'][:12]}…, "
                             f"but {M0_DIR / 'model.safetensors'} differs; restore it with `git checkout -- data/m0`")
        llm, _ = load_m0(M0_DIR)
        weights = {**weights, **{f"language_model.{k}": v for k, v in llm.state_dict().items()}}
    check_state_dict(weights, expected, folder / WEIGHTS_FILE, ignore_missing=tuple(ignore))
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, strict=False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def _as_kind(examples: Sequence[DialogueExample], kind: str) -> list[DialogueExample]:
    return [dataclasses.replace(e, kind=kind) for e in examples]


@torch.no_grad()
def _teacher_forced(model: FunAudioChat, examples, tensors, tokenizer, batch_size: int) -> dict[str, Any]:
    """Mean text NLL per reply token (nats) and, for s2m examples, the SRH's speech-code metrics."""
    config, disc = model.config, model.config.discrete
    nll, tokens, sums = 0.0, 0, None
    for start in range(0, len(examples), batch_size):
        batch = collate_dialogue(examples[start:start + batch_size], tensors, tokenizer, config)
        out = model(**batch)
        targets = out.text_labels[:, 1:]
        scored = int((targets != IGNORE_INDEX).sum())
        nll, tokens = nll + float(out.text_loss) * scored, tokens + scored
        if out.speech_loss is not None:
            part = head_metrics(out.speech_logits, out.speech_labels, disc.group_size, disc.bos_token_id,
                                disc.pad_token_id)
            sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
    result: dict[str, Any] = {"text_nll": round(nll / tokens, 4)}
    if sums is not None and sums["count"].sum() > 0:
        speech = summarize_metrics(sums)
        result.update(speech_accuracy=speech["accuracy"], speech_perplexity=speech["perplexity"])
    return result


@torch.no_grad()
def _s2t_answers(model, examples, tensors, tokenizer, batch_size: int, max_new_tokens: int = 20) -> list[str]:
    from ..generate import generate_s2t

    answers = []
    for start in range(0, len(examples), batch_size):
        batch = collate_dialogue(examples[start:start + batch_size], tensors, tokenizer, model.config,
                                 with_labels=False, padding_side="left")
        out = generate_s2t(model, batch, max_new_tokens)
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.text_ids.tolist()]
    return answers


@torch.no_grad()
def _s2m_replies(model, examples, tensors, tokenizer, speech_tokenizer, max_new_tokens: int = 40) -> dict[str, Any]:
    """Greedy S2M replies one at a time (batch 1: the SRH attends to left padding, as released): text exact match
    and fact accuracy, and the CTC read-back of the generated speech against the generated text."""
    from ..generate import generate_s2m

    disc = model.config.discrete
    exact, fact, read_back, spoken_text, with_speech = [], [], [], [], 0
    for example in examples:
        batch = collate_dialogue([example], tensors, tokenizer, model.config, with_labels=False)
        out = generate_s2m(model, batch, max_new_tokens, do_sample=False, repetition_penalty=1.0,
                           sp_gen_kwargs={"text_greedy": True})
        text = tokenizer.decode(out.text_ids[0].tolist(), skip_special_tokens=True).strip()
        exact.append(answer_is_exact(text, example))
        fact.append(answer_has_fact(text, example))
        codes = out.speech_ids[0][out.speech_ids[0] < disc.bos_token_id]
        if len(codes) and normalize_text(text):
            with_speech += 1
            read_back.append(speech_tokenizer.transcribe_ids([codes])[0])
            spoken_text.append(normalize_text(text))
    result = {"s2m_exact_match": round(sum(exact) / len(exact), 4), "s2m_fact_accuracy": round(sum(fact) / len(fact), 4),
              "s2m_replies": len(examples), "s2m_replies_with_speech": with_speech,
              "s2m_readback_cer": round(character_error_rate(spoken_text, read_back), 4) if read_back else None}
    return result


def evaluation_examples(data: DialogueData, name: str) -> list[DialogueExample]:
    """An evaluation set of ``data`` by name; ``TRAINED_SAMPLE`` is every 4th training S2T chat (80 of them)."""
    if name == TRAINED_SAMPLE:
        return data["train_s2t"][::4][:80]
    return data[name]


def evaluate_mllm(model: FunAudioChat, data: DialogueData, tensors, tokenizer, *, limit: int | None = None,
                  s2m_replies: int = 12, batch_size: int = 64, speech_tokenizer=None,
                  sets: Sequence[str] = EVAL_SETS) -> dict[str, Any]:
    """Every measurement of a checkpoint (rounded): ``t2t`` (M0's held-out probe on the LLM), one entry per
    evaluation set of ``sets`` (S2T greedy exact match / fact accuracy, teacher-forced S2T text NLL, teacher-forced
    S2M speech accuracy / perplexity and S2M text NLL), and greedy S2M replies on the first ``s2m_replies``
    utterances of the two held-out-phrasing sets (text accuracy, CTC read-back CER). ``limit``: first N examples of
    each set."""
    from ..speech_tokenizer import load_speech_tokenizer

    speech_tokenizer = speech_tokenizer or load_speech_tokenizer()
    was_training = model.training
    model.eval()
    t2t = evaluate_knowledge(model.language_model, tokenizer, "heldout")
    result: dict[str, Any] = {"t2t": {k: t2t[k] for k in ("exact_match", "fact_accuracy", "answer_nll")}}
    for name in sets:
        examples = evaluation_examples(data, name)[:limit]
        answers = _s2t_answers(model, examples, tensors, tokenizer, batch_size)
        s2t = _teacher_forced(model, examples, tensors, tokenizer, batch_size)
        s2m = _teacher_forced(model, _as_kind(examples, "s2m"), tensors, tokenizer, batch_size)
        result[name] = {"n": len(examples),
                        "s2t_exact_match": round(sum(map(answer_is_exact, answers, examples)) / len(examples), 4),
                        "s2t_fact_accuracy": round(sum(map(answer_has_fact, answers, examples)) / len(examples), 4),
                        "s2t_answer_nll": s2t["text_nll"], "s2m_text_nll": s2m["text_nll"],
                        "s2m_speech_accuracy": s2m["speech_accuracy"], "s2m_speech_perplexity": s2m["speech_perplexity"]}
        if name.startswith("heldout") and s2m_replies:
            replies = _as_kind(examples[:s2m_replies], "s2m")
            result[name].update(_s2m_replies(model, replies, tensors, tokenizer, speech_tokenizer))
    model.train(was_training)
    return result


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini prealign train``: pre-align (LLM frozen) and write the folder (trained parts, config,
    manifest with the curves and every measurement); the shipped ``data/prealign`` only with ``--out data/prealign``
    and the defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t = PREALIGN_TRAIN
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    add_train_flags(parser, "prealign", t)
    parser.add_argument("--mix", default=",".join(PREALIGN_MIX),
                        help="comma-separated dialogue sets to draw from (%(default)s)")
    args = parser.parse_args(argv)
    out = output_folder(parser, args, "prealign", PREALIGN_DIR, shipped_flags(t, mix=",".join(PREALIGN_MIX)))
    mix = tuple(args.mix.split(","))
    unknown = sorted(set(mix) - {"train_s2t", "train_s2m", "prealign_asr"})
    if unknown:
        parser.error(f"--mix: unknown dialogue sets {unknown}; choose from train_s2t, train_s2m, prealign_asr")
    run_config = config_from_flags(args, t)
    started = time.perf_counter()
    data = load_dialogue(progress=True)
    result = train_prealign(run_config, data=data, mix=mix, state_dir=args.state_dir, resume=not args.restart,
                            threads=args.threads)
    with atomic_directory(out) as folder:
        files = save_mllm(result.model, folder, llm_from_m0=True)
        model = load_mllm(folder)                      # measure exactly what is shipped
        with torch_threads(args.threads):
            metrics = evaluate_mllm(model, *data)
        manifest = write_manifest(
            folder, "prealign", run_command(TRAIN_COMMAND, argv), files, train=run_config.to_dict(),
            threads=args.threads, run_key=result.run_key, mix=list(mix), dialogue=data[0].summary(),
            dialogue_sha256=data[0].fingerprint(), parameters=parameter_counts(result.model),
            llm_bit_identical_to_m0=True, train_seconds=result.train_seconds,
            wall_seconds=round(time.perf_counter() - started, 1), log=result.log, metrics=metrics)
    refresh_seal(out)
    print(json.dumps({"out": str(out), "train_seconds": manifest["train_seconds"], "metrics": metrics}, indent=1))
    return 0


def add_sets_flag(parser, default: Sequence[str] = EVAL_SETS) -> None:
    """``--sets a,b``: which evaluation sets to measure (``default``: those the recipe's manifest holds;
    ``trained_sample`` is a sample of the training chats, a diagnostic of how well the model fits them)."""
    choices = (*EVAL_SETS, TRAINED_SAMPLE)

    def sets(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        unknown = sorted(set(names) - set(choices))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown evaluation sets {unknown}; choose from {', '.join(choices)}")
        return names

    parser.add_argument("--sets", type=sets, default=tuple(default),
                        help=f"comma-separated evaluation sets (default {','.join(default)}; from {','.join(choices)})")


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini prealign eval``: every measurement of a pre-aligned checkpoint (default data/prealign)."""
    parser = RecipeParser(prog="python -m fac_mini prealign eval", description=main_eval.__doc__)
    add_eval_flags(parser, PREALIGN_DIR)
    add_sets_flag(parser)
    args = parser.parse_args(argv)
    model = load_mllm(args.path)
    data = load_dialogue(progress=not args.json)
    with torch_threads(args.threads):
        metrics = evaluate_mllm(model, *data, limit=args.limit, sets=args.sets)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"pre-aligned {args.path}: T2T held-out exact match {metrics['t2t']['exact_match']:.3f}, "
          f"answer NLL {metrics['t2t']['answer_nll']:.3f}")
    for name in args.sets:
        row = metrics[name]
        print(f"  {name:<26} S2T exact {row['s2t_exact_match']:.3f} fact {row['s2t_fact_accuracy']:.3f} "
              f"NLL {row['s2t_answer_nll']:.3f} | S2M speech acc {row['s2m_speech_accuracy']:.3f} "
              f"ppl {row['s2m_speech_perplexity']:.1f}  (n={row['n']})")
    return 0
