"""A supervised semantic speech tokenizer (the S3Tokenizer idea): speech in, 25 Hz discrete ids out.

Fun-Audio-Chat speaks in the ids of CosyVoice's S3Tokenizer: 25 ids per second from a codebook of
3^8 = 6561 codes. S3Tokenizer is an ASR encoder with a quantiser in its middle, trained only to recognise
speech, so its ids keep *what* was said and lose most of *who* said it. The course's miniature::

    16 kHz waveform                    (samples,)
      -> log-mel, 100 Hz               (128, frames)            fac_mini.audio.log_mel
      -> AudioEncoder, 25 Hz           (T25, len(levels))       fac_mini.encoder; its ``proj`` maps to FSQ dims
      -> FSQ                           codes (T25, len(levels)) in [-1, 1];  ids (T25,) in [0, prod(levels))
      -> CTC head (training only)      (T25 * ctc_upsample, characters)  -> the transcript

Finite scalar quantisation (FSQ, Mentzer et al. 2023) needs no codebook: every dimension i is squashed
into a bounded range and rounded to one of ``L_i`` integers, and the id is the mixed-radix number of those
integers, ``id = sum_i q_i * prod_{j<i} L_j`` (the first dimension is the least significant digit). The
rounding passes gradients straight through (``z + (round(z) - z).detach()``).

Rate rule: a clip of ``n`` samples gives ``frames = n // 160`` mel frames and ``(frames + 1) // 4`` ids,
i.e. one id per whole 40 ms and one more for a last partial 40 ms holding at least 3 of its 4 mel frames
(see :func:`num_speech_tokens`). Padding positions of a batch hold :data:`PAD_ID` (-1).

The shipped head reads every id on its own (``head_kernel=1``) and predicts one character slot per id
(``ctc_upsample=1``), so each code has to stand for a character (or blank) by itself: the ids are pushed
towards content. 25 slots per second suffice here: eSpeak reads at most ~22 characters per second and every
training clip has at least 4 spare slots for CTC's blanks between doubled letters; ``ctc_upsample=2`` gives
two slots per id for faster speech.

Shipped checkpoint (1300 steps, ~8 min on one core; numbers in ``data/speech_tokenizer/manifest.json``):
test CER 20.9 % (16.0 % on test sentences whose words all occur in training; 4 test words - with, call,
how, earn - never do, and must be spelled from sound alone), dev CER 9.9 %; 240 of 243 codes used,
perplexity 70; id distance same text / other voice 0.55 vs other text / same voice 0.83 (ratio 0.67).
Much of the remaining distance is the choice among several codes that the head reads as the same
character: reading each id as the head's character drops the same-text distance from 0.62 to 0.35
(5 parallel texts), so the ids carry more detail than the transcript needs, and that detail varies by voice.

Rebuild the shipped checkpoint with ``python -m fac_mini speech-tokenizer train`` (the same as
``main_train([])``); measure it with ``python -m fac_mini speech-tokenizer eval`` (``main_eval([])``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import CACHE_DIR, DATA_DIR, set_seed
from .train.loop import warmup_cosine_lr
from .train.store import atomic_write, file_sha256
from .audio import SAMPLE_RATE, log_mel
from .encoder import AudioEncoder, AudioEncoderConfig

__all__ = [
    "PAD_ID", "BLANK", "SPEECH_TOKENIZER_DIR", "TRAIN_COMMAND",
    "fsq_bound", "fsq_quantize", "fsq_codes_to_indices", "fsq_indices_to_codes", "FSQ",
    "normalize_text", "build_char_vocab", "text_to_ids", "ctc_greedy_decode", "edit_distance",
    "character_error_rate", "dedup_consecutive", "normalized_edit_distance", "num_speech_tokens",
    "SpeechTokenizerConfig", "SpeechTokenizer", "SpeechTokens", "SpeechTokenizerOutput", "features_from_waves",
    "pad_features",
    "train_speech_tokenizer", "evaluate_speech_tokenizer", "load_speech_tokenizer", "read_manifest",
    "main_train", "main_eval",
]

PAD_ID = -1                     # id at padding positions of a batch (never a real code)
BLANK = "<blank>"               # CTC blank, always character id 0
SPEECH_TOKENIZER_DIR = DATA_DIR / "speech_tokenizer"
WORK_DIR = CACHE_DIR / "speech_tokenizer_run"   # resumable training state (optimizer included), not shipped
TRAIN_COMMAND = "python -m fac_mini speech-tokenizer train"
FSQ_EPS = 1e-3                  # bound slightly past the outer levels, as vector_quantize_pytorch does


# ----------------------------------------------------------------------------------------------------------
# Finite scalar quantisation
# ----------------------------------------------------------------------------------------------------------
def _levels(levels, device=None) -> torch.Tensor:
    """Validate ``levels`` and return them as an int32 tensor ``(dims,)``."""
    values = list(levels.tolist() if isinstance(levels, torch.Tensor) else levels)
    if not values or any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 2 for v in values):
        raise ValueError(f"levels must be a non-empty list of integers >= 2, got {levels!r}")
    return torch.tensor(values, dtype=torch.int32, device=device)


def _check_last_dim(z: torch.Tensor, levels: torch.Tensor, name: str) -> None:
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() == 0 or z.shape[-1] != levels.numel():
        raise ValueError(f"{name} has shape {tuple(z.shape)}; its last axis must have one entry per level "
                         f"({levels.numel()} for levels {levels.tolist()})")


def fsq_bound(z: torch.Tensor, levels, eps: float = FSQ_EPS) -> torch.Tensor:
    """Squash ``z`` ``(..., dims)`` into the range each dimension is rounded in, before rounding.

    With ``L`` levels, ``half_l = (L - 1)(1 + eps) / 2`` and ``offset = 0.5`` for even ``L`` (0 for odd):
    ``bounded = tanh(z + atanh(offset / half_l)) * half_l - offset``. Odd ``L`` rounds to
    ``{-(L-1)/2, ..., (L-1)/2}``, symmetric around 0; even ``L`` rounds to ``{-L/2, ..., L/2 - 1}`` (one
    more level below 0), and the shift inside ``tanh`` keeps ``z = 0`` on the level 0. This is exactly
    ``vector_quantize_pytorch.FSQ.bound`` (same operations in the same order, so the same floats).
    """
    levels = _levels(levels, z.device if isinstance(z, torch.Tensor) else None)
    _check_last_dim(z, levels, "z")
    half_l = (levels - 1) * (1 + eps) / 2                               # (dims,) float32
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)                     # (dims,)
    shift = torch.atanh(offset / half_l)                                # (dims,)
    return torch.tanh(z + shift) * half_l - offset                      # (..., dims)


def fsq_quantize(z: torch.Tensor, levels) -> torch.Tensor:
    """FSQ codes of ``z`` ``(..., dims)``: same shape, values ``q / (L // 2)`` for integer ``q`` per dimension.

    ``round`` has zero gradient almost everywhere, so the rounding is straight-through: the forward value is
    ``round(bounded)``, the backward pass sees the identity (``bounded + (round(bounded) - bounded).detach()``).
    float32/float64 stay as they are; other float dtypes are computed in float32 and cast back.
    """
    levels = _levels(levels, z.device if isinstance(z, torch.Tensor) else None)
    _check_last_dim(z, levels, "z")
    if not z.dtype.is_floating_point:
        raise ValueError(f"z must be floating point, got {z.dtype}")
    dtype = z.dtype
    work = z if dtype in (torch.float32, torch.float64) else z.float()
    bounded = fsq_bound(work, levels)
    rounded = bounded + (bounded.round() - bounded).detach()            # straight-through estimator
    return (rounded / (levels // 2)).to(dtype)


def fsq_codes_to_indices(codes: torch.Tensor, levels) -> torch.Tensor:
    """Mixed-radix ids of FSQ codes: ``(..., dims)`` -> ``(...,)`` long, ``id = sum_i q_i * prod_{j<i} L_j``
    with ``q_i = code_i * (L_i // 2) + L_i // 2`` in ``[0, L_i)``."""
    levels = _levels(levels, codes.device if isinstance(codes, torch.Tensor) else None)
    _check_last_dim(codes, levels, "codes")
    half_width = (levels // 2).to(codes.dtype)
    digits = (codes * half_width + half_width).round().long()                        # (..., dims)
    if (digits < 0).any() or (digits >= levels.long()).any():
        raise ValueError(f"codes lie outside the grid of levels {levels.tolist()}; pass fsq_quantize() output")
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]).long(), dim=0)  # (dims,)
    return (digits * basis).sum(dim=-1)


def fsq_indices_to_codes(indices: torch.Tensor, levels) -> torch.Tensor:
    """Inverse of :func:`fsq_codes_to_indices`: ids ``(...,)`` -> float32 codes ``(..., dims)``."""
    levels = _levels(levels, indices.device if isinstance(indices, torch.Tensor) else None)
    indices = torch.as_tensor(indices)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    size = int(levels.long().prod())
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"indices must lie in [0, {size}) for levels {levels.tolist()}, got range "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]).long(), dim=0)  # (dims,)
    digits = (indices.long()[..., None] // basis) % levels.long()                    # (..., dims)
    half_width = levels // 2
    return ((digits - half_width) / half_width).float()


class FSQ(nn.Module):
    """Finite scalar quantiser with no parameters: ``forward(z)`` -> ``(codes, indices)``.

    ``z`` ``(..., dims)`` with ``dims = len(levels)``; ``codes`` has the same shape (straight-through
    gradients), ``indices`` ``(...,)`` long in ``[0, codebook_size)``.
    """

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        self.levels = tuple(int(v) for v in _levels(levels).tolist())
        self.codebook_size = math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = fsq_quantize(z, self.levels)
        return codes, fsq_codes_to_indices(codes.detach(), self.levels)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return fsq_indices_to_codes(indices, self.levels)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}"


# ----------------------------------------------------------------------------------------------------------
# Characters, CTC decoding, edit distances
# ----------------------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Transcript as CTC targets see it: lower case, letters, apostrophe and single spaces; hyphens become
    spaces, every other character (punctuation, digits) is dropped. ``"Where's Dunmere?"`` -> ``"where's dunmere"``."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    text = re.sub(r"[-\s]+", " ", text.lower())
    text = re.sub(r"[^a-z' ]", "", text)
    return re.sub(r" +", " ", text).strip()


def build_char_vocab(texts: Sequence[str]) -> tuple[str, ...]:
    """CTC vocabulary of ``texts``: ``(BLANK, *sorted characters of their normalized forms)``; blank is id 0."""
    chars = sorted({char for text in texts for char in normalize_text(text)})
    if not chars:
        raise ValueError("no characters left after normalising the texts; pass real transcripts")
    return (BLANK, *chars)


def text_to_ids(text: str, vocab: Sequence[str]) -> list[int]:
    """Character ids of ``normalize_text(text)``; ValueError naming any character missing from ``vocab``."""
    index = {char: i for i, char in enumerate(vocab)}
    normalized = normalize_text(text)
    missing = sorted({char for char in normalized if char not in index})
    if missing:
        raise ValueError(f"characters {missing} of {text!r} are not in the CTC vocabulary")
    return [index[char] for char in normalized]


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, vocab: Sequence[str]) -> list[str]:
    """Best path: argmax per slot, merge repeats, drop blanks. ``log_probs`` ``(batch, slots, chars)``."""
    best = log_probs.argmax(dim=-1)                                     # (batch, slots)
    texts = []
    for row, length in zip(best.tolist(), lengths.tolist()):
        chars, previous = [], 0
        for symbol in row[:length]:
            if symbol != previous and symbol != 0:
                chars.append(vocab[symbol])
            previous = symbol
        texts.append("".join(chars))
    return texts


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1) between two sequences."""
    a, b = list(a), list(b)
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: total character edits / total reference characters, both sides ``normalize_text``-ed."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need equally many references and hypotheses (>= 1), got {len(references)} and "
                         f"{len(hypotheses)}")
    edits = sum(edit_distance(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses))
    total = sum(len(normalize_text(r)) for r in references)
    return edits / max(total, 1)


def dedup_consecutive(ids: Sequence[int]) -> list[int]:
    """Merge runs of one repeated id: ``[5, 5, 7, 5, 5] -> [5, 7, 5]`` (removes duration, keeps the order)."""
    out: list[int] = []
    for value in ids:
        if not out or value != out[-1]:
            out.append(value)
    return out


def normalized_edit_distance(a: Sequence[int], b: Sequence[int], dedup: bool = True) -> float:
    """Edit distance / length of the longer sequence, in [0, 1]; repeats are merged first when ``dedup``."""
    if dedup:
        a, b = dedup_consecutive(a), dedup_consecutive(b)
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def num_speech_tokens(num_samples: int) -> int:
    """Ids made from ``num_samples`` samples at 16 kHz: ``(num_samples // 160 + 1) // 4`` (25 per second).

    ``log_mel`` keeps ``n // 160`` frames; the encoder's stride-2 conv makes ``ceil(frames / 2)`` and its
    pair pooling ``floor(. / 2)``. So 1 s -> 25, 1.02 s -> 25, 1.03 s -> 26 (the last 40 ms needs 30 ms).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return (num_samples // 160 + 1) // 4


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
DEFAULT_VOCAB = (BLANK, " ", "'", *"abcdefghijklmnopqrstuvwxyz")


@dataclass
class SpeechTokenizerConfig:
    """Sizes of the speech tokenizer. Defaults: the mini setting shipped in ``data/speech_tokenizer``.

    The encoder's ``proj`` is the projection to FSQ dims: ``encoder.output_dim`` is always ``len(levels)``.
    Full size (S3Tokenizer v3): ``levels=(3,) * 8`` -> 6561 codes, a Whisper-large-sized encoder.
    """
    levels: tuple[int, ...] = (3, 3, 3, 3, 3)        # 3^5 = 243 codes
    encoder: AudioEncoderConfig = field(default_factory=lambda: AudioEncoderConfig(
        d_model=96, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=384))
    head_dim: int = 96                  # width of the CTC head
    head_layers: int = 1                # residual conv blocks in the head (0: a linear read-out)
    head_kernel: int = 1                # conv kernel in 25 Hz steps (odd); 1 = each id read alone
    ctc_upsample: int = 1               # character slots per id
    char_vocab: tuple[str, ...] = DEFAULT_VOCAB
    # Speaker adversary (off in the shipped model). Measured with a per-id adversary: its voice guess fell to
    # chance (cross-entropy 2.30 = ln 10), yet the ids' invariance ratio only went 0.70 -> 0.66 and CER
    # 22.5 % -> 23.6 %; voices change *which of several equivalent codes* is used, not codes per voice.
    speaker_classes: int = 0            # > 0: train with a speaker adversary over that many voices (0: none)
    adversary_weight: float = 1.0       # gradient-reversal strength of the speaker adversary
    adversary_kernel: int = 5           # ids the adversary sees at once (odd): it judges codes in context

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = AudioEncoderConfig(**self.encoder)
        self.levels = tuple(int(v) for v in _levels(self.levels).tolist())
        self.char_vocab = tuple(self.char_vocab)
        if self.encoder.output_dim != len(self.levels):
            self.encoder = dataclasses.replace(self.encoder, output_dim=len(self.levels))
        if not self.char_vocab or self.char_vocab[0] != BLANK or len(set(self.char_vocab)) != len(self.char_vocab):
            raise ValueError(f"char_vocab must start with {BLANK!r} (CTC blank = id 0) and have no duplicates")
        if self.head_kernel < 1 or self.head_kernel % 2 == 0:
            raise ValueError(f"head_kernel must be odd and >= 1, got {self.head_kernel}")
        if self.ctc_upsample < 1 or self.head_dim < 1 or self.head_layers < 0:
            raise ValueError("ctc_upsample and head_dim must be >= 1, head_layers >= 0")
        if self.speaker_classes < 0 or self.speaker_classes == 1 or self.adversary_weight < 0:
            raise ValueError("speaker_classes must be 0 (no adversary) or >= 2, adversary_weight >= 0")
        if self.adversary_kernel < 1 or self.adversary_kernel % 2 == 0:
            raise ValueError(f"adversary_kernel must be odd and >= 1, got {self.adversary_kernel}")

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SpeechTokenizerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SpeechTokenizerConfig fields {unknown}")
        return cls(**data)


class SpeechTokens(NamedTuple):
    ids: torch.Tensor    # (batch, T25) long, PAD_ID after each clip's end
    mask: torch.Tensor   # (batch, T25) bool, True on real ids


class SpeechTokenizerOutput(NamedTuple):
    ids: torch.Tensor            # (batch, T25) long ids, PAD_ID on padding
    mask: torch.Tensor           # (batch, T25) bool
    codes: torch.Tensor          # (batch, T25, len(levels)) FSQ codes (straight-through), 0 on padding
    ctc_log_probs: torch.Tensor  # (batch, T25 * ctc_upsample, chars) log-softmax over characters
    ctc_lengths: torch.Tensor    # (batch,) real character slots = ids per clip * ctc_upsample


class HeadBlock(nn.Module):
    """Residual conv block over 25 Hz positions: ``x + Conv(GELU(Conv(LN(x))))``; padding is zeroed first."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).masked_fill(~mask[..., None], 0).transpose(1, 2)         # (batch, dim, T25)
        return x + self.conv2(F.gelu(self.conv1(h))).transpose(1, 2)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-weight`` backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, weight: float):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


class SpeakerAdversary(nn.Module):
    """Guesses the voice at every 25 Hz position from the codes around it: ``(batch, T25, dims)`` ->
    ``(batch, T25, speakers)`` logits. Seeing a few neighbours lets it catch codes that depend on the voice
    *given the content* (the same sound written with another code), not only codes one voice prefers."""

    def __init__(self, dims: int, hidden: int, speakers: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(dims, hidden, kernel, padding=kernel // 2)
        self.out = nn.Linear(hidden, speakers)

    def forward(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(codes.masked_fill(~mask[..., None], 0).transpose(1, 2)).transpose(1, 2)
        return self.out(F.gelu(hidden))


def features_from_waves(waves, sampling_rate: int = SAMPLE_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel of each clip on its own, zero-padded: ``(batch, 128, frames)`` and ``mel_lengths`` ``(batch,)``.

    Each clip is transformed alone (not padded first), so a clip's features, and its ids, do not depend on
    the other clips of the batch. Stereo clips are averaged to mono; NaN and too-short clips raise ValueError.
    """
    if len(waves) == 0:
        raise ValueError("got no clips; pass a non-empty list of waveforms")
    mels = []
    for i, wave in enumerate(waves):
        try:
            mels.append(log_mel(wave, sampling_rate))
        except ValueError as error:
            raise ValueError(f"clip {i}: {error}") from error
    return pad_features(mels)


def pad_features(mels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(128, frames_i)`` log-mels into ``(batch, 128, max frames)`` (zeros after each) and their lengths."""
    lengths = torch.tensor([mel.shape[-1] for mel in mels])
    features = mels[0].new_zeros(len(mels), mels[0].shape[0], int(lengths.max()))
    for row, mel in enumerate(mels):
        features[row, :, : mel.shape[-1]] = mel
    return features, lengths


class SpeechTokenizer(nn.Module):
    """Encoder -> FSQ -> CTC head. ``encode`` gives 25 Hz ids; ``forward`` also gives CTC log-probabilities."""

    def __init__(self, config: SpeechTokenizerConfig | None = None):
        super().__init__()
        self.config = config = config or SpeechTokenizerConfig()
        self.encoder = AudioEncoder(config.encoder)            # its proj: d_model -> len(levels)
        self.fsq = FSQ(config.levels)
        self.head_in = nn.Linear(len(config.levels), config.head_dim)
        self.head_blocks = nn.ModuleList(HeadBlock(config.head_dim, config.head_kernel)
                                         for _ in range(config.head_layers))
        self.head_norm = nn.LayerNorm(config.head_dim)
        self.head_out = nn.Linear(config.head_dim, config.ctc_upsample * len(config.char_vocab))
        if config.speaker_classes:
            # Training only: guesses the voice from each id's code; the reversed gradient teaches the encoder
            # to choose codes that do not tell the voice (domain-adversarial training).
            self.speaker_head = SpeakerAdversary(len(config.levels), config.head_dim, config.speaker_classes,
                                                 config.adversary_kernel)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def forward(self, input_features: torch.Tensor, mel_lengths=None) -> SpeechTokenizerOutput:
        """``input_features`` ``(batch, 128, frames)``, ``mel_lengths`` ``(batch,)`` (default: all frames real)."""
        encoded = self.encoder(input_features, mel_lengths=mel_lengths)   # (batch, T25, len(levels)), mask
        mask = encoded.mask
        codes, ids = self.fsq(encoded.features)                          # (batch, T25, dims), (batch, T25)
        codes = codes.masked_fill(~mask[..., None], 0)
        ids = ids.masked_fill(~mask, PAD_ID)
        return SpeechTokenizerOutput(ids, mask, codes, self._ctc_log_probs(codes, mask),
                                     mask.sum(dim=1) * self.config.ctc_upsample)

    def _ctc_log_probs(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The CTC head: FSQ codes (batch, T25, dims) and mask -> log-probabilities (batch, up·T25, chars)."""
        hidden = self.head_in(codes)                                     # (batch, T25, head_dim)
        for block in self.head_blocks:
            hidden = block(hidden, mask)
        logits = self.head_out(self.head_norm(hidden))                   # (batch, T25, up * chars)
        batch, time, _ = logits.shape
        logits = logits.reshape(batch, time * self.config.ctc_upsample, len(self.config.char_vocab))
        return logits.log_softmax(dim=-1)

    def _features(self, inputs, sampling_rate: int, mel_lengths):
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 3:
            return inputs, mel_lengths
        if mel_lengths is not None:
            raise ValueError("mel_lengths only goes with a (batch, 128, frames) feature tensor")
        if isinstance(inputs, (list, tuple)):
            return features_from_waves(inputs, sampling_rate)
        if isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == 1:
            return features_from_waves([inputs], sampling_rate)
        shape = tuple(inputs.shape) if hasattr(inputs, "shape") else type(inputs).__name__
        raise ValueError(f"encode() takes a list of clips, one 1-D clip, or log-mel features (batch, 128, "
                         f"frames); got {shape}. For one stereo clip use tokenize(wave).")

    @torch.no_grad()
    def encode(self, inputs, sampling_rate: int = SAMPLE_RATE, mel_lengths=None) -> SpeechTokens:
        """25 Hz ids of a batch: ``inputs`` is a list of waveforms (numpy/torch, mono or 2-channel, at
        ``sampling_rate``), one 1-D waveform, or log-mel ``(batch, 128, frames)`` with optional ``mel_lengths``.
        Returns ``SpeechTokens(ids (batch, T25) long, mask (batch, T25) bool)``; ids are PAD_ID on padding."""
        features, lengths = self._features(inputs, sampling_rate, mel_lengths)
        encoded = self.encoder(features, mel_lengths=lengths)
        ids = fsq_codes_to_indices(fsq_quantize(encoded.features, self.config.levels), self.config.levels)
        return SpeechTokens(ids.masked_fill(~encoded.mask, PAD_ID), encoded.mask)

    def tokenize(self, wave, sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """Ids of one clip (mono, or multichannel averaged to mono): ``(num_speech_tokens(samples),)`` long."""
        ids, _ = self.encode([wave], sampling_rate)
        return ids[0]

    @torch.no_grad()
    def transcribe(self, inputs, sampling_rate: int = SAMPLE_RATE, mel_lengths=None) -> list[str]:
        """Greedy CTC transcripts (normalized text) of a batch, given as for :meth:`encode`."""
        features, lengths = self._features(inputs, sampling_rate, mel_lengths)
        output = self(features, lengths)
        return ctc_greedy_decode(output.ctc_log_probs, output.ctc_lengths, self.config.char_vocab)

    @torch.no_grad()
    def transcribe_ids(self, ids: Sequence[torch.Tensor]) -> list[str]:
        """Greedy CTC transcripts read from 25 Hz ids alone, no audio: ``ids`` is a list of 1-D id tensors (e.g.
        speech generated by a model). Gives exactly :meth:`transcribe` for the ids of a clip, because the CTC head
        only ever sees the FSQ codes of the ids."""
        if not len(ids) or any(not isinstance(row, torch.Tensor) or row.dim() != 1 or row.is_floating_point()
                                or not len(row) for row in ids):
            raise ValueError("transcribe_ids takes a non-empty list of non-empty 1-D integer id tensors")
        lengths = torch.tensor([len(row) for row in ids])
        if min(int(row.min()) for row in ids) < 0 or max(int(row.max()) for row in ids) >= self.codebook_size:
            raise ValueError(f"ids must lie in [0, {self.codebook_size}): pass speech codes only (no bos/eos/pad)")
        padded = nn.utils.rnn.pad_sequence(list(ids), batch_first=True)                  # (batch, T25)
        mask = torch.arange(padded.shape[1])[None] < lengths[:, None]
        codes = fsq_indices_to_codes(padded, self.config.levels).masked_fill(~mask[..., None], 0)
        return ctc_greedy_decode(self._ctc_log_probs(codes, mask), lengths * self.config.ctc_upsample,
                                 self.config.char_vocab)

    def losses(self, input_features: torch.Tensor, mel_lengths, texts: Sequence[str],
               speaker_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training losses of a batch: ``ctc`` (mean per target character, ``F.ctc_loss`` 'mean'), and with a
        speaker adversary and ``speaker_ids`` ``(batch,)`` also ``adversary`` (its cross-entropy per id).
        ``total`` = ctc + adversary; minimising it trains the adversary to recognise the voice and, through
        the reversed gradient, the encoder to hide it."""
        output = self(input_features, mel_lengths)
        targets = [torch.tensor(text_to_ids(text, self.config.char_vocab)) for text in texts]
        ctc = F.ctc_loss(output.ctc_log_probs.transpose(0, 1), torch.cat(targets), output.ctc_lengths,
                         torch.tensor([len(t) for t in targets]), blank=0, reduction="mean", zero_infinity=True)
        result = {"ctc": ctc, "total": ctc}
        if self.config.speaker_classes and speaker_ids is not None:
            reversed_codes = _ReverseGradient.apply(output.codes, self.config.adversary_weight)
            logits = self.speaker_head(reversed_codes, output.mask)                # (batch, T25, speakers)
            per_id = speaker_ids[:, None].expand(output.mask.shape)                # (batch, T25)
            result["adversary"] = F.cross_entropy(logits[output.mask], per_id[output.mask])
            result["total"] = ctc + result["adversary"]
        return result

    def ctc_loss(self, input_features: torch.Tensor, mel_lengths, texts: Sequence[str]) -> torch.Tensor:
        """Mean CTC loss per target character (``F.ctc_loss`` 'mean') of a batch and its transcripts."""
        return self.losses(input_features, mel_lengths, texts)["ctc"]

    # -- files ---------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> list[Path]:
        """Write ``model.safetensors`` and ``config.json`` atomically (temporary file, then ``os.replace``)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {name: tensor.detach().contiguous().clone() for name, tensor in self.state_dict().items()}
        model_path, config_path = directory / "model.safetensors", directory / "config.json"
        atomic_write(model_path, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
        atomic_write(config_path, lambda tmp: tmp.write_text(json.dumps(self.config.to_dict(), indent=1) + "\n"))
        return [model_path, config_path]

    @classmethod
    def from_pretrained(cls, directory) -> "SpeechTokenizer":
        """Load a folder written by :meth:`save_pretrained`; FileNotFoundError / ValueError name what is wrong."""
        from safetensors.torch import load_file

        directory = Path(directory)
        model_path, config_path = directory / "model.safetensors", directory / "config.json"
        for path in (config_path, model_path):
            if not path.is_file():
                raise FileNotFoundError(f"speech tokenizer file not found: {path}; run `{TRAIN_COMMAND}`")
        model = cls(SpeechTokenizerConfig.from_dict(json.loads(config_path.read_text())))
        weights = load_file(str(model_path))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{model_path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for name, tensor in weights.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{model_path}: {name} has shape {tuple(tensor.shape)}, the config expects "
                                 f"{tuple(expected[name].shape)}")
        model.load_state_dict(weights, strict=True)
        return model.eval()


def load_speech_tokenizer(directory=SPEECH_TOKENIZER_DIR) -> SpeechTokenizer:
    """The shipped (or another saved) speech tokenizer, in eval mode."""
    return SpeechTokenizer.from_pretrained(directory)


def read_manifest(directory=SPEECH_TOKENIZER_DIR) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"speech tokenizer manifest not found: {path}; run `{TRAIN_COMMAND}`")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def _load_examples(dataset, progress: bool) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """Log-mel (computed once, kept in memory), transcript and speaker of every utterance of ``dataset``."""
    from tqdm.auto import tqdm

    mels, texts, speakers = [], [], []
    for index in tqdm(range(len(dataset)), desc="log-mel", disable=not progress):
        example = dataset[index]
        mels.append(log_mel(example["audio"]["array"], example["audio"]["sampling_rate"]))
        texts.append(example["text"])
        speakers.append(example.get("speaker", ""))
    return mels, texts, speakers


def _batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle, sorted by length within chunks of 8 batches (less padding),
    then the batches shuffled. Depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    chunk = 8 * batch_size
    for start in range(0, len(order), chunk):
        part = sorted(order[start: start + chunk], key=lambda i: lengths[i])
        batches += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    batches = [batch for batch in batches if len(batch) == batch_size] or batches
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_speech_tokenizer(config: SpeechTokenizerConfig | None = None, steps: int = 1300, *,
                           batch_size: int = 16, lr: float = 3e-3, weight_decay: float = 0.01, warmup: int = 100,
                           seed: int = 0, out_dir=SPEECH_TOKENIZER_DIR, work_dir=WORK_DIR, resume: bool = True,
                           checkpoint_every: int = 100, dataset=None, evaluate: bool = True,
                           progress: bool = True, command: str | None = None, stop_after: int | None = None,
                           threads: int | None = 1) -> tuple[SpeechTokenizer, dict]:
    """Train the tokenizer with CTC on ``dataset`` (default ``load_corpus("train")``) and save it to ``out_dir``.

    AdamW, gradient clipping at 1, warm-up + cosine schedule, fixed ``seed``, no SpecAugment (it did not help
    within the 15-minute budget: test CER 20.8 % with it, 19.7 % without, for a 729-code variant).
    Every ``checkpoint_every`` steps ``work_dir/checkpoint.pt`` (weights, optimizer, step, losses, elapsed
    time) is written atomically; with
    ``resume`` a later call continues from it and reaches bit-identical weights. ``stop_after`` ends the
    call after that many total steps without finishing (to test resuming). When all ``steps`` are done,
    ``out_dir`` gets ``model.safetensors``, ``config.json`` and ``manifest.json`` (sha256 of the files,
    command, seed, steps, wall time, and with ``evaluate`` the test metrics of :func:`evaluate_speech_tokenizer`).
    Returns ``(model, manifest)`` (manifest ``{}`` when stopped early).

    ``threads``: torch threads while training (restored afterwards; ``None`` keeps the current setting). One
    thread is the default because on a shared 2-core machine two threads that compete with other processes
    were measured 5x *slower* per step (4 s vs 0.8 s for a batch of 16 clips).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(config, steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                      seed=seed, out_dir=out_dir, work_dir=work_dir, resume=resume,
                      checkpoint_every=checkpoint_every, dataset=dataset, evaluate=evaluate, progress=progress,
                      command=command, stop_after=stop_after)
    finally:
        torch.set_num_threads(previous_threads)


def _train(config, steps, *, batch_size, lr, weight_decay, warmup, seed, out_dir, work_dir, resume,
           checkpoint_every, dataset, evaluate, progress, command, stop_after) -> tuple[SpeechTokenizer, dict]:
    from tqdm.auto import tqdm

    config = config or SpeechTokenizerConfig()
    started = time.perf_counter()
    if dataset is None:
        from .corpus import load_corpus
        dataset = load_corpus("train")
    mels, texts, speakers = _load_examples(dataset, progress)
    vocab = build_char_vocab(texts)
    if config.char_vocab != vocab:
        config = dataclasses.replace(config, char_vocab=vocab)
    voices = sorted(set(speakers))                                   # adversary classes, in a fixed order
    if config.speaker_classes and config.speaker_classes != len(voices):
        if len(voices) < 2:
            raise ValueError("a speaker adversary needs utterances of at least 2 speakers")
        config = dataclasses.replace(config, speaker_classes=len(voices))
    speaker_ids = torch.tensor([voices.index(speaker) for speaker in speakers])
    hyper = {"steps": steps, "batch_size": min(batch_size, len(mels)), "lr": lr, "weight_decay": weight_decay,
             "warmup": warmup, "seed": seed, "examples": len(mels)}
    set_seed(seed)
    model = SpeechTokenizer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    work_dir = Path(work_dir)
    checkpoint_path = work_dir / "checkpoint.pt"
    start_step, losses, adversary_losses, elapsed_before = 0, [], [], 0.0
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state["config"] != config.to_dict() or state["hyper"] != hyper:
            raise ValueError(f"{checkpoint_path} was written for another config or hyper-parameters; delete it "
                             "or pass resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, losses, elapsed_before = state["step"], state["losses"], state["elapsed_s"]
        adversary_losses = state["adversary_losses"]

    def save_checkpoint(step: int) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                 "adversary_losses": adversary_losses,
                 "config": config.to_dict(), "hyper": hyper,
                 "elapsed_s": elapsed_before + time.perf_counter() - started}
        atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))

    lengths = [mel.shape[-1] for mel in mels]
    size = hyper["batch_size"]
    batches_per_epoch = len(_batch_order(lengths, size, seed, 0))
    end_step = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(total=steps, initial=start_step, desc="speech tokenizer", disable=not progress)
    for step in range(start_step, end_step):
        epoch, position = divmod(step, batches_per_epoch)
        batch = _batch_order(lengths, size, seed, epoch)[position]
        features, mel_lengths = pad_features([mels[i] for i in batch])
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr, warmup)
        parts = model.losses(features, mel_lengths, [texts[i] for i in batch], speaker_ids[batch])
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(parts["ctc"].item(), 5))
        if "adversary" in parts:
            adversary_losses.append(round(parts["adversary"].item(), 5))
        bar.update(1)
        bar.set_postfix(ctc=f"{losses[-1]:.3f}", epoch=epoch)
        if (step + 1) % checkpoint_every == 0 or step + 1 == end_step:
            save_checkpoint(step + 1)
    bar.close()
    model.eval()
    if end_step < steps:
        return model, {}
    train_seconds = elapsed_before + time.perf_counter() - started
    out_dir = Path(out_dir)
    files = model.save_pretrained(out_dir)
    manifest = {
        "command": command or f"{TRAIN_COMMAND} --steps {steps} --seed {seed}",
        "seed": seed, "steps": steps, **{k: v for k, v in hyper.items() if k not in ("steps", "seed")},
        "train_wall_s": round(train_seconds, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "codebook_size": config.codebook_size,
        "final_ctc_loss_mean_last_50": round(float(np.mean(losses[-50:])), 4),
        **({"final_adversary_loss_mean_last_50": round(float(np.mean(adversary_losses[-50:])), 4),
            "speakers": voices} if adversary_losses else {}),
        "files_sha256": {path.name: file_sha256(path) for path in files},
    }
    if evaluate:
        evaluated = time.perf_counter()
        manifest["metrics"] = evaluate_speech_tokenizer(model, "test", progress=progress)
        manifest["metrics_first5"] = evaluate_speech_tokenizer(model, "test", limit=5, invariance=False,
                                                              progress=False)
        manifest["eval_wall_s"] = round(time.perf_counter() - evaluated, 1)
    manifest_path = out_dir / "manifest.json"
    atomic_write(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    return model, manifest


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_speech_tokenizer(model: SpeechTokenizer, split: str = "test", *, dataset=None, batch_size: int = 32,
                              limit: int | None = None, invariance: bool = True, max_pairs: int = 2000,
                              seed: int = 0, progress: bool = False) -> dict:
    """Measure the tokenizer on ``split`` (texts it never trained on) and return rounded numbers:

    * ``cer``: greedy-CTC character error rate (corpus level, normalized text).
    * ``codes_used`` / ``codebook_usage``: distinct ids seen / their fraction of the codebook;
      ``code_perplexity``: exp(entropy) of the id distribution (how many codes it effectively uses).
    * speaker invariance, on id sequences with consecutive repeats merged (``dedup_consecutive``; it removes
      speaking rate) and then ``normalized_edit_distance``: ``same_text_diff_voice`` = mean over all pairs of
      ``parallel`` utterances with the same text; ``diff_text_same_voice`` = mean over (at most ``max_pairs``,
      seeded) pairs of utterances of one speaker with different texts; ``invariance_ratio`` = their quotient.
    """
    from tqdm.auto import tqdm

    if dataset is None:
        from .corpus import load_corpus
        dataset = load_corpus(split)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    was_training = model.training
    model.eval()
    ids_per_clip, references, hypotheses, rows, seconds = [], [], [], [], 0.0
    for start in tqdm(range(0, count, batch_size), desc=f"evaluate {split}", disable=not progress):
        examples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        features, lengths = features_from_waves([ex["audio"]["array"] for ex in examples],
                                                examples[0]["audio"]["sampling_rate"])
        output = model(features, lengths)
        hypotheses += ctc_greedy_decode(output.ctc_log_probs, output.ctc_lengths, model.config.char_vocab)
        references += [ex["text"] for ex in examples]
        seconds += sum(len(ex["audio"]["array"]) / ex["audio"]["sampling_rate"] for ex in examples)
        for row, ex in enumerate(examples):
            ids_per_clip.append(output.ids[row][output.mask[row]].tolist())
            rows.append({"text": ex["text"], "speaker": ex["speaker"], "parallel": bool(ex.get("parallel", False))})
    model.train(was_training)
    all_ids = torch.tensor([i for ids in ids_per_clip for i in ids])
    counts = torch.bincount(all_ids, minlength=model.codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    metrics = {
        "split": split, "utterances": count, "cer": round(character_error_rate(references, hypotheses), 4),
        "codebook_size": model.codebook_size, "codes_used": int((counts > 0).sum()),
        "codebook_usage": round(float((counts > 0).double().mean()), 4),
        "code_perplexity": round(float(torch.exp(-(probs * probs.log()).sum())), 1),
        "tokens_per_second": round(len(all_ids) / seconds, 3),
    }
    if invariance:
        same_text, same_voice = [], []
        for a in range(count):
            for b in range(a + 1, count):
                ra, rb = rows[a], rows[b]
                if ra["text"] == rb["text"] and ra["speaker"] != rb["speaker"] and ra["parallel"] and rb["parallel"]:
                    same_text.append((a, b))
                elif ra["speaker"] == rb["speaker"] and ra["text"] != rb["text"]:
                    same_voice.append((a, b))
        rng = random.Random(seed)
        if len(same_voice) > max_pairs:
            same_voice = sorted(rng.sample(same_voice, max_pairs))
        if same_text and same_voice:
            def mean_distance(pairs):
                return float(np.mean([normalized_edit_distance(ids_per_clip[a], ids_per_clip[b]) for a, b in pairs]))
            same_text_distance, same_voice_distance = mean_distance(same_text), mean_distance(same_voice)
            metrics.update({
                "same_text_diff_voice": round(same_text_distance, 4), "same_text_pairs": len(same_text),
                "diff_text_same_voice": round(same_voice_distance, 4), "diff_text_pairs": len(same_voice),
                "invariance_ratio": round(same_text_distance / same_voice_distance, 4),
                "distance": "normalized edit distance of ids with consecutive repeats merged",
            })
    metrics["examples"] = [{"reference": normalize_text(r), "hypothesis": h}
                           for r, h in zip(references[:3], hypotheses[:3])]
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Command line (wired as `python -m fac_mini speech-tokenizer train|eval`)
# ----------------------------------------------------------------------------------------------------------
def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini speech-tokenizer train [--steps N] [--seed S] [--out DIR] [--work-dir DIR] [--restart]``."""
    parser = argparse.ArgumentParser(prog=f"{TRAIN_COMMAND}", description="train the shipped speech tokenizer")
    parser.add_argument("--steps", type=int, default=1300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=str(SPEECH_TOKENIZER_DIR), help="folder for the trained checkpoint")
    parser.add_argument("--work-dir", default=str(WORK_DIR), help="folder for the resumable training state")
    parser.add_argument("--restart", action="store_true", help="ignore a saved training state and start over")
    parser.add_argument("--no-eval", action="store_true", help="skip the test-split metrics")
    args = parser.parse_args(list(argv) if argv is not None else None)
    command = " ".join([TRAIN_COMMAND, *(argv if argv is not None else sys.argv[1:])]).strip()
    _, manifest = train_speech_tokenizer(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                         out_dir=args.out, work_dir=args.work_dir, resume=not args.restart,
                                         evaluate=not args.no_eval, command=command)
    print(json.dumps({k: manifest[k] for k in ("steps", "train_wall_s", "metrics") if k in manifest}, indent=1))
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini speech-tokenizer eval [--checkpoint DIR] [--split test] [--limit N]``: print metrics as JSON."""
    parser = argparse.ArgumentParser(prog="python -m fac_mini speech-tokenizer eval",
                                     description="measure a speech tokenizer: CER, codebook use, speaker invariance")
    parser.add_argument("--checkpoint", default=str(SPEECH_TOKENIZER_DIR))
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    args = parser.parse_args(list(argv) if argv is not None else None)
    model = load_speech_tokenizer(args.checkpoint)
    print(json.dumps(evaluate_speech_tokenizer(model, args.split, limit=args.limit, progress=True), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main_train(sys.argv[2:]) if sys.argv[1:2] == ["train"] else main_eval(sys.argv[2:]))
