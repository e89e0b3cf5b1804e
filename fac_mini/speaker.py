"""Who is speaking: a frozen, pretrained speaker encoder and the similarity measures built on it.

CosyVoice's detokenizer takes the speaker's timbre from an *x-vector*, the embedding of a reference clip by a
speaker-verification network (CAM++, 192-d, in the released pipeline). The course uses the pretrained GE2E encoder
that ships inside the ``resemblyzer`` wheel (Wan et al. 2018, "Generalized end-to-end loss for speaker
verification"): its weights are in the wheel, so nothing is downloaded. The encoder::

    16 kHz waveform                          (samples,)
      -> volume raised to -30 dBFS (never lowered), long pauses cut by a voice-activity detector
      -> 1.6 s windows ("partials"), 1.3 per second, the last one zero-padded
      -> 40-bin mel, 10 ms hop                 (partials, 160, 40)
      -> 3-layer LSTM (256) -> Linear -> ReLU  (partials, 256), each partial L2-normalised
      -> mean over partials, L2-normalised     (256,)   the speaker embedding

Because of the ReLU every coordinate is >= 0, so two embeddings have cosine similarity in [0, 1]. On the 200
clips of the test split in which all 10 eSpeak voices say the same 20 texts, two clips of one voice average 0.87,
clips of two voices 0.63; the clip's own voice is the most similar of the 10 voice centroids (:func:`match_voices`,
each from 3 other clips of the voice) for 95 % of the clips (97 % with 5 reference clips, 93 % with 2). The
voices confused are the pairs spk01/spk05 and spk03/spk09.

Minimum length. resemblyzer keeps only the audio its voice-activity detector (webrtcvad, aggressiveness 3, 30 ms
windows) marks as speech, after smoothing the per-window decisions with a moving average over 8 windows and
rounding: a window survives only when at least 5 of the 8 windows around it are voiced. A clip therefore needs at
least 5 voiced 30 ms windows in a row, 150 ms of speech (2400 samples at 16 kHz); with less, nothing is left to
embed, and resemblyzer would silently return the same embedding for every such clip. This module raises
``ValueError`` instead. Clips shorter than one 1.6 s partial are zero-padded by resemblyzer and embed less
reliably: cut to 1.6 / 1.0 / 0.5 s (starting 125 ms in), the same 200 clips find their own voice 96 / 83 / 73 % of
the time.

Torch threads: the LSTM runs on however many threads the caller set (``torch.set_num_threads``); this module
never changes that number.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .audio import as_mono_float, resample
from .constants import SAMPLE_RATE

__all__ = ["SPEAKER_DIM", "VAD_WINDOW_SAMPLES", "MIN_VOICED_SAMPLES", "voice_encoder", "speaker_embedding",
           "speaker_embeddings", "speaker_similarity", "voice_references", "VoiceIdentification", "match_voices",
           "identify_voices"]

SPEAKER_DIM = 256                        # GE2E embedding width (CosyVoice's CAM++ x-vector has 192)
VAD_WINDOW_SAMPLES = SAMPLE_RATE * 30 // 1000   # resemblyzer's voice-activity window: 30 ms = 480 samples
MIN_VOICED_SAMPLES = 5 * VAD_WINDOW_SAMPLES    # 5 voiced windows in a row (150 ms) survive its smoothing
_PARTIALS_PER_FORWARD = 256              # partial windows per LSTM call (bounds memory for long batches)

_ENCODER = None


def _resemblyzer():
    """Import resemblyzer quietly: its ``webrtcvad`` imports ``pkg_resources`` (a deprecation warning) and its
    audio module imports ``scipy.ndimage.morphology`` (another)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        import resemblyzer
        from resemblyzer import audio
    return resemblyzer, audio


def voice_encoder():
    """The process's one ``resemblyzer.VoiceEncoder`` on the CPU, in eval mode, created on first use (its weights,
    17 MB, ship inside the wheel; loading takes well under a second and prints nothing)."""
    global _ENCODER
    if _ENCODER is None:
        resemblyzer, _ = _resemblyzer()
        encoder = resemblyzer.VoiceEncoder(device="cpu", verbose=False)
        encoder.eval().requires_grad_(False)
        _ENCODER = encoder
    return _ENCODER


def _voiced_audio(wave, sampling_rate: int, name: str) -> np.ndarray:
    """Validate one clip, bring it to 16 kHz mono, and apply resemblyzer's preprocessing (volume up to -30 dBFS,
    long pauses removed); ``ValueError`` when nothing that the voice-activity detector calls speech is left."""
    _, audio = _resemblyzer()
    array = as_mono_float(wave, name=name, allow_silent=False)          # a new array: the caller's is untouched
    if sampling_rate != SAMPLE_RATE:
        array = resample(array, sampling_rate, SAMPLE_RATE)
    voiced = audio.preprocess_wav(array)                                 # (voiced samples,), a multiple of 480
    if voiced.size == 0:
        raise ValueError(
            f"{name}: resemblyzer's voice-activity detector found no speech in this clip of {array.size} samples "
            f"({array.size / SAMPLE_RATE * 1000:.0f} ms at 16 kHz). It keeps a 30 ms window only when at least 5 of "
            f"the 8 windows around it are voiced, so a clip needs at least {MIN_VOICED_SAMPLES} samples "
            f"({MIN_VOICED_SAMPLES * 1000 // SAMPLE_RATE} ms) of continuous speech; pass a longer clip of speech")
    return voiced.astype(np.float32)


def _partial_mels(encoder, audio, voiced: np.ndarray) -> np.ndarray:
    """resemblyzer's ``embed_utterance`` up to the network: the clip cut into 1.6 s windows (rate 1.3 per second,
    a last window kept when >= 75 % covered, the clip zero-padded to the last window's end), each as a 40-bin mel:
    ``(partials, 160, 40)``."""
    wave_slices, mel_slices = encoder.compute_partial_slices(len(voiced), rate=1.3, min_coverage=0.75)
    end = wave_slices[-1].stop
    if end >= len(voiced):
        voiced = np.pad(voiced, (0, end - len(voiced)))
    mel = audio.wav_to_mel_spectrogram(voiced)                           # (frames, 40)
    return np.stack([mel[s] for s in mel_slices])


def speaker_embeddings(waves: Sequence, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speaker embeddings of several clips: ``(len(waves), 256)`` float32, each row of unit L2 norm.

    Each clip is embedded as ``resemblyzer.VoiceEncoder.embed_utterance(preprocess_wav(clip))`` does (the module
    docstring), but the 1.6 s windows of all clips go through the LSTM together, which is about 1.7x faster than
    one clip at a time; a clip's embedding then differs from :func:`speaker_embedding`'s by float rounding only
    (~1e-7). ``waves`` are numpy arrays, torch tensors or lists of samples (mono, or multichannel averaged to
    mono) at ``sampling_rate`` (resampled to 16 kHz). Deterministic; the inputs are never modified.

    Raises ``ValueError`` for an empty list, and, naming the clip, for empty, NaN, silent or out-of-range audio,
    and for a clip with less than 150 ms of continuous speech (``MIN_VOICED_SAMPLES``; see the module docstring).
    """
    if isinstance(waves, (np.ndarray, torch.Tensor)) and waves.ndim == 1:
        raise ValueError("speaker_embeddings() takes a list of clips; for one clip use speaker_embedding(wave)")
    if len(waves) == 0:
        raise ValueError("speaker_embeddings() got no clips; pass a non-empty list of waveforms")
    encoder = voice_encoder()
    _, audio = _resemblyzer()
    mels, owners = [], []
    for index, wave in enumerate(waves):
        clip_mels = _partial_mels(encoder, audio, _voiced_audio(wave, sampling_rate, f"clip {index}"))
        mels.append(clip_mels)
        owners += [index] * len(clip_mels)
    stacked = torch.from_numpy(np.concatenate(mels))                     # (all partials, 160, 40)
    with torch.no_grad():
        partials = torch.cat([encoder(chunk) for chunk in stacked.split(_PARTIALS_PER_FORWARD)])  # (partials, 256)
    owner = torch.tensor(owners)
    sums = torch.zeros(len(waves), SPEAKER_DIM, dtype=partials.dtype).index_add_(0, owner, partials)
    means = sums / torch.bincount(owner, minlength=len(waves))[:, None]
    return (means / means.norm(dim=1, keepdim=True)).numpy().astype(np.float32)


def speaker_embedding(wave, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The speaker embedding of one clip: ``(256,)`` float32 of unit L2 norm, every coordinate >= 0.

    ``wave`` is numpy, torch or a list of samples, mono (or multichannel, averaged), at ``sampling_rate`` Hz.
    Raises ``ValueError`` for empty, NaN, silent or out-of-range audio, and for less than 150 ms of continuous
    speech (see the module docstring). See :func:`speaker_embeddings` for many clips at once.
    """
    if isinstance(wave, (list, tuple)) and wave and not np.isscalar(wave[0]):
        raise ValueError("speaker_embedding() takes one clip; for a list of clips use speaker_embeddings(waves)")
    return speaker_embeddings([wave], sampling_rate)[0]


def _as_vectors(embeddings, name: str) -> np.ndarray:
    """``embeddings`` as a float64 array ``(n, dim)`` (a single vector becomes one row), checked finite, non-zero."""
    array = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings,
                       dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be one embedding (dim,) or a stack (n, dim); got shape {np.shape(embeddings)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if not np.all(np.linalg.norm(array, axis=1) > 0):
        raise ValueError(f"{name} contains an all-zero vector, which has no direction (cosine is undefined)")
    return array


def speaker_similarity(a, b) -> float:
    """Cosine similarity of two speaker embeddings (numpy or torch vectors of equal length), in [-1, 1]; for this
    encoder's embeddings, which are >= 0, in [0, 1]. Embed clips first with :func:`speaker_embedding`."""
    first, second = _as_vectors(a, "a"), _as_vectors(b, "b")
    if first.shape != second.shape or first.shape[0] != 1:
        raise ValueError(f"speaker_similarity() compares two vectors of equal length; got shapes {np.shape(a)} "
                         f"and {np.shape(b)}")
    first, second = first[0], second[0]
    return float(first @ second / (np.linalg.norm(first) * np.linalg.norm(second)))


def voice_references(embeddings, speakers: Sequence[str]) -> dict[str, np.ndarray]:
    """Group embeddings ``(n, dim)`` by their speaker labels: ``{speaker: (clips of that speaker, dim)}``, the
    ``references`` that :func:`match_voices` and :func:`identify_voices` take."""
    vectors = _as_vectors(embeddings, "embeddings")
    if len(speakers) != len(vectors):
        raise ValueError(f"got {len(vectors)} embeddings but {len(speakers)} speaker labels")
    return {speaker: vectors[[i for i, s in enumerate(speakers) if s == speaker]].astype(np.float32)
            for speaker in dict.fromkeys(speakers)}


@dataclass(frozen=True)
class VoiceIdentification:
    """Which reference voice each clip resembles most.

    ``voices`` are the reference voices (in the order given); ``similarity[i, j]`` is the cosine of clip i's
    embedding with voice j's centroid (the L2-normalised mean of that voice's reference embeddings, as GE2E
    defines a speaker); ``target_similarity[i]`` is the similarity to the clip's own (target) voice and
    ``best_other_similarity[i]`` the largest similarity to any other voice.
    """
    voices: tuple[str, ...]
    speakers: tuple[str, ...]
    similarity: np.ndarray            # (clips, voices)
    target_similarity: np.ndarray     # (clips,)
    best_other_similarity: np.ndarray  # (clips,)

    @property
    def predicted(self) -> tuple[str, ...]:
        """The most similar reference voice of each clip."""
        return tuple(self.voices[j] for j in self.similarity.argmax(axis=1))

    @property
    def target_most_similar(self) -> np.ndarray:
        """``(clips,)`` bool: the target voice is more similar than every other voice (strictly)."""
        return self.target_similarity > self.best_other_similarity

    @property
    def rate(self) -> float:
        """Fraction of clips whose target voice is the most similar (the detokenizer's goal: >= 0.9)."""
        return float(self.target_most_similar.mean())


def match_voices(embeddings, speakers: Sequence[str], references: Mapping[str, object]) -> VoiceIdentification:
    """Compare each clip's embedding (``(clips, dim)``) with the centroid of every reference voice.

    ``speakers[i]`` is the voice clip i should have (its target); ``references`` maps each voice to one embedding
    ``(dim,)`` or several ``(n, dim)`` (e.g. from :func:`voice_references`). Needs at least two voices, and every
    target among them. Returns a :class:`VoiceIdentification`.
    """
    vectors = _as_vectors(embeddings, "embeddings")
    speakers = tuple(speakers)
    if len(speakers) != len(vectors):
        raise ValueError(f"got {len(vectors)} embeddings but {len(speakers)} speaker labels")
    voices = tuple(references)
    if len(voices) < 2:
        raise ValueError(f"need reference embeddings of at least two voices to tell them apart; got {list(voices)}")
    missing = sorted(set(speakers) - set(voices))
    if missing:
        raise ValueError(f"no reference embeddings for the target voice(s) {missing}; references have {list(voices)}")
    centroids = []
    for voice in voices:
        voice_vectors = _as_vectors(references[voice], f"references[{voice!r}]")
        if voice_vectors.shape[1] != vectors.shape[1]:
            raise ValueError(f"references[{voice!r}] has dimension {voice_vectors.shape[1]}, the clips "
                             f"{vectors.shape[1]}")
        voice_vectors = voice_vectors / np.linalg.norm(voice_vectors, axis=1, keepdims=True)
        centroid = voice_vectors.mean(axis=0)
        centroids.append(centroid / np.linalg.norm(centroid))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ np.stack(centroids).T                            # (clips, voices)
    target = np.array([voices.index(speaker) for speaker in speakers])
    rows = np.arange(len(speakers))
    others = similarity.copy()
    others[rows, target] = -np.inf
    return VoiceIdentification(voices, speakers, similarity, similarity[rows, target], others.max(axis=1))


def identify_voices(clips: Sequence, speakers: Sequence[str], references: Mapping[str, object],
                    sampling_rate: int = SAMPLE_RATE) -> VoiceIdentification:
    """Embed ``clips`` (waveforms, as for :func:`speaker_embeddings`) and :func:`match_voices` them against
    ``references``: for each clip, is its target voice ``speakers[i]`` the most similar of all reference voices?
    ``.rate`` is the fraction of clips for which it is."""
    if len(clips) != len(speakers):
        raise ValueError(f"got {len(clips)} clips but {len(speakers)} speaker labels")
    return match_voices(speaker_embeddings(clips, sampling_rate), speakers, references)
