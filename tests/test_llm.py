"""fac_mini.llm against transformers' Qwen3 (same random weights, tiny config, rope θ set explicitly)."""
import pytest
import torch

from fac_mini.llm import (KVCache, LLMConfig, Qwen3ForCausalLM, Qwen3Model, generate, generate_greedy,
                          llm_config_from_hf, process_logits, sample_next_token)

transformers = pytest.importorskip("transformers")

# Attention inner width (4 heads x 16) differs from hidden 32, GQA 2 query heads per kv head, θ = 1e6.
TINY = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                 max_position_embeddings=256)
# Largest logit difference allowed between two float32 computations of the same model (ours vs transformers, a
# padded batch vs each row alone, cached vs full). They sum the same products in different orders (other kernels,
# and blocking that depends on the shapes and on the SIMD width: AVX2 vs AVX-512), and float32 rounds each sum by
# up to n·2^-24 of its absolute terms: for the last projection alone (32 terms of ~1 x 0.3) that is ~2e-5 on logits
# up to |7|. Measured: up to 1.0e-5 (padded vs alone, AVX2 kernels; 4e-6 otherwise). A real bug is far above:
# dropping the padding mask moves the logits by 7.
TOL = 5e-5


def _hf_model(config: LLMConfig, seed: int = 0):
    """A transformers Qwen3ForCausalLM with non-trivial random weights (norm weights too), eager attention."""
    hf_config = transformers.Qwen3Config(**config.to_hf_dict(), attn_implementation="eager")
    assert hf_config.rope_parameters["rope_theta"] == config.rope_theta
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3)
    return hf


@pytest.fixture(scope="module")
def pair():
    hf = _hf_model(TINY)
    ours = Qwen3ForCausalLM(TINY).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def _left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(1, TINY.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def test_state_dict_names_equal_transformers(pair):
    ours, hf = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "model.layers.0.self_attn.q_norm.weight" in ours.state_dict()


@torch.no_grad()
def test_logits_equal_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, TINY.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL, diff


@torch.no_grad()
def test_padded_batch_equals_transformers_and_unpadded_rows(pair):
    ours, hf = pair
    ids, mask, positions = _left_padded_batch()
    mine = ours(ids, attention_mask=mask, position_ids=positions).logits
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    assert (mine[valid] - ref[valid]).abs().max().item() <= TOL
    for row in range(ids.shape[0]):                     # padding changes nothing for the real tokens
        alone = ours(ids[row:row + 1, valid[row]]).logits[0]
        assert (alone - mine[row, valid[row]]).abs().max().item() <= TOL


@torch.no_grad()
def test_loss_equals_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, TINY.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100
    ref = hf(input_ids=ids, labels=labels).loss
    assert abs(ours(ids, labels=labels).loss.item() - ref.item()) <= TOL


@torch.no_grad()
def test_tied_embeddings_load_and_match():
    tied = LLMConfig(**{**TINY.to_dict(), "tie_word_embeddings": True})
    hf = _hf_model(tied, seed=3)
    ours = Qwen3ForCausalLM(tied).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.arange(10)[None] % tied.vocab_size
    assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= TOL


@torch.no_grad()
def test_cached_incremental_decoding_equals_full_recomputation(pair):
    ours, _ = pair
    ids, mask, positions = _left_padded_batch()
    full = ours(ids, attention_mask=mask, position_ids=positions).logits          # (B, T, V)
    cache = ours.new_cache()
    pieces = [ours(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], cache=cache).logits]
    for t in range(5, ids.shape[1]):
        pieces.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                           cache=cache).logits)
    assert cache.seq_length == ids.shape[1]
    incremental = torch.cat(pieces, dim=1)
    valid = mask.bool()
    assert (incremental[valid] - full[valid]).abs().max().item() <= TOL


@torch.no_grad()
def test_greedy_tokens_identical_to_transformers_generate(pair):
    ours, hf = pair
    ids, mask, _ = _left_padded_batch()
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                      pad_token_id=0, eos_token_id=None)
    mine = generate_greedy(ours, ids, 8, attention_mask=mask)
    assert torch.equal(mine, ref)


@torch.no_grad()
def test_eos_stops_rows_and_pads(pair):
    ours, _ = pair
    ids = torch.randint(1, TINY.vocab_size, (2, 4), generator=torch.Generator().manual_seed(4))
    free = generate_greedy(ours, ids, 6)
    eos = int(free[0, 5])                                   # the second token row 0 generates
    out = generate_greedy(ours, ids, 6, eos_token_id=eos, pad_token_id=0)
    first_eos = (out[0, 4:] == eos).nonzero()[0, 0] + 4
    assert (out[0, first_eos + 1:] == 0).all()


def test_process_logits_equals_transformers_processors():
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    history = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(6))
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                                      TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    ref = processors(history, logits.clone())
    before = logits.clone()
    mine = process_logits(logits, history, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    assert torch.equal(logits, before)
    assert torch.equal(torch.isinf(mine), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert (mine[finite] - ref[finite]).abs().max().item() <= 1e-6


@torch.no_grad()
def test_sampling_is_reproducible_and_degenerates_to_greedy(pair):
    ours, _ = pair
    ids = torch.randint(0, TINY.vocab_size, (2, 3), generator=torch.Generator().manual_seed(7))

    def draw(seed, **kw):
        return generate(ours, ids, 5, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(0, temperature=1.5), draw(0, temperature=1.5))
    greedy = generate_greedy(ours, ids, 5)
    assert torch.equal(draw(1, top_k=1), greedy)
    assert torch.equal(draw(2, top_p=1e-6), greedy)


def test_config_from_transformers_and_dict():
    hf_config = transformers.Qwen3Config(**TINY.to_hf_dict())
    assert llm_config_from_hf(hf_config) == TINY
    legacy = {**TINY.to_hf_dict(), "rope_theta": 5e6}                  # transformers 4.x style key
    del legacy["rope_parameters"], legacy["head_dim"]
    cfg = llm_config_from_hf(legacy)
    assert cfg.rope_theta == 5e6 and cfg.head_dim == TINY.hidden_size // TINY.num_attention_heads
    with pytest.raises(ValueError, match="rope_type"):
        llm_config_from_hf({**TINY.to_hf_dict(), "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})
    with pytest.raises(ValueError, match="rope_theta"):
        llm_config_from_hf({k: v for k, v in TINY.to_hf_dict().items() if k != "rope_parameters"})
    with pytest.raises(ValueError, match="lacks"):
        llm_config_from_hf({"hidden_size": 8})


def test_model_without_embedding_table():
    body = Qwen3Model(TINY, with_embeddings=False)
    assert not any(k.startswith("embed_tokens") for k in body.state_dict())
    assert body(inputs_embeds=torch.randn(1, 4, TINY.hidden_size)).shape == (1, 4, TINY.hidden_size)
    with pytest.raises(ValueError, match="no embedding table"):
        body(torch.zeros(1, 4, dtype=torch.long))


def test_bad_inputs_raise(pair):
    ours, _ = pair
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        ours(ids, inputs_embeds=torch.randn(2, 5, TINY.hidden_size))
    with pytest.raises(ValueError, match="exactly one"):
        ours()
    with pytest.raises(ValueError, match="integer tensor"):
        ours(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        ours(ids + TINY.vocab_size)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        ours(inputs_embeds=torch.randn(2, 5, TINY.hidden_size + 1))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="position_ids must be"):
        ours(ids, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="labels must be"):
        ours(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="cache has"):
        ours(ids, cache=KVCache(5))
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(torch.randn(1, 5), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="multiple of"):
        LLMConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="positive int"):
        LLMConfig(hidden_size=0)


@torch.no_grad()
def test_inputs_not_mutated(pair):
    ours, _ = pair
    ids, mask, positions = _left_padded_batch()
    embeds = torch.randn(3, 9, TINY.hidden_size)
    copies = [t.clone() for t in (ids, mask, positions, embeds)]
    ours(ids, attention_mask=mask, position_ids=positions)
    ours(inputs_embeds=embeds, attention_mask=mask)
    generate_greedy(ours, ids, 2, attention_mask=mask)
    for original, copy in zip((ids, mask, positions, embeds), copies):
        assert torch.equal(original, copy)


def test_multimodal_rope_on_text_positions_is_plain_rope():
    """A Qwen3-VL text config (MRoPE sections, interleaved) loads as plain RoPE, and transformers' Qwen3-VL rotary
    embedding gives exactly our cos/sin when the time/height/width position ids are equal (text-only input)."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from fac_mini.llm import RotaryEmbedding

    hf = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=2, head_dim=32, num_key_value_heads=1,
                           intermediate_size=64, num_hidden_layers=1, vocab_size=32,
                           rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                            "mrope_interleaved": True})
    config = llm_config_from_hf(hf)
    assert config.rope_theta == 5e6 and config.head_dim == 32
    positions = torch.arange(300)[None]
    expected = Qwen3VLTextRotaryEmbedding(hf)(torch.zeros(1, 300, 32), positions)
    got = RotaryEmbedding(config.head_dim, config.rope_theta)(positions, torch.float32)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    spatial = torch.stack([positions, torch.full_like(positions, 5), positions])        # an image grid: differs
    assert not torch.allclose(Qwen3VLTextRotaryEmbedding(hf)(torch.zeros(1, 300, 32), spatial)[0], expected[0])
    legacy = {**TINY.to_hf_dict(), "rope_parameters": {"type": "mrope", "mrope_section": [2, 1, 1], "rope_theta": 1e6}}
    assert llm_config_from_hf(legacy).rope_theta == 1e6
