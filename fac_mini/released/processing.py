"""The processor: user audio (+ an optional instruction) -> the keyword inputs of ``FunAudioChat``.

What the released ``FunAudioChatProcessor`` does for raw 16 kHz audio (docs/released_model.md §3.1, §3.6):

    num_frames   = int(len(wav) / 16000 * 25)             25 Hz speech frames, floor
    speech_ids   = <|audio_pad|> x num_frames -> the speech pad id, right-padded to a multiple of 5,
                   speech_attention_mask = 1 on the num_frames real frames         (A, T), T = 5 * ceil(max / 5)
    <|AUDIO|>    -> <|audio_bos|> <|AUDIO|> x ceil(num_frames / 5) <|audio_eos|>   one LLM position per 200 ms
    input_features, feature_attention_mask   Whisper 128-bin log-mel, valid = ceil(samples / 160) frames
    feature_exist_mask                       all True (every audio has features)

The user's audio is never turned into S3 tokens: the placeholder ids only count the groups, and the continuous
encoder's group means *replace* their embeddings (``continuous_features_mode="replace"``).

Chat format (one user turn holding the audio, then the assistant's turn is opened)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
    <|audio_bos|><|AUDIO|>...<|audio_eos|>[\\n{instruction}]<|im_end|>\\n<|im_start|>assistant\\n

System prompts: S2T "You are asked to generate text tokens.", S2M "You are asked to generate both text and speech
tokens at the same time." (``S2T_SYSTEM_PROMPT``, ``S2M_SYSTEM_PROMPT``).

Deviations from the release, all without effect on what the model computes:

- Mel padding. The released processor most likely pads every clip to 30 s (Whisper's ``padding="max_length"``,
  3000 frames) before the log-mel; its ``preprocessor_config.json`` was not visible (docs/released_model.md §3.1).
  Here ``feature_padding="longest"`` (default) returns only max(valid frames) frames. Each clip's log-mel is
  still computed on the clip followed by enough zeros (``N_FFT`` samples) that every valid frame sees exactly
  the zero right context and the same per-clip maximum as in the 30 s array, so the *valid* frames equal the
  released extractor's (tested against ``WhisperFeatureExtractor(padding="max_length")``); frames after a
  clip's valid length are 0 here (the log-mel of silence in the release) and the encoder never reads them.
  ``feature_padding="max_length"`` reproduces the released (A, 128, 3000) tensor.
- Long audio. Like the release (Whisper ``chunk_length`` 30 s), features stop at ``max_feature_seconds``
  while the placeholders cover the whole clip, so the tail groups get zero continuous features; a warning
  says so. ``max_feature_seconds=None`` keeps all the audio (the mini encoder has no length limit).
- Text padding. Batches are left-padded with the text pad id (``<|endoftext|>``) for generation
  (``padding_side="left"``); the released tokenizer's own padding side is not relied on.
- The speech pad id comes from the model config (``audio_config.pad_token_id``, 6563) instead of tokenising
  ``<|audio_pad|>`` with the ``speech_tokenizer/`` sub-tokenizer (which this course does not ship).
"""
from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..constants import GROUP_SIZE, SPEECH_PAD_ID, TOKEN_RATE_HZ
from ..train.store import read_json
from ..audio import (HOP_LENGTH, MIN_SAMPLES, N_FFT, N_MELS, _log_mel_padded, as_mono_float, check_not_silent,
                     load_audio, resample)
from ..constants import SAMPLE_RATE

__all__ = [
    "AUDIO_TOKEN", "AUDIO_BOS_TOKEN", "AUDIO_EOS_TOKEN",
    "AUDIO_PAD_TOKEN", "SIL_TOKEN", "AUDIO_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "S2T_SYSTEM_PROMPT",
    "S2M_SYSTEM_PROMPT", "SYSTEM_PROMPTS", "num_speech_frames", "num_audio_tokens", "chat_prompt",
    "audio_chat_prompt", "expand_audio_tokens", "FunAudioChatProcessor",
]

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS_TOKEN = "<|audio_bos|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"
AUDIO_PAD_TOKEN = "<|audio_pad|>"
SIL_TOKEN = "<|sil|>"
AUDIO_TEMPLATE = AUDIO_BOS_TOKEN + AUDIO_TOKEN + AUDIO_EOS_TOKEN
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
S2T_SYSTEM_PROMPT = "You are asked to generate text tokens."
S2M_SYSTEM_PROMPT = "You are asked to generate both text and speech tokens at the same time."
SYSTEM_PROMPTS = {"s2t": S2T_SYSTEM_PROMPT, "s2m": S2M_SYSTEM_PROMPT}
FEATURE_PADDINGS = ("longest", "max_length")

_SPECIAL = {"audio_token": AUDIO_TOKEN, "audio_bos_token": AUDIO_BOS_TOKEN, "audio_eos_token": AUDIO_EOS_TOKEN,
            "audio_pad_token": AUDIO_PAD_TOKEN, "sil_token": SIL_TOKEN, "im_start_token": "<|im_start|>",
            "im_end_token": "<|im_end|>"}


# ----------------------------------------------------------------------------------------------------------
# Counting and templates (pure functions)
# ----------------------------------------------------------------------------------------------------------
def num_speech_frames(num_samples: int, sampling_rate: int = SAMPLE_RATE, token_rate: int = TOKEN_RATE_HZ) -> int:
    """25 Hz frames of a clip, exactly as released: ``int(num_samples / sampling_rate * token_rate)`` (floor of
    the float product, so e.g. 1.03 s = 16480 samples -> 25 frames, 0.5 s -> 12)."""
    if num_samples < 0 or sampling_rate <= 0:
        raise ValueError(f"need num_samples >= 0 and sampling_rate > 0, got {num_samples}, {sampling_rate}")
    return int(num_samples / sampling_rate * token_rate)


def num_audio_tokens(num_frames: int, group_size: int = GROUP_SIZE) -> int:
    """``<|AUDIO|>`` placeholders (5 Hz LLM positions) for ``num_frames`` 25 Hz frames: ceil(n / k)."""
    if num_frames < 0 or group_size <= 0:
        raise ValueError(f"need num_frames >= 0 and group_size > 0, got {num_frames}, {group_size}")
    return -(-num_frames // group_size)


def chat_prompt(content: str, system: str | None = S2T_SYSTEM_PROMPT) -> str:
    """The released chat format up to the assistant's answer; ``system=None`` uses "You are a helpful assistant."

    >>> chat_prompt("hi", "sys")
    '<|im_start|>system\\nsys<|im_end|>\\n<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if not isinstance(content, str):
        raise ValueError(f"content must be a string, got {type(content).__name__}")
    system = DEFAULT_SYSTEM_PROMPT if system is None else system
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
            "<|im_start|>assistant\n")


def audio_chat_prompt(system: str | None = S2T_SYSTEM_PROMPT, instruction: str | None = None) -> str:
    """A prompt whose user turn is one audio slot ``<|audio_bos|><|AUDIO|><|audio_eos|>`` (+ "\\n" + instruction);
    the single ``<|AUDIO|>`` is expanded per clip by the processor."""
    content = AUDIO_TEMPLATE if not instruction else f"{AUDIO_TEMPLATE}\n{instruction}"
    return chat_prompt(content, system)


_AUDIO_PATTERN = re.compile(re.escape(AUDIO_TOKEN))


def expand_audio_tokens(text: str, counts: Sequence[int]) -> str:
    """Replace the i-th ``<|AUDIO|>`` of ``text`` by ``counts[i]`` copies between ``<|audio_bos|>``/``<|audio_eos|>``
    (the markers are added unless the placeholder is already flanked by them, as released)."""
    matches = list(_AUDIO_PATTERN.finditer(text))
    if len(matches) != len(counts):
        raise ValueError(f"the text holds {len(matches)} {AUDIO_TOKEN} placeholders but {len(counts)} audios were "
                         f"given; put one {AUDIO_TOKEN} (or {AUDIO_TEMPLATE}) per audio in the text")
    pieces, start = [], 0
    for match, count in zip(matches, counts):
        before, after = text[start:match.start()], text[match.end():]
        pieces.append(before)
        slot = AUDIO_TOKEN * count
        if not before.endswith(AUDIO_BOS_TOKEN):
            slot = AUDIO_BOS_TOKEN + slot
        if not after.startswith(AUDIO_EOS_TOKEN):
            slot = slot + AUDIO_EOS_TOKEN
        pieces.append(slot)
        start = match.end()
    pieces.append(text[start:])
    return "".join(pieces)


# ----------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------
class FunAudioChatProcessor:
    """Audio + chat text -> ``FunAudioChat`` inputs, as the released processor builds them (see the module doc).

    tokenizer: a transformers tokenizer holding the released special tokens (``<|im_start|>``, ``<|im_end|>``,
    ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>``, ``<|audio_pad|>``, ``<|sil|>``) and a pad token.
    speech_pad_id: the speech-vocabulary id of the placeholders (6563). group_size: 5. feature_padding:
    ``"longest"`` or ``"max_length"`` (30 s, released). max_feature_seconds: feature window (30 s as Whisper's
    ``chunk_length``; None = no limit). padding_side: ``"left"`` (generation) or ``"right"`` (training).
    """

    def __init__(self, tokenizer, *, speech_pad_id: int = SPEECH_PAD_ID, group_size: int = GROUP_SIZE,
                 token_rate: int = TOKEN_RATE_HZ, n_mels: int = N_MELS, feature_padding: str = "longest",
                 max_feature_seconds: float | None = 30.0, padding_side: str = "left"):
        if tokenizer is None or not callable(tokenizer):
            raise ValueError("tokenizer must be a transformers tokenizer (e.g. PreTrainedTokenizerFast), got "
                             f"{type(tokenizer).__name__}; use FunAudioChatProcessor.from_pretrained(path)")
        if feature_padding not in FEATURE_PADDINGS:
            raise ValueError(f"feature_padding={feature_padding!r}; use one of {FEATURE_PADDINGS}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; use 'left' (generation) or 'right' (training)")
        if group_size <= 0 or token_rate <= 0 or n_mels <= 0 or speech_pad_id < 0:
            raise ValueError(f"need positive group_size/token_rate/n_mels and speech_pad_id >= 0, got {group_size}, "
                             f"{token_rate}, {n_mels}, {speech_pad_id}")
        if max_feature_seconds is not None and max_feature_seconds * SAMPLE_RATE < MIN_SAMPLES:
            raise ValueError(f"max_feature_seconds={max_feature_seconds} is shorter than one speech frame")
        self.tokenizer = tokenizer
        self.speech_pad_id, self.group_size, self.n_mels = speech_pad_id, group_size, n_mels
        self.token_rate = token_rate
        self.feature_padding, self.max_feature_seconds, self.padding_side = (feature_padding, max_feature_seconds,
                                                                             padding_side)
        ids = {}
        for name, token in _SPECIAL.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None) \
                    or tokenizer.convert_ids_to_tokens(token_id) != token:
                raise ValueError(f"the tokenizer has no {token} token ({name}); load the Fun-Audio-Chat tokenizer "
                                 "(released checkpoint folder or fac_mini.tokenizer), which defines it")
            ids[name] = int(token_id)
        self.audio_token_id = ids["audio_token"]
        self.audio_bos_id = ids["audio_bos_token"]
        self.audio_eos_id = ids["audio_eos_token"]
        self.audio_pad_id = ids["audio_pad_token"]          # text-side id; the speech side uses speech_pad_id
        self.sil_id = ids["sil_token"]
        self.im_end_id = ids["im_end_token"]
        pad = tokenizer.pad_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad token; the released one pads with <|endoftext|>")
        self.pad_token_id = int(pad)

    # -- loading -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "FunAudioChatProcessor":
        """Load the text tokenizer of a checkpoint folder with transformers (``AutoTokenizer``) and read, when
        present, ``processor_config.json`` (``audio_group_size``), ``preprocessor_config.json`` (``feature_size``,
        ``chunk_length``) and ``config.json`` (``audio_config.pad_token_id``, ``group_size``). ``kwargs`` win."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {path}")
        if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json or vocab.json + merges.txt) in {path}")
        settings: dict[str, Any] = {}
        config = _optional_json(path / "config.json").get("audio_config", {})
        if "pad_token_id" in config:
            settings["speech_pad_id"] = _json_number(config, "pad_token_id", int, path / "config.json", "audio_config.")
        if "group_size" in config:
            settings["group_size"] = _json_number(config, "group_size", int, path / "config.json", "audio_config.")
        processor_config = _optional_json(path / "processor_config.json")
        if "audio_group_size" in processor_config:
            settings["group_size"] = _json_number(processor_config, "audio_group_size", int,
                                                  path / "processor_config.json")
        features = _optional_json(path / "preprocessor_config.json")
        if "feature_size" in features:
            settings["n_mels"] = _json_number(features, "feature_size", int, path / "preprocessor_config.json")
        if "chunk_length" in features:
            settings["max_feature_seconds"] = float(_json_number(features, "chunk_length", float,
                                                                 path / "preprocessor_config.json"))
        if features.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise ValueError(f"{path / 'preprocessor_config.json'}: sampling_rate {features['sampling_rate']} is not "
                             f"supported (the log-mel here is fixed at {SAMPLE_RATE} Hz)")
        settings.update(kwargs)
        return cls(AutoTokenizer.from_pretrained(str(path)), **settings)

    def check_config(self, config) -> None:
        """Raise ``ValueError`` if a ``FunAudioChatConfig`` uses other special ids than this tokenizer."""
        pairs = [("audio_token_index", self.audio_token_id), ("audio_bos_index", self.audio_bos_id),
                 ("audio_eos_index", self.audio_eos_id), ("sil_index", self.sil_id)]
        pairs.append(("discrete.pad_token_id", self.speech_pad_id))
        pairs.append(("discrete.group_size", self.group_size))
        for name, value in pairs:
            owner, attr = (config.discrete, name.split(".")[1]) if name.startswith("discrete.") else (config, name)
            if getattr(owner, attr) != value:
                raise ValueError(f"model config {name}={getattr(owner, attr)} but the processor uses {value}; load "
                                 "the tokenizer that belongs to this checkpoint")

    # -- pieces ------------------------------------------------------------------------------------------
    def prompt(self, task: str = "s2t", instruction: str | None = None, system: str | None = None) -> str:
        """The chat text for one audio: system prompt of ``task`` ("s2t" or "s2m") unless ``system`` is given."""
        if system is None:
            if task not in SYSTEM_PROMPTS:
                raise ValueError(f"task={task!r}; use one of {tuple(SYSTEM_PROMPTS)} or pass system=...")
            system = SYSTEM_PROMPTS[task]
        return audio_chat_prompt(system, instruction)

    def load_wave(self, audio, sampling_rate: int = SAMPLE_RATE, name: str = "audio") -> np.ndarray:
        """One clip (path, numpy or torch, any rate, mono or 2-channel) -> new mono float32 array at 16 kHz."""
        if isinstance(audio, (str, Path)):
            return load_audio(audio, SAMPLE_RATE)
        wave = as_mono_float(audio, name=name)
        if sampling_rate != SAMPLE_RATE:
            wave = resample(wave, sampling_rate, SAMPLE_RATE)
        return wave

    def speech_placeholders(self, frames: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame counts (A,) -> speech_ids (A, T) all ``speech_pad_id`` and speech_attention_mask (A, T) long,
        1 on the first n frames; T = the longest count rounded up to a multiple of ``group_size``."""
        length = self.group_size * num_audio_tokens(max(frames), self.group_size)
        mask = (torch.arange(length)[None] < torch.tensor(list(frames))[:, None]).long()         # (A, T)
        return torch.full((len(frames), length), self.speech_pad_id, dtype=torch.long), mask

    def features(self, waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """16 kHz clips -> (input_features (A, n_mels, F) float32, feature_attention_mask (A, F) long).

        Valid frames = ceil(min(samples, max samples) / 160); their values equal the released extractor's
        (each clip is computed with >= N_FFT zeros after it, or on exactly the 30 s window if it is that long).
        Each clip is validated as ``load_wave`` does (mono float in [-1, 1], finite, at least 40 ms, not silent).
        """
        if len(waves) == 0:
            raise ValueError("features() got no clips; pass a non-empty list of 16 kHz waveforms")
        checked = []
        for i, wave in enumerate(waves):
            wave = as_mono_float(wave, name=f"waves[{i}]")
            if wave.size < MIN_SAMPLES:
                raise ValueError(f"waves[{i}] has {wave.size} samples, shorter than one 25 Hz speech frame "
                                 f"({MIN_SAMPLES} samples = 40 ms at 16 kHz); pass longer audio")
            check_not_silent(wave, f"waves[{i}]")
            checked.append(wave)
        return self._features(checked)

    def _features(self, waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` on clips already validated by ``load_wave`` (no second pass over the samples)."""
        limit = None if self.max_feature_seconds is None else int(round(self.max_feature_seconds * SAMPLE_RATE))
        mels, valid = [], []
        for i, wave in enumerate(waves):
            if limit is not None and wave.size > limit:
                warnings.warn(f"audio {i} lasts {wave.size / SAMPLE_RATE:.2f} s; as in the release, its features stop "
                              f"at {self.max_feature_seconds} s while its placeholders cover the whole clip (the "
                              "tail groups get zero features). Pass max_feature_seconds=None to keep everything.",
                              stacklevel=3)
                wave = wave[:limit]
            if self.feature_padding == "max_length":
                target = limit if limit is not None else wave.size + N_FFT
            else:
                target = wave.size + N_FFT if limit is None else min(limit, wave.size + N_FFT)
            padded = np.zeros(max(target, wave.size), dtype=np.float32)
            padded[:wave.size] = wave
            # = log_mel(padded), without validating again (a clip's first 30 s may be silent, which is fine)
            mels.append(_log_mel_padded(torch.from_numpy(padded)[None], self.n_mels)[0])        # (n_mels, frames)
            valid.append(math.ceil(wave.size / HOP_LENGTH))
        frames = max(mel.shape[1] for mel in mels) if self.feature_padding == "max_length" else max(valid)
        features = torch.zeros(len(mels), self.n_mels, frames)
        for row, (mel, count) in enumerate(zip(mels, valid)):
            keep = mel.shape[1] if self.feature_padding == "max_length" else count
            features[row, :, :keep] = mel[:, :keep]
        mask = (torch.arange(frames)[None] < torch.tensor(valid)[:, None]).long()               # (A, F)
        return features, mask

    # -- the call ----------------------------------------------------------------------------------------
    def __call__(self, text: str | Sequence[str] | None = None, audio=None, *, sampling_rate: int = SAMPLE_RATE,
                 task: str = "s2t", instruction: str | None = None, system: str | None = None):
        """Build the model inputs (a transformers ``BatchFeature``: dict access, ``.to(device)``, ``**inputs``).

        audio: one clip or a list of clips (path, numpy or torch; ``sampling_rate`` Hz, resampled to 16 kHz). A
        list (or tuple) of numbers is *one* clip, as transformers' feature extractors read it; a list of arrays,
        tensors, paths or lists of numbers is a batch; a list mixing numbers with clips is an error. Silent
        (all-zero), empty, NaN or out-of-range float audio raises ``ValueError`` (see ``fac_mini.audio``).
        text: one string or a list (the batch), holding one ``<|AUDIO|>`` per clip in reading order (as the
        released processor takes it); default: one ``prompt(task, instruction, system)`` per clip.

        Returns input_ids, attention_mask (B, L) left-padded, and with audio speech_ids, speech_attention_mask
        (A, T), input_features (A, n_mels, F), feature_attention_mask (A, F), feature_exist_mask (A,) bool.
        """
        from transformers import BatchFeature

        clips = _audio_clips(audio)
        waves = [self.load_wave(clip, sampling_rate, name=f"audio[{i}]") for i, clip in enumerate(clips)]
        frames = [num_speech_frames(wave.size, SAMPLE_RATE, self.token_rate) for wave in waves]
        for i, (wave, count) in enumerate(zip(waves, frames)):
            if count == 0 or wave.size < MIN_SAMPLES:
                raise ValueError(f"audio[{i}] has {wave.size} samples at 16 kHz ({wave.size / SAMPLE_RATE * 1000:.1f} "
                                 f"ms), shorter than one 25 Hz speech frame (40 ms); pass longer audio")
            check_not_silent(wave, f"audio[{i}]")
        if text is None:
            if not waves:
                raise ValueError("pass audio (one clip or a list) and/or text with one <|AUDIO|> per clip")
            texts = [self.prompt(task, instruction, system) for _ in waves]
        else:
            if instruction is not None or system is not None:
                raise ValueError("instruction/system only build the default prompt; with text=..., write them into "
                                 "the text (see audio_chat_prompt)")
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
        placeholders = [len(_AUDIO_PATTERN.findall(t)) for t in texts]
        if sum(placeholders) != len(waves):
            raise ValueError(f"the texts hold {sum(placeholders)} {AUDIO_TOKEN} placeholders in all but {len(waves)} "
                             f"audios were given; put one {AUDIO_TOKEN} per audio, in order")
        counts = iter(num_audio_tokens(count, self.group_size) for count in frames)
        expanded = [expand_audio_tokens(t, [next(counts) for _ in range(n)]) for t, n in zip(texts, placeholders)]
        encoded = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in expanded]
        for t, ids in zip(expanded, encoded):
            expected = t.count(AUDIO_TOKEN)
            if sum(1 for i in ids if i == self.audio_token_id) != expected:
                raise ValueError(f"tokenising the prompt gave a different number of {AUDIO_TOKEN} ids than "
                                 f"placeholders ({expected}); is {AUDIO_TOKEN} a special token of this tokenizer?")
        longest = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, ids in enumerate(encoded):
            span = slice(longest - len(ids), longest) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        data: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if waves:
            speech_ids, speech_mask = self.speech_placeholders(frames)
            features, feature_mask = self._features(waves)
            data.update(speech_ids=speech_ids, speech_attention_mask=speech_mask, input_features=features,
                        feature_attention_mask=feature_mask,
                        feature_exist_mask=torch.ones(len(waves), dtype=torch.bool))
        return BatchFeature(data)

    # -- text out ----------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids (list or 1-D tensor) -> text (special tokens such as ``<|sil|>`` dropped by default)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        """(B, n) ids -> B strings."""
        return [self.decode(row, skip_special_tokens) for row in ids]

    def __repr__(self) -> str:
        return (f"FunAudioChatProcessor(tokenizer={type(self.tokenizer).__name__}[{len(self.tokenizer)}], "
                f"speech_pad_id={self.speech_pad_id}, group_size={self.group_size}, "
                f"feature_padding={self.feature_padding!r}, max_feature_seconds={self.max_feature_seconds}, "
                f"padding_side={self.padding_side!r})")


def _audio_clips(audio) -> list:
    """The clips of the processor's ``audio`` argument: None -> [], a list of numbers -> one clip, a list or tuple
    of anything else -> those clips, anything else -> one clip."""
    if audio is None:
        return []
    if not isinstance(audio, (list, tuple)):
        return [audio]
    is_number = [isinstance(item, numbers.Number) for item in audio]
    if audio and all(is_number):
        return [np.asarray(audio)]                       # one clip of samples (transformers' reading)
    if any(is_number):
        first = is_number.index(True)
        raise ValueError(f"audio mixes numbers (audio[{first}] = {audio[first]!r}) with clips; pass one clip as "
                         "an array (or a list of numbers), or a batch as a list of arrays")
    return list(audio)


def _json_number(config: dict[str, Any], key: str, kind: type, path: Path, prefix: str = ""):
    """``config[key]`` as an ``int`` (no bools, no floats) or a ``float`` (int or float); else ValueError naming it."""
    value = config[key]
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ValueError(f"{path}: {prefix}{key} = {json.dumps(value)} ({type(value).__name__}), expected "
                         f"{'an int' if kind is int else 'a number'}")
    return value


def _optional_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict ({} when absent); a corrupt file raises ``ValueError`` naming it."""
    return read_json(path, "processor file") if path.is_file() else {}
