"""The continuous audio encoder of Fun-Audio-Chat (``continuous_audio_tower``): log-mel in, 25 Hz vectors out.

A Whisper-large-v3-style Transformer encoder that works on 2-second windows, as in Qwen2.5-Omni's audio tower.
The frame-rate ladder, for one second of speech::

    16 kHz waveform   16000 samples
      -> log-mel      100 frames   (hop 160; ``fac_mini.audio.log_mel``)               (128, 100)
      -> conv1        100 frames   (kernel 3, stride 1) + GELU                         (d_model, 100)
      -> conv2         50 frames   (kernel 3, stride 2) + GELU, + sinusoidal positions (50, d_model)
      -> Transformer   50 frames   pre-LN layers, attention only inside each window    (50, d_model)
      -> avg-pool      25 frames   mean of neighbouring pairs                          (25, d_model)
      -> ln_post, proj 25 frames   LayerNorm, Linear d_model -> output_dim             (25, output_dim)

Windows: each clip's mel frames are cut into windows of ``2 * n_window`` frames (200 = 2 s; the last window
holds the remainder). The two convolutions run on every window separately (zero padding at window edges), the
positions restart at 0 in every window, and a token attends only to tokens of its own window
(``window_attention_mask``). Pooling, ``ln_post`` and ``proj`` then run over the whole clip again.

Parameter names equal the released checkpoint's keys without the ``continuous_audio_tower.`` prefix, so
``AudioEncoder(AudioEncoderConfig.released_8b()).load_state_dict(weights)`` loads them unchanged. The
computation equals ``transformers``' ``Qwen2_5OmniAudioEncoder`` (checked in ``tests/test_encoder.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AudioEncoderConfig", "AudioEncoder", "AudioEncoderOutput", "EncoderLayer", "WindowSelfAttention",
    "sinusoidal_positions", "encoder_output_lengths", "window_attention_mask",
]


@dataclass
class AudioEncoderConfig:
    """Sizes of the audio encoder. The defaults are a CPU-sized toy with the released rates and windows.

    Dropout is not configurable: the released model uses 0 everywhere.
    """
    num_mel_bins: int = 128             # log-mel channels in (Whisper-large-v3: 128)
    d_model: int = 64                   # width of the Transformer
    encoder_layers: int = 2
    encoder_attention_heads: int = 4    # head_dim = d_model // heads
    encoder_ffn_dim: int = 256          # hidden width of each layer's MLP
    n_window: int = 100                 # half a window in mel frames = one window in 50 Hz tokens (2 s)
    max_source_positions: int = 1500    # rows of the sinusoidal table (only the first n_window are used)
    output_dim: int = 64                # width of the 25 Hz output vectors (the LLM's hidden size)
    activation_function: str = "gelu"  # exact (erf) GELU, the only activation the released model uses

    def __post_init__(self):
        for name in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                     "n_window", "max_source_positions", "output_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AudioEncoderConfig.{name} must be a positive int, got {value!r} "
                                 f"({type(value).__name__})")
        if self.d_model % self.encoder_attention_heads != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"encoder_attention_heads={self.encoder_attention_heads}")
        if self.d_model % 2 != 0 or self.d_model < 4:
            raise ValueError(f"d_model={self.d_model} must be even and >= 4 (half sine, half cosine positions)")
        if not 1 <= self.n_window <= self.max_source_positions:
            raise ValueError(f"n_window={self.n_window} must be in [1, max_source_positions="
                             f"{self.max_source_positions}]: positions restart in every window")
        if self.activation_function != "gelu":
            raise ValueError(f"activation_function={self.activation_function!r} is not supported; use 'gelu'")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def released_8b(cls) -> "AudioEncoderConfig":
        """The sizes of Fun-Audio-Chat-8B's ``audio_config`` (about 0.64 B parameters)."""
        return cls(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                   encoder_ffn_dim=5120, n_window=100, max_source_positions=1500, output_dim=4096)


class AudioEncoderOutput(NamedTuple):
    features: torch.Tensor  # (batch, tokens, output_dim) 25 Hz vectors, zero after each clip's end
    mask: torch.Tensor      # (batch, tokens) bool, True on the encoder_output_lengths(...)[1] real tokens


# ----------------------------------------------------------------------------------------------------------
# Lengths, positions and the window mask
# ----------------------------------------------------------------------------------------------------------
def sinusoidal_positions(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions, ``(length, channels)``: sines in the first half of the channels, cosines in
    the second, at timescales ``max_timescale ** (k / (channels/2 - 1))`` for k = 0 .. channels/2 - 1."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]  # (length, channels/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def encoder_output_lengths(mel_lengths, n_window: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens the encoder makes from ``mel_lengths`` frames: ``(lengths_50hz, lengths_25hz)``.

    conv2 (stride 2, padding 1) turns each window of ``c`` frames into ``(c - 1) // 2 + 1`` tokens; summed over
    the windows this is ``(L - 1) // 2 + 1`` because full windows are even. The pool then keeps ``L50 // 2``.
    Accepts an int, a sequence or a tensor of ints; returns long tensors of the same shape.
    """
    lengths = torch.as_tensor(mel_lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"mel_lengths must hold integers, got dtype {lengths.dtype}")
    lengths = lengths.long()
    window = 2 * n_window                                                   # mel frames per window
    full_windows, remainder = lengths // window, lengths % window
    lengths_50hz = full_windows * n_window + torch.where(remainder > 0, (remainder - 1) // 2 + 1, 0)
    return lengths_50hz, lengths_50hz // 2


def window_attention_mask(mel_lengths, n_window: int = 100) -> torch.Tensor:
    """Which 50 Hz token may attend to which: ``(batch, T50, T50)`` bool, block diagonal per 2-s window.

    ``mask[b, q, k]`` is True when tokens q and k of clip b are both real and lie in the same window of
    ``n_window`` tokens. Rows of padding tokens are all False (OR with the identity before handing it to
    ``scaled_dot_product_attention``, which returns NaN for a row with nothing to attend to).
    """
    lengths_50hz = encoder_output_lengths(mel_lengths, n_window)[0].reshape(-1)  # (batch,)
    positions = torch.arange(int(lengths_50hz.max()))                          # (T50,)
    real = positions[None, :] < lengths_50hz[:, None]                           # (batch, T50)
    same_window = (positions[:, None] // n_window) == (positions[None, :] // n_window)  # (T50, T50)
    return real[:, :, None] & real[:, None, :] & same_window[None]


def _split_windows(x: torch.Tensor, lengths: torch.Tensor, window: int):
    """Cut ``x`` ``(batch, time, channels)`` into windows of ``window`` steps and keep those holding data.

    Returns ``windows`` ``(n, width, channels)`` with ``width = min(window, time)``, their real lengths
    ``(n,)``, and ``kept`` ``(batch * windows_per_clip,)`` bool for ``_merge_windows``.
    """
    batch, time, channels = x.shape
    windows_per_clip = math.ceil(time / window)
    width = min(window, time)
    x = F.pad(x, (0, 0, 0, windows_per_clip * width - time))   # pads only when there are several windows
    windows = x.reshape(batch * windows_per_clip, width, channels)
    starts = torch.arange(windows_per_clip, device=x.device) * window
    window_lengths = (lengths[:, None] - starts[None, :]).clamp(0, width).reshape(-1)
    kept = window_lengths > 0
    return windows[kept], window_lengths[kept], kept


def _merge_windows(windows: torch.Tensor, kept: torch.Tensor, batch: int, time: int) -> torch.Tensor:
    """Inverse of ``_split_windows``: ``(n, width, channels)`` -> ``(batch, time, channels)``, zeros elsewhere."""
    slots = windows.new_zeros(kept.numel(), *windows.shape[1:])
    slots[kept] = windows
    return slots.reshape(batch, -1, windows.shape[-1])[:, :time]


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------
class WindowSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; ``k_proj`` has no bias (a key bias adds the same score to every
    key of a query and cancels in the softmax), as in Whisper."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.num_heads = config.encoder_attention_heads
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x`` ``(n, time, d_model)``; ``allowed`` bool, broadcastable to ``(n, heads, time, time)``."""
        n, time, _ = x.shape

        def heads(t):  # (n, time, d_model) -> (n, heads, time, head_dim)
            return t.reshape(n, time, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # softmax(q k^T / sqrt(head_dim)) v
        return self.out_proj(attended.transpose(1, 2).reshape(n, time, -1))


class EncoderLayer(nn.Module):
    """Pre-LN Whisper layer: ``x + Attn(LN(x))``, then ``x + fc2(GELU(fc1(LN(x))))``."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.self_attn = WindowSelfAttention(config)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), allowed)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


# ----------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------
class AudioEncoder(nn.Module):
    """Windowed Whisper encoder with 2x average pooling and a projection to ``output_dim`` (see module doc).

    Call it with ``input_features`` ``(batch, num_mel_bins, frames)`` and either ``frames_mask``
    ``(batch, frames)`` (as returned by ``fac_mini.audio.log_mel_batch``) or ``mel_lengths`` ``(batch,)``;
    with neither, every frame is real. Each clip is encoded as if it were alone: frames after its length are
    ignored, whatever they hold.
    """

    def __init__(self, config: AudioEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or AudioEncoderConfig()
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding",
                             sinusoidal_positions(config.max_source_positions, config.d_model), persistent=False)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.ln_post = nn.LayerNorm(config.d_model)
        self.proj = nn.Linear(config.d_model, config.output_dim)
        # In the released checkpoint but never used by its forward; kept so the weights load strictly.
        self.audio_bos_eos_token = nn.Embedding(2, config.output_dim)

    # -- inputs ------------------------------------------------------------------------------------------
    def resolve_mel_lengths(self, input_features: torch.Tensor, frames_mask=None, mel_lengths=None) -> torch.Tensor:
        """Validate the inputs and return each clip's number of real mel frames, ``(batch,)`` long."""
        if not isinstance(input_features, torch.Tensor) or input_features.dim() != 3:
            shape = tuple(input_features.shape) if isinstance(input_features, torch.Tensor) else type(input_features)
            raise ValueError(f"input_features must be (batch, {self.config.num_mel_bins}, frames), got {shape}; "
                             "add a batch axis with features[None] for one clip")
        batch, bins, frames = input_features.shape
        if bins != self.config.num_mel_bins:
            raise ValueError(f"input_features has shape {tuple(input_features.shape)}: {bins} mel bins, but the "
                             f"encoder expects {self.config.num_mel_bins} (batch, mel bins, frames)")
        if not input_features.dtype.is_floating_point:
            raise ValueError(f"input_features must be floating point, got {input_features.dtype}")
        if frames_mask is not None and mel_lengths is not None:
            raise ValueError("pass frames_mask or mel_lengths, not both")
        if frames_mask is not None:
            if tuple(frames_mask.shape) != (batch, frames):
                raise ValueError(f"frames_mask has shape {tuple(frames_mask.shape)}, expected (batch, frames) = "
                                 f"{(batch, frames)} to match input_features {tuple(input_features.shape)}")
            if frames_mask.dtype.is_floating_point:
                raise ValueError(f"frames_mask must be bool (True on real frames), got {frames_mask.dtype}")
            real = frames_mask.to(device=input_features.device) != 0
            lengths = real.sum(dim=1)
            if not torch.equal(real, torch.arange(frames, device=real.device)[None] < lengths[:, None]):
                raise ValueError("frames_mask must be True on a prefix of each row (real frames first, then padding)")
        elif mel_lengths is not None:
            lengths = torch.as_tensor(mel_lengths, device=input_features.device)
            if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
                raise ValueError(f"mel_lengths must hold integers, got dtype {lengths.dtype}")
            if tuple(lengths.shape) != (batch,):
                raise ValueError(f"mel_lengths has shape {tuple(lengths.shape)}, expected (batch,) = ({batch},)")
            if (lengths > frames).any():
                raise ValueError(f"mel_lengths {lengths.tolist()} exceed the {frames} frames of input_features")
        else:
            lengths = torch.full((batch,), frames, device=input_features.device)
        short = (lengths < 3).nonzero().flatten().tolist()
        if short:
            raise ValueError(f"clips {short} have fewer than 3 mel frames, too short for one 25 Hz token; "
                             "pass at least 30 ms of audio")
        return lengths.long()

    # -- 100 Hz -> 50 Hz ---------------------------------------------------------------------------------
    def embed(self, input_features: torch.Tensor, frames_mask=None,
              mel_lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolutional front end, window by window: ``(batch, T50, d_model)`` tokens (positions added,
        restarting in every window, zero after each clip's end) and their mask ``(batch, T50)``."""
        lengths = self.resolve_mel_lengths(input_features, frames_mask, mel_lengths)  # (batch,)
        lengths_50hz, _ = encoder_output_lengths(lengths, self.config.n_window)
        batch, longest = lengths.numel(), int(lengths.max())
        frames = input_features[..., :longest].transpose(1, 2)                        # (batch, longest, bins)
        chunks, chunk_lengths, kept = _split_windows(frames, lengths, 2 * self.config.n_window)  # (n, width, bins)
        real_frames = torch.arange(chunks.shape[1], device=chunks.device)[None] < chunk_lengths[:, None]
        chunks = chunks.to(self.conv1.weight.dtype).masked_fill(~real_frames[..., None], 0).transpose(1, 2)
        if not torch.isfinite(chunks).all():
            raise ValueError("input_features hold NaN or infinite values in real frames; recompute the log-mel")
        hidden = F.gelu(self.conv1(chunks)) * real_frames[:, None]                    # (n, d_model, width)
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)                           # (n, ceil(width/2), d_model)
        hidden = hidden + self.positional_embedding[: hidden.shape[1]].to(hidden.dtype)
        hidden = _merge_windows(hidden, kept, batch, int(lengths_50hz.max()))         # (batch, T50, d_model)
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths_50hz[:, None]  # (batch, T50)
        return hidden.masked_fill(~mask[..., None], 0), mask

    def encode_50hz(self, input_features: torch.Tensor, frames_mask=None,
                    mel_lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Front end plus all Transformer layers, before pooling: ``(batch, T50, d_model)`` and mask ``(batch, T50)``.

        The layers run on a batch of windows (every window of every clip), each attending only to itself;
        this is what ``window_attention_mask`` draws, without materialising a ``(T50, T50)`` mask.
        """
        hidden, mask = self.embed(input_features, frames_mask, mel_lengths)          # (batch, T50, d_model)
        batch, time, _ = hidden.shape
        windows, window_lengths, kept = _split_windows(hidden, mask.sum(dim=1), self.config.n_window)
        real_keys = torch.arange(windows.shape[1], device=windows.device)[None] < window_lengths[:, None]
        allowed = real_keys[:, None, None, :]                                        # (n, 1, 1, width)
        for layer in self.layers:
            windows = layer(windows, allowed)                                        # (n, width, d_model)
        return _merge_windows(windows, kept, batch, time).masked_fill(~mask[..., None], 0), mask

    # -- 50 Hz -> 25 Hz ----------------------------------------------------------------------------------
    def forward(self, input_features: torch.Tensor, frames_mask=None, mel_lengths=None) -> AudioEncoderOutput:
        """``input_features`` ``(batch, num_mel_bins, frames)`` -> ``AudioEncoderOutput(features, mask)`` with
        ``features`` ``(batch, T25, output_dim)`` and ``mask`` ``(batch, T25)``, ``T25 = max(L50 // 2)``."""
        hidden, mask_50hz = self.encode_50hz(input_features, frames_mask, mel_lengths)  # (batch, T50, d_model)
        lengths_25hz = mask_50hz.sum(dim=1) // 2                 # whole pairs: an odd last 50 Hz token is dropped
        pairs = 2 * int(lengths_25hz.max())
        pooled = (hidden[:, 0:pairs:2] + hidden[:, 1:pairs:2]) / 2                   # (batch, T25, d_model)
        features = self.proj(self.ln_post(pooled))                                   # (batch, T25, output_dim)
        mask = torch.arange(features.shape[1], device=features.device)[None] < lengths_25hz[:, None]
        return AudioEncoderOutput(features.masked_fill(~mask[..., None], 0), mask)
