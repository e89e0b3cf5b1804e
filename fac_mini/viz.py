"""Plotting helpers shared by the notebooks: waveforms, spectrograms with time in seconds, token timelines,
and the system diagram. Each function draws on a matplotlib ``Axes`` you pass (or a new one) and returns it,
with titles and axis labels in units.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["new_axes", "plot_waveform", "plot_spectrogram", "plot_frame_grid", "plot_token_timeline",
           "draw_pipeline", "audio_player"]


def new_axes(ax=None, figsize=(9, 2.6)):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def plot_waveform(wave, sampling_rate: int = 16000, ax=None, title: str = "Waveform"):
    """Amplitude against time in seconds."""
    wave = _numpy(wave)
    ax = new_axes(ax)
    time = np.arange(wave.size) / sampling_rate
    ax.plot(time, wave, linewidth=0.6, color="tab:blue")
    ax.set(title=title, xlabel="time (s)", ylabel="amplitude", xlim=(0, max(time[-1], 1e-3)))
    return ax


def plot_spectrogram(features, frame_rate_hz: float = 100.0, ax=None, title: str = "Log-mel spectrogram",
                     colorbar: bool = True, ylabel: str = "mel bin"):
    """A ``(bins, frames)`` log-mel image with time in seconds on x (``frame_rate_hz`` frames per second)."""
    features = _numpy(features)
    if features.ndim != 2:
        raise ValueError(f"plot_spectrogram expects (bins, frames), got shape {features.shape}")
    ax = new_axes(ax)
    duration = features.shape[1] / frame_rate_hz
    image = ax.imshow(features, origin="lower", aspect="auto", cmap="magma",
                      extent=(0, duration, 0, features.shape[0]), interpolation="nearest")
    ax.set(title=title, xlabel="time (s)", ylabel=ylabel)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="log-mel (Whisper scale)", pad=0.01)
    return ax


def plot_frame_grid(ax, duration_s: float, frame_rate_hz: float, color: str, label: str, linewidth: float = 0.8,
                    linestyle: str = "-", alpha: float = 0.8):
    """Vertical lines at every frame boundary of a ``frame_rate_hz`` grid (e.g. 25 Hz tokens, 5 Hz groups)."""
    boundaries = np.arange(0, duration_s + 1e-9, 1.0 / frame_rate_hz)
    for index, x in enumerate(boundaries):
        ax.axvline(x, color=color, linewidth=linewidth, linestyle=linestyle, alpha=alpha,
                   label=label if index == 0 else None)
    return ax


def plot_token_timeline(ax, tokens: list[str], starts_s, ends_s, y: float = 0.0, height: float = 0.8,
                        color: str = "tab:green", fontsize: int = 8):
    """Tokens as labelled boxes on a time axis (seconds): one row of a timeline plot."""
    from matplotlib.patches import Rectangle

    for token, start, end in zip(tokens, starts_s, ends_s):
        ax.add_patch(Rectangle((start, y), end - start, height, facecolor=color, edgecolor="black", alpha=0.35,
                               linewidth=0.6))
        ax.text((start + end) / 2, y + height / 2, token, ha="center", va="center", fontsize=fontsize, clip_on=True)
    return ax


def draw_pipeline(ax=None):
    """The Fun-Audio-Chat system as boxes and arrows: user speech -> encoder -> 5 Hz LLM -> text + SRH -> speech."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    ax = new_axes(ax, figsize=(12, 4.2))
    boxes = {
        "wave_in": (0.0, 2.0, "user speech\n16 kHz", "#dddddd"),
        "mel": (1.55, 2.0, "log-mel\n100 Hz", "#cfe2f3"),
        "encoder": (3.1, 2.0, "audio encoder\n+ adapter\n25 Hz", "#cfe2f3"),
        "group": (4.65, 2.0, "group k=5\n5 Hz", "#d9ead3"),
        "llm": (6.2, 2.0, "shared LLM\n(Qwen3)\n5 Hz", "#fff2cc"),
        "text": (7.85, 3.3, "text head\n(text tokens)", "#fff2cc"),
        "srh": (7.85, 0.7, "Speech Refined\nHead: 5 tokens\nper step, 25 Hz", "#f4cccc"),
        "flow": (9.5, 0.7, "flow matching\ntokens -> mel", "#ead1dc"),
        "vocoder": (11.05, 0.7, "vocoder\nmel -> wave", "#ead1dc"),
        "wave_out": (11.05, 2.0, "assistant\nspeech", "#dddddd"),
    }
    width, height = 1.3, 1.0
    for x, y, label, color in boxes.values():
        ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.05", facecolor=color,
                                    edgecolor="black", linewidth=0.8))
        ax.text(x + width / 2, y + height / 2, label, ha="center", va="center", fontsize=8.5)

    def arrow(a, b, text=""):
        xa, ya = boxes[a][0] + width, boxes[a][1] + height / 2
        xb, yb = boxes[b][0], boxes[b][1] + height / 2
        if a == "vocoder":
            xa, ya, xb, yb = boxes[a][0] + width / 2, boxes[a][1] + height, boxes[b][0] + width / 2, boxes[b][1]
        ax.add_patch(FancyArrowPatch((xa, ya), (xb, yb), arrowstyle="-|>", mutation_scale=12, linewidth=1.0))
        if text:
            ax.text((xa + xb) / 2, (ya + yb) / 2 + 0.12, text, ha="center", fontsize=7.5, color="dimgray")

    for a, b in [("wave_in", "mel"), ("mel", "encoder"), ("encoder", "group"), ("group", "llm"), ("llm", "text"),
                 ("llm", "srh"), ("srh", "flow"), ("flow", "vocoder"), ("vocoder", "wave_out")]:
        arrow(a, b)
    ax.annotate("", xy=(6.85, 3.0), xytext=(8.5, 3.3),
                arrowprops=dict(arrowstyle="-|>", color="gray", connectionstyle="arc3,rad=0.3", linestyle="--"))
    ax.text(7.2, 3.75, "next step's input:\n(text + grouped speech) / 2", fontsize=7.5, color="dimgray", ha="center")
    ax.set(xlim=(-0.2, 12.6), ylim=(0.3, 4.6), title="Fun-Audio-Chat: dual-resolution speech in, text and speech out")
    ax.axis("off")
    return ax


def audio_player(wave, sampling_rate: int = 16000):
    """An IPython audio widget for a waveform (numpy or torch), normalised for listening."""
    from IPython.display import Audio

    return Audio(_numpy(wave).astype(np.float32), rate=sampling_rate)
