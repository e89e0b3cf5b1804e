"""Recipe: train and measure the 25 Hz speech tokenizer (``fac_mini.speech_tokenizer``) on the corpus.

CTC on the train split with the course's loop (:mod:`fac_mini.train.loop`): AdamW, warm-up + cosine schedule,
gradient clipping at 1, fixed seed, no SpecAugment (it did not help within the 15-minute budget: test CER 20.8 %
with it, 19.7 % without, for a 729-code variant). A speaker adversary (gradient reversal on the codes) was tried
and dropped: its voice guess fell to chance, yet the invariance ratio only went 0.70 -> 0.66 and CER rose
22.5 % -> 23.6 % (data/README.md). One thread is the default: on a shared 2-core machine two competing threads were
measured 5x *slower* per step.

``python -m fac_mini speech-tokenizer train --out data/speech_tokenizer`` rebuilds the shipped checkpoint (bit for
bit, same thread count); ``python -m fac_mini speech-tokenizer eval [--json]`` measures one.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..corpus import load_corpus
from ..audio import log_mel
from ..speech_tokenizer import (SPEECH_TOKENIZER_DIR, TRAIN_COMMAND, SpeechTokenizer, SpeechTokenizerConfig,
                                build_char_vocab, ctc_greedy_decode, features_from_waves, load_speech_tokenizer,
                                pad_features)
from .cli import (RecipeParser, add_eval_flags, add_train_flags, config_from_flags, output_folder, run_command,
                  shipped_flags, write_manifest)
from .loop import TrainConfig, TrainResult, adamw, torch_threads, train
from .metrics import character_error_rate, normalize_text, normalized_edit_distance
from .seal import refresh_seal
from .store import atomic_directory, read_json

__all__ = ["TOKENIZER_TRAIN", "LengthBucketSampler", "SpeechTokenizerRecipe", "train_speech_tokenizer",
           "evaluate_speech_tokenizer", "read_manifest", "main_train", "main_eval"]

# The shipped run: 1300 steps of 16 clips (~8 min on one core).
TOKENIZER_TRAIN = TrainConfig(steps=1300, batch_size=16, lr=3e-3, warmup=100, min_lr_ratio=0.1, weight_decay=0.01,
                              seed=0, log_every=1, checkpoint_every=100)


def read_manifest(directory=SPEECH_TOKENIZER_DIR) -> dict:
    """The manifest of a trained tokenizer folder (metrics, command, sha256 of its files)."""
    return read_json(Path(directory) / "manifest.json", "speech tokenizer manifest",
                     f"rebuild it with `{TRAIN_COMMAND} --out data/speech_tokenizer`")


class LengthBucketSampler:
    """One epoch's batches: a seeded shuffle, sorted by length within chunks of 8 batches (less padding), short
    batches dropped, then the batches shuffled. Each epoch's order depends only on (seed, epoch), so the sampler's
    state is just its position."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths, self.seed = list(lengths), seed
        self.batch_size = min(batch_size, len(self.lengths))
        self.step = 0
        self.batches_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches, chunk = [], 8 * self.batch_size
        for start in range(0, len(order), chunk):
            part = sorted(order[start: start + chunk], key=lambda i: self.lengths[i])
            batches += [part[i: i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        batches = [batch for batch in batches if len(batch) == self.batch_size] or batches
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def next_batch(self) -> list[int]:
        epoch, position = divmod(self.step, self.batches_per_epoch)
        self.step += 1
        return self._epoch(epoch)[position]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


class SpeechTokenizerRecipe:
    """The tokenizer from scratch with CTC on ``dataset``; log-mels are computed once and kept in memory."""
    name = "speech_tokenizer"

    def __init__(self, config: SpeechTokenizerConfig | None = None, dataset=None, progress: bool = True):
        from tqdm.auto import tqdm

        dataset = load_corpus("train") if dataset is None else dataset
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        self.mels, self.texts = [], []
        for index in tqdm(range(len(dataset)), desc="log-mel", disable=not progress):
            example = dataset[index]
            self.mels.append(log_mel(example["audio"]["array"], example["audio"]["sampling_rate"]))
            self.texts.append(example["text"])
        config = config or SpeechTokenizerConfig()
        vocab = build_char_vocab(self.texts)
        self.config = config if config.char_vocab == vocab else dataclasses.replace(config, char_vocab=vocab)

    def build_model(self) -> SpeechTokenizer:
        return SpeechTokenizer(self.config)

    def build_optimizer(self, model, train_config: TrainConfig):
        return adamw(model, train_config)

    def build_sampler(self, train_config: TrainConfig) -> LengthBucketSampler:
        return LengthBucketSampler([mel.shape[-1] for mel in self.mels], train_config.batch_size, train_config.seed)

    def loss(self, model: SpeechTokenizer, batch: list[int]) -> torch.Tensor:
        features, mel_lengths = pad_features([self.mels[i] for i in batch])
        return model.ctc_loss(features, mel_lengths, [self.texts[i] for i in batch])

    def fingerprint(self) -> Any:
        return {"config": self.config.to_dict(), "examples": len(self.mels), "texts": self.texts,
                "frames": [mel.shape[-1] for mel in self.mels]}


def train_speech_tokenizer(config: SpeechTokenizerConfig | None = None, train_config: TrainConfig = TOKENIZER_TRAIN,
                           *, dataset=None, state_dir=None, resume: bool = True, stop_after: int | None = None,
                           threads: int | None = 1, progress: bool = True) -> TrainResult:
    """Train the tokenizer with CTC on ``dataset`` (default ``load_corpus("train")``) with the course's loop;
    resumable to bit-identical weights with ``state_dir``. Returns the loop's ``TrainResult``."""
    recipe = SpeechTokenizerRecipe(config, dataset, progress)
    return train(recipe, train_config, state_dir=state_dir, resume=resume, stop_after=stop_after, threads=threads,
                 progress=progress)


@torch.no_grad()
def evaluate_speech_tokenizer(model: SpeechTokenizer, split: str = "test", *, dataset=None, batch_size: int = 32,
                              limit: int | None = None, invariance: bool = True, max_pairs: int = 2000,
                              seed: int = 0, progress: bool = False) -> dict:
    """Measure the tokenizer on ``split`` (texts it never trained on) and return rounded numbers:

    * ``cer``: greedy-CTC character error rate (corpus level, normalized text).
    * ``codes_used`` / ``codebook_usage``: distinct ids seen / their fraction of the codebook;
      ``code_perplexity``: exp(entropy) of the id distribution (how many codes it effectively uses).
    * speaker invariance, on id sequences with consecutive repeats merged (``dedup_consecutive``; it removes
      speaking rate) and then ``normalized_edit_distance``: ``same_text_diff_voice`` = mean over all pairs of
      ``parallel`` utterances with the same text; ``diff_text_same_voice`` = mean over (at most ``max_pairs``,
      seeded) pairs of utterances of one speaker with different texts; ``invariance_ratio`` = their quotient.
    """
    from tqdm.auto import tqdm

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive integer (or None for the whole split), got {limit!r}")
    if dataset is None:
        dataset = load_corpus(split)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError(f"split {split!r} has no utterances to evaluate")
    was_training = model.training
    model.eval()
    ids_per_clip, references, hypotheses, rows, seconds = [], [], [], [], 0.0
    for start in tqdm(range(0, count, batch_size), desc=f"evaluate {split}", disable=not progress):
        examples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        features, lengths = features_from_waves([ex["audio"]["array"] for ex in examples],
                                                examples[0]["audio"]["sampling_rate"])
        output = model(features, lengths)
        hypotheses += ctc_greedy_decode(output.ctc_log_probs, output.ctc_lengths, model.config.char_vocab)
        references += [ex["text"] for ex in examples]
        seconds += sum(len(ex["audio"]["array"]) / ex["audio"]["sampling_rate"] for ex in examples)
        for row, ex in enumerate(examples):
            ids_per_clip.append(output.ids[row][output.mask[row]].tolist())
            rows.append({"text": ex["text"], "speaker": ex["speaker"], "parallel": bool(ex.get("parallel", False))})
    model.train(was_training)
    all_ids = torch.tensor([i for ids in ids_per_clip for i in ids])
    counts = torch.bincount(all_ids, minlength=model.codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    metrics = {
        "split": split, "utterances": count, "cer": round(character_error_rate(references, hypotheses), 4),
        "codebook_size": model.codebook_size, "codes_used": int((counts > 0).sum()),
        "codebook_usage": round(float((counts > 0).double().mean()), 4),
        "code_perplexity": round(float(torch.exp(-(probs * probs.log()).sum())), 1),
        "tokens_per_second": round(len(all_ids) / seconds, 3),
    }
    if invariance:
        same_text, same_voice = [], []
        for a in range(count):
            for b in range(a + 1, count):
                ra, rb = rows[a], rows[b]
                if ra["text"] == rb["text"] and ra["speaker"] != rb["speaker"] and ra["parallel"] and rb["parallel"]:
                    same_text.append((a, b))
                elif ra["speaker"] == rb["speaker"] and ra["text"] != rb["text"]:
                    same_voice.append((a, b))
        rng = random.Random(seed)
        if len(same_voice) > max_pairs:
            same_voice = sorted(rng.sample(same_voice, max_pairs))
        if same_text and same_voice:
            def mean_distance(pairs):
                return float(np.mean([normalized_edit_distance(ids_per_clip[a], ids_per_clip[b]) for a, b in pairs]))
            same_text_distance, same_voice_distance = mean_distance(same_text), mean_distance(same_voice)
            metrics.update({
                "same_text_diff_voice": round(same_text_distance, 4), "same_text_pairs": len(same_text),
                "diff_text_same_voice": round(same_voice_distance, 4), "diff_text_pairs": len(same_voice),
                "invariance_ratio": round(same_text_distance / same_voice_distance, 4),
                "distance": "normalized edit distance of ids with consecutive repeats merged",
            })
    metrics["examples"] = [{"reference": normalize_text(r), "hypothesis": h}
                           for r, h in zip(references[:3], hypotheses[:3])]
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Commands (``python -m fac_mini speech-tokenizer train|eval``)
# ----------------------------------------------------------------------------------------------------------
def main_train(argv: Sequence[str] | None = None) -> int:
    """Train the speech tokenizer and write its folder: weights, config and a manifest with the test metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t = TOKENIZER_TRAIN
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    add_train_flags(parser, "speech_tokenizer", t)
    parser.add_argument("--no-eval", action="store_true", help="skip the test-split metrics")
    args = parser.parse_args(argv)
    out = output_folder(parser, args, "speech_tokenizer", SPEECH_TOKENIZER_DIR, shipped_flags(t, no_eval=False))
    run_config = config_from_flags(args, t)
    result = train_speech_tokenizer(train_config=run_config, state_dir=args.state_dir, resume=not args.restart,
                                    threads=args.threads)
    model = result.model
    losses = [row["loss"] for row in result.log if "loss" in row]
    fields: dict[str, Any] = {
        "config": model.config.to_dict(), "train": run_config.to_dict(), "threads": args.threads,
        "run_key": result.run_key, "steps": run_config.steps, "batch_size": run_config.batch_size,
        "train_seconds": result.train_seconds, "parameters": sum(p.numel() for p in model.parameters()),
        "codebook_size": model.config.codebook_size,
        "final_ctc_loss_mean_last_50": round(float(np.mean(losses[-50:])), 4)}
    with atomic_directory(out) as folder:
        files = [path.name for path in model.save_pretrained(folder)]
        if not args.no_eval:
            shipped_model = load_speech_tokenizer(folder)           # measure exactly what is written
            started = time.perf_counter()
            with torch_threads(args.threads):
                fields["metrics"] = evaluate_speech_tokenizer(shipped_model, "test", progress=True)
                fields["metrics_first5"] = evaluate_speech_tokenizer(shipped_model, "test", limit=5,
                                                                     invariance=False)
            fields["eval_seconds"] = round(time.perf_counter() - started, 1)
        manifest = write_manifest(folder, "speech_tokenizer", run_command(TRAIN_COMMAND, argv), files, **fields)
    refresh_seal(out)
    print(json.dumps({"out": str(out)} | {k: manifest[k] for k in ("steps", "train_seconds", "metrics")
                                          if k in manifest}, indent=1))
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """Measure a speech tokenizer: CER, codebook use, speaker invariance (JSON with --json)."""
    parser = RecipeParser(prog="python -m fac_mini speech-tokenizer eval", description=main_eval.__doc__)
    add_eval_flags(parser, SPEECH_TOKENIZER_DIR)
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))
    args = parser.parse_args(argv)
    model = load_speech_tokenizer(args.path)
    with torch_threads(args.threads):
        metrics = evaluate_speech_tokenizer(model, args.split, limit=args.limit, progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"speech tokenizer {args.path} on {metrics['utterances']} {args.split} utterances")
    for key, value in metrics.items():
        if key not in ("examples", "split", "utterances"):
            print(f"  {key:<22}{value}")
    for example in metrics["examples"]:
        print(f"  ref: {example['reference']}\n  hyp: {example['hypothesis']}")
    return 0
