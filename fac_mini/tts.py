"""Offline speech synthesis with the eSpeak NG library bundled in ``espeakng-loader``.

No human-speech corpus is reachable offline, so the course speaks its own mini world: eSpeak NG runs
in-process through ``ctypes`` (no apt, no subprocess), returns 22.05 kHz int16 samples, and
:func:`synthesize` resamples them to 16 kHz mono float32.

A *voice* is an eSpeak voice name plus a variant (``"en-us+f3"``), a speaking rate in words per minute and
a pitch (0-99); :data:`VOICES` lists the course's speakers.
"""
from __future__ import annotations

import ctypes
import os
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from .audio import resample

__all__ = ["Voice", "VOICES", "synthesize", "ESPEAK_RATE"]

ESPEAK_RATE = 22050  # eSpeak NG's native output rate (Hz)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: eSpeak voice name (with variant), words per minute, pitch and pitch range."""

    speaker_id: str
    name: str
    rate_wpm: int
    pitch: int
    pitch_range: int = 50


# Ten speakers: different accents (en-us, en, en-gb-x-rp, en-029), male and female variants, rates, pitches.
VOICES: tuple[Voice, ...] = (
    Voice("spk00", "en-us", 165, 45),
    Voice("spk01", "en-us+f3", 170, 60),
    Voice("spk02", "en+m3", 150, 35),
    Voice("spk03", "en+f2", 180, 70),
    Voice("spk04", "en-gb-x-rp+m1", 160, 40),
    Voice("spk05", "en-gb-x-rp+f4", 155, 65),
    Voice("spk06", "en-us+m7", 175, 30),
    Voice("spk07", "en-029+f1", 160, 55),
    Voice("spk08", "en+klatt", 165, 50),
    Voice("spk09", "en-us+f5", 145, 75, 70),
)


class _ESpeak:
    """A process-wide handle on libespeak-ng (the C library keeps global state, so one lock guards it)."""

    def __init__(self) -> None:
        import espeakng_loader

        os.environ.setdefault("ESPEAK_DATA_PATH", str(espeakng_loader.get_data_path()))
        self.lib = ctypes.cdll.LoadLibrary(str(espeakng_loader.get_library_path()))
        data_path = str(espeakng_loader.get_data_path()).encode()
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, ctypes.c_char_p(data_path), 0)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"eSpeak NG failed to initialise (returned {rate}); data path {data_path!r}")
        self.lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # keep a reference: the C side holds only a pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise ValueError(f"eSpeak NG has no voice {voice.name!r}")
            self.lib.espeak_SetParameter(_PARAM_RATE, voice.rate_wpm, 0)
            self.lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
            self.lib.espeak_SetParameter(_PARAM_RANGE, voice.pitch_range, 0)
            # The female variants add breath noise drawn from eSpeak's own random generator: seed it per
            # utterance so the same text and voice give the same samples in every fresh process.
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(zlib.crc32(f"{voice.name}|{text}".encode())))
            self._chunks = []
            encoded = text.encode("utf-8") + b"\0"
            self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            self._chunks = []
        return samples


_engine: _ESpeak | None = None


def synthesize(text: str, voice: Voice, sampling_rate: int = 16000) -> np.ndarray:
    """Speak ``text`` with ``voice``; return mono float32 samples in [-1, 1] at ``sampling_rate`` Hz.

    Leading and trailing silence that eSpeak adds is kept short (at most 50 ms each side) so that durations
    reflect speech. eSpeak keeps hidden state between calls, so the samples are exactly reproducible only
    for the same sequence of calls in a fresh process (what :func:`fac_mini.corpus.build_corpus` does).
    """
    global _engine
    if not text.strip():
        raise ValueError("synthesize() got empty text; pass at least one word")
    if _engine is None:
        _engine = _ESpeak()
    pcm = _engine.speak(text, voice)
    if pcm.size == 0:
        raise RuntimeError(f"eSpeak NG produced no audio for {text!r} with voice {voice.name!r}")
    wave = pcm.astype(np.float32) / 32768.0
    wave = _trim_silence(wave, ESPEAK_RATE, keep_s=0.05)
    return resample(wave, ESPEAK_RATE, sampling_rate)


def _trim_silence(wave: np.ndarray, rate: int, keep_s: float, threshold: float = 1e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) > threshold)
    if loud.size == 0:
        return wave
    keep = int(keep_s * rate)
    return wave[max(loud[0] - keep, 0): loud[-1] + keep + 1]
