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


def draw_pipeline(ax=None, sampling_rate: int = 16000, mel_rate_hz: float = 100.0, token_rate_hz: float = 25.0,
                  group_size: int = 5):
    """The Fun-Audio-Chat system as boxes and arrows: user speech -> encoder -> LLM at ``token_rate_hz /
    group_size`` -> text head + Speech Refined Head -> speech. Every rate in a label comes from the arguments.

    Each box is a text label with its own frame (``bbox``), so the frame always fits its text; arrows join the
    frames' edges.
    """
    if ax is None:
        ax = new_axes(None, figsize=(12, 3.6))
        ax.set_position((0.01, 0.0, 0.98, 0.9))  # no tick labels to make room for
    llm_rate = token_rate_hz / group_size
    boxes = {  # name: (x, y) of the label's centre in axes coordinates, text, colour
        "wave_in": (0.05, 0.55, f"user speech\n{sampling_rate / 1000:g} kHz", "#dddddd"),
        "mel": (0.175, 0.55, f"log-mel\n{mel_rate_hz:g} Hz", "#cfe2f3"),
        "encoder": (0.315, 0.55, f"audio encoder\n+ adapter\n{token_rate_hz:g} Hz", "#cfe2f3"),
        "group": (0.46, 0.55, f"group k = {group_size}\n{llm_rate:g} Hz", "#d9ead3"),
        "llm": (0.6, 0.55, f"shared LLM\n(Qwen3)\n{llm_rate:g} Hz", "#fff2cc"),
        "text": (0.78, 0.88, f"text head\n1 text token\nper step ({llm_rate:g} Hz)", "#fff2cc"),
        "srh": (0.78, 0.2, f"Speech Refined Head\n{group_size} speech tokens\nper step ({token_rate_hz:g} Hz)",
                "#f4cccc"),
        "flow": (0.93, 0.2, "flow matching\ntokens -> mel", "#ead1dc"),
        "vocoder": (0.93, 0.55, "vocoder\nmel -> wave", "#ead1dc"),
        "wave_out": (0.93, 0.88, "assistant\nspeech", "#dddddd"),
    }
    artists = {}
    for name, (x, y, label, color) in boxes.items():
        artists[name] = ax.text(x, y, label, transform=ax.transAxes, ha="center", va="center", fontsize=9,
                                bbox=dict(boxstyle="round,pad=0.5", facecolor=color, edgecolor="black",
                                          linewidth=0.8))

    def arrow(a, b, side_a, side_b, **style):
        ax.annotate("", xy=side_b, xycoords=artists[b], xytext=side_a, textcoords=artists[a],
                    arrowprops=dict(arrowstyle="-|>", mutation_scale=12, linewidth=1.0, shrinkA=1, shrinkB=1,
                                    **style))

    right, left, top, bottom = (1, 0.5), (0, 0.5), (0.5, 1), (0.5, 0)
    for a, b in [("wave_in", "mel"), ("mel", "encoder"), ("encoder", "group"), ("group", "llm")]:
        arrow(a, b, right, left)
    arrow("llm", "text", (1, 0.75), (0, 0.3))
    arrow("llm", "srh", (1, 0.25), (0, 0.7))
    arrow("srh", "flow", right, left)
    arrow("flow", "vocoder", top, bottom)
    arrow("vocoder", "wave_out", top, bottom)
    feedback = dict(color="gray", linestyle="--", connectionstyle="angle,angleA=180,angleB=90,rad=6")
    arrow("text", "llm", (0, 0.75), top, **feedback)
    arrow("srh", "llm", (0, 0.25), bottom, **feedback)
    ax.text(0.585, 0.9, "generated tokens are fed back:\nnext input = (text embedding\n+ grouped speech) / 2",
            transform=ax.transAxes, ha="right", va="center", fontsize=8, color="dimgray")
    ax.set_title(f"Fun-Audio-Chat: dual-resolution speech in ({token_rate_hz:g} Hz -> {llm_rate:g} Hz), "
                 "text and speech out")
    ax.axis("off")
    return ax


def audio_player(wave, sampling_rate: int = 16000):
    """An IPython audio widget for a waveform (numpy or torch), normalised for listening."""
    from IPython.display import Audio

    return Audio(_numpy(wave).astype(np.float32), rate=sampling_rate)
