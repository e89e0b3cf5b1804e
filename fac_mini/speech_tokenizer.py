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

FSQ itself is :mod:`fac_mini.fsq`. Training and evaluation are the recipe :mod:`fac_mini.train.speech_tokenizer`:
rebuild the shipped checkpoint with ``python -m fac_mini speech-tokenizer train --out data/speech_tokenizer``,
measure it with ``python -m fac_mini speech-tokenizer eval``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import DATA_DIR
from .constants import SAMPLE_RATE
from .audio import log_mel
from .encoder import AudioEncoder, AudioEncoderConfig
from .fsq import FSQ, fsq_levels, fsq_codes_to_indices, fsq_indices_to_codes, fsq_quantize
from .train.metrics import normalize_text
from .train.store import atomic_write_json, check_state_dict, read_json, read_safetensors, save_safetensors

__all__ = [
    "PAD_ID", "BLANK", "SPEECH_TOKENIZER_DIR", "TRAIN_COMMAND", "build_char_vocab", "text_to_ids",
    "ctc_greedy_decode", "num_speech_tokens", "SpeechTokenizerConfig", "SpeechTokenizer", "SpeechTokens",
    "SpeechTokenizerOutput", "features_from_waves", "pad_features", "load_speech_tokenizer",
    "shipped_speech_tokenizer",
]

PAD_ID = -1                     # id at padding positions of a batch (never a real code)
BLANK = "<blank>"               # CTC blank, always character id 0
SPEECH_TOKENIZER_DIR = DATA_DIR / "speech_tokenizer"
TRAIN_COMMAND = "python -m fac_mini speech-tokenizer train"


# ----------------------------------------------------------------------------------------------------------
# Characters and CTC decoding
# ----------------------------------------------------------------------------------------------------------
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

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = AudioEncoderConfig(**self.encoder)
        self.levels = tuple(int(v) for v in fsq_levels(self.levels).tolist())
        self.char_vocab = tuple(self.char_vocab)
        if self.encoder.output_dim != len(self.levels):
            self.encoder = dataclasses.replace(self.encoder, output_dim=len(self.levels))
        if not self.char_vocab or self.char_vocab[0] != BLANK or len(set(self.char_vocab)) != len(self.char_vocab):
            raise ValueError(f"char_vocab must start with {BLANK!r} (CTC blank = id 0) and have no duplicates")
        if self.head_kernel < 1 or self.head_kernel % 2 == 0:
            raise ValueError(f"head_kernel must be odd and >= 1, got {self.head_kernel}")
        if self.ctc_upsample < 1 or self.head_dim < 1 or self.head_layers < 0:
            raise ValueError("ctc_upsample and head_dim must be >= 1, head_layers >= 0")

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

    def ctc_loss(self, input_features: torch.Tensor, mel_lengths, texts: Sequence[str]) -> torch.Tensor:
        """Mean CTC loss per target character (``F.ctc_loss`` 'mean', infinite losses zeroed) of a batch and its
        transcripts: the tokenizer's only training signal."""
        output = self(input_features, mel_lengths)
        targets = [torch.tensor(text_to_ids(text, self.config.char_vocab)) for text in texts]
        return F.ctc_loss(output.ctc_log_probs.transpose(0, 1), torch.cat(targets), output.ctc_lengths,
                          torch.tensor([len(t) for t in targets]), blank=0, reduction="mean", zero_infinity=True)

    # -- files ---------------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> list[Path]:
        """Write ``model.safetensors`` and ``config.json``, each atomically; return their paths."""
        directory = Path(directory)
        model_path, config_path = directory / "model.safetensors", directory / "config.json"
        save_safetensors(self.state_dict(), model_path)
        atomic_write_json(config_path, self.config.to_dict())
        return [model_path, config_path]

    @classmethod
    def from_pretrained(cls, directory) -> "SpeechTokenizer":
        """Load a folder written by :meth:`save_pretrained`; FileNotFoundError / ValueError name the file (and
        key or shape) that is missing, corrupt or does not fit the config."""
        directory = Path(directory)
        hint = (f"rebuild it with `{TRAIN_COMMAND} --out data/speech_tokenizer` or restore the shipped files "
                "with `git checkout -- data/speech_tokenizer`")
        config_path = directory / "config.json"
        try:
            config = SpeechTokenizerConfig.from_dict(read_json(config_path, "speech tokenizer config", hint))
        except TypeError as error:
            raise ValueError(f"{config_path}: {error}") from None
        model = cls(config)
        weights = read_safetensors(directory / "model.safetensors", hint)
        check_state_dict(weights, model.state_dict(), directory / "model.safetensors")
        model.load_state_dict(weights, strict=True)
        return model.eval()


def load_speech_tokenizer(directory=SPEECH_TOKENIZER_DIR) -> SpeechTokenizer:
    """The shipped (or another saved) speech tokenizer, in eval mode."""
    return SpeechTokenizer.from_pretrained(directory)


_SHIPPED: dict[str, SpeechTokenizer] = {}


def shipped_speech_tokenizer() -> SpeechTokenizer:
    """The shipped tokenizer (``data/speech_tokenizer``), loaded once per process (read-back, resynthesis)."""
    if "tokenizer" not in _SHIPPED:
        _SHIPPED["tokenizer"] = load_speech_tokenizer()
    return _SHIPPED["tokenizer"]
