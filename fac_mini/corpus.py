"""The spoken mini world: build it offline, load it through ``datasets``.

:func:`build_corpus` speaks every statement and question of :mod:`fac_mini.world` with the voices of
:mod:`fac_mini.tts` and writes 16 kHz mono FLAC files, a ``metadata.jsonl`` (one row per utterance: text,
speaker, split, duration, sha256 of the PCM samples) and a ``manifest.json`` (counts, durations, sha256 of
every shipped file, the command that rebuilt it).

Splits are by *text*, so held-out utterances are sentences a model never heard:

* ``test``  - every held-out-template question (the knowledge probe) plus 5 % of the other texts, one voice
  each; 20 of them are also spoken by *all* voices (``parallel=True``) to measure speaker invariance.
  Shipped in git under ``data/corpus/``.
* ``dev``   - 5 % of the texts, one voice each; rebuilt into ``data/cache/corpus/`` on demand.
* ``train`` - the rest, one voice each and a second voice for half of them; rebuilt on demand.

eSpeak NG keeps hidden state between utterances, so synthesis is only reproducible when the same sequence
of utterances is spoken in a fresh process: the build therefore speaks each speaker's list, in a fixed
order, in its own new process.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from . import CACHE_DIR, DATA_DIR
from .constants import SAMPLE_RATE
from .train.store import file_sha256
from .tts import VOICES
from .world import build_world

__all__ = ["CORPUS_DIR", "SPLITS", "SHIPPED_SPLIT", "BUILD_COMMAND", "plan_utterances", "build_corpus",
           "read_metadata", "read_manifest", "load_corpus", "audio_path", "pcm_sha256", "file_sha256"]

CORPUS_DIR = DATA_DIR / "corpus"
CACHE_CORPUS_DIR = CACHE_DIR / "corpus"
SPLITS = ("train", "dev", "test")
SHIPPED_SPLIT = "test"
BUILD_COMMAND = "python -m fac_mini data build"
NUM_PARALLEL_TEXTS = 20


def plan_utterances(seed: int = 0) -> list[dict]:
    """Decide, deterministically, which texts are spoken by which voices in which split (no audio yet)."""
    world = build_world(seed)
    texts = [(t.text, t.kind if t.kind == "statement" else "question", t.split) for t in world.texts]
    rng = random.Random(seed + 1)
    plan: list[dict] = []
    test_texts = []
    for text, kind, template_split in texts:
        roll = rng.random()
        if template_split == "heldout" or roll < 0.05:
            split = "test"
            test_texts.append(text)
        elif roll < 0.10:
            split = "dev"
        else:
            split = "train"
        voices = [rng.randrange(len(VOICES))]
        if split == "train" and rng.random() < 0.5:
            voices.append((voices[0] + 1 + rng.randrange(len(VOICES) - 1)) % len(VOICES))
        for voice in voices:
            plan.append({"text": text, "kind": kind, "split": split, "speaker": VOICES[voice].speaker_id,
                         "parallel": False})
    parallel = set(rng.sample(test_texts, NUM_PARALLEL_TEXTS))
    for row in plan:
        if row["text"] in parallel:
            row["parallel"] = True
    for text in sorted(parallel):
        spoken_by = {row["speaker"] for row in plan if row["text"] == text}
        kind = next(row["kind"] for row in plan if row["text"] == text)
        for voice in VOICES:
            if voice.speaker_id not in spoken_by:
                plan.append({"text": text, "kind": kind, "split": "test", "speaker": voice.speaker_id,
                             "parallel": True})
    for index, row in enumerate(plan):
        row["id"] = f"{row['split']}-{row['speaker']}-{index:05d}"
    return plan


def pcm_sha256(pcm: np.ndarray) -> str:
    """sha256 of int16 samples (little-endian): identifies audio independently of the file encoder."""
    return hashlib.sha256(np.ascontiguousarray(pcm, dtype="<i2").tobytes()).hexdigest()


def _speak_list(job: tuple[str, list[dict], dict[str, str]]) -> list[dict]:
    """Worker: speak one speaker's utterances in order; write each to the folder its split maps to."""
    import soundfile as sf

    from .tts import synthesize

    speaker_id, rows, folder_of_split = job
    voice = next(v for v in VOICES if v.speaker_id == speaker_id)
    results = []
    for row in rows:
        wave = synthesize(row["text"], voice, SAMPLE_RATE)
        pcm = np.clip(np.round(wave * 32767.0), -32768, 32767).astype(np.int16)
        folder = Path(folder_of_split[row["split"]])
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(str(folder / f"{row['id']}.flac"), pcm, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
        results.append({**row, "num_samples": int(pcm.size), "duration_s": round(pcm.size / SAMPLE_RATE, 4),
                        "pcm_sha256": pcm_sha256(pcm)})
    return results


def build_corpus(out_dir: Path | str = CORPUS_DIR, cache_dir: Path | str = CACHE_CORPUS_DIR, seed: int = 0,
                 splits: tuple[str, ...] = SPLITS, workers: int = 2, progress: bool = True) -> dict:
    """Synthesise the corpus; the shipped split goes to ``out_dir/audio``, the others to ``cache_dir/audio``.

    Writes ``metadata.jsonl`` and ``manifest.json`` into ``out_dir`` when all splits are built, and returns the
    manifest. Takes about a minute on two cores.
    """
    from tqdm.auto import tqdm

    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {SPLITS}")
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    started = time.perf_counter()
    plan = plan_utterances(seed)
    folder_of_split = {split: str((out_dir if split == SHIPPED_SPLIT else cache_dir) / "audio") for split in SPLITS}
    # Each speaker's full list is always spoken (the hidden eSpeak state must see the same sequence);
    # utterances of splits not asked for are written to a scratch folder and thrown away.
    scratch = cache_dir / "scratch"
    for split in SPLITS:
        if split not in splits:
            folder_of_split[split] = str(scratch)
    jobs = [(voice.speaker_id, [row for row in plan if row["speaker"] == voice.speaker_id], folder_of_split)
            for voice in VOICES]
    rows: list[dict] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        for result in tqdm(pool.map(_speak_list, jobs), total=len(jobs), desc="speaking", unit="speaker",
                           disable=not progress):
            rows.extend(result)
    shutil.rmtree(scratch, ignore_errors=True)
    order = {row["id"]: index for index, row in enumerate(plan)}
    rows.sort(key=lambda row: order[row["id"]])
    manifest = _manifest(rows, out_dir, seed, time.perf_counter() - started)
    if set(splits) == set(SPLITS):
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "metadata.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        with open(out_dir / "manifest.json", "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.write("\n")
    return manifest


def _manifest(rows: list[dict], out_dir: Path, seed: int, seconds: float) -> dict:
    per_split = {}
    for split in SPLITS:
        chosen = [row for row in rows if row["split"] == split]
        per_split[split] = {"utterances": len(chosen), "texts": len({row["text"] for row in chosen}),
                            "duration_s": round(sum(row["duration_s"] for row in chosen), 2),
                            "shipped": split == SHIPPED_SPLIT}
    shipped = {f"audio/{row['id']}.flac": file_sha256(out_dir / "audio" / f"{row['id']}.flac")
               for row in rows if row["split"] == SHIPPED_SPLIT and (out_dir / "audio" / f"{row['id']}.flac").exists()}
    return {
        "command": BUILD_COMMAND, "seed": seed, "sampling_rate": SAMPLE_RATE, "format": "FLAC, 16-bit mono",
        "utterances": len(rows), "duration_s": round(sum(row["duration_s"] for row in rows), 2),
        "speakers": [{"speaker_id": v.speaker_id, "voice": v.name, "rate_wpm": v.rate_wpm, "pitch": v.pitch}
                     for v in VOICES],
        "splits": per_split, "pcm_sha256_of_all": hashlib.sha256("".join(r["pcm_sha256"] for r in rows).encode()).hexdigest(),
        "shipped_files_sha256": shipped, "build_seconds": round(seconds, 1),
    }


def read_manifest(corpus_dir: Path | str = CORPUS_DIR) -> dict:
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"corpus manifest not found: {path}; run `{BUILD_COMMAND}`")
    return json.loads(path.read_text())


def read_metadata(corpus_dir: Path | str = CORPUS_DIR) -> list[dict]:
    path = Path(corpus_dir) / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"corpus metadata not found: {path}; run `{BUILD_COMMAND}`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def audio_path(row: dict, corpus_dir: Path | str = CORPUS_DIR, cache_dir: Path | str = CACHE_CORPUS_DIR) -> Path:
    """Where an utterance's FLAC file lives: in git for the shipped split, in the cache otherwise."""
    folder = Path(corpus_dir) if row["split"] == SHIPPED_SPLIT else Path(cache_dir)
    return folder / "audio" / f"{row['id']}.flac"


def load_corpus(split: str = SHIPPED_SPLIT, corpus_dir: Path | str = CORPUS_DIR,
                cache_dir: Path | str = CACHE_CORPUS_DIR, build_missing: bool = True):
    """The utterances of ``split`` as a ``datasets.Dataset`` whose ``audio`` column decodes on access.

    Each example has ``id``, ``text``, ``kind`` ("statement"/"question"), ``split``, ``speaker``, ``parallel``,
    ``num_samples``, ``duration_s``, ``pcm_sha256``, ``path`` and ``audio`` = ``{"array": float32 samples,
    "sampling_rate": 16000}`` (decoded with soundfile; datasets' own ``Audio`` feature needs torchcodec, which
    does not load on CPU-only machines). The ``test`` split ships with the course; ``train`` and ``dev`` are
    synthesised into the cache the first time they are asked for (about a minute) when ``build_missing``.
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    rows = [row for row in read_metadata(corpus_dir) if row["split"] == split]
    for row in rows:
        row["path"] = str(audio_path(row, corpus_dir, cache_dir))
    missing = [row["path"] for row in rows if not Path(row["path"]).is_file()]
    if missing:
        if split == SHIPPED_SPLIT or not build_missing:
            raise FileNotFoundError(f"{len(missing)} audio files of split {split!r} are missing, e.g. "
                                    f"{missing[0]}; run `{BUILD_COMMAND}`")
        build_corpus(corpus_dir, cache_dir, seed=read_manifest(corpus_dir)["seed"], splits=(split,))
    dataset = datasets.Dataset.from_list(rows)
    return dataset.with_transform(_decode_batch)


def _decode_batch(batch: dict) -> dict:
    from .audio import load_audio

    if "path" not in batch:  # a column-only access such as dataset["text"]: nothing to decode
        return batch
    batch["audio"] = [{"array": load_audio(path), "sampling_rate": SAMPLE_RATE} for path in batch["path"]]
    return batch
