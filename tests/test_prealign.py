"""fac_mini.train.prealign: the mini Fun-Audio-Chat assembled from M0 and the speech tokenizer's encoder, its LLM
truly frozen during pre-alignment (bit-identical weights, no gradient), bit-identical resume, save/load."""
import copy
import dataclasses
import json

import pytest
import torch

from fac_mini.audio import load_audio
from fac_mini.corpus import audio_path, read_metadata
from fac_mini.dialogue import build_dialogue
from fac_mini.released.processing import FunAudioChatProcessor
from fac_mini.speech_tokenizer import load_speech_tokenizer
from fac_mini.tokenizer import load_tokenizer
from fac_mini.train.loop import TrainConfig, train
from fac_mini.train.m0 import load_m0
from fac_mini.train.prealign import (PREALIGN_DIR, DialogueRecipe, build_mllm, llm_fingerprint, load_mllm,
                                     parameter_counts, part_of, save_mllm)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup=1, log_every=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def pieces():
    """Four chats (S2T and S2M) on shipped test-split audio, with random answer speech ids (any ids do here)."""
    tokenizer = load_tokenizer()
    examples = build_dialogue()["heldout_speech_facts"][:2]
    examples = examples + [dataclasses.replace(e, kind="s2m") for e in examples]
    processor = FunAudioChatProcessor(tokenizer)
    rows = {row["id"]: row for row in read_metadata()}
    generator = torch.Generator().manual_seed(0)
    tensors = {"features": {}, "speech_ids": {}, "num_samples": {}}
    for example in examples:
        wave = load_audio(audio_path(rows[example.user_id]))
        mel, mask = processor.features([wave])
        tensors["features"][example.user_id] = mel[0, :, :int(mask.sum())]
        tensors["num_samples"][example.user_id] = torch.tensor([wave.size])
        tensors["speech_ids"][example.answer_speech_id] = torch.randint(0, 243, (27,), generator=generator)
    return examples, tensors, tokenizer


@pytest.fixture(scope="module")
def frozen(pieces):
    """Three pre-alignment steps (LLM frozen) on the four chats."""
    return train(_recipe(pieces, freeze_llm=True), TINY, progress=False)


def _recipe(pieces, freeze_llm):
    return DialogueRecipe("prealign-test", pieces[0], pieces[1], pieces[2], start=build_mllm, start_digest="test",
                          freeze_llm=freeze_llm)


def test_the_mini_mllm_is_m0_plus_the_tokenizer_encoder():
    torch.manual_seed(0)
    model = build_mllm()
    m0, _ = load_m0()
    for name, tensor in m0.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], tensor)
    encoder = load_speech_tokenizer().encoder.state_dict()
    own = model.continuous_audio_tower.state_dict()
    copied = [name for name in own if name in encoder and encoder[name].shape == own[name].shape]
    assert all(torch.equal(own[name], encoder[name]) for name in copied)
    assert set(own) - set(copied) == {"proj.weight", "proj.bias", "audio_bos_eos_token.weight"}
    assert model.config.text_config.hidden_size == model.config.audio_config.output_dim == 192
    assert {part_of(name) for name, _ in model.named_parameters()} == {"llm", "encoder", "adapter", "grouping", "srh"}
    with pytest.raises(ValueError, match="no known part"):
        part_of("lm_head.weight")


def test_prealignment_leaves_the_llm_bit_identical_and_without_gradient(frozen):
    model = frozen.model
    m0, _ = load_m0()
    assert all(torch.equal(model.language_model.state_dict()[k], v) for k, v in m0.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.language_model.parameters())
    trained = {name: p for name, p in model.named_parameters() if part_of(name) != "llm"}
    assert all(p.requires_grad for p in trained.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    torch.manual_seed(0)
    start = build_mllm()
    changed = {part_of(n) for n, p in model.named_parameters() if not torch.equal(p, start.state_dict()[n])}
    assert changed == {"encoder", "adapter", "grouping", "srh"}
    counts = parameter_counts(model)
    assert counts["llm"] == {"trainable": 0, "frozen": sum(p.numel() for p in m0.parameters())}


def test_the_same_recipe_without_freezing_changes_the_llm(pieces):
    """The control: the check above can fail (full fine-tuning moves the LLM)."""
    model = train(_recipe(pieces, freeze_llm=False), TINY, progress=False).model
    m0, _ = load_m0()
    assert not all(torch.equal(model.language_model.state_dict()[k], v) for k, v in m0.state_dict().items())


def test_an_interrupted_run_resumes_to_the_same_bits(pieces, frozen, tmp_path):
    straight = frozen.model.state_dict()
    train(_recipe(pieces, True), TINY, state_dir=tmp_path, stop_after=1, progress=False)
    resumed = train(_recipe(pieces, True), TINY, state_dir=tmp_path, progress=False)
    assert resumed.step == TINY.steps
    assert all(torch.equal(straight[k], v) for k, v in resumed.model.state_dict().items())


def test_save_and_load_keep_the_weights(frozen, tmp_path):
    model = copy.deepcopy(frozen.model)
    save_mllm(model, tmp_path / "pre", llm_from_m0=True)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "pre" / "model.safetensors"))
    assert not any(k.startswith("language_model.") for k in stored)        # the LLM is M0, named by sha256
    assert "llm_from_m0" in json.loads((tmp_path / "pre" / "config.json").read_text())
    loaded = load_mllm(tmp_path / "pre")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert llm_fingerprint(loaded) == llm_fingerprint(model)
    with torch.no_grad():
        model.language_model.lm_head.weight[0, 0] += 1
    with pytest.raises(ValueError, match="differs from data/m0"):
        save_mllm(model, tmp_path / "bad", llm_from_m0=True)
    save_mllm(model, tmp_path / "half", dtype=torch.float16)
    half = load_mllm(tmp_path / "half")
    assert torch.equal(half.language_model.lm_head.weight, model.language_model.lm_head.weight.half().float())
    (tmp_path / "pre" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_mllm(tmp_path / "pre")


@pytest.mark.skipif(not (PREALIGN_DIR / "manifest.json").is_file(), reason="data/prealign not built yet")
def test_the_shipped_prealigned_model_has_m0_as_its_llm():
    manifest = json.loads((PREALIGN_DIR / "manifest.json").read_text())
    model = load_mllm(PREALIGN_DIR)
    m0, _ = load_m0()
    assert all(torch.equal(model.language_model.state_dict()[k], v) for k, v in m0.state_dict().items())
    assert manifest["llm_bit_identical_to_m0"] is True
    assert manifest["parameters"]["llm"]["trainable"] == 0
    m0_heldout = json.loads((PREALIGN_DIR.parent / "m0" / "manifest.json").read_text())["metrics"]["heldout"]
    for key in ("exact_match", "answer_nll"):                 # T2T knowledge unchanged, by construction
        assert manifest["metrics"]["t2t"][key] == m0_heldout[key]
