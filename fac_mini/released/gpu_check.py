"""GPU check: the full Fun-Audio-Chat-8B architecture with random bf16 weights, timed on S2T and S2M.

    python -m fac_mini.released.gpu_check                 # 8B on CUDA: about 19 GB of weights, a few minutes at most
    python -m fac_mini.released.gpu_check --tiny          # the same code path on a tiny config, on CPU, in seconds

What it does, in order (one JSON object on stdout; progress on stderr):

1. Build ``FunAudioChat(FunAudioChatConfig.released_8b())`` *directly on the device*, in bfloat16: the modules
   are constructed under ``torch.device(device)`` with bfloat16 as the default dtype, so every weight is
   allocated once, on the GPU, and initialised there (N(0, 0.02²), norms 1). Nothing is allocated on the CPU
   first. The RoPE and sinusoid tables stay float32 (their constructors ask for float32 explicitly), as
   ``load_released`` keeps them. Random weights: the *speed* and *memory* are those of the release, the
   outputs are noise.
2. Inputs: ``--audio-seconds`` (default 30) of a synthetic 16 kHz waveform (or ``--audio PATH``) through
   ``FunAudioChatProcessor`` with the course tokenizer, then the prompt's ids are mapped onto the released
   vocabulary (``released_input_ids``): the special tokens get their released ids (``<|im_start|>`` 151644,
   ``<|AUDIO|>`` 151669, ...), ordinary text ids (< 512) are kept as they are. The course's 512-token BPE
   cannot spell Qwen3's ids, but the chat layout, the special ids and the number of ``<|AUDIO|>`` positions
   (5 per second) are exactly the released ones; only the system prompt is a few tokens longer or shorter
   than with the real Qwen3 tokenizer. The mel features, speech placeholders and masks do not depend on
   the tokenizer at all.
3. A short warm-up (CUDA context, cuBLAS, kernel caches), then time to first token (median of 3 synchronised
   ``generate_s2t(..., max_new_tokens=1)`` calls: encoder + prefill + first token), then S2T decoding of
   ``--s2t-tokens`` text tokens (greedy, as the released S2T example; text tokens/s = (n − 1) / (total − time
   to first token)), then ``--s2m-steps`` interleaved S2M
   steps (released sampling: T 0.8, top-p 0.9, repetition penalty 1.2; forced ``<|audio_bos|>``; the SRH runs
   5 sub-steps per LLM step). One S2M step = one 5 Hz group = 200 ms of speech, so steps per second / 5 is
   seconds of speech per wall-clock second (> 1: faster than real time) and ``s2m_rtf`` = 5 / steps per
   second is wall seconds per second of speech (< 1: faster than real time).
4. Peak memory: ``torch.cuda.max_memory_allocated`` over the whole run (weights included) on CUDA; the
   process's peak resident set on CPU.

With random weights a speech eos (6562) can be sampled early; speech then ends and the remaining steps are
text-only LLM steps that still run the SRH (as released), so the step rate stays comparable. The counts of
steps and speech groups actually produced are reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..encoder import AudioEncoderConfig
from ..generate import generate_s2m, generate_s2t
from ..model import FunAudioChat, FunAudioChatConfig
from .processing import FunAudioChatProcessor
from .config import count_parameters

__all__ = ["RELEASED_SPECIAL_IDS", "GPUCheckError", "tiny_config", "synthetic_speech", "released_input_ids",
           "build_random_model", "run_gpu_check", "main"]

# The released tokenizer's special ids (docs/released_model.md §1.5).
RELEASED_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                        "<|AUDIO|>": 151669, "<|audio_bos|>": 151670, "<|audio_eos|>": 151671,
                        "<|audio_pad|>": 151672, "<|sil|>": 151673}
GROUPS_PER_SECOND = 5            # one LLM step = one group of 5 speech tokens = 200 ms
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class GPUCheckError(RuntimeError):
    """The check cannot run here (no CUDA device, too little memory, an unsupported combination)."""


def _log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Configuration and inputs
# ----------------------------------------------------------------------------------------------------------
def tiny_config() -> FunAudioChatConfig:
    """The released ids and vocabularies (text 151936, speech 6565) with toy widths: the same code path as the
    8B check, small enough for a CPU in seconds."""
    released = FunAudioChatConfig.released_8b()
    text = dataclasses.replace(released.text_config, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    crq = dataclasses.replace(released.crq_config, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    audio = AudioEncoderConfig(num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                               encoder_ffn_dim=128, output_dim=text.hidden_size)
    return dataclasses.replace(released, audio_config=audio, crq_config=crq, text_config=text)


def _check_released_ids(config: FunAudioChatConfig) -> None:
    expected = {"audio_token_index": "<|AUDIO|>", "audio_bos_index": "<|audio_bos|>",
                "audio_eos_index": "<|audio_eos|>", "sil_index": "<|sil|>", "text_pad_token_id": "<|endoftext|>",
                "text_eos_token_id": "<|im_end|>"}
    for field, token in expected.items():
        if getattr(config, field) != RELEASED_SPECIAL_IDS[token]:
            raise GPUCheckError(f"config.{field}={getattr(config, field)} is not the released id of {token} "
                                f"({RELEASED_SPECIAL_IDS[token]}); the check needs the released ids")


def synthetic_speech(seconds: float, sampling_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like float32 waveform: a gliding harmonic 'voice' switched on and off in
    syllable-sized bursts, plus a little noise. Only its length matters to the timings."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    rng = np.random.default_rng(seed)
    time_s = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * time_s)                                  # Hz, gliding
    phase = 2 * np.pi * np.cumsum(pitch) / sampling_rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 6))
    bursts = (np.sin(2 * np.pi * 4 * time_s) > -0.3).astype(np.float64)                   # ~4 syllables/s
    wave = 0.2 * voice * bursts + 0.01 * rng.standard_normal(time_s.size)
    return wave.astype(np.float32)


def released_input_ids(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Course-tokenizer ids -> ids in the released vocabulary: each special token becomes its released id
    (``RELEASED_SPECIAL_IDS``), ordinary ids are kept (a new tensor; the input is not modified)."""
    table = torch.arange(max(len(tokenizer), int(input_ids.max()) + 1), dtype=torch.long)
    for token, released in RELEASED_SPECIAL_IDS.items():
        course = tokenizer.convert_tokens_to_ids(token)
        if course is None or tokenizer.convert_ids_to_tokens(course) != token:
            raise GPUCheckError(f"the tokenizer has no {token} token; use fac_mini.tokenizer.load_tokenizer()")
        table[course] = released
    return table[input_ids.to(torch.long).cpu()].to(input_ids.device)


def _released_inputs(processor: FunAudioChatProcessor, wave: np.ndarray, task: str) -> dict[str, torch.Tensor]:
    inputs = dict(processor(audio=wave, task=task))
    inputs["input_ids"] = released_input_ids(inputs["input_ids"], processor.tokenizer)
    return inputs


# ----------------------------------------------------------------------------------------------------------
# Building on the device
# ----------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_random_model(config: FunAudioChatConfig, device: str | torch.device = "cuda",
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> FunAudioChat:
    """``FunAudioChat(config)`` with random weights created directly on ``device`` in ``dtype`` (eval mode).

    The constructors run under ``torch.device(device)`` with ``dtype`` as the default dtype, so each weight
    is allocated once, where it will live; float32 buffers (RoPE, sinusoids) stay float32. The tied SRH
    ``lm_head`` is ``audio_tower.embed_tokens`` as in every ``FunAudioChat``.
    """
    device = torch.device(device)
    torch.manual_seed(seed)                  # also seeds CUDA: the init runs on the device
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = FunAudioChat(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process peak resident set (CPU)"


def _resolve_device(tiny: bool, device: str | None) -> torch.device:
    device = torch.device(device or ("cpu" if tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GPUCheckError("no CUDA device is available: this check builds the 8B model on an NVIDIA GPU "
                            "(about 19 GB of bf16 weights; a 24 GB card or larger). On a CPU machine run "
                            "`python -m fac_mini.released.gpu_check --tiny` (the same code path, tiny config).")
    if device.type not in ("cuda", "cpu"):
        raise GPUCheckError(f"device {device} is not supported; use cuda or cpu (--tiny)")
    if device.type == "cpu" and not tiny:
        raise GPUCheckError("the 8B model on CPU would need about 19 GB of RAM and minutes per token; run the "
                            "8B check on a GPU, or pass --tiny for the CPU version of the same code path")
    return device


# ----------------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------------
def run_gpu_check(tiny: bool = False, device: str | None = None, dtype: str = "bfloat16",
                  audio_seconds: float = 30.0, audio: str | Path | None = None, s2t_tokens: int = 128,
                  s2m_steps: int = 100, seed: int = 0) -> dict[str, Any]:
    """Build, run S2T and S2M, and return the measurements as a dict (see the module doc for each key)."""
    from ..tokenizer import load_tokenizer

    if dtype not in _DTYPES:
        raise GPUCheckError(f"dtype {dtype!r} not supported; use one of {sorted(_DTYPES)}")
    if s2t_tokens < 2 or s2m_steps < 2:
        raise GPUCheckError(f"need s2t_tokens >= 2 and s2m_steps >= 2 to measure a rate, got {s2t_tokens}, "
                            f"{s2m_steps}")
    device = _resolve_device(tiny, device)
    torch_dtype = _DTYPES[dtype]
    config = tiny_config() if tiny else FunAudioChatConfig.released_8b()
    _check_released_ids(config)
    started = time.perf_counter()

    processor = FunAudioChatProcessor(load_tokenizer())
    wave = processor.load_wave(audio) if audio is not None else synthetic_speech(audio_seconds, seed=seed)
    seconds = wave.size / 16000
    start = time.perf_counter()
    s2t_inputs = _released_inputs(processor, wave, "s2t")
    processor_s = time.perf_counter() - start
    s2m_inputs = _released_inputs(processor, wave, "s2m")
    audio_tokens = int((s2t_inputs["input_ids"] == config.audio_token_index).sum())

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        needed = count_parameters(config)["total"] * torch_dtype.itemsize + 2e9
        if needed > free:
            raise GPUCheckError(f"the GPU has {free / 1e9:.1f} GB free of {total / 1e9:.1f} GB; the {dtype} weights "
                                f"plus working memory need about {needed / 1e9:.1f} GB")
        torch.cuda.reset_peak_memory_stats(device)
    _log(f"building {'the tiny config' if tiny else 'Fun-Audio-Chat-8B'} on {device} in {dtype}")
    _sync(device)
    start = time.perf_counter()
    model = build_random_model(config, device, torch_dtype, seed)
    _sync(device)
    build_s = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _log(f"built {parameters / 1e9:.3f} B parameters ({weights_bytes / 1e9:.2f} GB) in {build_s:.1f} s")

    start = time.perf_counter()                                  # warm-up: kernels, cuBLAS, allocator
    generate_s2t(model, s2t_inputs, 2)
    _sync(device)
    warmup_s = time.perf_counter() - start

    first_token = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        generate_s2t(model, s2t_inputs, 1)
        _sync(device)
        first_token.append(time.perf_counter() - start)
    _log(f"time to first token {statistics.median(first_token):.3f} s ({audio_tokens} <|AUDIO|> positions)")

    ttft = statistics.median(first_token)
    s2t = generate_s2t(model, s2t_inputs, s2t_tokens)
    _sync(device)
    # Decoding rate after the first token. The loop's own step-0 time is taken before any device sync when the
    # speech head is off (CUDA runs asynchronously), so the synchronised time to first token is used instead.
    s2t_rate = (s2t.timing.steps - 1) / max(s2t.timing.total_s - ttft, 1e-9)
    _log(f"S2T: {s2t.timing.steps} text tokens, {s2t_rate:.1f} tokens/s")

    generator = torch.Generator(device=device).manual_seed(seed)
    s2m = generate_s2m(model, s2m_inputs, s2m_steps, generator=generator)
    _sync(device)
    steps_per_s = s2m.timing.decode_tokens_per_s
    groups = s2m.speech_ids.shape[1] // config.discrete.group_size
    _log(f"S2M: {s2m.timing.steps} steps, {steps_per_s:.1f} steps/s ({steps_per_s / GROUPS_PER_SECOND:.2f} s of "
         f"speech per second), {groups} speech groups")

    peak, peak_kind = _peak_memory(device)
    return {
        "mode": "tiny" if tiny else "8b",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": dtype,
        "parameters": parameters,
        "weights_gb": round(weights_bytes / 1e9, 3),
        "build_s": round(build_s, 3),
        "audio_s": round(seconds, 3),
        "prompt_tokens": int(s2t_inputs["input_ids"].shape[1]),
        "audio_tokens": audio_tokens,
        "processor_s": round(processor_s, 3),
        "warmup_s": round(warmup_s, 3),
        "time_to_first_token_s": round(ttft, 4),
        "s2t_text_tokens": s2t.timing.steps,
        "s2t_total_s": round(s2t.timing.total_s, 3),
        "s2t_text_tokens_per_s": round(s2t_rate, 2),
        "s2m_steps": s2m.timing.steps,
        "s2m_total_s": round(s2m.timing.total_s, 3),
        "s2m_steps_per_s": round(steps_per_s, 2),
        "s2m_speech_s_per_s": round(steps_per_s / GROUPS_PER_SECOND, 3),
        "s2m_rtf": round(GROUPS_PER_SECOND / steps_per_s, 4),
        "s2m_speech_groups": groups,
        "s2m_speech_ended": bool((s2m.speech_ids == config.discrete.eos_token_id).any()),
        "peak_memory_gb": round(peak / 1e9, 3),
        "peak_memory_kind": peak_kind,
        "total_s": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fac_mini.released.gpu_check [--tiny] [--device D] [--audio-seconds S] [--s2t-tokens N] [--s2m-steps N]``:
    print one JSON object; exit 2 (with the reason on stderr) if the check cannot run here."""
    parser = argparse.ArgumentParser(prog="python -m fac_mini.released.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config (released ids and vocabularies) on CPU")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--audio-seconds", type=float, default=30.0, help="length of the synthetic input audio")
    parser.add_argument("--audio", default=None, help="a 16 kHz (or any-rate) audio file instead of the synthetic one")
    parser.add_argument("--s2t-tokens", type=int, default=128, help="text tokens to decode in S2T")
    parser.add_argument("--s2m-steps", type=int, default=100, help="interleaved S2M steps (5 per second of speech)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = run_gpu_check(tiny=args.tiny, device=args.device, dtype=args.dtype,
                               audio_seconds=args.audio_seconds, audio=args.audio, s2t_tokens=args.s2t_tokens,
                               s2m_steps=args.s2m_steps, seed=args.seed)
    except GPUCheckError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
