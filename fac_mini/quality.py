"""How good is generated speech? The field's metrics, offline, on 16 kHz mono numpy audio.

Intrusive metrics compare a *degraded* clip (a vocoder's or detokenizer's output) with the *reference* it should
equal, sample-aligned (copy-synthesis keeps the timing):

* :func:`pesq_wb` - PESQ wide band (ITU-T P.862.2, the ``pesq`` package): a perceptual MOS-LQO from 1.04 (bad) to
  4.64 (identical).
* :func:`stoi` - short-time objective intelligibility (Taal et al. 2011, ``pystoi``, not the extended variant):
  the mean correlation of 384 ms one-third-octave envelopes, 0 to 1.
* :func:`mel_cepstral_distortion` - MCD in dB between the cepstra of the detokenizer's own 80-bin log-mel
  (lower is better, 0 for identical audio).

Both clips of a pair are validated and trimmed to the shorter of the two (a vocoder returns
``(frames - 1) * 320`` samples, up to 319 fewer than its input), so the comparison covers the common part only.

Non-intrusive and task metrics: :func:`dnsmos` (Microsoft's DNSMOS P.835 and P.808 networks, ONNX models inside the
``speechmos`` wheel) rates a clip alone; :func:`read_back` / :func:`read_back_cer` transcribe speech with the
course's speech tokenizer (its CTC head) and score the transcript.

The zero-training vocoder every learnt one must beat is :func:`griffin_lim` (phase recovered by Griffin-Lim from
the mel magnitude), and :func:`copy_synthesis_report` averages the intrusive metrics over clips: the table row
the vocoder and flow recipes print.

eSpeak speech is robotic and its silences are exactly zero: DNSMOS rates even the clean corpus low (about 2.7-2.9
OVRL), so use it to compare systems, not as an absolute score; frames of digital silence are left out of MCD.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from .audio import (MEL_FLOOR, MIN_SAMPLES, VOCODER_HOP, VOCODER_N_FFT, VOCODER_N_MELS, as_mono_float, resample,
                    vocoder_mel_padded)
from .constants import SAMPLE_RATE

__all__ = ["PESQ_MIN_SAMPLES", "STOI_MIN_SECONDS", "MCD_COEFFICIENTS", "pesq_wb", "stoi", "dct_matrix",
           "mel_cepstra", "mel_cepstral_distortion", "dnsmos", "griffin_lim", "read_back", "read_back_cer",
           "copy_synthesis_report"]

PESQ_MIN_SAMPLES = SAMPLE_RATE // 4      # the pesq C code rejects buffers shorter than 1/4 s
STOI_MIN_SECONDS = 31 * 128 / 10_000     # pystoi needs 30 frames (256 samples, hop 128 at 10 kHz) of speech: 0.4 s
MCD_COEFFICIENTS = range(1, 14)          # cepstral coefficients 1..13; c0 (the frame's loudness) is left out
_MCD_SCALE = 10.0 / math.log(10.0)       # natural-log cepstra -> dB
_SILENT_LOG_MEL = math.log(MEL_FLOOR) + 1e-4   # a frame whose every bin sits at the floor: digital silence


# ----------------------------------------------------------------------------------------------------------
# Pairs of clips
# ----------------------------------------------------------------------------------------------------------
def _clip(wave, sampling_rate: int, name: str) -> np.ndarray:
    """One clip as new mono float32 at 16 kHz; ``ValueError`` when empty, NaN, silent or out of range."""
    array = as_mono_float(wave, name=name, allow_silent=False)
    if sampling_rate != SAMPLE_RATE:
        array = resample(array, sampling_rate, SAMPLE_RATE)
    return array


def _aligned(reference, degraded, sampling_rate: int, min_samples: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (reference, degraded) pair and trim both to the shorter length (at least ``min_samples``)."""
    reference = _clip(reference, sampling_rate, "reference")
    degraded = _clip(degraded, sampling_rate, "degraded")
    length = min(reference.size, degraded.size)
    if length < min_samples:
        raise ValueError(f"{metric} needs at least {min_samples} samples ({min_samples / SAMPLE_RATE * 1000:.0f} ms "
                         f"at 16 kHz) in both clips; the shorter has {length}. Pass longer clips")
    return reference[:length], degraded[:length]


def pesq_wb(reference, degraded, sampling_rate: int = SAMPLE_RATE) -> float:
    """Wide-band PESQ (P.862.2) of ``degraded`` against ``reference``, from 1.04 to 4.64 (identical clips).

    Both are mono audio at ``sampling_rate`` (resampled to 16 kHz), trimmed to the shorter length. PESQ levels
    both clips and searches for delays itself. Raises ``ValueError`` for empty, NaN, silent or out-of-range
    audio, clips shorter than 1/4 s, and a reference in which PESQ finds no speech.
    """
    from pesq import NoUtterancesError, pesq

    reference, degraded = _aligned(reference, degraded, sampling_rate, PESQ_MIN_SAMPLES, "PESQ")
    try:
        return float(pesq(SAMPLE_RATE, reference, degraded, "wb"))
    except NoUtterancesError as error:
        raise ValueError(f"PESQ found no speech in the reference ({reference.size} samples): its voice-activity "
                         "detector needs utterances of speech; pass a clip of speech") from error


def stoi(reference, degraded, sampling_rate: int = SAMPLE_RATE) -> float:
    """Short-time objective intelligibility (``pystoi``, classic, not extended) of ``degraded``, from 0 to 1.

    Both are mono audio at ``sampling_rate``, trimmed to the shorter length; pystoi resamples to 10 kHz and drops
    frames more than 40 dB below the reference's loudest. Raises ``ValueError`` for empty, NaN, silent or
    out-of-range audio, and when fewer than 30 frames (0.4 s) of the reference are left after that, where pystoi
    itself would only warn and return 1e-5.
    """
    from pystoi import stoi as pystoi_stoi

    reference, degraded = _aligned(reference, degraded, sampling_rate, MIN_SAMPLES, "STOI")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = pystoi_stoi(reference, degraded, SAMPLE_RATE, extended=False)
    if any("Not enough STFT frames" in str(warning.message) for warning in caught):
        raise ValueError(f"STOI needs at least 30 frames ({STOI_MIN_SECONDS:.2f} s) of reference audio within 40 dB "
                         f"of its loudest frame; this pair ({reference.size} samples) has fewer. Pass longer clips")
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# Mel-cepstral distortion
# ----------------------------------------------------------------------------------------------------------
def dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II as a ``(size, size)`` matrix ``C`` (``c = C @ x`` along the first axis):
    ``C[k, n] = s_k cos(pi k (2n + 1) / (2 size))`` with ``s_0 = sqrt(1 / size)``, ``s_k = sqrt(2 / size)``,
    which is ``scipy.fft.dct(x, type=2, norm="ortho", axis=0)``; ``C @ C.T`` is the identity."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.cos(np.pi * k * (2 * n + 1) / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def mel_cepstra(log_mel) -> np.ndarray:
    """Cepstra of a natural-log mel ``(n_mels, frames)``: the orthonormal DCT-II over the mel bins, same shape
    (row 0 is the frame's loudness, rows 1.. its spectral envelope)."""
    log_mel = np.asarray(log_mel.detach().cpu() if isinstance(log_mel, torch.Tensor) else log_mel, dtype=np.float64)
    if log_mel.ndim != 2:
        raise ValueError(f"log_mel must be (n_mels, frames), got shape {log_mel.shape}")
    return dct_matrix(log_mel.shape[0]) @ log_mel


def mel_cepstral_distortion(reference, degraded, sampling_rate: int = SAMPLE_RATE) -> float:
    """Mel-cepstral distortion in dB between two time-aligned clips (a copy-synthesis and its original).

    Cepstra are :func:`mel_cepstra` of the detokenizer's 80-bin log-mel (:func:`fac_mini.audio.vocoder_mel`: 1280-pt
    STFT, hop 320, natural log, floor 1e-5); with ``c_d`` and ``c'_d`` those of one frame of each clip, ::

        MCD = (10 / ln 10) * sqrt(2 * sum_{d=1..13} (c_d - c'_d)^2),  averaged over frames

    Coefficient 0 (loudness) is left out; frames are compared one to one (no time warping: the clips must be
    aligned, as copy-syntheses are); frames where the reference is digital silence (every mel bin at the floor)
    are left out. Both clips are trimmed to the shorter length first. Absolute values depend on this cepstrum
    (an MFCC-style DCT of the log-mel, not SPTK's mel-cepstrum), so compare MCDs computed here with each other.
    The natural log reaches down to the 1e-5 floor (100 dB below full scale), so quiet bins weigh as much as loud
    ones: on 8 test clips white noise at +20 dB SNR scores 50.8 dB, Griffin-Lim from the mel 8.4 dB (clamping both
    log-mels 80 dB below the reference's peak changes little: 49.9 and 8.0 dB on 6 clips).
    Raises ``ValueError`` for empty, NaN, silent or too-short (< 40 ms) clips, or a reference with no
    non-silent frame.
    """
    reference, degraded = _aligned(reference, degraded, sampling_rate, MIN_SAMPLES, "MCD")
    mels = vocoder_mel_padded(torch.from_numpy(np.stack([reference, degraded]))).numpy()  # (2, 80, frames)
    speech_frames = mels[0].max(axis=0) > _SILENT_LOG_MEL                              # (frames,)
    if not speech_frames.any():
        raise ValueError("the reference has no frame above digital silence; MCD is undefined")
    cepstra = [mel_cepstra(mel[:, speech_frames])[list(MCD_COEFFICIENTS)] for mel in mels]  # 2 x (13, frames)
    per_frame = _MCD_SCALE * np.sqrt(2.0 * ((cepstra[0] - cepstra[1]) ** 2).sum(axis=0))   # (frames,)
    return float(per_frame.mean())


# ----------------------------------------------------------------------------------------------------------
# DNSMOS
# ----------------------------------------------------------------------------------------------------------
def dnsmos(wave, sampling_rate: int = SAMPLE_RATE) -> dict[str, float]:
    """Non-intrusive MOS of one clip: ``{"ovrl", "sig", "bak", "p808"}`` (each about 1 to 5).

    DNSMOS P.835 rates speech quality (``sig``), background noise (``bak``) and the whole (``ovrl``); the P.808
    network gives one overall MOS (``p808``). They run through ``speechmos.dnsmos`` on its bundled ONNX models
    (nothing is downloaded). The networks read 9.01 s windows at 16 kHz, one per second of audio, and average
    them; a clip shorter than 9.01 s is repeated end to end (doubled until long enough) first, as Microsoft's
    reference script does, so a 2 s clip is scored as 16 s of itself. Slow: about 7 s per 17 s of audio on a
    2-core CPU, so even a 2 s corpus clip takes 1-2.5 s (it is scored as 16 s), plus about 5 s to load the models
    on first use.

    ``wave`` is mono audio at ``sampling_rate`` (resampled to 16 kHz); samples beyond [-1, 1] (resampling can
    overshoot a little) are clipped, as speechmos rejects them. Raises ``ValueError`` for empty, NaN, silent,
    out-of-range or too-short (< 40 ms) audio.
    """
    from speechmos import dnsmos as speechmos_dnsmos

    array = np.clip(_clip(wave, sampling_rate, "wave"), -1.0, 1.0)
    if array.size < MIN_SAMPLES:
        raise ValueError(f"DNSMOS needs at least {MIN_SAMPLES} samples (40 ms); got {array.size}")
    scores = speechmos_dnsmos.run(array, SAMPLE_RATE)
    return {key: float(scores[f"{key}_mos"]) for key in ("ovrl", "sig", "bak", "p808")}


# ----------------------------------------------------------------------------------------------------------
# Griffin-Lim: the zero-training vocoder
# ----------------------------------------------------------------------------------------------------------
def griffin_lim(log_mel, n_iter: int = 32, seed: int | None = 0) -> np.ndarray:
    """Waveform from the detokenizer's log-mel ``(80, frames)`` by Griffin-Lim: ``((frames - 1) * 320,)`` float32.

    ``exp(log_mel)`` is the mel *magnitude*; librosa's ``mel_to_stft`` inverts the 80 Slaney filters (fmax 8 kHz)
    by non-negative least squares to a 641-bin magnitude, and ``griffinlim`` (``n_iter`` iterations, momentum 0.99,
    1280-pt Hann window, hop 320, centred, reflect padding: the STFT of ``vocoder_mel``) finds a phase that fits
    it. These are the two steps of ``librosa.feature.inverse.mel_to_audio(exp(log_mel), power=1, ...)``, but that
    function starts the phase from a fresh, unseeded generator (a different waveform on every call); here the
    random start comes from ``np.random.RandomState(seed)``, so the result is deterministic. ``seed=None`` starts
    from zero phase instead (librosa's ``init=None``), also deterministic.

    Measured on the first 16 test clips (32 iterations, seed 0): PESQ-WB 2.07, STOI 0.90, MCD 8.43 dB; zero phase
    start 2.04 / 0.90 / 8.39 and 100 iterations 2.05 / 0.90 / 8.28 (8 clips) are no better. About 0.3-0.6 s per second
    of audio on one busy core, two thirds of it in the least-squares mel inversion.
    """
    import librosa

    log_mel = np.asarray(log_mel.detach().cpu() if isinstance(log_mel, torch.Tensor) else log_mel,
                         dtype=np.float32)
    if log_mel.ndim != 2 or log_mel.shape[0] != VOCODER_N_MELS or log_mel.shape[1] < 2:
        raise ValueError(f"log_mel must be ({VOCODER_N_MELS}, frames >= 2), the output of "
                         f"fac_mini.audio.vocoder_mel; got shape {log_mel.shape}")
    if not np.isfinite(log_mel).all():
        raise ValueError("log_mel contains NaN or infinite values")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    magnitude = librosa.feature.inverse.mel_to_stft(np.exp(log_mel), sr=SAMPLE_RATE, n_fft=VOCODER_N_FFT, power=1.0,
                                                    fmax=SAMPLE_RATE / 2)                  # (641, frames)
    wave = librosa.griffinlim(magnitude, n_iter=n_iter, hop_length=VOCODER_HOP, win_length=VOCODER_N_FFT,
                              n_fft=VOCODER_N_FFT, window="hann", center=True, pad_mode="reflect",
                              length=(log_mel.shape[1] - 1) * VOCODER_HOP,
                              init=None if seed is None else "random", random_state=seed)
    return wave.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Read-back: what the speech tokenizer hears
# ----------------------------------------------------------------------------------------------------------


def read_back(waves: Sequence, sampling_rate: int = SAMPLE_RATE, tokenizer=None, batch_size: int = 32) -> list[str]:
    """Transcripts of ``waves`` by the speech tokenizer's CTC head (greedy; normalized text).

    ``tokenizer`` defaults to the shipped one (``data/speech_tokenizer``, loaded once). The clips are read in
    batches of ``batch_size`` with :meth:`SpeechTokenizer.transcribe`, as ``evaluate_speech_tokenizer`` reads the
    test split, so the same clips give the same transcripts. Raises ``ValueError`` naming a clip that is empty,
    NaN, silent or shorter than 40 ms.
    """
    if isinstance(waves, (np.ndarray, torch.Tensor)) and waves.ndim == 1:
        raise ValueError("read_back() takes a list of clips; wrap one clip in a list")
    if len(waves) == 0:
        raise ValueError("read_back() got no clips; pass a non-empty list of waveforms")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    from .audio import log_mel

    if tokenizer is None:
        from .speech_tokenizer import shipped_speech_tokenizer

        tokenizer = shipped_speech_tokenizer()
    texts: list[str] = []
    for start in range(0, len(waves), batch_size):
        batch = list(waves[start: start + batch_size])
        try:
            texts += tokenizer.transcribe(batch, sampling_rate)
        except ValueError:                  # its "clip i" counts within the batch: find the clip of ``waves``
            for offset, wave in enumerate(batch):
                try:
                    log_mel(wave, sampling_rate)
                except ValueError as error:
                    raise ValueError(f"read_back(), clip {start + offset}: {error}") from error
            raise
    return texts


def read_back_cer(waves: Sequence, texts: Sequence[str], sampling_rate: int = SAMPLE_RATE, tokenizer=None) -> float:
    """Corpus character error rate of :func:`read_back` (``waves``) against the ``texts`` they should say
    (``fac_mini.train.metrics.character_error_rate``: edits / reference characters, both sides normalized)."""
    from .train.metrics import character_error_rate

    if len(waves) != len(texts):
        raise ValueError(f"got {len(waves)} clips but {len(texts)} texts")
    return character_error_rate(list(texts), read_back(waves, sampling_rate, tokenizer))


# ----------------------------------------------------------------------------------------------------------
# The table row
# ----------------------------------------------------------------------------------------------------------
def copy_synthesis_report(references: Sequence, syntheses: Sequence, sampling_rate: int = SAMPLE_RATE,
                          with_dnsmos: bool = False, progress: bool = False) -> dict:
    """Mean PESQ-WB, STOI and MCD (dB) of ``syntheses[i]`` against ``references[i]`` over all clips, rounded to 4
    decimals: ``{"clips", "pesq_wb", "stoi", "mcd_db"}``, plus ``dnsmos_ovrl``/``_sig``/``_bak``/``_p808`` of the
    syntheses with ``with_dnsmos`` (slow: see :func:`dnsmos`). Every clip's errors are raised naming the clip."""
    from tqdm.auto import tqdm

    if len(references) != len(syntheses):
        raise ValueError(f"got {len(references)} references but {len(syntheses)} syntheses")
    if len(references) == 0:
        raise ValueError("copy_synthesis_report() got no clips")
    rows = []
    for index in tqdm(range(len(references)), desc="speech metrics", disable=not progress):
        reference, synthesis = references[index], syntheses[index]
        try:
            row = {"pesq_wb": pesq_wb(reference, synthesis, sampling_rate),
                   "stoi": stoi(reference, synthesis, sampling_rate),
                   "mcd_db": mel_cepstral_distortion(reference, synthesis, sampling_rate)}
            if with_dnsmos:
                row |= {f"dnsmos_{key}": value for key, value in dnsmos(synthesis, sampling_rate).items()}
        except ValueError as error:
            raise ValueError(f"clip {index}: {error}") from error
        rows.append(row)
    return {"clips": len(rows)} | {key: round(float(np.mean([row[key] for row in rows])), 4) for key in rows[0]}
