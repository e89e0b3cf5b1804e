"""Recipe: train and measure the flow-matching detokenizer (``fac_mini.flow``) on the corpus.

Training data: every train-split utterance as (the shipped tokenizer's 25 Hz ids, the detokenizer log-mel cropped
to 2 frames per id, the clip's own GE2E speaker embedding), as CosyVoice trains on each utterance with its own
x-vector. Batches of similar lengths (``LengthBucketSampler``); noise, times, condition dropout and prompts come from
the global RNG, whose state the loop saves, so an interrupted run resumes to the same bits. The dev CFM loss (fixed
noise) is logged every 500 steps.

``python -m fac_mini flow train --out data/flow`` rebuilds the shipped checkpoint (bit for bit on the same CPU kind
and thread count); ``python -m fac_mini flow eval [--json]`` measures the whole detokenizer (tokens → flow →
vocoder) on the test split: read-back CER, STOI against the original, DNSMOS, speaker similarity, speed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import CACHE_DIR
from ..audio import vocoder_mel
from ..corpus import load_corpus
from ..flow import FLOW_DIR, SPEAKERS_FILE, FlowConfig, FlowDetokenizer, load_flow, save_flow
from .cli import (RecipeParser, add_eval_flags, add_train_flags, config_from_flags, output_folder, run_command,
                  shipped_flags, write_manifest)
from .loop import TrainConfig, TrainResult, adamw, torch_threads, train
from .seal import refresh_seal
from .speech_tokenizer import LengthBucketSampler
from .srh_study import corpus_speech_tokens
from .store import atomic_directory, atomic_write, file_sha256, read_json, save_safetensors

__all__ = ["FLOW_TRAIN", "FlowExample", "flow_examples", "collate_flow", "voice_centroids", "mel_statistics", "FlowRecipe", "train_flow", "dev_loss",
           "read_manifest", "main_train", "main_eval"]

TRAIN_COMMAND = "python -m fac_mini flow train"
CACHE = CACHE_DIR / "flow"
# The shipped run (one thread): 5000 steps of 12 utterances.
FLOW_TRAIN = TrainConfig(steps=5000, batch_size=12, lr=1e-3, warmup=300, min_lr_ratio=0.05, weight_decay=0.01,
                         seed=0, log_every=50, eval_every=500, checkpoint_every=250)


def read_manifest(directory=FLOW_DIR) -> dict:
    """The manifest of a trained flow folder (learning curve, command, sha256 of its files)."""
    return read_json(Path(directory) / "manifest.json", "flow manifest", f"rebuild it with `{TRAIN_COMMAND} --out data/flow`")


class FlowExample(dict):
    """``{"id", "speaker", "text", "ids" (T,), "mel" (2T, 80), "embedding" (256,)}`` of one utterance."""


@torch.no_grad()
def flow_examples(split: str, *, limit: int | None = None, cache_dir=CACHE, progress: bool = False) -> list[FlowExample]:
    """Ids, mel and speaker embedding of every utterance of ``split`` (cached under ``cache_dir``, keyed by the
    tokenizer's ids cache and the corpus audio, when ``limit`` is None)."""
    from tqdm.auto import tqdm

    from ..corpus import read_manifest as read_corpus_manifest
    from ..speaker import speaker_embeddings
    from ..speech_tokenizer import SPEECH_TOKENIZER_DIR

    tokens = corpus_speech_tokens(split, progress=progress, limit=limit)
    digest = file_sha256(Path(SPEECH_TOKENIZER_DIR) / "model.safetensors")[:12]
    corpus_digest = read_corpus_manifest()["pcm_sha256_of_all"][:12]
    cache_path = Path(cache_dir) / f"flow-{split}-{digest}-{corpus_digest}.pt"
    if limit is None and cache_path.is_file():
        return torch.load(cache_path, weights_only=False)
    dataset = load_corpus(split)
    examples, waves = [], []
    for index in tqdm(range(len(tokens)), desc=f"mel {split}", disable=not progress):
        wave = dataset[index]["audio"]["array"]
        ids = tokens[index]["ids"]
        frames = 2 * len(ids)
        mel = vocoder_mel(wave).T                                       # (wave frames, 80); wave frames >= 2T
        if mel.shape[0] < frames:
            mel = torch.cat([mel, mel[-1:].expand(frames - mel.shape[0], -1)])
        examples.append(FlowExample(id=tokens[index]["id"], speaker=tokens[index]["speaker"], text=tokens[index]["text"],
                                    ids=ids, mel=mel[:frames].clone()))
        waves.append(wave)
    embeddings = np.concatenate([speaker_embeddings(waves[i: i + 64])
                                 for i in tqdm(range(0, len(waves), 64), desc=f"speaker {split}", disable=not progress)])
    for example, embedding in zip(examples, embeddings):
        example["embedding"] = torch.from_numpy(embedding)
    if limit is None:
        atomic_write(cache_path, lambda tmp: torch.save(examples, tmp))
    return examples


def collate_flow(examples: Sequence[FlowExample]) -> dict[str, torch.Tensor]:
    """Pad a batch: ``ids``/``id_mask`` ``(batch, T)``, ``mel`` ``(batch, 2T, 80)``, ``speaker`` ``(batch, 256)``."""
    longest = max(len(e["ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    id_mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    mel = torch.zeros(len(examples), 2 * longest, examples[0]["mel"].shape[-1])
    for row, e in enumerate(examples):
        n = len(e["ids"])
        ids[row, :n], id_mask[row, :n], mel[row, : 2 * n] = e["ids"], True, e["mel"]
    return {"speech_ids": ids, "id_mask": id_mask, "mel": mel,
            "speaker": torch.stack([e["embedding"] for e in examples])}


def voice_centroids(examples: Sequence[FlowExample]) -> dict[str, torch.Tensor]:
    """``{voice: (256,)}``: the L2-normalised mean embedding of each voice's clips (GE2E's speaker centroid)."""
    voices: dict[str, list[torch.Tensor]] = {}
    for e in examples:
        voices.setdefault(e["speaker"], []).append(e["embedding"])
    centroids = {voice: torch.stack(vectors).mean(0) for voice, vectors in sorted(voices.items())}
    return {voice: (c / c.norm()).contiguous() for voice, c in centroids.items()}


def mel_statistics(examples: Sequence[FlowExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and std of the log-mel over every frame of ``examples``."""
    frames = torch.cat([e["mel"] for e in examples])                   # (all frames, 80)
    return frames.mean(0), frames.std(0).clamp(min=1e-3)


class FlowRecipe:
    """The flow detokenizer from scratch on ``examples``."""
    name = "flow"

    def __init__(self, examples: Sequence[FlowExample], config: FlowConfig = FlowConfig()):
        if not examples:
            raise ValueError("the training set is empty")
        self.examples, self.config = list(examples), config
        self.mean, self.std = mel_statistics(self.examples)

    def build_model(self) -> FlowDetokenizer:
        model = FlowDetokenizer(self.config)
        model.mel_mean.copy_(self.mean)
        model.mel_std.copy_(self.std)
        return model

    def build_optimizer(self, model, train_config: TrainConfig):
        return adamw(model, train_config, decay_matrices_only=True)

    def build_sampler(self, train_config: TrainConfig) -> LengthBucketSampler:
        return LengthBucketSampler([len(e["ids"]) for e in self.examples], train_config.batch_size, train_config.seed)

    def loss(self, model: FlowDetokenizer, batch: list[int]) -> torch.Tensor:
        return model.loss(**collate_flow([self.examples[i] for i in batch]))

    def fingerprint(self) -> Any:
        return {"config": self.config.to_dict(), "examples": len(self.examples),
                "ids": [e["ids"].tolist() for e in self.examples[:: max(1, len(self.examples) // 50)]],
                "lengths": [len(e["ids"]) for e in self.examples]}


@torch.no_grad()
def dev_loss(model: FlowDetokenizer, examples: Sequence[FlowExample], seed: int = 0) -> dict[str, float]:
    """The CFM loss of ``examples`` with fixed noise/times (a seeded generator; the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    batch = collate_flow(examples)
    return {"dev_cfm": round(float(model.loss(**batch, generator=generator)), 4)}


def train_flow(train_config: TrainConfig = FLOW_TRAIN, *, examples=None, dev_examples=None, config: FlowConfig = FlowConfig(),
               state_dir=None, resume: bool = True, stop_after: int | None = None, threads: int | None = 1,
               progress: bool = True) -> TrainResult:
    """Train the flow on ``examples`` (default: the train split) with the course's loop; dev CFM loss of
    ``dev_examples`` (default: the dev split) every ``eval_every`` steps."""
    examples = flow_examples("train", progress=progress) if examples is None else examples
    dev_examples = flow_examples("dev", progress=progress) if dev_examples is None else dev_examples
    recipe = FlowRecipe(examples, config)
    return train(recipe, train_config, state_dir=state_dir, resume=resume, stop_after=stop_after, threads=threads,
                 progress=progress, evaluate=lambda model: dev_loss(model, dev_examples))


# ----------------------------------------------------------------------------------------------------------
# Commands (``python -m fac_mini flow train|eval``)
# ----------------------------------------------------------------------------------------------------------
def main_train(argv: Sequence[str] | None = None) -> int:
    """Train the flow detokenizer on the train split and write its folder with the learning curve
    (shipped: ``--out data/flow``). The whole detokenizer is measured by ``flow eval``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    add_train_flags(parser, "flow", FLOW_TRAIN)
    args = parser.parse_args(argv)
    out = output_folder(parser, args, "flow", FLOW_DIR, shipped_flags(FLOW_TRAIN))
    run_config = config_from_flags(args, FLOW_TRAIN)
    examples = flow_examples("train", progress=True)
    result = train_flow(run_config, examples=examples, state_dir=args.state_dir, resume=not args.restart,
                        threads=args.threads)
    with atomic_directory(out) as folder:
        save_flow(result.model, folder)
        save_safetensors(voice_centroids(examples), folder / SPEAKERS_FILE)
        write_manifest(folder, "flow", run_command(TRAIN_COMMAND, argv),
                       ["config.json", "model.safetensors", SPEAKERS_FILE],
                       train=run_config.to_dict(), threads=args.threads, train_seconds=result.train_seconds,
                       run_key=result.run_key, log=result.log, utterances=len(examples),
                       parameters=sum(p.numel() for p in result.model.parameters()))
    refresh_seal(out)
    print(json.dumps({"train_seconds": result.train_seconds, "last": result.log[-1]}))
    print(f"wrote {out}")
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """Measure the whole detokenizer (shipped tokenizer ids → flow → shipped vocoder) on the test split."""
    from ..detokenize import evaluate_detokenizer

    parser = RecipeParser(prog="python -m fac_mini flow eval", description=main_eval.__doc__)
    add_eval_flags(parser, FLOW_DIR, limit=False)
    parser.add_argument("--limit", type=int, default=48, help="test clips measured (%(default)s)")
    parser.add_argument("--dnsmos-clips", type=int, default=8, help="clips rated by DNSMOS (slow; %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="Euler steps (%(default)s)")
    parser.add_argument("--guidance", type=float, default=0.7, help="classifier-free guidance g (%(default)s)")
    args = parser.parse_args(argv)
    flow = load_flow(args.path)
    with torch_threads(args.threads):
        result = evaluate_detokenizer(flow, limit=args.limit, dnsmos_clips=args.dnsmos_clips, steps=args.steps,
                                      guidance=args.guidance, progress=not args.json)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0
