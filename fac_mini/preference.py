"""Multi-task preference data from the mini world: what DPO trains on (notebook 12), and how each task is measured.

Fun-Audio-Chat's DPO stage (paper §2.4) optimises one loss across several *preference dimensions*. The mini world
has honest analogues of three of the paper's four:

- ``robustness``  a spoken question degraded by noise, a reverberation-like filter or a speed change (seeded,
  :func:`degrade`) -> the correct answer is chosen, the worst of the model's own sampled answers is rejected.
  Measured by the answer's *attribute accuracy* (did it answer what was asked: the statement of the asked
  attribute) and fact accuracy, on degraded held-out questions.
- ``style``  instruction following: "Answer in one word." (chosen: the value, e.g. "Dunmere."; rejected: the
  model's own full-sentence reply) and "Answer in a full sentence." (chosen: the canonical sentence; rejected:
  the one-word answer). Measured by the fraction of replies that follow the instruction (mean of the two).
- ``voice``  audio understanding, a question about the user's own voice: "Is the speaker's voice high or low?"
  (chosen: "The voice is high." / "The voice is low." from the eSpeak pitch of the clip's voice; rejected: the
  other one). Two voices (``HELD_OUT_VOICES``) never appear in its training pairs. Measured by accuracy.

*Empathy* is left out: eSpeak speaks every sentence in one neutral manner, so the corpus has no emotional speech
to be empathetic to; inventing labels would teach nothing true.

Training pairs come from the corpus ``train`` split (questions about speech facts, as in Core-Cocktail), a fifth
of them kept apart as a ``dev`` set; evaluation uses the shipped ``test`` split only (the held-out phrasings),
so ``dpo eval`` runs on a fresh clone. Robustness pairs also come as S2M pairs (text *and* speech: the reply's
speech ids are the corpus recording of that sentence), so DPO moves both streams.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import CACHE_DIR
from .constants import SAMPLE_RATE
from .dialogue import DialogueData, DialogueExample, answer_has_fact, collate_dialogue
from .tts import VOICES
from .world import ATTRIBUTES, STATEMENTS

__all__ = [
    "DIMENSIONS", "DEGRADATIONS", "ONE_WORD", "FULL_SENTENCE", "VOICE_QUESTION", "HIGH_PITCH", "HELD_OUT_VOICES",
    "PREFERENCE_CACHE", "PreferencePair", "Prompt", "degrade", "voice_height", "voice_answer", "one_word_answer",
    "reply_attribute", "follows_instruction", "voice_reply_is_right", "evaluation_prompts", "training_prompts",
    "prompt_tensors", "build_pairs", "collate_pairs", "score_replies", "generate_replies", "pairs_fingerprint",
    "save_pairs", "load_pairs", "pair_summary",
]

DIMENSIONS = ("robustness", "style", "voice")
DEGRADATIONS = ("noise", "reverb", "speed")
ONE_WORD = "Answer in one word."
FULL_SENTENCE = "Answer in a full sentence."
VOICE_QUESTION = "Is the speaker's voice high or low?"
HIGH_PITCH = 55                        # eSpeak pitch (0-99) from which a corpus voice counts as "high"
HELD_OUT_VOICES = ("spk02", "spk05")   # one low, one high voice: never in the voice task's training pairs
PREFERENCE_CACHE = CACHE_DIR / "preference"
SAMPLES_PER_PROMPT = 4                 # on-policy samples ranked per robustness prompt
DEV_EVERY = 5                          # every 5th training question is a dev prompt instead


# ----------------------------------------------------------------------------------------------------------
# Degradations (robustness)
# ----------------------------------------------------------------------------------------------------------
def degrade(wave: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A seeded degraded copy of a 16 kHz clip (float32, mono).

    noise:  white Gaussian noise at an SNR drawn from U[0, 10] dB of the clip's power;
    reverb: convolution with an exponentially decaying noise tail (RT60 from U[0.3, 0.8] s) mixed 1:1 with the
            dry signal, rescaled to the original peak (a room-like smear of the words);
    speed:  played U[0.85, 1.15] times faster (resampled, so pitch and tempo both change; length changes).
    """
    from .audio import as_mono_float, resample

    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; use one of {DEGRADATIONS}")
    wave = as_mono_float(wave, allow_silent=False)
    rng = np.random.default_rng(seed)
    if kind == "noise":
        snr_db = rng.uniform(0.0, 10.0)
        power = float(np.mean(wave ** 2))
        noise = rng.standard_normal(wave.size) * np.sqrt(power / 10 ** (snr_db / 10))
        return (wave + noise).astype(np.float32)
    if kind == "reverb":
        rt60 = rng.uniform(0.3, 0.8)
        length = int(rt60 * SAMPLE_RATE)
        decay = np.exp(-6.9 * np.arange(length) / length)            # -60 dB (ln 1000 = 6.9) at RT60
        tail = rng.standard_normal(length) * decay
        tail /= np.sqrt(np.sum(tail ** 2))
        wet = np.convolve(wave, tail)[:wave.size]
        mixed = wave + wet
        return (mixed * (np.abs(wave).max() / np.abs(mixed).max())).astype(np.float32)
    factor = rng.uniform(0.85, 1.15)
    return resample(wave, round(SAMPLE_RATE * factor), SAMPLE_RATE)


# ----------------------------------------------------------------------------------------------------------
# Answers and how each task scores them
# ----------------------------------------------------------------------------------------------------------
def voice_height(speaker: str) -> str:
    """"high" or "low": the eSpeak pitch of a corpus voice (spk00-spk09) against ``HIGH_PITCH``."""
    for voice in VOICES:
        if voice.speaker_id == speaker:
            return "high" if voice.pitch >= HIGH_PITCH else "low"
    raise ValueError(f"unknown corpus voice {speaker!r}; have {[v.speaker_id for v in VOICES]}")


def voice_answer(height: str) -> str:
    """The reply to ``VOICE_QUESTION``: "The voice is high." or "The voice is low."."""
    if height not in ("high", "low"):
        raise ValueError(f"height must be 'high' or 'low', got {height!r}")
    return f"The voice is {height}."


def one_word_answer(value: str) -> str:
    """The reply to ``ONE_WORD``: the value alone, capitalised, with a full stop ("baker" -> "Baker.")."""
    return value[:1].upper() + value[1:] + "."


_TEMPLATE_PATTERNS = {attribute: re.compile("^" + re.escape(STATEMENTS[attribute][0]).replace(
    re.escape("{name}"), r"[A-Z][a-z]+ [A-Z][a-z]+").replace(re.escape("{value}"), r"[a-z A-Z]+") + "$")
    for attribute in ATTRIBUTES}


def reply_attribute(text: str) -> str | None:
    """Which attribute's canonical statement the reply is ("X lives in Y." -> "town"), or None."""
    text = text.strip()
    for attribute, pattern in _TEMPLATE_PATTERNS.items():
        if pattern.match(text):
            return attribute
    return None


def follows_instruction(text: str, instruction: str) -> bool:
    """Style compliance: ``ONE_WORD`` -> a single word (letters, optional full stop); ``FULL_SENTENCE`` -> at least
    three words ending with a full stop."""
    text = text.strip()
    if instruction == ONE_WORD:
        return re.fullmatch(r"[A-Za-z]+\.?", text) is not None
    if instruction == FULL_SENTENCE:
        return len(text.split()) >= 3 and text.endswith(".")
    raise ValueError(f"not a style instruction: {instruction!r}; use ONE_WORD or FULL_SENTENCE")


def voice_reply_is_right(text: str, height: str) -> bool:
    """The reply names the right height and not the other one (as a word)."""
    other = "low" if height == "high" else "high"
    return re.search(rf"\b{height}\b", text) is not None and re.search(rf"\b{other}\b", text) is None


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One user turn of a task: ``example`` (its ``user_id`` names the clip, "<corpus id>~<degradation>" for a
    degraded copy; ``answer`` the correct reply of the task), the instruction line, and the task."""

    dimension: str
    example: DialogueExample
    instruction: str | None = None

    @property
    def clip(self) -> tuple[str, str | None]:
        """(corpus utterance id, degradation or None)."""
        base, _, kind = self.example.user_id.partition("~")
        return base, kind or None


def _with_clip(example: DialogueExample, degradation: str | None, answer: str | None = None) -> DialogueExample:
    user_id = example.user_id if degradation is None else f"{example.user_id}~{degradation}"
    return dataclasses.replace(example, user_id=user_id, answer=example.answer if answer is None else answer)


def _task_prompts(questions: Sequence[DialogueExample], clips: Sequence[DialogueExample], speaker_of: dict[str, str],
                  *, split_styles: bool) -> list[Prompt]:
    """Robustness (each question degraded, kinds in turn), style (each question under both instructions, or one
    in turn with ``split_styles``), voice (each clip)."""
    prompts = [Prompt("robustness", _with_clip(e, DEGRADATIONS[i % len(DEGRADATIONS)])) for i, e in
               enumerate(questions)]
    for i, example in enumerate(questions):
        styles = ((ONE_WORD, FULL_SENTENCE)[i % 2],) if split_styles else (ONE_WORD, FULL_SENTENCE)
        for style in styles:
            answer = one_word_answer(example.value) if style == ONE_WORD else example.answer
            prompts.append(Prompt("style", _with_clip(example, None, answer), style))
    for example in clips:
        height = voice_height(speaker_of[example.user_id])
        prompts.append(Prompt("voice", _with_clip(example, None, voice_answer(height)), VOICE_QUESTION))
    return prompts


def _speakers() -> dict[str, str]:
    from .corpus import read_metadata

    return {row["id"]: row["speaker"] for row in read_metadata()}


def evaluation_prompts(data: DialogueData) -> list[Prompt]:
    """The held-out prompts, all from the shipped test split: the 160 held-out-phrasing questions (robustness:
    degraded; style: under both instructions) and the voice question on each of them."""
    questions = list(data["heldout_speech_facts"]) + list(data["heldout_text_facts"])
    return _task_prompts(questions, questions, _speakers(), split_styles=False)


def training_prompts(data: DialogueData) -> dict[str, list[Prompt]]:
    """``{"train": [...], "dev": [...]}`` from the training questions about speech facts (train split; every
    ``DEV_EVERY``-th is dev). Style alternates the two instructions; the voice task asks about every training
    question and statement clip (the pre-alignment statements too), leaving out ``HELD_OUT_VOICES``."""
    speaker_of = _speakers()
    questions, statements = list(data["train_s2t"]), list(data["prealign_asr"])
    prompts = {}
    for name, keep in (("train", lambda i: i % DEV_EVERY != 0), ("dev", lambda i: i % DEV_EVERY == 0)):
        examples = [e for i, e in enumerate(questions) if keep(i)]
        clips = examples + [dataclasses.replace(e, kind="s2t") for i, e in enumerate(statements) if keep(i)]
        clips = [e for e in clips if name == "dev" or speaker_of[e.user_id] not in HELD_OUT_VOICES]
        prompts[name] = _task_prompts(examples, clips, speaker_of, split_styles=name == "train")
    return prompts


def prompt_tensors(prompts: Sequence[Prompt], base: dict[str, dict[str, torch.Tensor]], *,
                   progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``base`` (the dialogue tensors: log-mel, speech ids, sample counts) plus the log-mel features and sample
    counts of every degraded clip of ``prompts`` (computed from the corpus audio, seeded by the clip's place)."""
    from tqdm.auto import tqdm

    from .audio import load_audio
    from .corpus import audio_path, read_metadata
    from .released.processing import FunAudioChatProcessor
    from .tokenizer import load_tokenizer

    rows = {row["id"]: row for row in read_metadata()}
    processor = FunAudioChatProcessor(load_tokenizer())
    features, samples = dict(base["features"]), dict(base["num_samples"])
    degraded = sorted({p.example.user_id for p in prompts if "~" in p.example.user_id})
    for user_id in tqdm(degraded, desc="degraded clips", disable=not progress):
        name, _, kind = user_id.partition("~")
        seed = int(hashlib.sha256(user_id.encode()).hexdigest()[:8], 16)
        wave = degrade(load_audio(audio_path(rows[name])), kind, seed)
        mel, mask = processor.features([wave])                                            # (1, 128, F), (1, F)
        features[user_id] = mel[0, :, :int(mask.sum())].clone()
        samples[user_id] = torch.tensor([wave.size])
    for prompt in prompts:
        if prompt.example.user_id not in features:
            raise KeyError(f"no features for clip {prompt.example.user_id}: pass the dialogue tensors that hold it")
    return {"features": features, "num_samples": samples, "speech_ids": dict(base["speech_ids"])}


# ----------------------------------------------------------------------------------------------------------
# Replies and scores
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_replies(model, prompts: Sequence[Prompt], tensors, tokenizer, *, batch_size: int = 64,
                     samples: int = 1, seed: int = 0, max_new_tokens: int = 20) -> list[list[str]]:
    """S2T replies to each prompt: greedy (``samples=1``) or ``samples`` draws at temperature 1 from a generator
    seeded with ``seed``. Returns one list of replies per prompt (S2T generation does not depend on padding)."""
    from .generate import generate_s2t

    replies: list[list[str]] = [[] for _ in prompts]
    generator = torch.Generator().manual_seed(seed)
    order = [i for i in range(len(prompts)) for _ in range(samples)]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate_dialogue([dataclasses.replace(prompts[i].example, kind="s2t") for i in rows], tensors,
                                 tokenizer, model.config, with_labels=False, padding_side="left",
                                 instructions=[prompts[i].instruction for i in rows])
        if samples == 1:
            out = generate_s2t(model, batch, max_new_tokens)
        else:
            out = generate_s2t(model, batch, max_new_tokens, do_sample=True, generator=generator,
                               sp_gen_kwargs={"text_greedy": False})
        for i, ids in zip(rows, out.text_ids.tolist()):
            replies[i].append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return replies


def _robustness_score(reply: str, example: DialogueExample) -> int:
    """5 for the exact answer; else 2 for the right fact, +1 for the right attribute, +1 for the right person."""
    if reply == example.answer:
        return 5
    return 2 * answer_has_fact(reply, example) + (reply_attribute(reply) == example.attribute) + \
        (example.person in reply)


def score_replies(prompts: Sequence[Prompt], replies: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every task's held-out metrics from one greedy reply per prompt (rounded to 4 digits):

    robustness: attribute_accuracy (primary), fact_accuracy, person_accuracy, exact_match, and per degradation
    the attribute accuracy; style: compliance (primary: mean of the two instructions), one_word, full_sentence,
    one_word_fact_accuracy; voice: accuracy (primary), held_out_voices, seen_voices.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    mean = lambda values: round(float(np.mean(values)), 4) if len(values) else None     # noqa: E731
    speaker_of = _speakers()
    rob = [(p, r) for p, r in zip(prompts, replies) if p.dimension == "robustness"]
    style = [(p, r) for p, r in zip(prompts, replies) if p.dimension == "style"]
    voice = [(p, r) for p, r in zip(prompts, replies) if p.dimension == "voice"]
    result: dict[str, dict[str, float]] = {}
    if rob:
        result["robustness"] = {
            "attribute_accuracy": mean([reply_attribute(r) == p.example.attribute for p, r in rob]),
            "fact_accuracy": mean([answer_has_fact(r, p.example) for p, r in rob]),
            "person_accuracy": mean([p.example.person in r for p, r in rob]),
            "exact_match": mean([r == p.example.answer for p, r in rob]), "n": len(rob),
            **{f"attribute_accuracy_{kind}": mean([reply_attribute(r) == p.example.attribute for p, r in rob
                                                   if p.clip[1] == kind]) for kind in DEGRADATIONS}}
    if style:
        one = [follows_instruction(r, p.instruction) for p, r in style if p.instruction == ONE_WORD]
        full = [follows_instruction(r, p.instruction) for p, r in style if p.instruction == FULL_SENTENCE]
        result["style"] = {"compliance": round((mean(one) + mean(full)) / 2, 4) if one and full else mean(one + full),
                           "one_word": mean(one), "full_sentence": mean(full),
                           "one_word_fact_accuracy": mean([r.rstrip(".").lower() == p.example.value.lower()
                                                           for p, r in style if p.instruction == ONE_WORD]),
                           "n": len(style)}
    if voice:
        right = [(speaker_of[p.clip[0]] in HELD_OUT_VOICES,
                  voice_reply_is_right(r, "high" if "high" in p.example.answer else "low")) for p, r in voice]
        result["voice"] = {"accuracy": mean([ok for _, ok in right]),
                           "held_out_voices": mean([ok for held, ok in right if held]),
                           "seen_voices": mean([ok for held, ok in right if not held]), "n": len(voice)}
    return result


# ----------------------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a chosen and a rejected reply. ``kind`` "s2t" (text reply) or "s2m" (text + the corpus
    recording of each reply sentence: ``chosen_speech_id`` / ``rejected_speech_id``). ``source``: "on-policy" when
    the rejected reply is the model's own sample or greedy reply, "constructed" when the task made it."""

    prompt: Prompt
    kind: str
    chosen: str
    rejected: str
    source: str
    chosen_speech_id: str | None = None
    rejected_speech_id: str | None = None

    def examples(self) -> tuple[DialogueExample, DialogueExample]:
        """The chosen and the rejected chat as dialogue examples (same prompt, different reply)."""
        base = dataclasses.replace(self.prompt.example, kind=self.kind)
        return (dataclasses.replace(base, answer=self.chosen, answer_speech_id=self.chosen_speech_id),
                dataclasses.replace(base, answer=self.rejected, answer_speech_id=self.rejected_speech_id))


def build_pairs(model, prompts: Sequence[Prompt], tensors, tokenizer, spoken: dict[str, str], *, seed: int = 0,
                samples: int = SAMPLES_PER_PROMPT) -> list[PreferencePair]:
    """Preference pairs for ``prompts`` from ``model`` (the reference: the checkpoint DPO starts from).

    robustness: ``samples`` draws per degraded question, ranked by answer quality (exact > right fact > right
    attribute / person); chosen = the correct answer (one of the draws when the model found it), rejected = the
    lowest-ranked draw; none when every draw is exact. Every second one is also an S2M pair when both sentences
    have a recording (``spoken``: sentence -> corpus utterance id). style: rejected = the model's greedy reply
    when it breaks the instruction (on-policy), else the reply in the other style (constructed). voice: rejected
    = the other height (constructed).
    """
    pairs: list[PreferencePair] = []
    robust = [p for p in prompts if p.dimension == "robustness"]
    draws = generate_replies(model, robust, tensors, tokenizer, samples=samples, seed=seed)
    for number, (prompt, replies) in enumerate(zip(robust, draws)):
        example = prompt.example
        worst = min(replies, key=lambda reply: _robustness_score(reply, example))
        if worst == example.answer:
            continue
        pairs.append(PreferencePair(prompt, "s2t", example.answer, worst, "on-policy"))
        if number % 2 == 0 and example.answer in spoken and worst in spoken:
            pairs.append(PreferencePair(prompt, "s2m", example.answer, worst, "on-policy",
                                        spoken[example.answer], spoken[worst]))
    styled = [p for p in prompts if p.dimension == "style"]
    greedy = generate_replies(model, styled, tensors, tokenizer)
    for prompt, (reply,) in zip(styled, greedy):
        example = prompt.example
        if not follows_instruction(reply, prompt.instruction):
            pairs.append(PreferencePair(prompt, "s2t", example.answer, reply, "on-policy"))
        elif prompt.instruction == FULL_SENTENCE:
            pairs.append(PreferencePair(prompt, "s2t", example.answer, one_word_answer(example.value), "constructed"))
        elif reply.rstrip(".").lower() != example.value.lower():       # one word, but the wrong one
            pairs.append(PreferencePair(prompt, "s2t", example.answer, reply, "on-policy"))
    for prompt in (p for p in prompts if p.dimension == "voice"):
        height = "high" if "high" in prompt.example.answer else "low"
        pairs.append(PreferencePair(prompt, "s2t", prompt.example.answer,
                                    voice_answer("low" if height == "high" else "high"), "constructed"))
    return pairs


def collate_pairs(pairs: Sequence[PreferencePair], tensors, tokenizer, config) -> dict[str, torch.Tensor]:
    """One ``FunAudioChat.forward`` batch of 2B chats: the B chosen first, then the B rejected (labels on the
    replies only). S2M and S2T pairs may be mixed."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    chosen, rejected = zip(*(pair.examples() for pair in pairs))
    instructions = [pair.prompt.instruction for pair in pairs] * 2
    return collate_dialogue([*chosen, *rejected], tensors, tokenizer, config, instructions=instructions)


def pairs_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """sha256 of every pair (what a DPO run's key depends on)."""
    payload = json.dumps([dataclasses.asdict(pair) for pair in pairs], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_pairs(path: Path | str) -> list[PreferencePair]:
    """Pairs written by :func:`save_pairs` (JSON lines)."""
    pairs = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        prompt = row.pop("prompt")
        prompt = Prompt(prompt["dimension"], DialogueExample(**prompt["example"]), prompt["instruction"])
        pairs.append(PreferencePair(prompt=prompt, **row))
    return pairs


def save_pairs(pairs: Sequence[PreferencePair], path: Path | str) -> Path:
    """Write pairs as JSON lines (atomically)."""
    from .train.store import atomic_write

    text = "".join(json.dumps(dataclasses.asdict(pair), sort_keys=True) + "\n" for pair in pairs)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def pair_summary(pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """How many pairs per dimension, kind and source."""
    summary: dict[str, Any] = {}
    for pair in pairs:
        key = f"{pair.prompt.dimension}/{pair.kind}/{pair.source}"
        summary[key] = summary.get(key, 0) + 1
    return dict(sorted(summary.items()))
