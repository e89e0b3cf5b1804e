"""Recipe: train and measure the vocoders (``fac_mini.vocoder``) on the corpus audio, GAN-free.

Random 0.8 s segments of the train split (12 800 samples = 40 hops), their log-mel computed on the fly, and the
reconstruction losses only: multi-resolution STFT (spectral convergence + log-magnitude L1 at 512/1024/2048 points)
plus the mel L1. No discriminators: within the CPU budget the adversarial losses were not tried (a GAN roughly
doubles the step time, and the recipe is already at the budget; data/README.md). Dev losses are logged every
1000 steps (the learning curve).

``python -m fac_mini vocoder train --out data/vocoder`` rebuilds the shipped Vocos (bit for bit on the same CPU kind
and thread count); ``--kind hifigan --out data/vocoder_hifigan`` the HiFi-GAN comparison. ``python -m fac_mini
vocoder eval [--json]`` measures copy-synthesis on the test split against Griffin-Lim on the same mel.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import DATA_DIR
from ..audio import VOCODER_HOP, vocoder_mel_padded
from ..constants import SAMPLE_RATE
from ..corpus import load_corpus
from ..vocoder import (VOCODER_DIR, HiFiGANConfig, VocosConfig, build_vocoder, load_vocoder, mel_l1_loss,
                       multi_resolution_stft_loss, save_vocoder, vocode)
from .cli import (RecipeParser, add_eval_flags, add_train_flags, config_from_flags, output_folder, run_command,
                  shipped_flags, write_manifest)
from .loop import TrainConfig, TrainResult, adamw, torch_threads, train
from .seal import refresh_seal
from .store import atomic_directory, read_json

__all__ = ["VOCOS_TRAIN", "HIFIGAN_TRAIN", "HIFIGAN_DIR", "SEGMENT_SAMPLES", "SegmentSampler", "VocoderRecipe",
           "load_waves", "segments", "reconstruction_loss", "dev_losses", "train_vocoder", "evaluate_vocoder", "real_time_factor", "read_manifest", "main_train", "main_eval"]

TRAIN_COMMAND = "python -m fac_mini vocoder train"
HIFIGAN_DIR = DATA_DIR / "vocoder_hifigan"
SEGMENT_SAMPLES = 40 * VOCODER_HOP      # 0.8 s: 40 hops, 41 mel frames
# The shipped runs (one thread): Vocos 14 000 steps of 4 segments; HiFi-GAN (about 2.8x slower per step) 600, a
# comparison of design and speed more than a rival (it gets an eighth of the Vocos's CPU time).
VOCOS_TRAIN = TrainConfig(steps=14000, batch_size=4, lr=2e-3, warmup=200, min_lr_ratio=0.05, weight_decay=0.01,
                          seed=0, log_every=50, eval_every=1000, checkpoint_every=250)
HIFIGAN_TRAIN = TrainConfig(steps=600, batch_size=4, lr=2e-3, warmup=100, min_lr_ratio=0.05, weight_decay=0.01,
                            seed=0, log_every=25, eval_every=250, checkpoint_every=100)
KINDS = {"vocos": (VocosConfig, VOCOS_TRAIN, VOCODER_DIR), "hifigan": (HiFiGANConfig, HIFIGAN_TRAIN, HIFIGAN_DIR)}
# the comparison HiFi-GAN is stored in float16 (data/'s size budget; its metrics are measured on the rounded file)
STORE_DTYPES = {"vocos": torch.float32, "hifigan": torch.float16}


def read_manifest(directory=VOCODER_DIR) -> dict:
    """The manifest of a trained vocoder folder (metrics, learning curve, command, sha256 of its files)."""
    return read_json(Path(directory) / "manifest.json", "vocoder manifest",
                     f"rebuild it with `{TRAIN_COMMAND} --out data/vocoder`")


def load_waves(split: str, limit: int | None = None) -> list[np.ndarray]:
    """The float32 samples of the first ``limit`` utterances of ``split`` (all when None)."""
    dataset = load_corpus(split)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return [dataset[i]["audio"]["array"] for i in range(count)]


class SegmentSampler:
    """Batches of ``(clip, start)`` pairs: a clip drawn with probability proportional to its length, a start
    uniform in it, from the sampler's own generator (its state is saved with the training state)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, segment: int = SEGMENT_SAMPLES):
        self.lengths = torch.tensor(lengths, dtype=torch.float64)
        self.batch_size, self.segment = batch_size, segment
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> list[tuple[int, int]]:
        clips = torch.multinomial(self.lengths, self.batch_size, replacement=True, generator=self.generator)
        room = (self.lengths[clips] - self.segment).clamp(min=0)
        starts = (torch.rand(self.batch_size, generator=self.generator, dtype=torch.float64) * room).long()
        return list(zip(clips.tolist(), starts.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def segments(waves: Sequence[np.ndarray], batch: Sequence[tuple[int, int]], length: int = SEGMENT_SAMPLES) -> torch.Tensor:
    """``(batch, length)`` float32: each clip's samples from its start, zero-padded at the end when it is shorter."""
    out = torch.zeros(len(batch), length)
    for row, (clip, start) in enumerate(batch):
        piece = waves[clip][start: start + length]
        out[row, : len(piece)] = torch.from_numpy(piece)
    return out


def reconstruction_loss(model: torch.nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """MR-STFT + mel L1 of the vocoder's output on the mel of ``audio`` ``(batch, samples)``."""
    mel = vocoder_mel_padded(audio)                                    # (batch, 80, samples // 320 + 1)
    predicted = model(mel)                                             # (batch, (frames - 1) * 320)
    target = audio[:, : predicted.shape[-1]]
    return multi_resolution_stft_loss(predicted, target) + mel_l1_loss(predicted, mel)


class VocoderRecipe:
    """A vocoder from scratch on random train-split segments."""

    def __init__(self, config: VocosConfig | HiFiGANConfig, waves: Sequence[np.ndarray]):
        if not waves:
            raise ValueError("the training set is empty")
        self.config, self.waves = config, list(waves)
        self.name = f"vocoder_{config.kind}"

    def build_model(self) -> torch.nn.Module:
        return build_vocoder(self.config)

    def build_optimizer(self, model, train_config: TrainConfig):
        return adamw(model, train_config, betas=(0.8, 0.99))            # HiFi-GAN's betas

    def build_sampler(self, train_config: TrainConfig) -> SegmentSampler:
        return SegmentSampler([len(w) for w in self.waves], train_config.batch_size, train_config.seed)

    def loss(self, model, batch) -> torch.Tensor:
        return reconstruction_loss(model, segments(self.waves, batch))

    def fingerprint(self) -> Any:
        return {"config": self.config.to_dict(), "clips": len(self.waves), "samples": [len(w) for w in self.waves],
                "segment": SEGMENT_SAMPLES}


@torch.no_grad()
def dev_losses(model: torch.nn.Module, waves: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean MR-STFT and mel-L1 losses of whole dev clips (the learning curve)."""
    stft, mel_l1 = [], []
    for wave in waves:
        audio = torch.from_numpy(wave)[None]
        mel = vocoder_mel_padded(audio)
        predicted = model(mel)
        stft.append(float(multi_resolution_stft_loss(predicted, audio[:, : predicted.shape[-1]])))
        mel_l1.append(float(mel_l1_loss(predicted, mel)))
    return {"dev_stft": round(float(np.mean(stft)), 4), "dev_mel_l1": round(float(np.mean(mel_l1)), 4)}


def train_vocoder(kind: str = "vocos", train_config: TrainConfig | None = None, *, waves=None, dev_waves=None,
                  state_dir=None, resume: bool = True, stop_after: int | None = None, threads: int | None = 1,
                  progress: bool = True) -> TrainResult:
    """Train a ``kind`` ("vocos" or "hifigan") vocoder on ``waves`` (default: the train split) with the course's
    loop; dev losses of ``dev_waves`` (default: 8 dev clips) every ``eval_every`` steps."""
    if kind not in KINDS:
        raise ValueError(f"unknown vocoder kind {kind!r}; choose from {sorted(KINDS)}")
    config_class, shipped, _ = KINDS[kind]
    waves = load_waves("train") if waves is None else waves
    dev_waves = load_waves("dev", 8) if dev_waves is None else dev_waves
    recipe = VocoderRecipe(config_class(), waves)
    return train(recipe, train_config or shipped, state_dir=state_dir, resume=resume, stop_after=stop_after,
                 threads=threads, progress=progress, evaluate=lambda model: dev_losses(model, dev_waves))


# ----------------------------------------------------------------------------------------------------------
# Measurement: copy-synthesis against Griffin-Lim on the same mel
# ----------------------------------------------------------------------------------------------------------
def real_time_factor(model: torch.nn.Module, seconds: float = 5.0, repeats: int = 3) -> float:
    """Seconds of compute per second of audio for one ``seconds``-long clip (best of ``repeats``)."""
    frames = int(seconds * SAMPLE_RATE) // VOCODER_HOP + 1
    mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(0)) - 5.0
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(mel)
            best = min(best, time.perf_counter() - start)
    return best / seconds


def evaluate_vocoder(model: torch.nn.Module, split: str = "test", *, limit: int | None = 48, dnsmos_clips: int = 8,
                     baseline: bool = True, progress: bool = False) -> dict[str, Any]:
    """Copy-synthesis quality on the first ``limit`` clips of ``split``: PESQ-WB, STOI and MCD of the vocoder (and of
    Griffin-Lim, 32 iterations, on the same mel), DNSMOS OVRL of the first ``dnsmos_clips`` clips of each and of the
    originals, the real-time factor, and the parameter count."""
    from tqdm.auto import tqdm

    from ..audio import vocoder_mel
    from ..quality import dnsmos, griffin_lim, mel_cepstral_distortion, pesq_wb, stoi

    references = load_waves(split, limit)
    systems: dict[str, list[np.ndarray]] = {"vocoder": []}
    if baseline:
        systems["griffin_lim"] = []
    for wave in tqdm(references, desc=f"copy-synthesis {split}", disable=not progress):
        mel = vocoder_mel(wave)
        systems["vocoder"].append(vocode(mel, model).numpy())
        if baseline:
            systems["griffin_lim"].append(griffin_lim(mel.numpy()))
    result: dict[str, Any] = {"split": split, "clips": len(references),
                              "seconds": round(sum(len(w) for w in references) / SAMPLE_RATE, 1),
                              "parameters": sum(p.numel() for p in model.parameters()),
                              "kind": model.config.kind}
    dnsmos_refs = references[:dnsmos_clips]
    if dnsmos_clips:
        result["original"] = {"dnsmos_ovrl": round(float(np.mean([dnsmos(w)["ovrl"] for w in dnsmos_refs])), 3)}
    for name, outputs in systems.items():
        row = {"pesq_wb": float(np.mean([pesq_wb(r, o) for r, o in zip(references, outputs)])),
               "stoi": float(np.mean([stoi(r, o) for r, o in zip(references, outputs)])),
               "mcd_db": float(np.mean([mel_cepstral_distortion(r, o) for r, o in zip(references, outputs)]))}
        if dnsmos_clips:
            row["dnsmos_ovrl"] = float(np.mean([dnsmos(o)["ovrl"] for o in outputs[:dnsmos_clips]]))
        result[name] = {key: round(value, 3) for key, value in row.items()}
    result["vocoder"]["rtf"] = round(real_time_factor(model), 4)
    return result


# ----------------------------------------------------------------------------------------------------------
# Commands (``python -m fac_mini vocoder train|eval``)
# ----------------------------------------------------------------------------------------------------------
def _kind_from(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--kind" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--kind="):
            return arg.split("=", 1)[1]
    return "vocos"


def main_train(argv: Sequence[str] | None = None) -> int:
    """Train a vocoder on the train split and write its folder with the learning curve and the test metrics
    (shipped: ``--out data/vocoder``; ``--kind hifigan --out data/vocoder_hifigan``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kind = _kind_from(argv)
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    parser.add_argument("--kind", choices=sorted(KINDS), default="vocos", help="vocoder design (%(default)s)")
    if kind not in KINDS:
        parser.parse_args(argv)                                        # exits with argparse's message
    config_class, shipped, shipped_dir = KINDS[kind]
    add_train_flags(parser, f"vocoder_{kind}", shipped)
    args = parser.parse_args(argv)
    out = output_folder(parser, args, f"vocoder_{kind}", shipped_dir, shipped_flags(shipped))
    run_config = config_from_flags(args, shipped)
    result = train_vocoder(kind, run_config, state_dir=args.state_dir, resume=not args.restart, threads=args.threads)
    with atomic_directory(out) as folder:
        save_vocoder(result.model, folder, STORE_DTYPES[kind])
        model = load_vocoder(folder)                                   # measure exactly what is written
        with torch_threads(args.threads):
            measured = evaluate_vocoder(model, progress=True)
        write_manifest(folder, f"vocoder_{kind}", run_command(TRAIN_COMMAND, argv),
                       ["config.json", "model.safetensors"], train=run_config.to_dict(), threads=args.threads,
                       train_seconds=result.train_seconds, run_key=result.run_key, log=result.log, test=measured)
    refresh_seal(out)
    print(json.dumps({"train_seconds": result.train_seconds, "test": measured}))
    print(f"wrote {out}")
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """Copy-synthesis metrics of a vocoder folder (default the shipped Vocos) against Griffin-Lim on the same mel."""
    parser = RecipeParser(prog="python -m fac_mini vocoder eval", description=main_eval.__doc__)
    add_eval_flags(parser, VOCODER_DIR, limit=False)
    parser.add_argument("--limit", type=int, default=48, help="test clips measured (%(default)s)")
    parser.add_argument("--dnsmos-clips", type=int, default=8, help="clips rated by DNSMOS (slow; %(default)s)")
    args = parser.parse_args(argv)
    model = load_vocoder(args.path)
    with torch_threads(args.threads):
        result = evaluate_vocoder(model, limit=args.limit, dnsmos_clips=args.dnsmos_clips, progress=not args.json)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"vocoder {args.path} ({result['kind']}, {result['parameters']:,} parameters), copy-synthesis of "
          f"{result['clips']} {result['split']} clips ({result['seconds']} s)")
    for name in ("vocoder", "griffin_lim"):
        row = result.get(name)
        if row:
            print(f"  {name:<12} " + "  ".join(f"{key} {value}" for key, value in row.items()))
    return 0
