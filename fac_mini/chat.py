"""The voice chat: speech in -> the mini Fun-Audio-Chat -> text + speech out, streamed, on one CPU thread.

One call of :meth:`VoiceChat.reply` runs the whole loop of notebook 13::

    question wave (any rate) -> 16 kHz -> FunAudioChatProcessor   log-mel + <|AUDIO|> slots, the released prompt
      -> generate (KV caches)            one LLM step = one text token + one group of 5 speech ids (200 ms)
         on_step: the group's speech codes -> StreamingDetokenizer.push    hops of 15 ids + 3 of look-ahead
                  -> flow (ids -> mel) -> vocoder (mel -> wave) -> an audio chunk, ready while the LLM goes on
      -> finish(): the last chunk        reply.wave = the chunks end to end (16 kHz float32 mono)

The prompt is what the model was trained on (``fac_mini.dialogue.collate_dialogue``): the system prompt of the
mode (``S2M_SYSTEM_PROMPT`` for text + speech, ``S2T_SYSTEM_PROMPT`` for text only), the user's audio slot and an
optional text instruction (:func:`~fac_mini.released.processing.audio_chat_prompt`). Generation is greedy by
default (text = raw argmax, SRH greedy: the same reply every time); ``do_sample=True`` samples the speech with the
released settings (T 0.8, top-p 0.9, repetition penalty 1.2) from a generator seeded with ``seed``.

**Multi-turn.** The chat keeps the previous turns (user audio + the assistant's text reply), at most the last
``MAX_HISTORY_TURNS`` = 8 (the release's value), and puts them before the new question in the released chat format;
older turns drop out, and turns that would not fit the LLM's context (256 positions for the mini model) are dropped
too, oldest first (``reply.timings["history_turns"]`` says how many were used). ``reset()`` forgets them;
``history=False`` makes one call single-turn (it neither reads nor extends the history). The mini model was trained
on single-turn chats only, so its evaluation is single-turn.

**Timings** (``reply.timings``, seconds from the start of ``reply``, the question having ended): ``first_token_s``
(prefill: the first token of any kind), ``first_text_s`` (the first token that is text, not a control token),
``first_audio_s`` (the first audio chunk ready to play), ``total_s``, ``llm_steps``, ``audio_s`` (seconds of reply
audio), ``rtf`` (total_s / audio_s) and ``stages``: the seconds spent inside the encoder, the LLM, the SRH, the
flow and the vocoder (forward hooks on those modules and their direct children), and ``other`` (the rest: Python,
sampling, the processor's log-mel). ``reply.timeline`` lists every event in order: ``("text", token)``,
``("speech", group of 5 ids)``, ``("audio", samples in the chunk)``. Everything runs on the calling thread.

``python -m fac_mini chat eval`` measures the loop on the held-out spoken questions (:func:`evaluate_chat`).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import DATA_DIR
from .audio import MIN_SAMPLES, as_mono_float, resample
from .constants import SAMPLE_RATE
from .detokenize import DEFAULT_SPEAKER, Detokenizer
from .generate import GenerationStep, generate_s2m, generate_s2t
from .model import FunAudioChat
from .released.processing import (AUDIO_TEMPLATE, FunAudioChatProcessor, S2M_SYSTEM_PROMPT, S2T_SYSTEM_PROMPT,
                                  audio_chat_prompt)

__all__ = ["CHAT_DIR", "MAX_HISTORY_TURNS", "MODES", "STAGES", "REPLY_VOICES", "EVAL_SETS", "ChatTurn", "ChatEvent",
           "ChatReply", "VoiceChat", "chat_text", "evaluate_chat", "main_eval"]

CHAT_DIR = DATA_DIR / "dpo"            # the shipped chat model: the DPO checkpoint
MAX_HISTORY_TURNS = 8                  # previous turns kept in the prompt (the release's value)
MODES = ("s2m", "s2t")
SYSTEM_PROMPTS = {"s2m": S2M_SYSTEM_PROMPT, "s2t": S2T_SYSTEM_PROMPT}
STAGES = ("encoder", "llm", "srh", "flow", "vocoder")
REPLY_VOICES = ("spk00", "spk03", "spk06", "spk08")      # the voices `chat eval` cycles through
EVAL_SETS = ("heldout_speech_facts", "heldout_text_facts")
DEFAULT_MAX_NEW_TOKENS = 48            # LLM steps per reply: 9.6 s of speech, twice the longest corpus answer
# How to rebuild each shipped checkpoint a chat can load (named in the FileNotFoundError of a missing folder).
RECIPES = {"dpo": "python -m fac_mini dpo train --out data/dpo",
           "cocktail": "python -m fac_mini cocktail train --out data/cocktail",
           "prealign": "python -m fac_mini prealign train --out data/prealign"}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# ----------------------------------------------------------------------------------------------------------
# What a reply holds
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatTurn:
    """One finished turn of the history: the user's 16 kHz audio, its instruction and the assistant's text."""

    wave: np.ndarray
    instruction: str | None
    text: str


@dataclass(frozen=True)
class ChatEvent:
    """One moment of a reply: ``time_s`` from the start of ``reply``; ``kind`` "text" (payload: the token as text,
    control tokens by name), "speech" (payload: the step's 5 speech ids, bos/eos included) or "audio" (payload: the
    number of samples of the chunk that became ready)."""

    time_s: float
    kind: str
    payload: Any


@dataclass
class ChatReply:
    """What :meth:`VoiceChat.reply` returns (COURSE.md §6).

    text: the reply's text (control tokens dropped). speech_ids (n,): the 25 Hz speech codes that were spoken (bos,
    eos and pad removed). wave (samples,): float32 mono at ``sampling_rate`` = 16000 (empty in "s2t" mode or when
    the model produced no speech). timings / timeline: see the module doc. text_ids (steps,): every generated text
    id. chunks: the streamed audio chunks in order (``wave`` is their concatenation). mel (80, 2·n): the streamed
    log-mel the vocoder read (None without speech). question: the 16 kHz wave the model heard. speaker: the reply
    voice (a name, or "clip" for a reference clip; None in "s2t" mode).
    """

    text: str
    speech_ids: torch.Tensor
    wave: np.ndarray
    timings: dict[str, Any]
    timeline: list[ChatEvent]
    mode: str
    text_ids: torch.Tensor
    chunks: list[np.ndarray] = field(default_factory=list)
    mel: torch.Tensor | None = None
    question: np.ndarray | None = None
    speaker: str | None = None
    sampling_rate: int = SAMPLE_RATE

    @property
    def audio_s(self) -> float:
        """Seconds of reply audio."""
        return self.wave.size / self.sampling_rate


# ----------------------------------------------------------------------------------------------------------
# The prompt
# ----------------------------------------------------------------------------------------------------------
def chat_text(system: str, previous: Sequence[ChatTurn] = (), instruction: str | None = None) -> str:
    """The chat text up to the assistant's new reply, one ``<|AUDIO|>`` slot per user turn (the processor expands
    each to its clip's groups). Without previous turns this is exactly ``audio_chat_prompt(system, instruction)``,
    the single-turn prompt of training; each previous turn is a user turn (audio + its instruction) and the
    assistant's text reply, in the released chat format::

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\n<|audio_bos|><|AUDIO|><|audio_eos|>[\\n{instruction}]<|im_end|>\\n
        <|im_start|>assistant\\n{reply}<|im_end|>\\n          ... once per previous turn
        <|im_start|>user\\n<|audio_bos|><|AUDIO|><|audio_eos|>[\\n{instruction}]<|im_end|>\\n<|im_start|>assistant\\n
    """
    current = audio_chat_prompt(system, instruction)
    opening = f"{IM_START}system\n{system}{IM_END}\n"
    if not current.startswith(opening):
        raise ValueError(f"audio_chat_prompt no longer starts with the system turn {opening!r}; update chat_text")

    def user(turn_instruction: str | None) -> str:
        content = AUDIO_TEMPLATE if not turn_instruction else f"{AUDIO_TEMPLATE}\n{turn_instruction}"
        return f"{IM_START}user\n{content}{IM_END}\n"

    past = "".join(f"{user(turn.instruction)}{IM_START}assistant\n{turn.text}{IM_END}\n" for turn in previous)
    return opening + past + current[len(opening):]


# ----------------------------------------------------------------------------------------------------------
# Where the time goes: forward hooks per stage
# ----------------------------------------------------------------------------------------------------------
def _timed_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The root and its direct children (the items of a ModuleList/ModuleDict child, which is never called
    itself): together they run all of a stage's module work, whichever method (forward, generate_step,
    generate) drives them."""
    modules = [root]
    for child in root.children():
        modules += list(child.children()) if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [child]
    return modules


class StageClock:
    """Seconds spent inside each stage's modules, from forward pre-hooks and hooks (nested calls of one stage
    count once). Use as ``with clock.attached(): ...``; the hooks are removed afterwards."""

    def __init__(self, stages: Mapping[str, Sequence[torch.nn.Module]]):
        self.stages = {name: list(roots) for name, roots in stages.items()}
        self.seconds = {name: 0.0 for name in self.stages}
        self._depth = {name: 0 for name in self.stages}
        self._entered = {name: 0.0 for name in self.stages}

    def _enter(self, name: str):
        def hook(module, args):
            if self._depth[name] == 0:
                self._entered[name] = time.perf_counter()
            self._depth[name] += 1
        return hook

    def _leave(self, name: str):
        def hook(module, args, output):
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self.seconds[name] += time.perf_counter() - self._entered[name]
        return hook

    @contextmanager
    def attached(self) -> Iterator["StageClock"]:
        handles = []
        try:
            for name, roots in self.stages.items():
                modules = {id(m): m for root in roots for m in _timed_modules(root)}.values()
                for module in modules:
                    handles.append(module.register_forward_pre_hook(self._enter(name)))
                    handles.append(module.register_forward_hook(self._leave(name)))
            yield self
        finally:
            for handle in handles:
                handle.remove()


# ----------------------------------------------------------------------------------------------------------
# The chat
# ----------------------------------------------------------------------------------------------------------
def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use 's2m' (text + speech) or 's2t' (text only)")
    return mode


def _question_wave(wave, sampling_rate) -> np.ndarray:
    """A question clip -> new mono float32 at 16 kHz, or ValueError saying what is wrong and what to do."""
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Real) or \
            not math.isfinite(sampling_rate) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive number of Hz, got {sampling_rate!r}")
    ndim = wave.dim() if isinstance(wave, torch.Tensor) else np.ndim(wave)
    if ndim == 2:
        raise ValueError(f"the question has shape {tuple(np.shape(wave))}: pass one mono channel; average the "
                         "channels first (wave.mean(axis=0) for (channels, samples))")
    if ndim != 1:
        raise ValueError(f"the question must be a 1-D mono waveform (samples,), got shape {tuple(np.shape(wave))}")
    array = as_mono_float(wave, name="the question", allow_silent=False)
    if sampling_rate != SAMPLE_RATE:
        if array.size * SAMPLE_RATE / sampling_rate < MIN_SAMPLES:
            raise ValueError(f"the question lasts {array.size / sampling_rate * 1000:.1f} ms, shorter than one 25 Hz "
                             "speech frame (40 ms); pass longer audio")
        array = resample(array, sampling_rate, SAMPLE_RATE)
    if array.size < MIN_SAMPLES:
        raise ValueError(f"the question has {array.size} samples at 16 kHz ({array.size / SAMPLE_RATE * 1000:.1f} ms), "
                         f"shorter than one 25 Hz speech frame ({MIN_SAMPLES} samples = 40 ms); pass longer audio")
    return array


class VoiceChat:
    """Speech in -> text + speech out with the mini Fun-Audio-Chat (see the module doc).

    model: a ``FunAudioChat`` (eval mode is set). tokenizer: its text tokenizer (``fac_mini.tokenizer``).
    detokenizer: the flow + vocoder (``Detokenizer.from_pretrained()``), whose codebook must cover the model's
    speech codes. speaker: the default reply voice, a corpus voice name (``"spk00"`` … ``"spk09"``) or a reference
    clip (16 kHz). max_new_tokens: LLM steps per reply at most. do_sample / seed: greedy (default, reproducible) or
    sampled speech with the released settings (``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``),
    drawn from a generator seeded with ``seed`` at every reply; text stays greedy unless ``text_greedy=False``.
    flow_steps / guidance: the flow's Euler steps and CFG strength. vocoder_lookahead: mel frames the streaming
    vocoder waits for (6 = 120 ms, the default of ``StreamingDetokenizer``; its full context makes the stream equal
    the offline wave).
    """

    def __init__(self, model: FunAudioChat, tokenizer, detokenizer: Detokenizer, *, speaker=DEFAULT_SPEAKER,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, do_sample: bool = False, seed: int = 0,
                 temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0, repetition_penalty: float | None = None,
                 text_greedy: bool = True, flow_steps: int = 10, guidance: float = 0.7, vocoder_lookahead: int = 6):
        if not isinstance(model, FunAudioChat):
            raise ValueError(f"model must be a FunAudioChat, got {type(model).__name__}")
        if not isinstance(detokenizer, Detokenizer):
            raise ValueError(f"detokenizer must be a fac_mini.detokenize.Detokenizer, got {type(detokenizer).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        disc = model.config.discrete
        if detokenizer.flow.config.vocab_size < disc.bos_token_id:
            raise ValueError(f"the detokenizer knows {detokenizer.flow.config.vocab_size} speech codes but the model "
                             f"speaks codes 0..{disc.bos_token_id - 1}; use the detokenizer trained on the same "
                             "speech tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = FunAudioChatProcessor(tokenizer, speech_pad_id=disc.pad_token_id, group_size=disc.group_size)
        self.processor.check_config(model.config)
        self.detokenizer = detokenizer
        self.speaker_name, self.speaker_embedding = self._voice(speaker)
        self.max_new_tokens, self.do_sample, self.seed, self.text_greedy = max_new_tokens, do_sample, seed, text_greedy
        if repetition_penalty is None:                       # the released sampling uses 1.2; greedy uses none
            repetition_penalty = 1.2 if do_sample else 1.0
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty) \
            if do_sample else dict(repetition_penalty=repetition_penalty)
        self.stream_settings = dict(steps=flow_steps, guidance=guidance, vocoder_lookahead=vocoder_lookahead)
        self.history: list[ChatTurn] = []
        self._special_ids = set(tokenizer.all_special_ids)
        self._stages = {"encoder": [model.continuous_audio_tower, model.audio_tower], "llm": [model.language_model],
                        "srh": [model.audio_invert_tower], "flow": [detokenizer.flow],
                        "vocoder": [detokenizer.vocoder]}

    @classmethod
    def from_pretrained(cls, path: Path | str | None = None, **kwargs) -> "VoiceChat":
        """The shipped chat: the model of ``path`` (default ``data/dpo``, a LoRA adapter over its base; a folder of
        ``save_mllm`` such as ``data/cocktail``, the Core-Cocktail model, also loads: ``fac_mini.train.dpo.
        load_chat_model``), the course tokenizer and the shipped detokenizer (``data/flow`` + ``data/vocoder``).
        ``kwargs`` go to the constructor. A missing folder raises ``FileNotFoundError`` naming the command that
        builds it."""
        from .tokenizer import load_tokenizer
        from .train.dpo import load_chat_model

        folder = CHAT_DIR if path is None else Path(path)
        if not (folder / "config.json").is_file():
            recipe = RECIPES.get(folder.name) if folder.resolve().parent == DATA_DIR.resolve() else None
            hint = f"build it with `{recipe}`" if recipe else "pass the folder of a saved mini Fun-Audio-Chat"
            raise FileNotFoundError(f"chat model not found: {folder / 'config.json'} is missing; {hint}"
                                    + ("" if path is not None else " (or pass path='data/cocktail')"))
        return cls(load_chat_model(folder), load_tokenizer(), Detokenizer.from_pretrained(), **kwargs)

    # -- settings ------------------------------------------------------------------------------------------
    def _voice(self, speaker) -> tuple[str, torch.Tensor]:
        """A voice name or reference clip -> (its name or "clip", its (256,) embedding); ValueError if unknown."""
        if isinstance(speaker, str) and speaker not in self.detokenizer.speakers:
            raise ValueError(f"unknown speaker {speaker!r}; choose one of {sorted(self.detokenizer.speakers)} or "
                             "pass a reference clip (16 kHz waveform)")
        return (speaker if isinstance(speaker, str) else "clip"), self.detokenizer.speaker_embedding(speaker)

    def reset(self) -> None:
        """Forget the previous turns."""
        self.history.clear()

    # -- the prompt ----------------------------------------------------------------------------------------
    def context_limit(self, mode: str) -> int:
        """Prompt positions the model can take with room for ``max_new_tokens`` steps (the LLM's context, and in
        "s2m" the SRH's, which runs 5 positions per LLM position)."""
        config = self.model.config
        limit = config.text_config.max_position_embeddings
        if _check_mode(mode) == "s2m":
            limit = min(limit, config.crq_config.max_position_embeddings // config.discrete.group_size)
        return limit - self.max_new_tokens

    def build_inputs(self, wave: np.ndarray, mode: str = "s2m", instruction: str | None = None,
                     history: bool = True) -> tuple[dict[str, torch.Tensor], int]:
        """The processor's inputs for a 16 kHz question (validated, see ``reply``) after the kept previous turns
        (at most ``MAX_HISTORY_TURNS``; oldest dropped first, also while the prompt is too long for the context).
        Returns (inputs, number of previous turns in the prompt)."""
        system = SYSTEM_PROMPTS[_check_mode(mode)]
        turns = self.history[-MAX_HISTORY_TURNS:] if history else []
        limit = self.context_limit(mode)
        while True:
            inputs = self.processor(text=chat_text(system, turns, instruction),
                                    audio=[turn.wave for turn in turns] + [wave])
            length = inputs["input_ids"].shape[1]
            if length <= limit:
                return dict(inputs), len(turns)
            if not turns:
                raise ValueError(f"the question ({wave.size / SAMPLE_RATE:.1f} s) makes a prompt of {length} "
                                 f"positions, but the model takes at most {limit} with max_new_tokens="
                                 f"{self.max_new_tokens}; pass a shorter question or a smaller max_new_tokens")
            turns = turns[1:]

    # -- the loop ------------------------------------------------------------------------------------------
    def reply(self, wave, sampling_rate: int = SAMPLE_RATE, mode: str = "s2m", *, instruction: str | None = None,
              speaker=None, history: bool = True) -> ChatReply:
        """Answer one spoken question: ``wave`` is mono audio (numpy or torch, float in [-1, 1] or int PCM) at
        ``sampling_rate`` Hz (resampled to 16 kHz). ``mode``: "s2m" (text + streamed speech) or "s2t" (text only:
        the wave is empty, ``first_audio_s`` is None). ``instruction``: optional text after the audio in the user
        turn. ``speaker``: this reply's voice (default: the chat's). ``history=False``: single turn, and the turn is
        not kept. Raises ValueError for a wrong mode, an unknown speaker, a non-positive rate, stereo, empty, too
        short (< 40 ms), silent, NaN or infinite audio, or a question too long for the model's context."""
        _check_mode(mode)
        speaker_name, embedding = (self.speaker_name, self.speaker_embedding) if speaker is None else self._voice(speaker)
        question = _question_wave(wave, sampling_rate)
        clock = StageClock(self._stages)
        start = time.perf_counter()
        timeline: list[ChatEvent] = []
        marks: dict[str, float | None] = {"first_text_s": None, "first_speech_s": None, "first_audio_s": None}
        chunks: list[np.ndarray] = []
        codes: list[int] = []
        bos = self.model.config.discrete.bos_token_id
        stream = self.detokenizer.stream(embedding, **self.stream_settings) if mode == "s2m" else None

        def now() -> float:
            return time.perf_counter() - start

        def add_chunks(new: Sequence[np.ndarray]) -> None:
            for chunk in new:
                if chunk.size:
                    ready = now()
                    marks["first_audio_s"] = marks["first_audio_s"] or ready
                    chunks.append(chunk)
                    timeline.append(ChatEvent(ready, "audio", int(chunk.size)))

        def on_step(step: GenerationStep) -> None:
            token = int(step.text_ids[0])
            arrived = now()
            timeline.append(ChatEvent(arrived, "text", self.tokenizer.decode([token], skip_special_tokens=False)))
            if token not in self._special_ids and marks["first_text_s"] is None:
                marks["first_text_s"] = arrived
            if step.speech_ids is not None:
                group = step.speech_ids[0].tolist()
                timeline.append(ChatEvent(arrived, "speech", group))
                spoken = [i for i in group if 0 <= i < bos]
                if spoken:
                    marks["first_speech_s"] = marks["first_speech_s"] or arrived
                    codes.extend(spoken)
                    add_chunks(stream.push(spoken))

        with clock.attached():
            inputs, turns_used = self.build_inputs(question, mode, instruction, history)
            generator = torch.Generator().manual_seed(self.seed) if self.do_sample else None
            common = dict(do_sample=self.do_sample, generator=generator, on_step=on_step, **self.sampling)
            if mode == "s2m":
                out = generate_s2m(self.model, inputs, self.max_new_tokens,
                                   sp_gen_kwargs={"text_greedy": self.text_greedy}, **common)
                if codes:
                    add_chunks([stream.finish()])
            else:
                out = generate_s2t(self.model, inputs, self.max_new_tokens,
                                   sp_gen_kwargs={"text_greedy": self.text_greedy}, **common)
        total = now()
        text_ids = out.text_ids[0]
        text = self.tokenizer.decode(text_ids.tolist(), skip_special_tokens=True).strip()
        reply_wave = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        audio_s = reply_wave.size / SAMPLE_RATE
        stages = {name: round(clock.seconds[name], 4) for name in STAGES}
        stages["other"] = round(max(0.0, total - sum(clock.seconds.values())), 4)
        timings = {"first_token_s": timeline[0].time_s, **marks, "total_s": total,
                   "llm_steps": out.timing.steps, "audio_s": audio_s, "rtf": total / audio_s if audio_s else None,
                   "question_s": question.size / SAMPLE_RATE, "prompt_positions": int(inputs["input_ids"].shape[1]),
                   "history_turns": turns_used, "stages": stages}
        if history:
            self.history.append(ChatTurn(question, instruction, text))
            del self.history[:-MAX_HISTORY_TURNS]
        return ChatReply(text=text, speech_ids=torch.tensor(codes, dtype=torch.long), wave=reply_wave,
                         timings=timings, timeline=timeline, mode=mode, text_ids=text_ids, chunks=chunks,
                         mel=stream.mel if codes else None, question=question, speaker=speaker_name if mode == "s2m" else None)

    def ask(self, text: str, voice: str = "spk00", mode: str = "s2m", **kwargs) -> ChatReply:
        """Speak ``text`` with eSpeak in a corpus voice (``voice``: spk00 … spk09, ``fac_mini.tts.VOICES``) and
        :meth:`reply` to it (``kwargs``: instruction, speaker, history). ``reply.question`` is the synthesised wave."""
        from .tts import VOICES, synthesize

        voices = {v.speaker_id: v for v in VOICES}
        if voice not in voices:
            raise ValueError(f"unknown corpus voice {voice!r}; choose one of {sorted(voices)}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("ask() needs a non-empty question text")
        return self.reply(synthesize(text, voices[voice]), SAMPLE_RATE, mode, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Measurement: `python -m fac_mini chat eval`
# ----------------------------------------------------------------------------------------------------------
def _spread(examples: Sequence, limit: int | None) -> list:
    """``limit`` examples evenly spaced over the set (several voices and people), or all of them."""
    if limit is None or limit >= len(examples):
        return list(examples)
    return [examples[i * len(examples) // limit] for i in range(limit)]


def _accuracies(flags: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """``{"s2t_fact": [...], "s2t_exact": [...], ...}`` -> ``{"s2t_fact_accuracy": rate, "s2t_exact_match": ...}``."""
    names = {"fact": "fact_accuracy", "exact": "exact_match"}
    return {f"{mode}_{names[kind]}": round(sum(values) / max(len(values), 1), 4)
            for mode, kind, values in ((*key.split("_"), values) for key, values in flags.items())}


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"median": round(float(np.median(array)), 4), "p90": round(float(np.quantile(array, 0.9)), 4),
            "max": round(float(array.max()), 4)}


def _reference_numbers(cocktail_dir: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """The numbers the goals are set against, read from the shipped manifests: the Core-Cocktail model's S2T fact
    accuracy per evaluation set (its shipped run) and the speech tokenizer's CER on real speech (test split)."""
    from .train.store import read_json

    cocktail = read_json(cocktail_dir / "manifest.json", "Core-Cocktail manifest",
                         f"rebuild it with `{RECIPES['cocktail']}`")
    metrics = cocktail["runs"][cocktail["shipped_run"]]["metrics"]
    per_set = {name: metrics[name]["s2t_fact_accuracy"] for name in EVAL_SETS}
    overall = sum(metrics[name]["s2t_fact_accuracy"] * metrics[name]["n"] for name in EVAL_SETS) / \
        sum(metrics[name]["n"] for name in EVAL_SETS)
    tokenizer = read_json(tokenizer_dir / "manifest.json", "speech tokenizer manifest",
                          "rebuild it with `python -m fac_mini speech-tokenizer train --out data/speech_tokenizer`")
    return {"cocktail_run": cocktail["shipped_run"], "cocktail_s2t_fact_accuracy": per_set,
            "cocktail_s2t_fact_accuracy_overall": round(overall, 4),
            "tokenizer_cer_real_speech": tokenizer["metrics"]["cer"]}


def evaluate_chat(chat: VoiceChat, *, limit: int | None = 24, dnsmos_clips: int = 8,
                  voices: Sequence[str] = REPLY_VOICES, progress: bool = False) -> dict[str, Any]:
    """The chat loop on held-out spoken questions (``heldout_speech_facts`` and ``heldout_text_facts`` of
    ``build_dialogue()``: held-out phrasing, corpus test clips of several voices; ``limit`` per set, evenly
    spaced), each answered single-turn in "s2t" and in "s2m" mode (reply voices cycling through ``voices``).

    Returns one dict: answer accuracy (``answer_has_fact``, exact match) per set and overall for both modes;
    speech-text consistency (CTC read-back CER of each spoken reply against its own text, from its speech ids and
    from its audio, beside the tokenizer's CER on real speech); DNSMOS of the first ``dnsmos_clips`` replies beside
    that of their questions (eSpeak corpus audio); speaker similarity of the replies to their voice's centroid and
    to the best other voice; latency (first text, first audio), RTF and the per-stage seconds; the goals.
    """
    from tqdm.auto import tqdm

    from .audio import load_audio
    from .corpus import audio_path, read_metadata
    from .dialogue import answer_has_fact, answer_is_exact, build_dialogue
    from .quality import dnsmos, read_back
    from .speaker import match_voices, speaker_embeddings
    from .speech_tokenizer import SPEECH_TOKENIZER_DIR, shipped_speech_tokenizer
    from .train.metrics import character_error_rate, normalize_text

    if not voices or any(voice not in chat.detokenizer.speakers for voice in voices):
        raise ValueError(f"voices must be names of {sorted(chat.detokenizer.speakers)}, got {list(voices)}")
    started = time.perf_counter()
    reference = _reference_numbers(DATA_DIR / "cocktail", SPEECH_TOKENIZER_DIR)
    data = build_dialogue()
    rows = {row["id"]: row for row in read_metadata()}
    per_set: dict[str, Any] = {}
    spoken: list[dict[str, Any]] = []           # s2m replies with speech and text
    s2m_timings, s2t_timings, all_flags = [], [], {"s2t_fact": [], "s2t_exact": [], "s2m_fact": [], "s2m_exact": []}
    for name in EVAL_SETS:
        examples = _spread(data[name], limit)
        flags = {key: [] for key in all_flags}
        for index, example in enumerate(tqdm(examples, desc=f"chat {name}", disable=not progress)):
            question = load_audio(audio_path(rows[example.user_id]))
            s2t = chat.reply(question, mode="s2t", history=False)
            voice = voices[index % len(voices)]
            s2m = chat.reply(question, mode="s2m", speaker=voice, history=False)
            flags["s2t_fact"].append(answer_has_fact(s2t.text, example))
            flags["s2t_exact"].append(answer_is_exact(s2t.text, example))
            flags["s2m_fact"].append(answer_has_fact(s2m.text, example))
            flags["s2m_exact"].append(answer_is_exact(s2m.text, example))
            s2t_timings.append(s2t.timings)
            s2m_timings.append(s2m.timings)
            if s2m.wave.size >= MIN_SAMPLES and len(s2m.speech_ids) and normalize_text(s2m.text):
                spoken.append({"text": s2m.text, "ids": s2m.speech_ids, "wave": s2m.wave, "voice": voice,
                               "question": question, "timings": s2m.timings})
        per_set[name] = {"n": len(examples), "question_voices": sorted({rows[e.user_id]["speaker"] for e in examples}),
                         **_accuracies(flags), "cocktail_s2t_fact_accuracy": reference["cocktail_s2t_fact_accuracy"][name]}
        for key in all_flags:
            all_flags[key] += flags[key]
    overall = {"n": len(all_flags["s2t_fact"]), **_accuracies(all_flags), "s2m_replies_with_speech": len(spoken)}

    consistency: dict[str, Any] = {"replies": len(spoken), "tokenizer_cer_real_speech": reference["tokenizer_cer_real_speech"]}
    speech: dict[str, Any] = {}
    if spoken:
        texts = [reply["text"] for reply in spoken]
        tokenizer = shipped_speech_tokenizer()
        consistency["cer_from_ids"] = round(character_error_rate(texts, tokenizer.transcribe_ids(
            [reply["ids"] for reply in spoken])), 4)
        consistency["cer_from_audio"] = round(character_error_rate(texts, read_back([r["wave"] for r in spoken])), 4)
        if dnsmos_clips:
            scored = spoken[:dnsmos_clips]
            speech["dnsmos_clips"] = len(scored)
            speech["dnsmos_ovrl_replies"] = round(float(np.mean([dnsmos(r["wave"])["ovrl"] for r in scored])), 3)
            speech["dnsmos_ovrl_questions"] = round(float(np.mean([dnsmos(r["question"])["ovrl"] for r in scored])), 3)
        references = {voice: embedding.numpy() for voice, embedding in chat.detokenizer.speakers.items()}
        try:
            matched = match_voices(speaker_embeddings([r["wave"] for r in spoken]), [r["voice"] for r in spoken],
                                   references)
            speech.update(target_similarity=round(float(matched.target_similarity.mean()), 4),
                          best_other_similarity=round(float(matched.best_other_similarity.mean()), 4),
                          target_voice_rate=round(matched.rate, 4))
        except ValueError as error:          # a reply with less than 150 ms of voiced audio cannot be embedded
            speech["speaker_similarity_error"] = str(error)

    with_audio = [t for t in s2m_timings if t["audio_s"]]
    stage_seconds = {name: round(sum(t["stages"][name] for t in with_audio), 3) for name in (*STAGES, "other")}
    total_s, audio_s = sum(t["total_s"] for t in with_audio), sum(t["audio_s"] for t in with_audio)
    latency = {"s2t_first_text_s": _summary([t["first_text_s"] for t in s2t_timings if t["first_text_s"] is not None]),
               "s2m_first_text_s": _summary([t["first_text_s"] for t in s2m_timings if t["first_text_s"] is not None]),
               "s2m_first_audio_s": _summary([t["first_audio_s"] for t in with_audio]),
               "s2m_total_s": _summary([t["total_s"] for t in with_audio]),
               "s2m_audio_s": _summary([t["audio_s"] for t in with_audio]),
               "rtf": round(total_s / audio_s, 4) if audio_s else None,
               "rtf_per_reply": _summary([t["rtf"] for t in with_audio]),
               "llm_steps": _summary([t["llm_steps"] for t in with_audio]),
               "stage_seconds": stage_seconds,
               "stage_share": {name: round(value / max(total_s, 1e-9), 3) for name, value in stage_seconds.items()}}
    first_audio = latency["s2m_first_audio_s"]
    goal_accuracy = round(reference["cocktail_s2t_fact_accuracy_overall"] - 0.05, 4)
    goal_cer = round(1.5 * reference["tokenizer_cer_real_speech"], 4)
    goals = {
        "first_audio_s_max<=1.0": {"value": first_audio and first_audio["max"], "goal": 1.0,
                                   "met": bool(first_audio and first_audio["max"] <= 1.0)},
        "rtf<=0.5": {"value": latency["rtf"], "goal": 0.5, "met": latency["rtf"] is not None and latency["rtf"] <= 0.5},
        "s2m_fact_accuracy>=cocktail_s2t-0.05": {"value": overall["s2m_fact_accuracy"], "goal": goal_accuracy,
                                                 "met": overall["s2m_fact_accuracy"] >= goal_accuracy},
        "consistency_cer_from_ids<=1.5x_tokenizer": {"value": consistency.get("cer_from_ids"), "goal": goal_cer,
                                                     "met": consistency.get("cer_from_ids") is not None
                                                     and consistency["cer_from_ids"] <= goal_cer},
    }
    return {"sets": per_set, "overall": overall, "consistency": consistency, "speech": speech, "latency": latency,
            "goals": goals, "reference": reference, "threads": torch.get_num_threads(), "machine_cores": os.cpu_count(),
            "limit_per_set": limit, "reply_voices": list(voices), "max_new_tokens": chat.max_new_tokens,
            "eval_seconds": round(time.perf_counter() - started, 1)}


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini chat eval``: the voice chat on held-out spoken questions (accuracy, speech-text
    consistency, DNSMOS, speaker similarity, latency, RTF, where the time goes), all on ``--threads`` threads."""
    from .train.cli import RecipeParser, add_eval_flags
    from .train.loop import torch_threads

    parser = RecipeParser(prog="python -m fac_mini chat eval", description=main_eval.__doc__)
    add_eval_flags(parser, CHAT_DIR)
    parser.set_defaults(limit=24)
    parser.add_argument("--dnsmos-clips", type=int, default=8, help="replies scored by DNSMOS (slow; 0 = none)")
    args = parser.parse_args(argv)
    if args.dnsmos_clips < 0:
        parser.error(f"--dnsmos-clips must be >= 0, got {args.dnsmos_clips}")
    try:
        chat = VoiceChat.from_pretrained(args.path)
    except FileNotFoundError as error:
        parser.error(str(error))
    with torch_threads(args.threads):
        result = evaluate_chat(chat, limit=args.limit, dnsmos_clips=args.dnsmos_clips, progress=not args.json)
    result["path"] = str(args.path)
    if args.json:
        print(json.dumps(result))
        return 0
    overall, latency = result["overall"], result["latency"]
    print(f"voice chat {args.path}: {overall['n']} held-out questions, {result['threads']} thread(s) "
          f"(machine: {result['machine_cores']} cores), {result['eval_seconds']} s")
    for name, row in result["sets"].items():
        print(f"  {name:<22} S2T fact {row['s2t_fact_accuracy']:.3f} exact {row['s2t_exact_match']:.3f} | S2M fact "
              f"{row['s2m_fact_accuracy']:.3f} exact {row['s2m_exact_match']:.3f} | Core-Cocktail S2T fact "
              f"{row['cocktail_s2t_fact_accuracy']:.3f}")
    print(f"  consistency: {json.dumps(result['consistency'])}")
    print(f"  speech: {json.dumps(result['speech'])}")
    print(f"  latency: first text {latency['s2m_first_text_s']}, first audio {latency['s2m_first_audio_s']}, "
          f"RTF {latency['rtf']}; stage share {latency['stage_share']}")
    for goal, row in result["goals"].items():
        print(f"  goal {goal:<42} {row['value']} (goal {row['goal']}): {'met' if row['met'] else 'MISSED'}")
    return 0
