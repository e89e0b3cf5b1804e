"""Speech ids -> waveform: the flow (ids -> mel) and the vocoder (mel -> waveform), offline or streaming.

Fun-Audio-Chat speaks through CosyVoice 3's detokenizer; this is the course's miniature of it, with the two calls
users ask for (COURSE.md §6):

* :func:`speech_ids_to_wave` — 25 Hz speech ids (the shipped tokenizer's 243 codes) in a chosen voice -> 16 kHz audio;
* :func:`resynthesize` — a clip -> tokenizer -> flow -> vocoder, in the clip's own voice: what survives the tokens.

A voice (``speaker=``) is a corpus voice name (``"spk03"``: the centroid of its training clips' GE2E embeddings,
shipped in ``data/flow/speakers.safetensors``), a reference clip (a waveform, at least 150 ms of speech), or a
256-d embedding. Fun-Audio-Chat itself always speaks with one fixed x-vector; the default here is ``"spk00"``.

**Streaming** (:class:`StreamingDetokenizer`), as the release's web demo: ids arrive in hops of 15 (0.6 s) and each
hop is decoded once 3 more ids (the flow's look-ahead) exist. The flow's attention is chunk-causal with chunks of
exactly one hop (``fac_mini.flow``), and its noise is drawn per chunk from a seed, so the streamed mel equals the
offline mel (up to float rounding). The vocoder is a stack of convolutions: a sample is final once the mel
``vocoder_lookahead`` frames after it exists. With the full receptive field (Vocos: 3 + 3·8 conv frames + 2 frames
of iSTFT overlap = 29 frames) the streamed audio equals the offline audio; the default waits 6 frames (120 ms),
which changes the samples at each seam by a little (measured in ``tests/test_detokenize.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .audio import VOCODER_HOP, as_mono_float
from .constants import SAMPLE_RATE
from .flow import FLOW_DIR, SPEAKERS_FILE, FlowDetokenizer, load_flow
from .vocoder import VOCODER_DIR, load_vocoder

__all__ = ["TOKEN_HOP", "PRE_LOOKAHEAD", "MAX_HISTORY_IDS", "DEFAULT_SPEAKER", "Detokenizer", "StreamingDetokenizer",
           "speech_ids_to_wave", "resynthesize", "load_speakers", "vocoder_context_frames", "evaluate_detokenizer",
           "audio_chunk_steps"]

TOKEN_HOP = 15            # ids per streaming hop (0.6 s), the release's TOKEN_HOP_LEN
PRE_LOOKAHEAD = 3         # ids of look-ahead the flow needs beyond a hop, the release's PRE_LOOKAHEAD_LEN
MAX_HISTORY_IDS = 25 * 20  # ids of history a streaming hop re-reads (the release keeps 20 s)
DEFAULT_SPEAKER = "spk00"


def vocoder_context_frames(vocoder: torch.nn.Module) -> int:
    """Mel frames on either side that a vocoder output sample depends on (exact for the Vocos design: the embedding
    conv and every ConvNeXt block see ±3 frames, the iSTFT window spans ±2 hops)."""
    config = vocoder.config
    if config.kind == "vocos":
        return 3 * (1 + config.num_layers) + config.n_fft // (2 * config.hop_length)
    raise ValueError("streaming needs the Vocos vocoder (its receptive field is known exactly); got "
                     f"kind {config.kind!r}")


def load_speakers(directory: Path | str = FLOW_DIR) -> dict[str, torch.Tensor]:
    """The shipped voices: ``{voice: (256,) unit embedding}`` (centroids of each corpus voice's training clips)."""
    from .train.store import read_safetensors

    return read_safetensors(Path(directory) / SPEAKERS_FILE,
                            "rebuild it with `python -m fac_mini flow train --out data/flow`")


def _check_ids(speech_ids, vocab_size: int, name: str = "speech_ids") -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(speech_ids) if not isinstance(speech_ids, torch.Tensor) else speech_ids)
    if ids.dim() != 1:
        raise ValueError(f"{name} must be one sequence of ids (1-D), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: there is nothing to speak")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{first}] = {int(ids[first])} is outside the speech codebook [0, {vocab_size}); "
                         "these are the shipped tokenizer's ids (control ids such as bos/eos/pad must be removed)")
    return ids.long()


def chunk_noise(frames: int, n_mels: int, seed: int, chunk: int) -> torch.Tensor:
    """x₀ ``(frames, n_mels)``: N(0, I) drawn chunk by chunk from ``seed`` (chunk b from seed·1000003 + b), so a
    prefix of frames gets the same noise whatever the total length (what makes streaming equal offline)."""
    blocks = [torch.randn(chunk, n_mels, generator=torch.Generator().manual_seed(seed * 1_000_003 + b))
              for b in range(-(-frames // chunk))]
    return torch.cat(blocks)[:frames]


@dataclass
class Detokenizer:
    """The flow and the vocoder together, with the shipped voices."""
    flow: FlowDetokenizer
    vocoder: torch.nn.Module
    speakers: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, flow_dir: Path | str = FLOW_DIR, vocoder_dir: Path | str = VOCODER_DIR) -> "Detokenizer":
        return cls(load_flow(flow_dir), load_vocoder(vocoder_dir), load_speakers(flow_dir))

    # --- voices -----------------------------------------------------------------------------------------
    def speaker_embedding(self, speaker=None) -> torch.Tensor:
        """``(256,)`` embedding of a voice name, a reference clip (16 kHz waveform) or an embedding."""
        speaker = DEFAULT_SPEAKER if speaker is None else speaker
        if isinstance(speaker, str):
            if speaker not in self.speakers:
                raise ValueError(f"unknown voice {speaker!r}; choose one of {sorted(self.speakers)}, or pass a "
                                 "reference clip or a 256-d embedding")
            return self.speakers[speaker]
        array = speaker.detach().cpu().numpy() if isinstance(speaker, torch.Tensor) else np.asarray(speaker)
        if array.ndim == 1 and array.shape[0] == self.flow.config.speaker_dim and array.dtype.kind == "f" \
                and np.abs(array).max() <= 1.0 + 1e-4 and abs(float(np.linalg.norm(array)) - 1.0) < 1e-3:
            return torch.from_numpy(array.astype(np.float32))          # already a unit embedding
        from .speaker import speaker_embedding

        return torch.from_numpy(speaker_embedding(as_mono_float(speaker, name="speaker clip")))

    # --- offline ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def mel(self, speech_ids, speaker=None, *, steps: int = 10, guidance: float = 0.7, seed: int = 0) -> torch.Tensor:
        """Log-mel ``(80, 2·ids)`` of one id sequence."""
        ids = _check_ids(speech_ids, self.flow.config.vocab_size)
        c = self.flow.config
        noise = chunk_noise(len(ids) * c.token_mel_ratio, c.n_mels, seed, c.chunk_frames)
        embedding = self.speaker_embedding(speaker)
        return self.flow.generate(ids[None], embedding[None], steps=steps, guidance=guidance, noise=noise[None])[0].T

    @torch.no_grad()
    def wave(self, speech_ids, speaker=None, **kwargs) -> np.ndarray:
        """16 kHz float32 waveform of one id sequence: ``(2·ids − 1)·320`` samples."""
        mel = self.mel(speech_ids, speaker, **kwargs)
        return self.vocoder(mel[None])[0].clamp(-1, 1).numpy().astype(np.float32)

    def stream(self, speaker=None, **kwargs) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, speaker, **kwargs)


class StreamingDetokenizer:
    """Decode speech ids as they arrive: ``push(ids)`` returns the audio chunks that became final, ``finish()`` the
    rest. Concatenated, the chunks are the offline waveform (exactly with ``vocoder_lookahead`` = the vocoder's
    context, see the module docstring). ``timings`` records, per chunk, the seconds from the arrival of the ids
    that completed it to the chunk being ready."""

    def __init__(self, detokenizer: Detokenizer, speaker=None, *, steps: int = 10, guidance: float = 0.7, seed: int = 0,
                 hop: int = TOKEN_HOP, lookahead: int = PRE_LOOKAHEAD, vocoder_lookahead: int = 6,
                 max_history: int = MAX_HISTORY_IDS):
        c = detokenizer.flow.config
        if hop * c.token_mel_ratio != c.chunk_frames:
            raise ValueError(f"hop {hop} ids = {hop * c.token_mel_ratio} frames must equal the flow's attention chunk "
                             f"({c.chunk_frames} frames) for streaming to match offline decoding")
        if lookahead < c.lookahead:
            raise ValueError(f"lookahead {lookahead} is shorter than the flow's look-ahead conv ({c.lookahead} ids)")
        self.detok, self.steps, self.guidance, self.seed = detokenizer, steps, guidance, seed
        self.hop, self.lookahead, self.max_history = hop, lookahead, max_history
        self.context = vocoder_context_frames(detokenizer.vocoder)
        if not 0 <= vocoder_lookahead <= self.context:
            raise ValueError(f"vocoder_lookahead must be in [0, {self.context}], got {vocoder_lookahead}")
        self.vocoder_lookahead = vocoder_lookahead
        self.embedding = detokenizer.speaker_embedding(speaker)
        self.ids: list[int] = []
        self.mel = torch.zeros(c.n_mels, 0)            # final mel frames so far (80, frames)
        self.samples_out = 0                           # samples already returned
        self.timings: list[float] = []
        self.finished = False

    @torch.no_grad()
    def _flow_frames(self, end_id: int, emit_until: int) -> None:
        """Run the flow on ids[start:end_id] and keep the frames up to ``emit_until`` (a frame index)."""
        c = self.detok.flow.config
        start_chunk = max(0, (end_id - self.max_history) // self.hop)          # history re-read, whole chunks
        start = start_chunk * self.hop
        ids = torch.tensor(self.ids[start:end_id])
        frames = len(ids) * c.token_mel_ratio
        noise = chunk_noise(end_id * c.token_mel_ratio, c.n_mels, self.seed, c.chunk_frames)[start * c.token_mel_ratio:]
        mel = self.detok.flow.generate(ids[None], self.embedding[None], steps=self.steps, guidance=self.guidance,
                                       noise=noise[None, :frames])[0].T          # (80, frames)
        first = self.mel.shape[1] - start * c.token_mel_ratio
        self.mel = torch.cat([self.mel, mel[:, first: emit_until - start * c.token_mel_ratio]], dim=1)

    @torch.no_grad()
    def _vocode(self, final: bool) -> np.ndarray:
        frames = self.mel.shape[1]
        end_sample = (frames - 1) * VOCODER_HOP if final else max(0, (frames - 1 - self.vocoder_lookahead) * VOCODER_HOP)
        if end_sample <= self.samples_out or frames < 2:
            return np.zeros(0, dtype=np.float32)
        first_frame = max(0, self.samples_out // VOCODER_HOP - self.context)
        wave = self.detok.vocoder(self.mel[None, :, first_frame:])[0].clamp(-1, 1)
        offset = first_frame * VOCODER_HOP
        chunk = wave[self.samples_out - offset: end_sample - offset].numpy().astype(np.float32)
        self.samples_out = end_sample
        return chunk

    def push(self, speech_ids: Iterable[int]) -> list[np.ndarray]:
        """Add ids; return the audio chunks (16 kHz float32) that are ready (possibly none)."""
        if self.finished:
            raise ValueError("this stream is finished; start a new one with Detokenizer.stream()")
        new = list(speech_ids)
        if new:
            self.ids += _check_ids(new, self.detok.flow.config.vocab_size).tolist()
        arrived = time.perf_counter()
        c = self.detok.flow.config
        chunks = []
        while len(self.ids) >= (self.mel.shape[1] // c.token_mel_ratio) + self.hop + self.lookahead:
            done_ids = self.mel.shape[1] // c.token_mel_ratio
            self._flow_frames(done_ids + self.hop + self.lookahead, (done_ids + self.hop) * c.token_mel_ratio)
            chunk = self._vocode(final=False)
            if chunk.size:
                chunks.append(chunk)
                self.timings.append(time.perf_counter() - arrived)
        return chunks

    def finish(self) -> np.ndarray:
        """Decode the remaining ids (no look-ahead left to wait for) and return the last chunk."""
        if self.finished:
            raise ValueError("this stream is already finished")
        if not self.ids:
            raise ValueError("no speech ids were pushed: there is nothing to speak")
        arrived = time.perf_counter()
        c = self.detok.flow.config
        if self.mel.shape[1] < len(self.ids) * c.token_mel_ratio:
            self._flow_frames(len(self.ids), len(self.ids) * c.token_mel_ratio)
        self.finished = True
        chunk = self._vocode(final=True)
        self.timings.append(time.perf_counter() - arrived)
        return chunk


def audio_chunk_steps(ids_per_step: Sequence[int], hop: int = TOKEN_HOP, lookahead: int = PRE_LOOKAHEAD) -> list[int]:
    """The streaming schedule of :class:`StreamingDetokenizer` as a generation loop drives it (``fac_mini.chat``):
    after which step (0-based) each audio chunk is ready, given how many speech ids each step pushed.

    Chunk c needs hop·(c + 1) + lookahead ids (its hop and the flow's look-ahead beyond it), so one step can release
    several chunks when the hop is small; after the last step, ``finish`` flushes the rest as one last chunk if any
    id was pushed at all."""
    steps, total = [], 0
    for step, count in enumerate(ids_per_step):
        total += count
        while total >= hop * (len(steps) + 1) + lookahead:
            steps.append(step)
    if total:
        steps.append(len(ids_per_step) - 1)
    return steps


# ----------------------------------------------------------------------------------------------------------
# The user-facing calls (COURSE.md §6)
# ----------------------------------------------------------------------------------------------------------
_SHIPPED: dict[str, Detokenizer] = {}


def _shipped() -> Detokenizer:
    if "detokenizer" not in _SHIPPED:
        _SHIPPED["detokenizer"] = Detokenizer.from_pretrained()
    return _SHIPPED["detokenizer"]


def speech_ids_to_wave(speech_ids, speaker=None, *, steps: int = 10, guidance: float = 0.7, seed: int = 0,
                       detokenizer: Detokenizer | None = None):
    """25 Hz speech ids -> ``(wave, 16000)``: numpy float32 mono with ``(2·ids − 1)·320`` samples.

    ``speech_ids``: one sequence (list, numpy, torch; the shipped tokenizer's codes 0..242) or a list of sequences
    (then a list of waves is returned). ``speaker``: a voice name (``"spk00"`` … ``"spk09"``, default ``"spk00"``),
    a reference clip (16 kHz, ≥ 150 ms of speech) or a 256-d unit embedding. ``steps``/``guidance``: Euler steps and
    CFG strength; ``seed`` fixes the noise. Raises ``ValueError`` for empty ids, ids outside the codebook, an unknown
    voice, or a reference clip that is too short or silent.
    """
    detok = _shipped() if detokenizer is None else detokenizer
    batched = (isinstance(speech_ids, (list, tuple)) and len(speech_ids) > 0
               and not np.isscalar(speech_ids[0]) and not (isinstance(speech_ids[0], torch.Tensor) and speech_ids[0].dim() == 0))
    if batched:
        return [detok.wave(ids, speaker, steps=steps, guidance=guidance, seed=seed) for ids in speech_ids], SAMPLE_RATE
    return detok.wave(speech_ids, speaker, steps=steps, guidance=guidance, seed=seed), SAMPLE_RATE


def resynthesize(wave, sampling_rate: int = SAMPLE_RATE, *, steps: int = 10, guidance: float = 0.7, seed: int = 0,
                 detokenizer: Detokenizer | None = None):
    """Speech tokenizer -> flow -> vocoder, in the input's own voice: returns ``(wave, 16000)`` numpy float32 mono."""
    from .audio import resample
    from .speech_tokenizer import shipped_speech_tokenizer

    array = as_mono_float(wave, allow_silent=False)
    if sampling_rate != SAMPLE_RATE:
        array = resample(array, sampling_rate, SAMPLE_RATE)
    ids, mask = shipped_speech_tokenizer().encode([array], SAMPLE_RATE)
    detok = _shipped() if detokenizer is None else detokenizer
    return detok.wave(ids[0][mask[0]], array, steps=steps, guidance=guidance, seed=seed), SAMPLE_RATE


# ----------------------------------------------------------------------------------------------------------
# Measurement (``python -m fac_mini flow eval``)
# ----------------------------------------------------------------------------------------------------------
def _rtf(function, seconds_of_audio: float, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best / seconds_of_audio


def evaluate_detokenizer(flow: FlowDetokenizer, *, vocoder=None, split: str = "test", limit: int | None = 48,
                         dnsmos_clips: int = 8, steps: int = 10, guidance: float = 0.7, seed: int = 0,
                         progress: bool = False) -> dict[str, Any]:
    """Resynthesis of the first ``limit`` clips of ``split`` from their tokenizer ids, each in its own voice (the
    clip's embedding), against the original audio and against vocoder copy-synthesis (the previous stage):
    read-back CER, STOI vs the original, DNSMOS OVRL, speaker similarity to the target voice and to the nine others,
    and the speed (RTF of the vocoder alone and of the whole detokenizer; first-chunk latency of streaming)."""
    from tqdm.auto import tqdm

    from .quality import dnsmos, read_back_cer, stoi
    from .speaker import match_voices, speaker_embeddings
    from .train.flow import flow_examples

    vocoder = load_vocoder() if vocoder is None else vocoder
    detok = Detokenizer(flow, vocoder, load_speakers())
    examples = flow_examples(split, progress=progress)[:limit]
    from .corpus import load_corpus

    dataset = load_corpus(split)
    originals = [dataset[i]["audio"]["array"] for i in range(len(examples))]
    texts = [e["text"] for e in examples]
    systems: dict[str, list[np.ndarray]] = {"resynthesis": [], "copy_synthesis": []}
    for e in tqdm(examples, desc=f"resynthesise {split}", disable=not progress):
        systems["resynthesis"].append(detok.wave(e["ids"], e["embedding"], steps=steps, guidance=guidance, seed=seed))
        with torch.no_grad():
            systems["copy_synthesis"].append(vocoder(e["mel"].T[None])[0].clamp(-1, 1).numpy())
    references = {voice: embedding.numpy() for voice, embedding in detok.speakers.items()}
    speakers = [e["speaker"] for e in examples]
    result: dict[str, Any] = {"split": split, "clips": len(examples), "steps": steps, "guidance": guidance,
                              "original": {"read_back_cer": round(read_back_cer(originals, texts), 4)}}
    if dnsmos_clips:
        result["original"]["dnsmos_ovrl"] = round(float(np.mean([dnsmos(w)["ovrl"] for w in originals[:dnsmos_clips]])), 3)
    for name, waves in systems.items():
        voices = match_voices(speaker_embeddings(waves), speakers, references)
        row = {"read_back_cer": read_back_cer(waves, texts),
               "stoi": float(np.mean([stoi(o, w) for o, w in zip(originals, waves)])),
               "target_similarity": float(voices.target_similarity.mean()),
               "best_other_similarity": float(voices.best_other_similarity.mean()),
               "target_voice_rate": voices.rate}
        if dnsmos_clips:
            row["dnsmos_ovrl"] = float(np.mean([dnsmos(w)["ovrl"] for w in waves[:dnsmos_clips]]))
        result[name] = {key: round(value, 4) for key, value in row.items()}
    result["cer_ratio"] = round(result["resynthesis"]["read_back_cer"] / max(result["original"]["read_back_cer"], 1e-9), 3)
    # speed on a 5 s id sequence (the longest kind of corpus reply), one clip at a time
    ids = torch.cat([e["ids"] for e in examples])[:125]
    seconds = (2 * len(ids) - 1) * VOCODER_HOP / SAMPLE_RATE
    mel = detok.mel(ids, DEFAULT_SPEAKER, steps=steps, guidance=guidance)
    with torch.no_grad():
        result["rtf_vocoder"] = round(_rtf(lambda: vocoder(mel[None]), seconds), 4)
    result["rtf_detokenizer"] = round(_rtf(lambda: detok.wave(ids, DEFAULT_SPEAKER, steps=steps, guidance=guidance),
                                           seconds), 4)
    stream = detok.stream(DEFAULT_SPEAKER, steps=steps, guidance=guidance)
    stream.push(ids[: TOKEN_HOP + PRE_LOOKAHEAD].tolist())
    result["first_chunk_latency_s"] = round(stream.timings[0], 4)
    return result
