"""Conditional flow matching from 25 Hz speech ids to the detokenizer's mel: CosyVoice 3's flow at mini size.

**The path and its target** (CosyVoice's ``ConditionalCFM``, σ_min = 1e-6). Noise x₀ ~ N(0, I) flows to the mel x₁
along a straight line; the network learns the velocity of that line:

$$x_t = \\bigl(1 - (1 - \\sigma_{\\min})\\,t\\bigr)\\,x_0 + t\\,x_1, \\qquad u_t = x_1 - (1 - \\sigma_{\\min})\\,x_0,$$
$$\\mathcal L = \\frac{\\sum_{f,b} m_f\\,(v_\\theta(x_t, t, c) - u_t)_{f,b}^2}{\\sum_f m_f \\cdot n_{\\text{mels}}}$$

with the frame mask m. The training time is drawn uniformly then bent by CosyVoice's cosine schedule
t ← 1 − cos(πt/2), which puts more steps near the noise end, where the velocity changes fastest.

**The condition** c, concatenated with x_t per frame as in CosyVoice 3's DiT: ``[x_t, cond, μ, speaker]``:

* μ: speech-id embedding (80) → a look-ahead convolution that sees the next 3 ids → repeated ×2 to 50 Hz;
* speaker: the GE2E embedding (256-d, :mod:`fac_mini.speaker`) L2-normalised and projected to 80;
* cond: a prompt mel — a random prefix (≤ 30 %) of the target with probability 0.5 in training, zeros otherwise; the
  loss skips the prompt frames (CosyVoice's ``only_mask_loss``).

For classifier-free guidance μ, speaker and cond are all zeroed for 20 % of the training examples; sampling mixes
the two velocities, v = (1 + g)·v_cond − g·v_uncond with g = 0.7, over 10 Euler steps on the cosine schedule.

**The estimator** is a small DiT (transformer blocks with AdaLN-Zero modulation from the time embedding, rotary
positions), CosyVoice 3's choice: a transformer scales with data more simply than the U-Net/Conformer of CosyVoice
1/2, and at mini size it is the fastest of the three on a CPU (no up/down-sampling path). Its attention is
*chunk-causal*: a frame sees every frame of its own 30-frame chunk (15 ids = one streaming hop) and of all earlier
chunks. CosyVoice 3 trains half of its steps with such a mask so that it can stream; here every step uses it, so the
streaming decoder (:mod:`fac_mini.detokenize`) gives the same mel as the offline one.

The mel is modelled in a normalised space: per-bin mean and std of the train split (buffers of the model) map the
log-mel (digital silence at log 1e-5 = −11.5) to roughly unit scale; CosyVoice models its log-mel directly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import DATA_DIR
from .audio import VOCODER_N_MELS
from .llm import RotaryEmbedding, apply_rotary

__all__ = ["FLOW_DIR", "SPEAKERS_FILE", "SIGMA_MIN", "FlowConfig", "conditional_flow", "cfm_loss", "cosine_t", "cosine_time_span",
           "euler_solve", "guided_velocity", "gaussian_cfm_floor", "PreLookahead", "DiTBlock", "FlowDetokenizer",
           "chunk_mask", "save_flow", "load_flow"]

FLOW_DIR = DATA_DIR / "flow"
SPEAKERS_FILE = "speakers.safetensors"   # the corpus voices' embedding centroids, shipped beside the weights
SIGMA_MIN = 1e-6


# ----------------------------------------------------------------------------------------------------------
# The path, the loss, the schedule and the solver
# ----------------------------------------------------------------------------------------------------------
def conditional_flow(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float,
                     sigma_min: float = SIGMA_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """CosyVoice's CFM path and target: ``x_t = (1 − (1 − σ)t)·x0 + t·x1`` and ``u_t = x1 − (1 − σ)·x0``.

    ``t`` is a number or a tensor of shape ``(batch,)`` (or any shape that is a prefix of ``x0.shape``): it is
    broadcast over the trailing dimensions. ``x0`` and ``x1`` must have the same shape.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.dim() > x0.dim() or tuple(x0.shape[: t.dim()]) != tuple(t.shape):
        raise ValueError(f"t of shape {tuple(t.shape)} does not broadcast over x of shape {tuple(x0.shape)}: "
                         "pass a number or one time per example")
    t = t.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    x_t = (1 - (1 - sigma_min) * t) * x0 + t * x1
    u_t = x1 - (1 - sigma_min) * x0
    return x_t, u_t


def cfm_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CosyVoice's masked MSE: squared error summed over masked frames and bins / (masked frames · bins).

    ``predicted``/``target``: ``(batch, frames, bins)``; ``mask``: ``(batch, frames)``, True where the loss counts.
    """
    mask = mask.to(predicted.dtype)[..., None]                        # (batch, frames, 1)
    count = mask.sum() * predicted.shape[-1]
    if count == 0:
        raise ValueError("the loss mask selects no frame")
    return ((predicted - target) ** 2 * mask).sum() / count


def cosine_t(t: torch.Tensor) -> torch.Tensor:
    """CosyVoice's time schedule: ``1 − cos(π t / 2)`` (dense near t = 0, the noise end)."""
    return 1 - torch.cos(t * (math.pi / 2))


def cosine_time_span(steps: int) -> torch.Tensor:
    """The ``steps + 1`` time points of sampling: ``1 − cos(π/2 · linspace(0, 1, steps + 1))``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return cosine_t(torch.linspace(0, 1, steps + 1))


def euler_solve(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                time_span: torch.Tensor, trajectory: bool = False):
    """Integrate dx/dt = velocity(x, t) from ``time_span[0]`` to ``time_span[-1]`` with explicit Euler steps.

    Returns the end point, or with ``trajectory`` the stacked states at every time point ``(len(time_span), *x0.shape)``.
    """
    x, states = x0, [x0]
    for t0, t1 in zip(time_span[:-1], time_span[1:]):
        x = x + (t1 - t0) * velocity(x, t0)
        states.append(x)
    return torch.stack(states) if trajectory else x


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ``(1 + g)·v_cond − g·v_uncond`` (g = 0: the conditional velocity alone)."""
    return (1 + guidance) * v_cond - guidance * v_uncond


def gaussian_cfm_floor(s: float) -> float:
    """The lowest loss per dimension of independent-coupling CFM from N(0, I) to N(m, s²I) (σ_min = 0, uniform t).

    Given x_t, the target u = x₁ − x₀ is still uncertain: Var(u | x_t, t) = s² / ((1 − t)² + s² t²), and
    ∫₀¹ s² / ((1 − t)² + s² t²) dt = s·(atan s + atan 1/s) = s·π/2, whatever the mean m.
    """
    if not s > 0:
        raise ValueError(f"s must be positive, got {s}")
    return s * math.pi / 2


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int = 243            # the shipped speech tokenizer's FSQ codes
    n_mels: int = VOCODER_N_MELS
    token_mel_ratio: int = 2         # 25 Hz ids -> 50 Hz mel frames
    lookahead: int = 3               # future ids the look-ahead conv sees
    lookahead_channels: int = 256
    speaker_dim: int = 256           # GE2E (resemblyzer) embedding
    dim: int = 192
    depth: int = 4
    heads: int = 4
    ff_mult: int = 2
    chunk_frames: int = 30           # attention chunk: 15 ids = one streaming hop
    cfg_rate: float = 0.2            # condition dropped for this fraction of training examples
    prompt_rate: float = 0.5         # a prompt prefix is given to this fraction
    prompt_max_ratio: float = 0.3    # ... of at most this fraction of the frames
    sigma_min: float = SIGMA_MIN

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PreLookahead(nn.Module):
    """CosyVoice 3's ``PreLookaheadLayer``: a conv that reads ids t .. t+3 (right padding), leaky ReLU, a causal conv
    (kernel 3, left padding) back to the embedding width, and a residual add. ``(batch, ids, 80)`` in and out."""

    def __init__(self, channels: int, hidden: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, hidden, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(hidden, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(x.transpose(1, 2), (0, self.lookahead))             # (batch, 80, ids + 3): zeros after the end
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))                              # causal
        return x + h.transpose(1, 2)


def chunk_mask(frames: int, chunk: int, device=None) -> torch.Tensor:
    """``(frames, frames)`` boolean: query i may attend key j when j's chunk is not after i's (chunk-causal)."""
    index = torch.arange(frames, device=device) // chunk
    return index[None, :] <= index[:, None]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of times in [0, 1] (scaled by 1000, as diffusion models do): ``(batch,)`` -> ``(batch, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class DiTBlock(nn.Module):
    """Pre-norm attention + feed-forward, each modulated by (shift, scale, gate) from the time embedding (AdaLN-Zero:
    the gates start at 0, so every block starts as the identity)."""

    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(approximate="tanh"), nn.Linear(ff_mult * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, time: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:                 # x (batch, frames, dim), time (batch, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(time))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        batch, frames, dim = h.shape
        q, k, v = self.qkv(h).view(batch, frames, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)   # (batch, heads, frames, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + gate1 * self.proj(attended.transpose(1, 2).reshape(batch, frames, dim))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.ff(h)


class FlowDetokenizer(nn.Module):
    """Speech ids ``(batch, ids)`` + speaker embeddings ``(batch, 256)`` -> normalised mel ``(batch, 2·ids, 80)``."""

    def __init__(self, config: FlowConfig = FlowConfig()):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.n_mels)
        self.lookahead = PreLookahead(c.n_mels, c.lookahead_channels, c.lookahead)
        self.speaker_proj = nn.Linear(c.speaker_dim, c.n_mels)
        self.input_proj = nn.Linear(4 * c.n_mels, c.dim)              # [x_t, cond, mu, speaker]
        self.time_mlp = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.rotary = RotaryEmbedding(c.dim // c.heads, 10000.0)
        self.blocks = nn.ModuleList(DiTBlock(c.dim, c.heads, c.ff_mult) for _ in range(c.depth))
        self.final_norm = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(c.dim, 2 * c.dim)
        self.output_proj = nn.Linear(c.dim, c.n_mels)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        self.register_buffer("mel_mean", torch.zeros(c.n_mels))
        self.register_buffer("mel_std", torch.ones(c.n_mels))

    # --- conditions -------------------------------------------------------------------------------------
    def token_condition(self, speech_ids: torch.Tensor) -> torch.Tensor:
        """μ: ``(batch, ids)`` -> ``(batch, ids · token_mel_ratio, 80)``."""
        return self.lookahead(self.embed(speech_ids)).repeat_interleave(self.config.token_mel_ratio, dim=1)

    def speaker_condition(self, speaker: torch.Tensor) -> torch.Tensor:
        """``(batch, 256)`` -> ``(batch, 80)`` (L2-normalised first, as CosyVoice does with its x-vectors)."""
        return self.speaker_proj(F.normalize(speaker, dim=-1))

    def normalise(self, mel: torch.Tensor) -> torch.Tensor:          # log-mel (..., 80) -> model space
        return (mel - self.mel_mean) / self.mel_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mel_std + self.mel_mean

    # --- the estimator ----------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, speaker: torch.Tensor,
                 cond: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """v_θ: ``x_t``, ``mu``, ``cond`` ``(batch, frames, 80)``, ``speaker`` ``(batch, 80)`` (already projected),
        ``t`` ``(batch,)``, ``frame_mask`` ``(batch, frames)`` True on real frames -> ``(batch, frames, 80)``."""
        batch, frames, _ = x_t.shape
        h = self.input_proj(torch.cat([x_t, cond, mu, speaker[:, None].expand(-1, frames, -1)], dim=-1))
        time = self.time_mlp(timestep_embedding(t, self.config.dim))
        positions = torch.arange(frames, device=x_t.device)[None].expand(batch, -1)
        cos, sin = self.rotary(positions, h.dtype)
        mask = chunk_mask(frames, self.config.chunk_frames, x_t.device)[None, None]    # (1, 1, frames, frames)
        if frame_mask is not None:
            mask = mask & frame_mask[:, None, None, :]
        for block in self.blocks:
            h = block(h, time, cos, sin, mask)
        shift, scale = self.final_modulation(F.silu(time))[:, None].chunk(2, dim=-1)
        return self.output_proj(self.final_norm(h) * (1 + scale) + shift)

    # --- training ---------------------------------------------------------------------------------------
    def loss(self, speech_ids: torch.Tensor, id_mask: torch.Tensor, mel: torch.Tensor, speaker: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """CFM loss of a batch: ``speech_ids``/``id_mask`` ``(batch, ids)``, target log-mel ``(batch, 2·ids, 80)``,
        ``speaker`` ``(batch, 256)``. Noise, time, condition dropout and prompts are drawn from ``generator``."""
        c = self.config
        batch, frames, _ = mel.shape
        if frames != speech_ids.shape[1] * c.token_mel_ratio:
            raise ValueError(f"mel has {frames} frames; {speech_ids.shape[1]} ids need {speech_ids.shape[1] * c.token_mel_ratio}")
        frame_mask = id_mask.repeat_interleave(c.token_mel_ratio, dim=1)            # (batch, frames)
        x1 = self.normalise(mel) * frame_mask[..., None]
        x0 = torch.randn(x1.shape, generator=generator)
        t = cosine_t(torch.rand(batch, generator=generator))
        keep = (torch.rand(batch, generator=generator) >= c.cfg_rate).float()       # CFG: drop the condition
        mu = self.token_condition(speech_ids) * keep[:, None, None]
        spk = self.speaker_condition(speaker) * keep[:, None]
        lengths = frame_mask.sum(1)
        with_prompt = torch.rand(batch, generator=generator) < c.prompt_rate
        prompt_len = (torch.rand(batch, generator=generator) * c.prompt_max_ratio * lengths).long() * with_prompt
        in_prompt = torch.arange(frames)[None] < prompt_len[:, None]                 # (batch, frames)
        cond = x1 * in_prompt[..., None] * keep[:, None, None]
        x_t, u_t = conditional_flow(x0, x1, t, c.sigma_min)
        predicted = self.velocity(x_t, t, mu, spk, cond, frame_mask)
        return cfm_loss(predicted, u_t, frame_mask & ~in_prompt)

    # --- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, speech_ids: torch.Tensor, speaker: torch.Tensor, *, steps: int = 10, guidance: float = 0.7,
                 noise: torch.Tensor | None = None, prompt_mel: torch.Tensor | None = None,
                 id_mask: torch.Tensor | None = None, trajectory: bool = False) -> torch.Tensor:
        """Log-mel ``(batch, 2·ids, 80)`` of ``speech_ids`` ``(batch, ids)`` in the voice ``speaker`` ``(batch, 256)``:
        Euler steps on the cosine schedule with classifier-free guidance (the conditional and unconditional
        velocities in one doubled batch). ``noise``: x₀ ``(batch, frames, 80)`` (default: N(0, I) from the global RNG).
        ``prompt_mel``: log-mel ``(batch, P, 80)`` of the first P frames, given as the condition and kept.
        With ``trajectory`` returns the de-normalised states at every time point ``(steps + 1, batch, frames, 80)``."""
        c = self.config
        batch, ids = speech_ids.shape
        frames = ids * c.token_mel_ratio
        noise = torch.randn(batch, frames, c.n_mels) if noise is None else noise
        if noise.shape != (batch, frames, c.n_mels):
            raise ValueError(f"noise must have shape {(batch, frames, c.n_mels)}, got {tuple(noise.shape)}")
        frame_mask = None if id_mask is None else id_mask.repeat_interleave(c.token_mel_ratio, dim=1)
        mu = self.token_condition(speech_ids)
        spk = self.speaker_condition(speaker)
        cond = torch.zeros_like(noise)
        if prompt_mel is not None:
            cond[:, : prompt_mel.shape[1]] = self.normalise(prompt_mel)
        # one doubled batch: [conditional; unconditional]
        mu2, spk2, cond2 = (torch.cat([a, torch.zeros_like(a)]) for a in (mu, spk, cond))
        mask2 = None if frame_mask is None else torch.cat([frame_mask, frame_mask])

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guidance == 0:
                return self.velocity(x, t.expand(batch), mu, spk, cond, frame_mask)
            v = self.velocity(torch.cat([x, x]), t.expand(2 * batch), mu2, spk2, cond2, mask2)
            return guided_velocity(v[:batch], v[batch:], guidance)

        result = euler_solve(velocity, noise, cosine_time_span(steps), trajectory=trajectory)
        mel = self.denormalise(result)
        if prompt_mel is not None:
            mel[..., : prompt_mel.shape[1], :] = prompt_mel
        return mel


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def save_flow(model: FlowDetokenizer, directory: Path | str) -> None:
    """``config.json`` + ``model.safetensors`` (atomic writes; the mel statistics are buffers of the weights)."""
    from .train.store import atomic_write_json, save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "config.json", model.config.to_dict())
    save_safetensors(model.state_dict(), directory / "model.safetensors")


def load_flow(directory: Path | str = FLOW_DIR) -> FlowDetokenizer:
    """The flow detokenizer of a folder written by :func:`save_flow` (default: the shipped one), in eval mode."""
    from .train.store import check_state_dict, read_json, read_safetensors

    directory = Path(directory)
    hint = "rebuild it with `python -m fac_mini flow train --out data/flow` or `git checkout -- data/`"
    data = read_json(directory / "config.json", "flow config", hint)
    try:
        config = FlowConfig(**data)
    except TypeError as error:
        raise ValueError(f"{directory / 'config.json'} is not a flow config ({error}); {hint}") from error
    model = FlowDetokenizer(config)
    weights = read_safetensors(directory / "model.safetensors", hint)
    check_state_dict(weights, model.state_dict(), directory / "model.safetensors")
    model.load_state_dict(weights)
    return model.eval()
