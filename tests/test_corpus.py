"""The mini world, the spoken corpus (manifest, shipped files, splits, loading) and its deterministic rebuild."""
import json
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

from fac_mini import REPO_ROOT
from fac_mini.corpus import (CORPUS_DIR, SHIPPED_SPLIT, SPLITS, load_corpus, pcm_sha256, plan_utterances,
                             read_manifest, read_metadata)
from fac_mini.train.store import file_sha256
from fac_mini.tts import VOICES, synthesize
from fac_mini.world import HELD_OUT_QUESTION, QUESTIONS, build_world


@pytest.fixture(scope="module")
def manifest():
    return read_manifest()


@pytest.fixture(scope="module")
def metadata():
    return read_metadata()


def test_world_is_deterministic_and_held_out_templates_stay_out():
    world, again = build_world(0), build_world(0)
    assert world.facts == again.facts and world.texts == again.texts
    assert build_world(1).facts != world.facts
    assert len(world.facts) == 160 and len(set(world.people)) == 40
    held_out = {t.text for t in world.questions("heldout")}
    training = {t.text for t in world.texts if t.split == "train"}
    assert len(held_out) == 160 and not held_out & training
    for example in world.questions("heldout"):
        assert example.template == HELD_OUT_QUESTION
        assert example.text == QUESTIONS[example.attribute][HELD_OUT_QUESTION].format(name=example.person)
        assert example.answer == world.fact(example.person, example.attribute).answer
    with pytest.raises(ValueError, match="num_people must be in"):
        build_world(0, num_people=0)


def test_manifest_counts_durations_and_rate(manifest, metadata):
    assert manifest["sampling_rate"] == 16000
    assert manifest["command"] == "python -m fac_mini data build"
    assert manifest["utterances"] == len(metadata) >= 1500
    assert manifest["duration_s"] >= 45 * 60
    assert abs(sum(row["duration_s"] for row in metadata) - manifest["duration_s"]) < 0.1
    for split in SPLITS:
        rows = [row for row in metadata if row["split"] == split]
        assert manifest["splits"][split]["utterances"] == len(rows)
        assert abs(manifest["splits"][split]["duration_s"] - sum(row["duration_s"] for row in rows)) < 0.05
    assert len(manifest["speakers"]) == len(VOICES) == 10
    assert all(abs(row["duration_s"] - row["num_samples"] / 16000) < 1e-3 for row in metadata)


def test_shipped_files_match_manifest_sha256(manifest, metadata):
    shipped = manifest["shipped_files_sha256"]
    assert len(shipped) == manifest["splits"][SHIPPED_SPLIT]["utterances"] > 0
    for name, digest in shipped.items():
        assert file_sha256(CORPUS_DIR / name) == digest, name
    size = sum((CORPUS_DIR / name).stat().st_size for name in shipped)
    assert size < 25 * 2**20


def test_splits_are_disjoint_by_text_and_parallel_set_is_complete(metadata):
    texts = defaultdict(set)
    for row in metadata:
        texts[row["split"]].add(row["text"])
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["dev"] and not texts["dev"] & texts["test"]
    held_out = {t.text for t in build_world(0).questions("heldout")}
    assert held_out <= texts["test"]
    parallel = [row for row in metadata if row["parallel"]]
    speakers_per_text = Counter(row["text"] for row in parallel)
    assert len(speakers_per_text) == 20 and set(speakers_per_text.values()) == {10}
    assert all(row["split"] == "test" for row in parallel)
    assert len({row["id"] for row in metadata}) == len(metadata)


def test_load_corpus_decodes_shipped_audio(metadata):
    test = load_corpus("test")
    assert len(test) == sum(row["split"] == "test" for row in metadata)
    for index in (0, 17, len(test) - 1):
        example = test[index]
        audio = example["audio"]
        assert audio["sampling_rate"] == 16000 and audio["array"].dtype == np.float32
        assert audio["array"].size == example["num_samples"]
        pcm = np.round(audio["array"] * 32768).astype(np.int16)
        assert pcm_sha256(pcm) == example["pcm_sha256"]
    assert list(test["text"])[:3] == [row["text"] for row in metadata if row["split"] == "test"][:3]


def test_load_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_corpus("validation")
    with pytest.raises(FileNotFoundError, match="corpus metadata not found"):
        load_corpus("test", corpus_dir=tmp_path)
    (tmp_path / "metadata.jsonl").write_text((CORPUS_DIR / "metadata.jsonl").read_text())
    with pytest.raises(FileNotFoundError, match="audio files of split 'test' are missing"):
        load_corpus("test", corpus_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="audio files of split 'dev' are missing"):
        load_corpus("dev", corpus_dir=tmp_path, cache_dir=tmp_path / "cache", build_missing=False)


def test_plan_matches_shipped_metadata(metadata):
    plan = plan_utterances(0)
    keys = ("id", "text", "kind", "split", "speaker", "parallel")
    assert [{k: row[k] for k in keys} for row in plan] == [{k: row[k] for k in keys} for row in metadata]


def test_synthesize_output_and_errors():
    wave = synthesize("Mira lives in Kelby.", VOICES[0])
    assert wave.dtype == np.float32 and wave.ndim == 1 and 0.5 * 16000 < wave.size < 4 * 16000
    assert 0.05 < np.abs(wave).max() <= 1.0
    with pytest.raises(ValueError, match="empty text"):
        synthesize("   ", VOICES[0])


@pytest.mark.slow
def test_data_build_reproduces_the_shipped_corpus_and_tokenizer(tmp_path, manifest):
    """`python -m fac_mini data build` from scratch gives the same audio (every PCM hash), files and tokenizer."""
    out, cache, tokenizer = tmp_path / "corpus", tmp_path / "cache", tmp_path / "tokenizer"
    result = subprocess.run([sys.executable, "-m", "fac_mini", "data", "build", "--out", str(out), "--cache", str(cache),
                             "--tokenizer-out", str(tokenizer)], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rebuilt = json.loads((out / "manifest.json").read_text())
    for key in ("utterances", "duration_s", "splits", "speakers", "sampling_rate", "pcm_sha256_of_all",
                "shipped_files_sha256"):
        assert rebuilt[key] == manifest[key], key
    assert (out / "metadata.jsonl").read_text() == (CORPUS_DIR / "metadata.jsonl").read_text()
    assert (tokenizer / "tokenizer.json").read_text() == (REPO_ROOT / "data/tokenizer/tokenizer.json").read_text()
    assert len(list((cache / "audio").glob("*.flac"))) == manifest["splits"]["train"]["utterances"] + \
        manifest["splits"]["dev"]["utterances"]
