"""The vocoder and flow recipes on the shared loop: an interrupted run resumes to the same bits, the commands guard
data/, and the shipped manifests hold what data/README.md reports."""
import json
import subprocess
import sys

import numpy as np
import torch

from fac_mini import DATA_DIR, REPO_ROOT
from fac_mini.flow import FlowConfig
from fac_mini.train.flow import FlowRecipe, collate_flow, voice_centroids
from fac_mini.train.loop import TrainConfig, train
from fac_mini.train.vocoder import SEGMENT_SAMPLES, SegmentSampler, VocoderRecipe, segments
from fac_mini.vocoder import VocosConfig

TINY_VOCOS = VocosConfig(dim=16, intermediate_dim=32, num_layers=1)
TINY_FLOW = FlowConfig(vocab_size=7, dim=16, depth=1, heads=2, lookahead_channels=8)
RUN = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup=1, log_every=1, checkpoint_every=1)


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_segment_sampler_is_resumable_and_in_range():
    sampler = SegmentSampler([20000, 5000], 8, seed=3)
    sampler.next_batch()
    state = sampler.state_dict()
    after = sampler.next_batch()
    again = SegmentSampler([20000, 5000], 8, seed=3)
    again.load_state_dict(state)
    assert again.next_batch() == after
    for clip, start in after:
        assert 0 <= start <= max(0, [20000, 5000][clip] - SEGMENT_SAMPLES)
    audio = segments([np.ones(100, dtype=np.float32)], [(0, 0)])
    assert audio.shape == (1, SEGMENT_SAMPLES) and audio[0, :100].sum() == 100 and audio[0, 100:].abs().sum() == 0


def test_vocoder_recipe_resumes_bit_identically(tmp_path):
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(3)]
    whole = train(VocoderRecipe(TINY_VOCOS, waves), RUN, progress=False)
    train(VocoderRecipe(TINY_VOCOS, waves), RUN, state_dir=tmp_path, stop_after=2, progress=False)
    resumed = train(VocoderRecipe(TINY_VOCOS, waves), RUN, state_dir=tmp_path, progress=False)
    assert resumed.step == 4 and _same_weights(whole.model, resumed.model)


def _flow_examples():
    generator = torch.Generator().manual_seed(0)
    return [{"id": f"u{i}", "speaker": f"spk0{i % 2}", "text": "x",
             "ids": torch.randint(0, 7, (5 + i,), generator=generator),
             "mel": torch.randn(2 * (5 + i), 80, generator=generator) - 5,
             "embedding": torch.nn.functional.normalize(torch.rand(256, generator=generator), dim=0)} for i in range(4)]


def test_flow_recipe_resumes_bit_identically(tmp_path):
    examples = _flow_examples()
    whole = train(FlowRecipe(examples, TINY_FLOW), RUN, progress=False)
    train(FlowRecipe(examples, TINY_FLOW), RUN, state_dir=tmp_path, stop_after=2, progress=False)
    resumed = train(FlowRecipe(examples, TINY_FLOW), RUN, state_dir=tmp_path, progress=False)
    assert resumed.step == 4 and _same_weights(whole.model, resumed.model)
    assert torch.allclose(whole.model.mel_mean, torch.cat([e["mel"] for e in examples]).mean(0))


def test_collate_and_voice_centroids():
    examples = _flow_examples()
    batch = collate_flow(examples[:2])
    assert batch["speech_ids"].shape == (2, 6) and batch["mel"].shape == (2, 12, 80)
    assert batch["id_mask"].sum().item() == 11 and batch["mel"][0, 10:].abs().sum() == 0
    centroids = voice_centroids(examples)
    assert sorted(centroids) == ["spk00", "spk01"]
    assert all(abs(float(c.norm()) - 1) < 1e-6 for c in centroids.values())


def _command(*args):
    return subprocess.run([sys.executable, "-m", "fac_mini", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)


def test_commands_guard_the_shipped_folders():
    result = _command("vocoder", "train", "--steps", "3", "--out", "data/vocoder")
    assert result.returncode == 2 and "refusing to overwrite" in result.stderr
    result = _command("vocoder", "train", "--kind", "wavenet")
    assert result.returncode == 2 and "wavenet" in result.stderr
    result = _command("flow", "train", "--steps", "0")
    assert result.returncode == 2 and "positive" in result.stderr


def test_shipped_manifests_hold_the_learning_curves():
    for folder, metric in (("vocoder", "dev_stft"), ("flow", "dev_cfm")):
        manifest = json.loads((DATA_DIR / folder / "manifest.json").read_text())
        curve = [row[metric] for row in manifest["log"] if metric in row]
        assert len(curve) >= 5 and curve[-1] < curve[0], (folder, curve)
    vocoder = json.loads((DATA_DIR / "vocoder" / "manifest.json").read_text())["test"]
    # the goal: the learnt vocoder beats Griffin-Lim on PESQ-WB and MCD (STOI: data/README.md)
    assert vocoder["vocoder"]["pesq_wb"] > vocoder["griffin_lim"]["pesq_wb"]
    assert vocoder["vocoder"]["mcd_db"] < vocoder["griffin_lim"]["mcd_db"]
