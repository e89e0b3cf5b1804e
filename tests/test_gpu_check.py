"""fac_mini.released.gpu_check: the 8B GPU check's code path on a tiny config on CPU, its id mapping and its errors; the
real 8B run when a CUDA GPU is present."""
import json

import numpy as np
import pytest
import torch

from fac_mini.released import gpu_check
from fac_mini.released.gpu_check import (RELEASED_SPECIAL_IDS, build_random_model, main, released_input_ids,
                                         run_gpu_check, synthetic_speech, tiny_config)
from fac_mini.model import FunAudioChatConfig
from fac_mini.released.processing import FunAudioChatProcessor
from fac_mini.tokenizer import load_tokenizer

KEYS = {"mode", "device", "device_name", "torch", "dtype", "parameters", "weights_gb", "build_s", "audio_s",
        "prompt_tokens", "audio_tokens", "processor_s", "warmup_s", "time_to_first_token_s", "s2t_text_tokens",
        "s2t_total_s", "s2t_text_tokens_per_s", "s2m_steps", "s2m_total_s", "s2m_steps_per_s", "s2m_speech_s_per_s",
        "s2m_rtf", "s2m_speech_groups", "s2m_speech_ended", "peak_memory_gb", "peak_memory_kind", "total_s"}


def test_tiny_config_has_the_released_ids_and_vocabularies():
    tiny, released = tiny_config(), FunAudioChatConfig.released_8b()
    for name in ("audio_token_index", "audio_bos_index", "audio_eos_index", "sil_index", "text_pad_token_id",
                 "text_eos_token_id"):
        assert getattr(tiny, name) == getattr(released, name)
    assert tiny.text_config.vocab_size == 151936 and tiny.discrete == released.discrete
    assert tiny.text_config.hidden_size == tiny.audio_config.output_dim == 64


def test_released_input_ids_keep_the_chat_layout():
    tokenizer = load_tokenizer()
    inputs = FunAudioChatProcessor(tokenizer)(audio=synthetic_speech(1.0), task="s2m")
    before = inputs["input_ids"].clone()
    ids = released_input_ids(inputs["input_ids"], tokenizer)
    assert torch.equal(inputs["input_ids"], before)                                   # input untouched
    assert ids.shape == before.shape
    assert (ids == RELEASED_SPECIAL_IDS["<|AUDIO|>"]).sum() == (before == 3).sum() == 5      # 1 s -> 5 groups
    row = ids[0].tolist()
    assert row[0] == RELEASED_SPECIAL_IDS["<|im_start|>"] and row[-1] != RELEASED_SPECIAL_IDS["<|im_end|>"]
    assert row.count(RELEASED_SPECIAL_IDS["<|im_end|>"]) == 2 and row.count(RELEASED_SPECIAL_IDS["<|audio_bos|>"]) == 1
    ordinary = before >= len(gpu_check.RELEASED_SPECIAL_IDS)
    assert torch.equal(ids[ordinary], before[ordinary])                               # BPE ids kept


def test_synthetic_speech_is_deterministic():
    first, second = synthetic_speech(0.5, seed=3), synthetic_speech(0.5, seed=3)
    assert first.dtype == np.float32 and first.shape == (8000,) and np.array_equal(first, second)
    assert 0.05 < np.abs(first).max() < 1.0
    with pytest.raises(ValueError):
        synthetic_speech(0)


def test_build_random_model_allocates_in_the_requested_dtype():
    model = build_random_model(tiny_config(), "cpu", torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32                                  # restored
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers())                      # RoPE, sinusoids
    assert model.audio_invert_tower.lm_head.weight is model.audio_tower.embed_tokens.weight
    assert not model.training


@pytest.mark.bf16_cpu
def test_tiny_run_on_cpu_reports_every_measurement():
    result = run_gpu_check(tiny=True, audio_seconds=2.0, s2t_tokens=6, s2m_steps=8)
    assert set(result) == KEYS
    assert result["mode"] == "tiny" and result["device"] == "cpu" and result["dtype"] == "bfloat16"
    assert result["audio_tokens"] == 10 and result["audio_s"] == 2.0                 # 5 <|AUDIO|> per second
    assert result["s2t_text_tokens"] == 6 and result["s2m_steps"] == 8
    assert 0 < result["s2m_speech_groups"] <= 7                                       # step 0 emits <|audio_bos|>
    assert result["s2m_speech_s_per_s"] == pytest.approx(result["s2m_steps_per_s"] / 5, rel=1e-2)
    for key in ("build_s", "time_to_first_token_s", "s2t_text_tokens_per_s", "s2m_steps_per_s", "peak_memory_gb"):
        assert result[key] > 0, key


def test_main_prints_one_json_object(capsys):
    assert main(["--tiny", "--audio-seconds", "1", "--s2t-tokens", "3", "--s2m-steps", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == KEYS and result["audio_tokens"] == 5


def test_errors_are_clear(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["--device", "cpu"]) == 2
    assert "--tiny" in capsys.readouterr().err
    assert main(["--tiny", "--s2m-steps", "1"]) == 2
    assert "s2m_steps >= 2" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_8b_check_on_gpu():
    result = run_gpu_check()
    assert result["mode"] == "8b" and result["dtype"] == "bfloat16"
    assert abs(result["parameters"] / 1e9 - 9.42) < 0.01 and abs(result["weights_gb"] - 18.85) < 0.05
    assert result["audio_tokens"] == 150 and result["s2t_text_tokens"] >= 2 and result["s2m_steps"] >= 2
    assert result["weights_gb"] <= result["peak_memory_gb"] < 24                     # the release quotes ~24 GB
    assert result["total_s"] < 300
