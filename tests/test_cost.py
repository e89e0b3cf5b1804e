"""fac_mini.cost against brute-force counts and a real transformers model."""
import torch
import pytest

from fac_mini.cost import QWEN3_8B, attention_flops, kv_cache_bytes, linear_flops, speech_tokens


def test_speech_tokens_rounding_and_errors():
    assert speech_tokens(360, 25) == 9000 and speech_tokens(360, 25, 5) == 1800
    assert speech_tokens(0.04, 25) == 1 and speech_tokens(0.041, 25) == 2 and speech_tokens(0.04, 25, 5) == 1
    assert speech_tokens(0, 25) == 0
    with pytest.raises(ValueError, match="group_size >= 1"):
        speech_tokens(1.0, 25, 0)


def test_attention_flops_counts_causal_multiply_adds():
    layers, dim, T = 3, 8, 7
    multiply_adds = sum((i + 1) * dim for i in range(T))       # query i meets keys 0..i, once for QK and once for AV
    assert attention_flops(T, layers, dim) == layers * 2 * 2 * multiply_adds


def test_kv_cache_bytes_equals_real_cache_tensors():
    layers, T, kv_heads, head_dim = 2, 5, 3, 4
    keys = [torch.zeros(1, kv_heads, T, head_dim, dtype=torch.bfloat16) for _ in range(layers)]
    values = [torch.zeros_like(k) for k in keys]
    real = sum(t.numel() * t.element_size() for t in keys + values)
    assert kv_cache_bytes(T, layers, kv_heads, head_dim, 2) == real
    assert linear_flops(10, 100) == 2000


def test_qwen3_8b_non_embedding_parameters_match_transformers():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert total - embeddings == QWEN3_8B.non_embedding_parameters
    assert abs(total / 1e9 - 8.19) < 0.01
