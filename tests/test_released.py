"""fac_mini.released: the released config and size, loading/saving the released layout, and parity with the
official implementation on a tiny checkpoint it saved (tests/fixtures/released_tiny, see its README)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from released_tiny import BATCHES, CHECKPOINT, FIXTURE

from fac_mini.model import FunAudioChat, FunAudioChatConfig
from fac_mini.released import (INDEX_NAME, RELEASED_UNCONFIRMED, SINGLE_FILE_NAME, build_on_meta, count_parameters,
                               load_released, parse_size, released_config, save_released)
from fac_mini.released.load_benchmark import bench_load

TIED = ("audio_tower.embed_tokens.weight", "audio_invert_tower.lm_head.weight")
LOGITS_TOLERANCE, LOSS_TOLERANCE = 1e-4, 1e-5


EXPECTED = load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def official():
    """The fixture checkpoint (saved by the official code) loaded by load_released."""
    return load_released(CHECKPOINT)


def _fixture_config() -> FunAudioChatConfig:
    return FunAudioChatConfig.from_dict(json.loads((CHECKPOINT / "config.json").read_text()))


def _run(model, batch):
    with torch.no_grad():
        return model(**{key: value.clone() for key, value in batch.items()})


def _copy_checkpoint(tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, target)
    return target


# ----------------------------------------------------------------------------------------------------------
# Parity with the official implementation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train", "train_notext", "infer", "infer_left"])
def test_parity_with_official_implementation(official, name):
    batch = BATCHES[name]
    frozen = {key: value.clone() for key, value in batch.items()}
    with torch.no_grad():
        out = official(**batch)
    for key, value in batch.items():                          # the caller's tensors are never modified
        assert torch.equal(value, frozen[key]), key
    text, speech = EXPECTED[f"{name}.text_logits"], EXPECTED[f"{name}.speech_logits"]
    assert out.text_logits.shape == text.shape and out.speech_logits.shape == speech.shape
    text_diff = (out.text_logits - text).abs()
    speech_diff = (out.speech_logits - speech).abs()
    if name == "infer_left":
        # Left padding: official outputs at padded positions depend on the device (see the fixture README).
        real = batch["attention_mask"].bool()
        text_diff, speech_diff = text_diff[real], speech_diff[real.repeat_interleave(5, dim=1)]
    assert text_diff.max() <= LOGITS_TOLERANCE, f"text logits differ by {text_diff.max():.3g}"
    assert speech_diff.max() <= LOGITS_TOLERANCE, f"speech logits differ by {speech_diff.max():.3g}"
    for loss in ("loss", "text_loss", "speech_loss"):
        if f"{name}.{loss}" in EXPECTED:
            value = getattr(out, loss)
            assert value is not None, loss
            assert abs(value.item() - EXPECTED[f"{name}.{loss}"].item()) <= LOSS_TOLERANCE, loss
        else:
            assert getattr(out, loss) is None


def test_integer_and_bool_masks_give_the_same_outputs(official):
    batch = BATCHES["train"]
    masks = ("attention_mask", "speech_attention_mask", "feature_attention_mask", "feature_exist_mask",
             "text_attention_mask")
    as_int = {**batch, **{key: batch[key].long() for key in masks}}
    as_bool = {**batch, **{key: batch[key].bool() for key in masks}}
    first, second = _run(official, as_int), _run(official, as_bool)
    assert torch.equal(first.text_logits, second.text_logits)
    assert torch.equal(first.speech_logits, second.speech_logits)
    assert torch.equal(first.loss, second.loss)
    with pytest.raises(ValueError, match="feature_exist_mask"):
        _run(official, {**batch, "feature_exist_mask": torch.tensor([2, 0, 1, 0])})


# ----------------------------------------------------------------------------------------------------------
# What load_released returns
# ----------------------------------------------------------------------------------------------------------
def test_fixture_layout_and_loaded_model(official):
    index = json.loads((CHECKPOINT / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 5
    assert TIED[0] in index["weight_map"] and TIED[1] not in index["weight_map"]   # dropped by save_pretrained
    assert not official.training
    assert official.audio_invert_tower.lm_head.weight is official.audio_tower.embed_tokens.weight
    tensors = [*official.named_parameters(), *official.named_buffers()]
    assert not [name for name, tensor in tensors if tensor.is_meta]
    assert all(tensor.device.type == "cpu" for _, tensor in tensors)
    assert all(parameter.dtype == torch.float32 for parameter in official.parameters())


def test_loaded_model_equals_a_normally_constructed_one(tmp_path):
    torch.manual_seed(3)
    model = FunAudioChat(_fixture_config()).eval()          # normal construction: real init, real buffers
    save_released(model, tmp_path, max_shard_size="60KB")
    loaded = load_released(tmp_path)
    for name, buffer in model.named_buffers():               # recomputed after the meta construction
        assert torch.equal(loaded.get_buffer(name), buffer), name
    for batch in ("train", "infer"):
        expected, got = _run(model, BATCHES[batch]), _run(loaded, BATCHES[batch])
        assert torch.equal(got.text_logits, expected.text_logits)
        assert torch.equal(got.speech_logits, expected.speech_logits)
        if expected.loss is not None:
            assert torch.equal(got.loss, expected.loss)


@pytest.mark.parametrize("max_shard_size", ["1GB", 50_000])
def test_save_load_round_trip_is_bitwise(official, tmp_path, max_shard_size):
    first, second = tmp_path / "first", tmp_path / "second"
    save_released(official, first, max_shard_size=max_shard_size)
    single = max_shard_size == "1GB"
    assert (first / SINGLE_FILE_NAME).exists() == single and (first / INDEX_NAME).exists() == (not single)
    stored = {}
    for file in first.glob("*.safetensors"):
        stored.update(load_file(str(file)))
    assert TIED[1] not in stored and TIED[0] in stored
    loaded = load_released(first, dtype=None)
    reference = official.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
    assert loaded.audio_invert_tower.lm_head.weight is loaded.audio_tower.embed_tokens.weight
    save_released(loaded, second, max_shard_size=max_shard_size)             # saving again: the same bytes
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_saved_config_has_only_released_keys_unless_fusion_differs(tmp_path):
    import dataclasses

    torch.manual_seed(4)
    model = FunAudioChat(_fixture_config())
    save_released(model, tmp_path / "average")
    assert "speech_text_fusion" not in json.loads((tmp_path / "average" / "config.json").read_text())
    summed = FunAudioChat(dataclasses.replace(_fixture_config(), speech_text_fusion="sum"))
    save_released(summed, tmp_path / "sum")                  # a course variant keeps its marker, so it round-trips
    assert json.loads((tmp_path / "sum" / "config.json").read_text())["speech_text_fusion"] == "sum"
    assert load_released(tmp_path / "sum").config.speech_text_fusion == "sum"
    assert load_released(tmp_path / "average").config.speech_text_fusion == "average"


def test_save_replaces_an_earlier_layout(official, tmp_path):
    save_released(official, tmp_path, max_shard_size=50_000)
    save_released(official, tmp_path, max_shard_size="1GB")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", SINGLE_FILE_NAME]
    assert torch.equal(load_released(tmp_path).language_model.lm_head.weight, official.language_model.lm_head.weight)


@pytest.mark.bf16_cpu
def test_bfloat16_load(official, tmp_path):
    loaded = load_released(CHECKPOINT, dtype=torch.bfloat16)
    assert all(parameter.dtype == torch.bfloat16 for parameter in loaded.parameters())
    assert all(buffer.dtype == torch.float32 for buffer in loaded.buffers())    # RoPE/sinusoid tables stay fp32
    assert loaded.audio_invert_tower.lm_head.weight is loaded.audio_tower.embed_tokens.weight
    for name, parameter in official.named_parameters():
        assert torch.equal(loaded.get_parameter(name), parameter.to(torch.bfloat16)), name
    got, reference = _run(loaded, BATCHES["train"]), _run(official, BATCHES["train"])
    assert got.text_logits.dtype == torch.bfloat16 and torch.isfinite(got.speech_logits).all()
    assert (got.text_logits.float() - reference.text_logits).abs().max() < 0.5
    save_released(loaded, tmp_path)                                          # bf16 round trip, bitwise
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_released(tmp_path, dtype=None)
    for key, tensor in again.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, loaded.state_dict()[key]), key


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------
def _edit_shard(directory: Path, edit, anchor: str = "continuous_audio_tower.conv1.weight") -> None:
    """Apply edit(tensors) to the shard holding ``anchor`` and update the index to match."""
    index_path = directory / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][anchor]
    tensors = load_file(str(directory / shard))
    edit(tensors)
    save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    index["weight_map"] = {key: file for key, file in index["weight_map"].items() if file != shard}
    index["weight_map"].update({key: shard for key in tensors})
    index_path.write_text(json.dumps(index))


def test_key_problems_are_reported_together(tmp_path):
    directory = _copy_checkpoint(tmp_path)

    def edit(tensors):
        victim = next(key for key in tensors if key != "continuous_audio_tower.conv1.weight")
        tensors.pop(victim)
        edit.missing = victim
        tensors["continuous_audio_tower.conv1.weight"] = torch.zeros(7, 128, 3)           # wrong shape
        tensors["language_model.model.surprise.weight"] = torch.zeros(3)                 # unexpected
        tensors["language_model.model.rotary_emb.inv_freq"] = torch.zeros(4)             # known unused: fine

    _edit_shard(directory, edit)
    with pytest.raises(ValueError) as caught:
        load_released(directory)
    message = str(caught.value)
    for expected in ("missing tensors (1)", edit.missing, "unexpected tensors (1)",
                     "language_model.model.surprise.weight", "tensors with the wrong shape (1)",
                     "continuous_audio_tower.conv1.weight: [7, 128, 3]", "model expects [16, 128, 3]"):
        assert expected in message, expected
    assert "inv_freq" not in message


def test_index_and_shard_disagreeing_is_an_error(tmp_path):
    directory = _copy_checkpoint(tmp_path)
    index = json.loads((directory / INDEX_NAME).read_text())
    key = "language_model.lm_head.weight"
    other = next(file for file in set(index["weight_map"].values()) if file != index["weight_map"][key])
    index["weight_map"][key] = other
    (directory / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{key} \\(index: {other}, but not in that file\\)"):
        load_released(directory)


@pytest.mark.parametrize("keep", [0.5, -1])
def test_truncated_shard_names_the_file(tmp_path, keep):
    directory = _copy_checkpoint(tmp_path)
    shard = directory / "model-00003-of-00005.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)] if keep > 0 else data[:keep])
    with pytest.raises(ValueError, match="model-00003-of-00005.safetensors"):
        load_released(directory)


def test_missing_shard_is_file_not_found(tmp_path):
    directory = _copy_checkpoint(tmp_path)
    (directory / "model-00004-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00004-of-00005.safetensors"):
        load_released(directory)


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_released(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_released(tmp_path)
    directory = _copy_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_audio"}))
    with pytest.raises(ValueError, match="model_type 'qwen2_audio'"):
        load_released(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_released(directory)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_released(directory)
    with pytest.raises(ValueError, match="dtype"):
        load_released(CHECKPOINT, dtype=torch.int64)


def test_a_stored_srh_head_must_equal_the_speech_table(tmp_path):
    directory = _copy_checkpoint(tmp_path)
    table = load_file(str(directory / json.loads((directory / INDEX_NAME).read_text())["weight_map"][TIED[0]]))[TIED[0]]
    _edit_shard(directory, lambda tensors: tensors.__setitem__(TIED[1], table.clone()))
    model = load_released(directory)                                    # equal: accepted and tied
    assert model.audio_invert_tower.lm_head.weight is model.audio_tower.embed_tokens.weight
    _edit_shard(directory, lambda tensors: tensors.__setitem__(TIED[1], table + 1))
    with pytest.raises(ValueError, match="audio_invert_tower.lm_head.weight differs from audio_tower.embed_tokens"):
        load_released(directory)


# ----------------------------------------------------------------------------------------------------------
# The released configuration and its size
# ----------------------------------------------------------------------------------------------------------
def test_released_config():
    config = released_config()
    assert config["model_type"] == "funaudiochat" and config["audio_token_index"] == 151669
    assert config["architectures"] == ["FunAudioChatForConditionalGeneration"]
    audio, text = config["audio_config"], config["text_config"]
    assert (audio["bos_token_id"], audio["eos_token_id"], audio["pad_token_id"], audio["codebook_size"]) == \
        (6561, 6562, 6563, 6565)
    assert (audio["d_model"], audio["encoder_layers"], audio["output_dim"], audio["group_size"]) == (1280, 32, 4096, 5)
    assert audio["continuous_features_mode"] == "replace" and audio["enable_audio_invert_tower"] is True
    crq = audio["crq_transformer_config"]
    assert (crq["hidden_size"], crq["num_hidden_layers"], crq["head_dim"], crq["rope_theta"]) == (1024, 28, 128, 1e6)
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"], text["rope_theta"]) == \
        (4096, 36, 151936, 5e6)
    assert (text["audio_bos_index"], text["audio_eos_index"], text["sil_index"]) == (151670, 151671, 151673)
    assert text["tie_word_embeddings"] is False
    assert FunAudioChatConfig.from_dict(config) == FunAudioChatConfig.released_8b()
    for dotted in RELEASED_UNCONFIRMED:                                  # every caveat names a real field
        value = config
        for part in dotted.split("."):
            value = value[part]


def test_count_parameters_reproduces_the_released_split():
    counts = count_parameters()
    hidden, codebook, group = 4096, 6565, 5
    assert counts["audio_tower"] == codebook * hidden + 2 * hidden * hidden
    crq = counts["audio_invert_tower"] - (group * hidden * hidden + group * hidden + 2 * 1024 * hidden)
    assert crq == 28 * (1024 * 2048 * 2 + 1024 * 1024 * 2 + 2 * 128 + 3 * 1024 * 3072 + 2 * 1024) + 1024
    assert abs(counts["language_model"] / 1e9 - 8.19) < 0.01
    assert abs(counts["continuous_audio_tower"] / 1e9 - 0.640) < 0.002
    assert abs(counts["audio_tower"] / 1e9 - 0.060) < 0.001
    assert abs(counts["audio_invert_tower"] / 1e9 - 0.533) < 0.001       # the tied lm_head is not counted twice
    assert abs(counts["total"] / 1e9 - 9.42) < 0.01
    assert counts["total"] == sum(value for key, value in counts.items() if key != "total")
    model = build_on_meta(_fixture_config())
    assert count_parameters(_fixture_config())["total"] == sum(p.numel() for p in model.parameters())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 * 2 ** 30 and parse_size(1234) == 1234
    assert parse_size("500MB") == 500 * 10 ** 6 and parse_size("1.5KB") == 1500
    for bad in ("five", "-1GB", 0, "3XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_bench_load_measures_a_fresh_process(tmp_path):
    result = bench_load(dtype="float32", cache_dir=tmp_path, config=_fixture_config())
    assert result["within_bound"] and result["shards"] >= 1 and result["built_now"]
    assert 0 < result["checkpoint_bytes"] < 10 ** 6 and result["peak_rss_gb"] >= result["rss_before_load_gb"] > 0
    assert bench_load(dtype="float32", cache_dir=tmp_path, config=_fixture_config())["built_now"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_onto_gpu_keeps_parity():
    model = load_released(CHECKPOINT, device="cuda")
    assert all(parameter.is_cuda for parameter in model.parameters())
    batch = {key: value.cuda() for key, value in BATCHES["train"].items()}
    out = _run(model, batch)
    assert (out.text_logits.cpu() - EXPECTED["train.text_logits"]).abs().max() <= LOGITS_TOLERANCE
    assert (out.speech_logits.cpu() - EXPECTED["train.speech_logits"]).abs().max() <= LOGITS_TOLERANCE
    assert abs(out.loss.item() - EXPECTED["train.loss"].item()) <= LOSS_TOLERANCE
