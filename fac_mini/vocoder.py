"""Vocoders: the detokenizer's 80-bin log-mel (50 frames per second) -> a 16 kHz waveform.

A mel spectrogram keeps how loud each band is and throws the phase away; a vocoder has to invent a phase that
makes the frames overlap-add into clean speech. Two designs, trained from scratch on the corpus
(``python -m fac_mini vocoder train``):

* :class:`VocosVocoder` (the default, Siuzdenko et al. 2023): a ConvNeXt backbone at the *frame* rate and an iSTFT
  head. Each frame predicts the complex spectrum of its window, ``S = exp(m)·(cos p + i sin p)`` over the
  ``n_fft / 2 + 1 = 641`` bins, and ``torch.istft`` overlap-adds the windows (hop 320). Nothing runs at the sample
  rate, so it is fast on a CPU.
* :class:`HiFiGANGenerator` (Kong et al. 2020): transposed convolutions upsample the frames 8·5·4·2 = 320 times to the
  sample rate, with multi-receptive-field residual blocks at every scale. Its parameter names and arithmetic follow
  transformers' ``SpeechT5HifiGan`` (``tests/test_vocoder.py`` loads the same weights into both and compares).

Both read ``(batch, 80, frames)`` and return ``(batch, (frames - 1) · 320)`` samples: the centred STFT of
``fac_mini.audio.vocoder_mel`` puts frame j at sample 320·j. :func:`copy_synthesis` (COURSE.md §6) runs the shipped
vocoder on the mel of a clip: the upper bound of what any detokenizer that predicts this mel can reach.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import DATA_DIR
from .audio import VOCODER_HOP, VOCODER_N_FFT, VOCODER_N_MELS, as_mono_float, vocoder_mel
from .constants import SAMPLE_RATE

__all__ = ["VOCODER_DIR", "VocosConfig", "HiFiGANConfig", "ConvNeXtBlock", "ISTFTHead", "VocosVocoder",
           "HiFiGANGenerator", "build_vocoder", "load_vocoder", "save_vocoder", "vocode", "copy_synthesis",
           "multi_resolution_stft_loss", "mel_l1_loss"]

VOCODER_DIR = DATA_DIR / "vocoder"


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VocosConfig:
    """A tiny Vocos: ConvNeXt blocks at 50 frames per second, then the iSTFT head."""
    n_mels: int = VOCODER_N_MELS
    dim: int = 192                  # backbone width
    intermediate_dim: int = 576     # ConvNeXt's inverted bottleneck (3 x dim)
    num_layers: int = 8
    n_fft: int = VOCODER_N_FFT      # the head's window: 641 complex bins per frame
    hop_length: int = VOCODER_HOP
    kind: str = "vocos"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HiFiGANConfig:
    """A HiFi-GAN V1-style generator (ResBlock1) with ``SpeechT5HifiGan``'s parameter names; 8·5·4·2 = 320 = hop."""
    n_mels: int = VOCODER_N_MELS
    upsample_initial_channel: int = 128
    upsample_rates: tuple[int, ...] = (8, 5, 4, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 8, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1
    kind: str = "hifigan"

    def __post_init__(self):
        if int(np.prod(self.upsample_rates)) != VOCODER_HOP:
            raise ValueError(f"upsample_rates {self.upsample_rates} multiply to {int(np.prod(self.upsample_rates))}, "
                             f"not the mel hop {VOCODER_HOP}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Vocos: ConvNeXt backbone + iSTFT head
# ----------------------------------------------------------------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """Depthwise conv (kernel 7) -> LayerNorm -> Linear up -> GELU -> Linear down -> layer scale, residual."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # (batch, dim, frames)
        residual = x
        x = self.dwconv(x).transpose(1, 2)                          # (batch, frames, dim)
        x = self.pwconv2(F.gelu(self.pwconv1(self.norm(x))))
        return residual + (self.gamma * x).transpose(1, 2)


class ISTFTHead(nn.Module):
    """Frame features -> complex spectrum -> waveform by overlap-add (``torch.istft``, centred Hann window).

    $$S_{f,j} = e^{m_{f,j}}\\,(\\cos p_{f,j} + i\\,\\sin p_{f,j}), \\qquad
      x[n] = \\frac{\\sum_j w[n - jH]\\,\\mathrm{IDFT}(S_{\\cdot,j})[n - jH]}{\\sum_j w^2[n - jH]}$$

    The magnitude is predicted in the log domain (clamped at e^4.6 ≈ 100, as Vocos does, so a wild early step
    cannot overflow) and the phase as an angle: cos/sin keep it on the unit circle without wrapping trouble.
    """

    def __init__(self, dim: int, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.out = nn.Linear(dim, n_fft + 2)                        # 641 log-magnitudes + 641 phases
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:            # (batch, frames, dim) -> (batch, bins, frames)
        log_magnitude, phase = self.out(x).transpose(1, 2).chunk(2, dim=1)
        magnitude = torch.exp(log_magnitude.clamp(max=4.6))
        return torch.polar(magnitude, phase)

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # (batch, frames, dim) -> (batch, samples)
        spectrum = self.spectrum(x)
        return torch.istft(spectrum, self.n_fft, self.hop_length, window=self.window, center=True)


class VocosVocoder(nn.Module):
    """Mel ``(batch, 80, frames)`` -> waveform ``(batch, (frames - 1) · 320)``."""

    def __init__(self, config: VocosConfig = VocosConfig()):
        super().__init__()
        self.config = config
        self.embed = nn.Conv1d(config.n_mels, config.dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(config.dim, config.intermediate_dim, 1.0 / config.num_layers)
                                    for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.head = ISTFTHead(config.dim, config.n_fft, config.hop_length)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)   # (batch, dim, frames)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x.transpose(1, 2)))            # (batch, samples)


# ----------------------------------------------------------------------------------------------------------
# HiFi-GAN generator (SpeechT5HifiGan's layout)
# ----------------------------------------------------------------------------------------------------------
class HiFiGANResBlock(nn.Module):
    """ResBlock1: for each dilation d, ``x += conv2(lrelu(conv1_d(lrelu(x))))`` (kernel k, 'same' padding)."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], slope: float):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=(kernel_size * d - d) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, self.slope)), self.slope))
        return x


class HiFiGANGenerator(nn.Module):
    """Mel ``(batch, 80, frames)`` -> waveform: conv_pre, then per scale a transposed conv and the mean of the
    multi-receptive-field resblocks, then leaky ReLU (slope 0.01, the default, as the original code), conv_post, tanh.
    Returns ``(batch, (frames - 1) · 320)`` samples: the last frame's 320 samples are cut so that both vocoders align
    with the centred STFT (frame j at sample 320·j)."""

    def __init__(self, config: HiFiGANConfig = HiFiGANConfig()):
        super().__init__()
        self.config = config
        channels = config.upsample_initial_channel
        self.conv_pre = nn.Conv1d(config.n_mels, channels, kernel_size=7, padding=3)
        self.upsampler = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            self.upsampler.append(nn.ConvTranspose1d(channels // 2 ** i, channels // 2 ** (i + 1), kernel, stride=rate,
                                                     padding=(kernel - rate) // 2))
            for k, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(HiFiGANResBlock(channels // 2 ** (i + 1), k, tuple(dilations),
                                                      config.leaky_relu_slope))
        self.conv_post = nn.Conv1d(channels // 2 ** len(config.upsample_rates), 1, kernel_size=7, padding=3)
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def full_forward(self, mel: torch.Tensor) -> torch.Tensor:    # (batch, 80, frames) -> (batch, frames · 320)
        x = self.conv_pre(mel)
        kinds = len(self.config.resblock_kernel_sizes)
        for i, upsample in enumerate(self.upsampler):
            x = upsample(F.leaky_relu(x, self.config.leaky_relu_slope))
            x = sum(self.resblocks[i * kinds + j](x) for j in range(kinds)) / kinds
        x = self.conv_post(F.leaky_relu(x))                          # slope 0.01 here, as in the original code
        return torch.tanh(x).squeeze(1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.full_forward(mel)[:, : (mel.shape[-1] - 1) * VOCODER_HOP]


def build_vocoder(config: VocosConfig | HiFiGANConfig) -> nn.Module:
    return VocosVocoder(config) if config.kind == "vocos" else HiFiGANGenerator(config)


def _config_from_dict(data: dict[str, Any]) -> VocosConfig | HiFiGANConfig:
    kind = data.get("kind")
    if kind == "vocos":
        return VocosConfig(**data)
    if kind == "hifigan":
        tuples = {key: tuple(tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value
                  for key, value in data.items()}
        return HiFiGANConfig(**tuples)
    raise ValueError(f"vocoder config has kind {kind!r}; expected 'vocos' or 'hifigan'")


# ----------------------------------------------------------------------------------------------------------
# Losses (GAN-free: multi-resolution STFT + mel)
# ----------------------------------------------------------------------------------------------------------
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))   # (n_fft, hop): short windows for time, long for pitch


def multi_resolution_stft_loss(predicted: torch.Tensor, target: torch.Tensor,
                               resolutions=STFT_RESOLUTIONS) -> torch.Tensor:
    """Mean over resolutions of spectral convergence ``‖|S|−|Ŝ|‖_F / ‖|S|‖_F`` plus the L1 of log magnitudes."""
    total = predicted.new_zeros(())
    for n_fft, hop in resolutions:
        window = torch.hann_window(n_fft, device=predicted.device)
        spec_p, spec_t = (torch.stft(x, n_fft, hop, window=window, return_complex=True).abs().clamp(min=1e-7)
                          for x in (predicted, target))
        convergence = torch.linalg.norm(spec_t - spec_p) / torch.linalg.norm(spec_t).clamp(min=1e-7)
        total = total + convergence + F.l1_loss(spec_p.log(), spec_t.log())
    return total / len(resolutions)


def mel_l1_loss(predicted: torch.Tensor, target_mel: torch.Tensor) -> torch.Tensor:
    """L1 between the detokenizer log-mel of the prediction and the target log-mel (HiFi-GAN's reconstruction loss)."""
    from .audio import vocoder_mel_padded

    predicted_mel = vocoder_mel_padded(predicted)
    frames = min(predicted_mel.shape[-1], target_mel.shape[-1])
    return F.l1_loss(predicted_mel[..., :frames], target_mel[..., :frames])


# ----------------------------------------------------------------------------------------------------------
# Files and the user-facing calls
# ----------------------------------------------------------------------------------------------------------
def save_vocoder(model: nn.Module, directory: Path | str, dtype: torch.dtype = torch.float32) -> None:
    """``config.json`` + ``model.safetensors`` (atomic writes; floating tensors stored in ``dtype``, loaded back as
    float32)."""
    from .train.store import atomic_write_json, save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "config.json", model.config.to_dict())
    save_safetensors({name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                      for name, tensor in model.state_dict().items()}, directory / "model.safetensors")


def load_vocoder(directory: Path | str = VOCODER_DIR) -> nn.Module:
    """The vocoder of a folder written by :func:`save_vocoder` (default: the shipped Vocos), in eval mode."""
    from .train.store import check_state_dict, read_json, read_safetensors

    directory = Path(directory)
    hint = "rebuild it with `python -m fac_mini vocoder train --out data/vocoder` or `git checkout -- data/`"
    config = _config_from_dict(read_json(directory / "config.json", "vocoder config", hint))
    model = build_vocoder(config)
    weights = read_safetensors(directory / "model.safetensors", hint)
    check_state_dict(weights, model.state_dict(), directory / "model.safetensors")
    model.load_state_dict(weights)
    return model.eval()


_SHIPPED: dict[str, nn.Module] = {}


def _shipped() -> nn.Module:
    if "vocoder" not in _SHIPPED:
        _SHIPPED["vocoder"] = load_vocoder()
    return _SHIPPED["vocoder"]


@torch.no_grad()
def vocode(mel: torch.Tensor, vocoder: nn.Module | None = None) -> torch.Tensor:
    """Waveform(s) of log-mel ``(80, frames)`` or ``(batch, 80, frames)`` with ``vocoder`` (default: shipped)."""
    if not isinstance(mel, torch.Tensor) or mel.dim() not in (2, 3) or mel.shape[-2] != VOCODER_N_MELS:
        shape = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
        raise ValueError(f"mel must be a tensor of shape (80, frames) or (batch, 80, frames), got {shape}")
    if mel.shape[-1] < 2:
        raise ValueError(f"mel has {mel.shape[-1]} frame(s); a waveform needs at least 2 (one 20 ms hop)")
    if not torch.isfinite(mel).all():
        raise ValueError("mel contains NaN or infinite values")
    vocoder = _shipped() if vocoder is None else vocoder
    wave = vocoder(mel[None] if mel.dim() == 2 else mel).clamp(-1.0, 1.0)
    return wave[0] if mel.dim() == 2 else wave


def copy_synthesis(wave, sampling_rate: int = SAMPLE_RATE, vocoder: nn.Module | None = None) -> tuple[np.ndarray, int]:
    """The shipped vocoder on the mel of ``wave`` (mel -> waveform only): returns ``(wave, 16000)``, numpy mono float32.

    The output has ``(len // 320) · 320`` samples (the centred STFT's frames), input at another rate is resampled.
    """
    as_mono_float(wave, allow_silent=False)                            # the clear errors, before any work
    mel = vocoder_mel(wave, sampling_rate)
    return vocode(mel, vocoder).numpy().astype(np.float32), SAMPLE_RATE
