"""Audio in: loading, validation, mono, resampling, and Whisper's log-mel front end.

Everything that enters the course's models goes through here, so bad input fails *here*, with a message
that says what was wrong and what to do. Conventions: waveforms are mono ``float32`` in [-1, 1] at
16 kHz; a log-mel spectrogram is a tensor of shape ``(n_mels, frames)`` at 100 frames per second.

What is accepted, and how it is converted (``as_mono_float``):

- numpy arrays, torch tensors (any device; ``bfloat16``/``float16`` are converted to ``float32``, exactly),
  and lists of numbers (one clip, read with ``np.asarray``);
- float samples whose peak is at most ``MAX_FLOAT_PEAK`` (2.0): a little above 1 is what resampling or mixing
  full-scale audio gives; a larger peak means the samples are not in [-1, 1] (16-bit PCM values stored as
  floats shift the whole log-mel by log10(32768²) / 4 = +2.26) and is rejected with the fix, "divide by 32768";
- integer PCM (int16, int32, uint8), scaled to [-1, 1].

Rejected with ``ValueError``: empty, NaN or infinite samples, a single number, other ranks or dtypes, and, where
speech is expected (``log_mel``, ``log_mel_batch``, ``load_audio``, the processor), audio that is silent
everywhere (all samples zero): there is nothing to encode.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import torch

from .constants import SAMPLE_RATE

__all__ = [
    "N_FFT", "HOP_LENGTH", "N_MELS", "MIN_SAMPLES", "MAX_FLOAT_PEAK",
    "as_mono_float", "check_not_silent", "resample", "load_audio", "mel_filterbank", "log_mel", "log_mel_batch",
    "VOCODER_N_FFT", "VOCODER_HOP", "VOCODER_N_MELS", "MEL_RATE_HZ", "MEL_FLOOR", "vocoder_mel", "vocoder_mel_padded",
    "vocoder_frames",
]

N_FFT = 400           # 25 ms analysis window
HOP_LENGTH = 160      # 10 ms hop -> 100 mel frames per second
N_MELS = 128          # Whisper-large-v3 uses 128 mel bins
MIN_SAMPLES = SAMPLE_RATE // 25  # one 25 Hz speech-token frame (40 ms): anything shorter carries no token
MAX_FLOAT_PEAK = 2.0  # float audio louder than this is not in [-1, 1] (e.g. int16 PCM values stored as floats)

# The detokenizer's mel (what the flow predicts and the vocoder reads), CosyVoice's recipe at 16 kHz: 80 bins,
# magnitude (not power), natural log with a floor, 50 frames per second = 2 per 25 Hz speech token.
VOCODER_N_FFT = 1280  # 80 ms window = 4 hops, as Vocos and HiFT use
VOCODER_HOP = 320     # 20 ms hop -> 50 mel frames per second
VOCODER_N_MELS = 80
MEL_RATE_HZ = SAMPLE_RATE // VOCODER_HOP
MEL_FLOOR = 1e-5      # log(1e-5) = -11.5: the value of digital silence


def as_mono_float(wave, *, name: str = "wave", allow_silent: bool = True) -> np.ndarray:
    """Validate ``wave`` and return it as a new mono ``float32`` numpy array (the caller's data is never changed).

    Accepts numpy arrays, torch tensors (``bfloat16``/``float16`` are converted to ``float32``) or a list of
    numbers: 1-D ``(samples,)`` is mono; 2-D is multichannel, either ``(channels, samples)`` or
    ``(samples, channels)`` (the shorter axis is taken as channels) and is averaged to mono. Integer PCM is
    scaled to [-1, 1] (int16 by 32768, int32 by 2**31, uint8 centred on 128).

    Raises ``ValueError`` for: a single number, other ranks, empty audio, non-numeric dtypes, NaN or infinite
    samples, float samples with a peak above ``MAX_FLOAT_PEAK`` (not in [-1, 1]: int16 PCM stored as floats
    must be divided by 32768), and (when ``allow_silent=False``) audio that is silent everywhere.
    """
    if isinstance(wave, torch.Tensor):
        tensor = wave.detach()
        if tensor.dtype in (torch.bfloat16, torch.float16):     # numpy has no bfloat16; float32 holds both exactly
            tensor = tensor.float()
        array = tensor.cpu().numpy()
    else:
        array = np.asarray(wave)
    if array.dtype == np.int16:
        array = array.astype(np.float32) / 32768.0
    elif array.dtype == np.int32:
        array = array.astype(np.float32) / 2147483648.0
    elif array.dtype == np.uint8:
        array = (array.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=True)
    else:
        raise ValueError(f"{name} has dtype {array.dtype}; pass float samples in [-1, 1] or int16/int32 PCM")
    if array.ndim == 0:
        raise ValueError(f"{name} is a single number ({float(array)}), not audio; pass a 1-D array of samples")
    if array.ndim not in (1, 2):
        raise ValueError(
            f"{name} must be 1-D (samples,) or 2-D (channels, samples); got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (0 samples); pass at least {MIN_SAMPLES} samples (40 ms at 16 kHz)")
    if array.ndim == 2:
        channel_axis = 0 if array.shape[0] <= array.shape[1] else 1
        array = array.mean(axis=channel_axis)
    peak = float(np.abs(array).max())                   # NaN if any sample is NaN, inf if any is infinite
    if not math.isfinite(peak):
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite samples; clean the audio before passing it")
    if peak > MAX_FLOAT_PEAK:
        raise ValueError(f"{name} has float samples with peak |x| = {peak:.6g}, but float audio must lie in [-1, 1] "
                         f"(accepted up to {MAX_FLOAT_PEAK}). If these are 16-bit PCM values stored as floats, "
                         "divide by 32768 (or pass the int16 array itself); otherwise divide by the peak")
    if not allow_silent and peak == 0:
        raise ValueError(f"{name} is silent (all {array.size} samples are zero)")
    return array


def check_not_silent(wave: np.ndarray, name: str = "wave") -> None:
    """Raise ``ValueError`` if the mono array ``wave`` is zero everywhere (there is no speech to encode)."""
    if not np.any(wave):
        raise ValueError(f"{name} is silent (all {wave.size} samples are zero): there is no speech to encode; "
                         "pass real audio")


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float waveform from ``orig_sr`` to ``target_sr`` Hz (soxr 'HQ', librosa's default)."""
    for rate in (orig_sr, target_sr):
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool):
            raise TypeError(f"sampling rates must be numbers of Hz, got orig_sr={orig_sr!r}, target_sr={target_sr!r}")
    if not (orig_sr > 0 and target_sr > 0 and math.isfinite(orig_sr) and math.isfinite(target_sr)):
        raise ValueError(f"sampling rates must be positive, got orig_sr={orig_sr}, target_sr={target_sr}")
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave.copy()
    import soxr

    return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32)


def load_audio(path, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file into mono float32 at ``sampling_rate`` Hz.

    Raises ``FileNotFoundError`` when the file does not exist, ``ValueError`` naming the file when it cannot be
    decoded, is empty, holds NaN, is entirely silent, or (a float file) holds samples far outside [-1, 1].
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as error:  # soundfile raises LibsndfileError/RuntimeError for corrupt data
        raise ValueError(f"cannot decode audio file {path}: {error}") from error
    wave = as_mono_float(data.T, name=f"audio file {path}", allow_silent=False)
    return resample(wave, file_rate, sampling_rate)


# ----------------------------------------------------------------------------------------------------------
# Mel filterbank and Whisper log-mel
# ----------------------------------------------------------------------------------------------------------
def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    mel = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    freq = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), freq)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular mel filters, Slaney scale and area normalisation, shape ``(n_mels, n_fft // 2 + 1)``.

    Filter m rises linearly from mel point m to m+1 and falls to m+2; its area is normalised by
    ``2 / (f_{m+2} - f_m)`` so each filter has roughly constant energy (librosa's default, Whisper's choice).
    """
    f_max = sampling_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sampling_rate / 2, n_fft // 2 + 1)                         # (n_freqs,)
    mel_points = np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)                                                     # (n_mels + 2,)
    widths = np.diff(hz_points)                                                            # (n_mels + 1,)
    offsets = hz_points[:, None] - fft_freqs[None, :]                                      # (n_mels + 2, n_freqs)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))                                 # (n_mels, n_freqs)
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


_FILTERS: dict[tuple[int, int, int], torch.Tensor] = {}


def _filters(n_mels: int) -> torch.Tensor:
    key = (n_mels, N_FFT, SAMPLE_RATE)
    if key not in _FILTERS:
        _FILTERS[key] = mel_filterbank(n_mels, N_FFT, SAMPLE_RATE)
    return _FILTERS[key]


def _prepare(wave, sampling_rate: int, name: str) -> np.ndarray:
    array = as_mono_float(wave, name=name)
    if sampling_rate != SAMPLE_RATE:
        array = resample(array, sampling_rate, SAMPLE_RATE)
    if array.size < MIN_SAMPLES:
        raise ValueError(
            f"{name} has {array.size} samples at 16 kHz, shorter than one 25 Hz speech frame "
            f"({MIN_SAMPLES} samples = 40 ms); pass longer audio")
    check_not_silent(array, name)
    return array


def _log_mel_padded(batch: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Whisper log-mel of already padded 16 kHz audio, ``(batch, samples)`` -> ``(batch, n_mels, samples // 160)``."""
    window = torch.hann_window(N_FFT)
    stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (B, 201, samples//160 + 1)
    power = stft[..., :-1].abs() ** 2                                                # Whisper drops the last frame
    mel = _filters(n_mels) @ power                                                   # (B, n_mels, frames)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)   # keep an 80 dB dynamic range below each clip's peak
    return (log_spec + 4.0) / 4.0                    # roughly centred on 0, unit scale


def log_mel(wave, sampling_rate: int = SAMPLE_RATE, n_mels: int = N_MELS) -> torch.Tensor:
    """Whisper log-mel spectrogram of one mono clip: ``(n_mels, frames)`` with ``frames = samples // 160``.

    Equal to ``WhisperFeatureExtractor(feature_size=128)(wave, sampling_rate=16000, padding="longest")``.
    ``wave`` may be numpy, torch (bfloat16/float16 included) or a list of numbers, float in [-1, 1] or integer
    PCM, mono or 2-channel; audio at another rate is resampled to 16 kHz first. Raises ``ValueError`` on empty,
    NaN, silent (all zero), wrong-rank, too-short (< 40 ms) or out-of-range float input (peak above
    ``MAX_FLOAT_PEAK``: int16 PCM values stored as floats must be divided by 32768).
    """
    array = _prepare(wave, sampling_rate, "wave")
    return _log_mel_padded(torch.from_numpy(array)[None], n_mels)[0]


def log_mel_batch(waves, sampling_rate: int = SAMPLE_RATE,
                  n_mels: int = N_MELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel of several clips zero-padded to the longest, as Whisper's extractor does with ``padding="longest"``.

    Returns ``features`` of shape ``(batch, n_mels, frames)`` and a boolean ``frames_mask`` ``(batch, frames)``
    that is True on the ``ceil(samples / 160)`` frames each clip really covers.
    """
    if len(waves) == 0:
        raise ValueError("log_mel_batch() got no clips; pass a non-empty list of waveforms")
    arrays = [_prepare(wave, sampling_rate, f"waves[{i}]") for i, wave in enumerate(waves)]
    longest = max(array.size for array in arrays)
    batch = torch.zeros(len(arrays), longest)
    for row, array in enumerate(arrays):
        batch[row, : array.size] = torch.from_numpy(array)
    features = _log_mel_padded(batch, n_mels)
    frames = features.shape[-1]
    valid = torch.tensor([math.ceil(array.size / HOP_LENGTH) for array in arrays])
    frames_mask = torch.arange(frames)[None, :] < valid[:, None]
    return features, frames_mask


# ----------------------------------------------------------------------------------------------------------
# The detokenizer's 80-bin mel (flow target, vocoder input)
# ----------------------------------------------------------------------------------------------------------
def vocoder_frames(num_samples: int) -> int:
    """Mel frames of a clip of ``num_samples`` samples: ``num_samples // 320 + 1`` (centred STFT, 50 per second)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return num_samples // VOCODER_HOP + 1


def vocoder_mel_padded(batch: torch.Tensor) -> torch.Tensor:
    """The detokenizer's log-mel of padded 16 kHz audio: ``(batch, samples)`` -> ``(batch, 80, samples // 320 + 1)``.

    ``log(max(M·|STFT|, 1e-5))`` with a centred 1280-point Hann STFT, hop 320, and 80 Slaney filters up to 8 kHz
    (the same filters as ``librosa.filters.mel``): the input of Griffin-Lim (``librosa.feature.inverse.mel_to_audio``
    with ``power=1``) and of the learnt vocoders. Differentiable (the vocoders' mel loss uses it).
    """
    window = torch.hann_window(VOCODER_N_FFT, device=batch.device, dtype=batch.dtype)
    stft = torch.stft(batch, VOCODER_N_FFT, VOCODER_HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True)                                   # (B, 641, frames)
    magnitude = stft.abs()
    key = (VOCODER_N_MELS, VOCODER_N_FFT, SAMPLE_RATE)
    if key not in _FILTERS:
        _FILTERS[key] = mel_filterbank(VOCODER_N_MELS, VOCODER_N_FFT, SAMPLE_RATE)
    mel = _FILTERS[key].to(batch.device, batch.dtype) @ magnitude                   # (B, 80, frames)
    return torch.clamp(mel, min=MEL_FLOOR).log()


def vocoder_mel(wave, sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The detokenizer's log-mel of one mono clip: ``(80, frames)`` with ``frames = samples // 320 + 1`` (50 Hz).

    Validated and resampled like ``log_mel`` (``ValueError`` on empty, NaN, silent, too-short — at most 640 samples —
    or out-of-range audio).
    """
    array = _prepare(wave, sampling_rate, "wave")
    if array.size <= VOCODER_N_FFT // 2:
        raise ValueError(f"wave is too short: {array.size} samples at 16 kHz; the detokenizer's mel needs more than "
                         f"{VOCODER_N_FFT // 2} (40 ms, half its 1280-point window) to centre its first window")
    return vocoder_mel_padded(torch.from_numpy(array)[None])[0]
