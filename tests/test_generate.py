"""fac_mini.generate: KV-cached S2T/S2M loops against uncached references, the released timeline, speech eos,
determinism, batching, speech-id files."""
import numpy as np
import pytest
import torch

from fac_mini.generate import (DEFAULT_SP_GEN_KWARGS, generate, generate_s2m, generate_s2t, load_speech_ids,
                               prompt_embeddings, save_speech_ids, speech_ids_for_detokenizer)

ABOS, AEOS, IM_END, PAD = 4, 5, 2, 0           # course tokenizer ids (the tiny config's defaults)
SP_BOS, SP_EOS, SP_PAD, K = 6561, 6562, 6563, 5
GREEDY_S2M = dict(do_sample=False, repetition_penalty=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(samples, seed=0):
    return (np.random.default_rng(seed).standard_normal(samples) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(processor):
    return processor(audio=_noise(8000), task="s2m")                 # 0.5 s: 3 <|AUDIO|> positions


# ----------------------------------------------------------------------------------------------------------
# References from first principles: no KV cache, the whole sequence recomputed at every step
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _reference_s2m(model, inputs, steps, force_abos=True):
    """Batch-1 greedy interleaved loop with full recomputation of the LLM and of the SRH at every (sub-)step."""
    head = model.audio_invert_tower
    embed = model.language_model.model.embed_tokens
    ids = inputs["input_ids"].clone()                                                   # (1, L)
    lm_inputs = [model(**inputs).inputs_embeds]                                         # prompt (1, L, H)
    step_text = embed(ids)
    srh_inputs = []                                                                     # 25 Hz SRH inputs so far
    prev = head.embed_speech(torch.tensor([SP_BOS]))                                    # (1, H)
    in_speech, last_group = False, None
    tokens, groups, text_logits, speech_logits = [], [], [], []
    for step in range(steps):
        in_speech = in_speech or ids[0, -1].item() == ABOS
        if step > 0:
            step_text = embed(ids[:, -1:])                                              # (1, 1, H)
            x = step_text
            if in_speech and last_group is not None:
                x = (step_text + model.audio_tower(last_group)) / 2
            lm_inputs.append(x)
        new = lm_inputs[-1].shape[1]
        hidden = model.language_model.model(inputs_embeds=torch.cat(lm_inputs, dim=1))   # (1, T, H), no cache
        logits = model.language_model.lm_head(hidden[:, -1])                            # (1, V)
        text_logits.append(logits)
        u = head.ungrouped_inputs(hidden[:, -new:], step_text)                          # (1, 5·new, H)
        sampled, step_logits = [], []
        for sub in range(K):
            piece = u[:, :5 * new - 4] if sub == 0 else u[:, 5 * new - 5 + sub:5 * new - 4 + sub]
            srh_inputs.append(piece + prev[:, None])
            srh_logits = head.refine(torch.cat(srh_inputs, dim=1))[:, -1]              # (1, C), no cache
            token = srh_logits.argmax(-1)
            sampled.append(token.item())
            step_logits.append(srh_logits)
            prev = head.embed_speech(token)
        speech_logits.append(torch.stack(step_logits, dim=1))
        token = chosen = ABOS if step == 0 and force_abos else logits.argmax(-1).item()
        last_group = None
        if in_speech:
            if SP_EOS in sampled:
                sampled, token, in_speech = [SP_EOS] * K, AEOS, False
            groups.append(sampled)
            last_group = torch.tensor([sampled])
        tokens.append(token)
        ids = torch.cat((ids, torch.tensor([[token]])), dim=1)
        if chosen == IM_END:                                    # eos is checked before the speech rewrite
            break
    return tokens, groups, text_logits, speech_logits


def test_prompt_embeddings_equal_the_model_forward(model, processor):
    inputs = processor(audio=[_noise(8000), _noise(16480, 1)], task="s2m")
    embeds, text_embeds = prompt_embeddings(model, inputs)
    with torch.no_grad():
        reference = model(**inputs).inputs_embeds
    assert torch.equal(embeds, reference)
    assert torch.equal(text_embeds, model.language_model.model.embed_tokens(inputs["input_ids"]))


def test_s2t_cached_equals_full_forward_recomputation(model, inputs):
    out = generate_s2t(model, inputs, 12, output_logits=True)
    assert out.speech_ids.shape == (1, 0) and out.speech_logits == [None] * out.timing.steps
    for step, token in enumerate(out.text_ids[0].tolist()):
        prefix = out.sequences[:, :out.prompt_length + step]
        with torch.no_grad():
            full = model(**{**inputs, "input_ids": prefix, "attention_mask": torch.ones_like(prefix)})
        assert torch.allclose(full.text_logits[:, -1], out.text_logits[step], atol=1e-5)
        assert full.text_logits[0, -1].argmax().item() == token


def test_s2m_cached_equals_uncached_reference(model, inputs):
    steps = 8
    out = generate_s2m(model, inputs, steps, output_logits=True, **GREEDY_S2M)
    tokens, groups, text_logits, speech_logits = _reference_s2m(model, inputs, steps)
    assert out.text_ids[0].tolist() == tokens
    assert out.speech_ids.view(-1, K).tolist() == groups
    for step in range(len(tokens)):
        assert torch.allclose(out.text_logits[step], text_logits[step], atol=1e-5)
        assert torch.allclose(out.speech_logits[step], speech_logits[step], atol=1e-5)


def test_forced_abos_timeline(model, inputs):
    out = generate_s2m(model, inputs, 6, **GREEDY_S2M)
    assert out.text_ids[0, 0].item() == ABOS                    # step 0 (prefill) emits <|audio_bos|>
    assert out.speech_steps.tolist() == [1, 2, 3, 4, 5]          # the prefill group is discarded
    assert out.speech_ids.shape == (1, 5 * 5)
    timing = out.timing
    assert timing.steps == 6 and 0 < timing.time_to_first_token_s <= timing.time_to_first_speech_s <= timing.total_s
    assert timing.tokens_per_s > 0 and timing.decode_tokens_per_s > 0
    silent = generate_s2m(model, inputs, 6, sp_gen_kwargs={"force_text_abos": False}, **GREEDY_S2M)
    assert ABOS not in silent.text_ids[0].tolist() and silent.speech_ids.shape == (1, 0)


def test_prompt_ending_in_audio_bos_speaks_from_prefill(model, inputs):
    ids = torch.cat((inputs["input_ids"], torch.tensor([[ABOS]])), dim=1)
    prefilled = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = generate_s2m(model, prefilled, 3, sp_gen_kwargs={"force_text_abos": False}, **GREEDY_S2M)
    assert out.speech_steps.tolist() == [0, 1, 2]


def _bias_srh_eos(monkeypatch, model, calls_to_bias):
    """Make the SRH emit the speech eos at the given refine calls (1-based; step s sub-step j = 5·s + j + 1)."""
    head, original, calls = model.audio_invert_tower, model.audio_invert_tower.refine, []

    def biased(inputs, **kwargs):
        logits = original(inputs, **kwargs)
        calls.append(1)
        if len(calls) in calls_to_bias:
            logits = logits.clone()
            logits[:, -1, SP_EOS] += 1e4
        return logits

    monkeypatch.setattr(head, "refine", biased)
    return calls


def test_speech_eos_ends_speech(monkeypatch, model, inputs):
    calls = _bias_srh_eos(monkeypatch, model, {5 * 3 + 2 + 1})  # step 3, sub-step 2
    out = generate_s2m(model, inputs, 6, **GREEDY_S2M)
    groups = out.speech_ids.view(-1, K).tolist()
    assert out.speech_steps.tolist() == [1, 2, 3]                # no group after speech ended
    assert groups[2] == [SP_EOS] * K and SP_EOS not in sum(groups[:2], [])
    text = out.text_ids[0].tolist()
    assert text[0] == ABOS and text[3] == AEOS                     # the text token of that step is replaced
    assert len(calls) == K * out.timing.steps                     # the SRH still runs on every forward
    kept = out.speech_ids_for_detokenizer()[0]
    assert kept.tolist() == sum(groups[:2], []) and kept.max() < 6561


def test_eos_in_the_prefill_group_is_ignored(monkeypatch, model, inputs):
    _bias_srh_eos(monkeypatch, model, {1, 2, 3, 4, 5})            # all of step 0 (prefill)
    out = generate_s2m(model, inputs, 4, **GREEDY_S2M)
    assert out.text_ids[0, 0].item() == ABOS and out.speech_steps.tolist() == [1, 2, 3]
    assert SP_EOS not in out.speech_ids.tolist()[0]


def test_srh_repetition_history_is_the_appended_speech_ids(monkeypatch, model, inputs):
    head, original, seen = model.audio_invert_tower, model.audio_invert_tower.generate_step, []

    def recording(lm_hidden, state, *args, **kwargs):
        seen.append(None if state.speech_history is None else state.speech_history.clone())
        assert kwargs["repetition_penalty"] == 1.3 and not kwargs["update_history"]
        return original(lm_hidden, state, *args, **kwargs)

    monkeypatch.setattr(head, "generate_step", recording)
    out = generate_s2m(model, inputs, 5, do_sample=False, repetition_penalty=1.3)
    assert seen[0] is None and seen[1] is None                    # steps 0, 1: nothing appended yet
    for step in range(2, 5):                                      # then: all groups appended so far
        assert torch.equal(seen[step], out.speech_ids[:, :K * (step - 1)])


def test_resampling_from_srh_logits_when_not_only_crq_sampling(model, inputs):
    crq = generate_s2m(model, inputs, 4, output_logits=True, **GREEDY_S2M)
    resampled = generate_s2m(model, inputs, 4, output_logits=True, sp_gen_kwargs={"only_crq_sampling": False},
                             **GREEDY_S2M)
    assert torch.equal(crq.speech_ids, resampled.speech_ids)       # greedy: argmax of the same logits
    penalised = generate_s2m(model, inputs, 4, do_sample=False, repetition_penalty=1.5,
                             sp_gen_kwargs={"only_crq_sampling": False})
    assert penalised.speech_ids.shape == (1, 15)


def test_sampling_is_deterministic_with_a_seeded_generator(model, inputs):
    def run(seed):
        return generate_s2m(model, inputs, 6, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.speech_ids, again.speech_ids)
    assert not torch.equal(first.speech_ids, other.speech_ids)
    text_sampled = generate_s2t(model, inputs, 6, do_sample=True, sp_gen_kwargs={"text_greedy": False},
                                generator=torch.Generator().manual_seed(0))
    assert text_sampled.sequences.shape[1] <= inputs["input_ids"].shape[1] + 6


def test_inputs_are_not_mutated(model, inputs):
    before = {key: value.clone() for key, value in inputs.items()}
    generate_s2m(model, inputs, 4, generator=torch.Generator().manual_seed(0))
    generate_s2t(model, inputs, 4)
    assert all(torch.equal(inputs[key], value) for key, value in before.items())


def test_s2t_batch_with_left_padding_equals_single_rows(model, processor):
    waves = [_noise(8000, 2), _noise(16480, 3)]
    batch = generate_s2t(model, processor(audio=waves, instruction="Say it."), 6, output_logits=True)
    for row, wave in enumerate(waves):
        single = generate_s2t(model, processor(audio=wave, instruction="Say it."), 6, output_logits=True)
        n = single.text_ids.shape[1]
        assert batch.text_ids[row, :n].tolist() == single.text_ids[0].tolist()
        for step in range(n):
            assert torch.allclose(batch.text_logits[step][row], single.text_logits[step][0], atol=1e-4)


def test_s2m_batch_runs_rowwise(model, processor):
    out = generate_s2m(model, processor(audio=[_noise(8000), _noise(8000, 1)], task="s2m"), 4, **GREEDY_S2M)
    assert out.speech_ids.shape == (2, 15) and out.text_ids[:, 0].tolist() == [ABOS, ABOS]
    assert len(out.speech_ids_for_detokenizer()) == 2


def test_max_new_tokens_zero_returns_the_prompt(model, inputs):
    out = generate_s2m(model, inputs, 0)
    assert torch.equal(out.sequences, inputs["input_ids"]) and out.speech_ids.shape == (1, 0)


def test_speech_id_files_round_trip(tmp_path):
    ids = torch.tensor([[1, 2, SP_BOS, 3, SP_EOS], [SP_PAD, 4, 5, 6, 7]])
    kept = speech_ids_for_detokenizer(ids)
    assert [row.tolist() for row in kept] == [[1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(load_speech_ids(save_speech_ids(tmp_path / "a.npy", ids)), ids)
    loaded = load_speech_ids(save_speech_ids(tmp_path / "b.json", kept))
    assert [row.tolist() for row in loaded] == [[1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="save them as .json"):
        save_speech_ids(tmp_path / "c.npy", kept)
    with pytest.raises(ValueError, match="use .npy or .json"):
        save_speech_ids(tmp_path / "d.txt", ids)


def test_bad_arguments_are_rejected(model, inputs):
    with pytest.raises(ValueError, match="unknown sp_gen_kwargs"):
        generate_s2m(model, inputs, 2, sp_gen_kwargs={"greedy": True})
    with pytest.raises(ValueError, match="keys generation does not use"):
        generate_s2t(model, {**inputs, "labels": inputs["input_ids"]}, 2)
    right = torch.ones_like(inputs["attention_mask"])
    right[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        generate_s2t(model, {**inputs, "attention_mask": right}, 2)
    with pytest.raises(ValueError, match="speech_ids is missing"):
        generate_s2t(model, {"input_ids": inputs["input_ids"]}, 2)
    with pytest.raises(ValueError, match="use generate_s2m"):
        generate_s2t(model, inputs, 2, sp_gen_kwargs={"disable_speech": False})
    assert DEFAULT_SP_GEN_KWARGS["force_text_abos"] is True
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, inputs, -1)
