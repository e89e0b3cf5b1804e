"""fac_mini.srh: released Speech Refined Head semantics (teacher forcing vs cached generation) and the baseline."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fac_mini.llm import LLMConfig
from fac_mini.srh import ParallelSpeechHead, SpeechRefinedHead, speech_loss, teacher_forcing_ids

H, C, K = 16, 13, 5                     # LLM width, codebook (10 codes + bos/eos/pad), group size
BOS, PAD = 10, 12
CRQ = LLMConfig(vocab_size=1, hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, rope_theta=1e6, max_position_embeddings=512)
TOL = 1e-5


def _randomize(module: nn.Module, seed: int) -> None:
    """Non-trivial weights (init std 0.02 gives near-uniform logits and near-ties for argmax)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else 0.5 * noise)


def _head(seed: int = 0) -> SpeechRefinedHead:
    table = nn.Embedding(C, H)                           # the speech table the head is tied to (audio_tower)
    head = SpeechRefinedHead(H, CRQ, codebook_size=C, group_size=K, bos_id=BOS, pad_id=PAD, speech_embedding=table)
    _randomize(head, seed)
    return head.eval()


def _fixed_inputs(length: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, H, generator=generator), torch.randn(1, length, H, generator=generator)


def test_state_dict_names_and_shapes_as_released():
    head = _head()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes["pre_matching.weight"] == (K * H, H) and shapes["pre_matching.bias"] == (K * H,)
    assert shapes["input_matching.weight"] == (CRQ.hidden_size, H)
    assert shapes["output_matching.weight"] == (H, CRQ.hidden_size)
    assert shapes["lm_head.weight"] == (C, H)
    assert shapes["crq_transformer.layers.1.self_attn.q_norm.weight"] == (CRQ.head_dim,)
    assert shapes["crq_transformer.norm.weight"] == (CRQ.hidden_size,)
    assert not any(k.startswith("crq_transformer.embed_tokens") for k in shapes)
    assert [k for k in shapes if k.endswith("bias")] == ["pre_matching.bias"]


@torch.no_grad()
def test_crq_transformer_equals_transformers_qwen3model():
    transformers = pytest.importorskip("transformers")
    reference = transformers.Qwen3Model(transformers.Qwen3Config(**CRQ.to_hf_dict(), attn_implementation="eager"))
    _randomize(reference, seed=2)
    reference.eval()
    head = _head()
    weights = {k: v for k, v in reference.state_dict().items() if not k.startswith("embed_tokens")}
    head.crq_transformer.load_state_dict(weights, strict=True)
    embeds = torch.randn(2, 10, CRQ.hidden_size, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0                                                      # right padding
    mine = head.crq_transformer(inputs_embeds=embeds, attention_mask=mask)
    ref = reference(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert (mine[valid] - ref[valid]).abs().max().item() <= TOL


def _generate(head, hidden, text, prefill_len, **sampling):
    """Prefill with the first ``prefill_len`` LLM positions, then one call per remaining position."""
    state = head.new_state()
    steps = [head.generate_step(hidden[:, :prefill_len], state, text[:, :prefill_len], **sampling)]
    for p in range(prefill_len, hidden.shape[1]):
        steps.append(head.generate_step(hidden[:, p:p + 1], state, text[:, p:p + 1], **sampling))
    return steps, state


@torch.no_grad()
def test_teacher_forced_argmax_reproduces_greedy_generation():
    """Teacher forcing, fed the tokens that greedy generation produced, must predict exactly those tokens.

    Generation over LLM positions 0..P−1 (prefill of L0 positions, then one per call) yields groups G_0..G_N
    (G_0 from the prefill's last position). In 25 Hz terms, position j = k·p + s was fed U_j + emb(previous
    token), with previous = bos for every prefill position up to k·(L0−1), then the running sampled sequence.
    Teacher forcing feeds U_j + emb(label[j + k − 1]) and predicts label[j + k]. Both coincide when
    label = [bos group] × L0 + G_0 + ... + G_N over P + 1 LLM positions: the L0 bos groups play the prefill's
    broadcast bos (as the released training data's leading <|audio_bos|> groups do), and the extra last LLM
    position keeps the −(k−1) roll from wrapping into the compared positions. Then the teacher-forced logits
    at positions k·(L0−1) .. k·P − 1 equal the generation's logits and their argmax equals G_0..G_N.
    """
    head = _head()
    prefill_len, total = 3, 6
    hidden, text = _fixed_inputs(total + 1)                          # one extra position for teacher forcing
    steps, _ = _generate(head, hidden[:, :total], text[:, :total], prefill_len)   # greedy (argmax)
    generated = torch.cat([s.tokens for s in steps], dim=1)          # (1, k·(N + 1))
    labels = torch.cat((torch.full((1, K * prefill_len), BOS), generated), dim=1)  # (1, k·(total + 1))
    assert labels.shape[1] == K * (total + 1)
    forced = head(hidden, labels, text_embeds=text).logits          # (1, k·(total + 1), C)
    compared = forced[:, K * (prefill_len - 1):K * total]
    assert torch.equal(compared.argmax(-1), generated)
    sampled_logits = torch.cat([s.logits for s in steps], dim=1)
    assert (compared - sampled_logits).abs().max().item() <= TOL


@torch.no_grad()
def test_kv_cached_generation_equals_uncached_recomputation():
    """Cached sampling (with temperature, top-p, repetition penalty) vs one uncached pass over the same inputs."""
    head = _head(seed=4)
    prefill_len, total = 2, 5
    hidden, text = _fixed_inputs(total, seed=5)
    sampling = dict(do_sample=True, temperature=1.3, top_p=0.9, repetition_penalty=1.2,
                    generator=torch.Generator().manual_seed(0))
    steps, state = _generate(head, hidden, text, prefill_len, **sampling)
    assert state.cache.seq_length == K * total and state.speech_history.shape == (1, K * (total - prefill_len + 1))
    # rebuild every CRQ input by hand, one piece per sub-step: [U + previous-token embedding] in feeding order
    pieces, previous = [], head.embed_speech(torch.tensor([BOS]))
    calls = [(0, prefill_len)] + [(p, p + 1) for p in range(prefill_len, total)]
    for (start, stop), step in zip(calls, steps):
        inputs = head.ungrouped_inputs(hidden[:, start:stop], text[:, start:stop])       # (1, k·L, H)
        first = inputs.shape[1] - K                                                      # sub-step 0's position
        pieces.append(inputs[:, :first + 1] + previous[:, None])
        for s in range(1, K):
            pieces.append(inputs[:, first + s:first + s + 1] + head.embed_speech(step.tokens[:, s - 1])[:, None])
        previous = head.embed_speech(step.tokens[:, -1])
    full = head.refine(torch.cat(pieces, dim=1))                   # no cache, positions 0 .. k·total − 1
    sampled_at = torch.tensor([p.shape[1] for p in pieces]).cumsum(0) - 1   # each piece's last position
    recomputed = full[:, sampled_at]
    cached = torch.cat([s.logits for s in steps], dim=1)
    assert (recomputed - cached).abs().max().item() <= TOL
    sampling["generator"] = torch.Generator().manual_seed(0)
    again, _ = _generate(head, hidden, text, prefill_len, **sampling)
    assert torch.equal(torch.cat([s.tokens for s in again], 1), torch.cat([s.tokens for s in steps], 1))


@torch.no_grad()
def test_loss_uses_one_group_shift_and_ignores_minus_100():
    head = _head()
    hidden, text = _fixed_inputs(4)
    labels = torch.randint(0, 10, (1, 4 * K), generator=torch.Generator().manual_seed(6))
    labels[0, 3:8] = -100
    out = head(hidden, labels, text_embeds=text)
    targets = labels[0, K:]                                         # logits j vs label j + k
    keep = targets != -100
    manual = F.cross_entropy(out.logits[0, :3 * K][keep], targets[keep])
    assert abs(out.loss.item() - manual.item()) <= 1e-6
    grouped = head(hidden, labels.view(1, 4, K), text_embeds=text)  # (B, L, k) labels mean the same
    assert torch.equal(grouped.logits, out.logits)
    empty = head(hidden, torch.full_like(labels, -100)).loss
    assert empty.item() == 0.0
    assert speech_loss(out.logits, labels, K).item() == out.loss.item()


def test_text_embeddings_are_stop_gradient_and_inputs_not_mutated():
    head = _head()
    hidden, text = _fixed_inputs(3)
    hidden.requires_grad_(True)
    text.requires_grad_(True)
    labels = torch.randint(0, 10, (1, 3 * K))
    copies = (hidden.detach().clone(), text.detach().clone(), labels.clone())
    head(hidden, labels, text_embeds=text).loss.backward()
    assert hidden.grad is not None and text.grad is None
    with torch.no_grad():
        head.generate_step(hidden, head.new_state(), text)
    for original, copy in zip((hidden.detach(), text.detach(), labels), copies):
        assert torch.equal(original, copy)


@torch.no_grad()
def test_padding_and_positions_do_not_change_real_positions():
    head = _head()
    hidden, text = _fixed_inputs(4)
    labels = torch.randint(0, 10, (1, 4 * K), generator=torch.Generator().manual_seed(7))
    plain = head(hidden, labels, text_embeds=text).logits
    explicit = head(hidden, labels, text_embeds=text, position_ids=torch.arange(4)[None]).logits
    assert (plain - explicit).abs().max().item() <= TOL
    batch_hidden = torch.cat((hidden, torch.randn(1, 4, H)))
    batch_labels = torch.cat((labels, labels.masked_fill(torch.arange(4 * K) >= 2 * K, -100)))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = head(batch_hidden, batch_labels, text_embeds=torch.cat((text, torch.randn(1, 4, H))),
                 attention_mask=mask, position_ids=torch.arange(4)[None].repeat(2, 1)).logits
    assert (batch[0] - plain[0]).abs().max().item() <= TOL


@torch.no_grad()
def test_parallel_head_shapes_shift_and_sampling():
    head = ParallelSpeechHead(H, codebook_size=C, group_size=K)
    _randomize(head, seed=8)
    hidden, text = _fixed_inputs(3)
    labels = torch.randint(0, 10, (1, 3 * K))
    out = head(hidden, labels, text_embeds=text)
    assert out.logits.shape == (1, 3 * K, C)
    manual = F.cross_entropy(out.logits[0, :2 * K], labels[0, K:])
    assert abs(out.loss.item() - manual.item()) <= 1e-6
    step = head.generate_step(hidden, text)
    assert torch.equal(step.tokens, out.logits[:, 2 * K:].argmax(-1))


def test_bad_inputs_raise():
    head = _head()
    hidden, text = _fixed_inputs(2)
    with pytest.raises(ValueError, match="speech_labels must be"):
        head(hidden, torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        head(hidden, torch.zeros(1, 2 * K))
    with pytest.raises(ValueError, match="lm_hidden must be"):
        head(torch.randn(1, 2, H + 1), torch.zeros(1, 2 * K, dtype=torch.long))
    with pytest.raises(ValueError, match="text_embeds"):
        head(hidden, torch.zeros(1, 2 * K, dtype=torch.long), text_embeds=text[:, :1])
    with pytest.raises(ValueError, match="attention_mask must be"):
        head(hidden, torch.zeros(1, 2 * K, dtype=torch.long), attention_mask=torch.ones(1, 2 * K))
    with pytest.raises(ValueError, match="speech_embedding must be"):
        SpeechRefinedHead(H, CRQ, codebook_size=C, bos_id=BOS, pad_id=PAD, speech_embedding=nn.Embedding(C, H + 1))
    state = head.new_state()
    with torch.no_grad():
        head.generate_step(hidden, state)
        with pytest.raises(ValueError, match="one SRHState per batch"):
            head.generate_step(torch.randn(2, 1, H), state)


def test_teacher_forcing_ids_by_hand():
    labels = torch.tensor([[10, 11, 12, 13, 14, -100]])
    previous, targets = teacher_forcing_ids(labels, group_size=2, pad_id=99)
    assert previous.tolist() == [[11, 12, 13, 14, 99, 10]]        # label j + 1 (-100 -> pad; the end wraps)
    assert targets.tolist() == [[12, 13, 14, -100, -100, -100]]   # label j + 2
    previous, targets = teacher_forcing_ids(labels, group_size=1, pad_id=99)
    assert torch.equal(previous, labels.masked_fill(labels == -100, 99))   # k = 1: the ordinary LM shift
    assert targets.tolist() == [[11, 12, 13, 14, -100, -100]]
    with pytest.raises(ValueError, match=r"\(B, k·L\)"):
        teacher_forcing_ids(labels[0])
