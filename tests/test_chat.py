"""fac_mini.chat: the voice chat loop on a tiny random model (streamed audio vs offline detokenization, the on_step
hook of generate, the prompt vs the training collation, multi-turn history, timings, bad input), and one reply of
the shipped chat checkpoint to a shipped test clip."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from fac_mini import DATA_DIR
from fac_mini.audio import resample
from fac_mini.chat import (MAX_HISTORY_TURNS, STAGES, ChatTurn, VoiceChat, chat_text, main_eval)
from fac_mini.detokenize import PRE_LOOKAHEAD, TOKEN_HOP, Detokenizer, vocoder_context_frames
from fac_mini.flow import FlowConfig, FlowDetokenizer
from fac_mini.generate import generate_s2m, generate_s2t
from fac_mini.model import DiscreteAudioConfig, FunAudioChat, FunAudioChatConfig
from fac_mini.released.processing import (AUDIO_TOKEN, S2M_SYSTEM_PROMPT, S2T_SYSTEM_PROMPT, audio_chat_prompt)
from fac_mini.vocoder import VocosConfig, VocosVocoder

pytestmark = pytest.mark.usefixtures("one_thread")

CODES = 11                                                   # the tiny flow's codebook = the tiny model's codes
TINY_DISCRETE = DiscreteAudioConfig(codebook_size=CODES + 4, bos_token_id=CODES, eos_token_id=CODES + 1,
                                    pad_token_id=CODES + 2)
SHIPPED = DATA_DIR / "dpo" if (DATA_DIR / "dpo" / "config.json").is_file() else DATA_DIR / "cocktail"


def _noise(samples, seed=0):
    return (np.random.default_rng(seed).standard_normal(samples) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer():
    from fac_mini.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    """Random weights whose SRH speaks: the speech bos/eos rows of the tied table are zeroed (logit 0), so the
    greedy group is a real code whenever one of the 11 code logits is positive, and speech does not end at once."""
    torch.manual_seed(0)
    model = FunAudioChat(FunAudioChatConfig(discrete=TINY_DISCRETE)).eval()
    with torch.no_grad():
        model.audio_tower.embed_tokens.weight[[TINY_DISCRETE.bos_token_id, TINY_DISCRETE.eos_token_id]] = 0
    return model


@pytest.fixture(scope="module")
def tiny_detokenizer():
    torch.manual_seed(0)                                     # as tests/test_detokenize.py builds its tiny one
    flow = FlowDetokenizer(FlowConfig(vocab_size=CODES, dim=32, depth=2, heads=2, lookahead_channels=16)).eval()
    for block in flow.blocks:
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    torch.nn.init.normal_(flow.final_modulation.weight, std=0.1)
    vocoder = VocosVocoder(VocosConfig(dim=32, intermediate_dim=64, num_layers=2)).eval()
    voices = {f"spk0{i}": torch.nn.functional.normalize(torch.rand(256), dim=0) for i in range(2)}
    return Detokenizer(flow, vocoder, voices)


@pytest.fixture()
def chat(tiny_model, tokenizer, tiny_detokenizer):
    return VoiceChat(tiny_model, tokenizer, tiny_detokenizer, max_new_tokens=16)


@pytest.fixture(scope="module")
def s2m_reply(tiny_model, tokenizer, tiny_detokenizer):
    return VoiceChat(tiny_model, tokenizer, tiny_detokenizer, max_new_tokens=16).reply(_noise(8000), history=False)


# ----------------------------------------------------------------------------------------------------------
# Streaming: the reply's audio is the offline detokenization of its ids
# ----------------------------------------------------------------------------------------------------------
def test_streamed_reply_equals_offline_with_the_full_vocoder_context(tiny_model, tokenizer, tiny_detokenizer):
    context = vocoder_context_frames(tiny_detokenizer.vocoder)
    chat = VoiceChat(tiny_model, tokenizer, tiny_detokenizer, max_new_tokens=16, vocoder_lookahead=context)
    reply = chat.reply(_noise(8000), history=False)
    ids = reply.speech_ids
    assert len(ids) >= 2 * (TOKEN_HOP + PRE_LOOKAHEAD), "the tiny model should speak several hops"
    assert int(ids.min()) >= 0 and int(ids.max()) < CODES
    kinds = [event.kind for event in reply.timeline]
    last_speech = max(i for i, kind in enumerate(kinds) if kind == "speech")
    assert kinds.index("audio") < last_speech                # a chunk was ready while the model still spoke
    torch.testing.assert_close(reply.mel, tiny_detokenizer.mel(ids, "spk00"), rtol=0, atol=1e-5)
    offline = tiny_detokenizer.wave(ids, "spk00")
    assert reply.wave.dtype == np.float32 and reply.wave.shape == offline.shape
    assert np.abs(reply.wave - offline).max() < 1e-5
    np.testing.assert_array_equal(np.concatenate(reply.chunks), reply.wave)


def test_streamed_reply_with_the_default_lookahead_is_close_to_offline(s2m_reply, tiny_detokenizer):
    offline = tiny_detokenizer.wave(s2m_reply.speech_ids, "spk00")
    assert s2m_reply.wave.shape == offline.shape
    error = s2m_reply.wave - offline
    snr_db = 10 * np.log10(np.sum(offline ** 2) / max(np.sum(error ** 2), 1e-20))
    assert snr_db > 15, snr_db                               # the bound of tests/test_detokenize.py


def test_reply_speech_ids_are_the_generated_codes(s2m_reply, tiny_model, tokenizer):
    """The ids spoken are exactly the codes (< bos) of the groups the timeline shows, in order."""
    groups = [event.payload for event in s2m_reply.timeline if event.kind == "speech"]
    assert all(len(group) == TINY_DISCRETE.group_size for group in groups)
    codes = [i for group in groups for i in group if i < TINY_DISCRETE.bos_token_id]
    assert s2m_reply.speech_ids.tolist() == codes
    texts = [event.payload for event in s2m_reply.timeline if event.kind == "text"]
    assert texts == [tokenizer.decode([i], skip_special_tokens=False) for i in s2m_reply.text_ids.tolist()]
    assert s2m_reply.text == tokenizer.decode(s2m_reply.text_ids.tolist(), skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------------
# generate's on_step hook
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampled", [False, True])
def test_on_step_sees_every_step_and_changes_nothing(model, processor, sampled):
    inputs = processor(audio=[_noise(8000), _noise(11000, 1)], task="s2m")
    settings = dict(do_sample=sampled, repetition_penalty=1.2 if sampled else 1.0)
    plain = generate_s2m(model, inputs, 12, generator=torch.Generator().manual_seed(3) if sampled else None,
                         **settings)
    steps = []
    watched = generate_s2m(model, inputs, 12, generator=torch.Generator().manual_seed(3) if sampled else None,
                           on_step=steps.append, **settings)
    assert torch.equal(plain.sequences, watched.sequences) and torch.equal(plain.speech_ids, watched.speech_ids)
    assert torch.equal(plain.speech_steps, watched.speech_steps)
    assert [s.step for s in steps] == list(range(watched.timing.steps))
    assert torch.equal(torch.stack([s.text_ids for s in steps], dim=1), watched.text_ids)          # (B, n)
    with_speech = [s for s in steps if s.speech_ids is not None]
    assert [s.step for s in with_speech] == watched.speech_steps.tolist()
    assert torch.equal(torch.cat([s.speech_ids for s in with_speech], dim=1), watched.speech_ids)  # (B, 5·G)
    assert [s.elapsed_s for s in steps] == watched.timing.step_end_s


def test_on_step_in_s2t_has_no_speech_and_a_bad_callback_is_refused(model, processor):
    inputs = processor(audio=_noise(8000), task="s2t")
    steps = []
    out = generate_s2t(model, inputs, 6, on_step=steps.append)
    assert len(steps) == out.timing.steps and all(s.speech_ids is None for s in steps)
    with pytest.raises(ValueError, match="on_step must be a callable"):
        generate_s2t(model, inputs, 6, on_step="print")


# ----------------------------------------------------------------------------------------------------------
# The prompt: what the model was trained on
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["s2t", "s2m"])
def test_single_turn_inputs_equal_the_training_collation(chat, tokenizer, tiny_model, mode):
    from fac_mini.audio import load_audio
    from fac_mini.corpus import audio_path, read_metadata
    from fac_mini.dialogue import build_dialogue, collate_dialogue, example_tensors

    example = build_dialogue()["heldout_text_facts"][0]
    example = dataclasses.replace(example, kind=mode, answer_speech_id=None)     # the user's clip only
    expected = collate_dialogue([example], example_tensors([example]), tokenizer, tiny_model.config,
                                with_labels=False, padding_side="left")
    row = next(r for r in read_metadata() if r["id"] == example.user_id)
    inputs, turns = chat.build_inputs(load_audio(audio_path(row)), mode, history=False)
    assert turns == 0 and sorted(inputs) == sorted(expected)
    for key, value in expected.items():
        assert inputs[key].dtype == value.dtype and torch.equal(inputs[key], value), key


def test_chat_text_without_history_is_the_training_prompt():
    assert chat_text(S2M_SYSTEM_PROMPT) == audio_chat_prompt(S2M_SYSTEM_PROMPT)
    assert chat_text(S2T_SYSTEM_PROMPT, (), "Repeat what you heard.") == \
        audio_chat_prompt(S2T_SYSTEM_PROMPT, "Repeat what you heard.")
    previous = [ChatTurn(_noise(4000), None, "first answer"), ChatTurn(_noise(4000), "Be brief.", "second answer")]
    text = chat_text(S2T_SYSTEM_PROMPT, previous)
    assert text.count(AUDIO_TOKEN) == 3 and text.count("<|im_start|>system") == 1
    assert text.index("first answer") < text.index("Be brief.") < text.index("second answer")
    assert text.endswith(audio_chat_prompt(S2T_SYSTEM_PROMPT).split("<|im_end|>\n", 1)[1])


def test_a_resampled_question_is_heard_at_16_khz_and_the_input_is_left_alone(chat):
    wave = _noise(11025, 4)                                   # 0.5 s at 22.05 kHz
    reply = chat.reply(wave, 22050, mode="s2t", history=False)
    np.testing.assert_array_equal(reply.question, resample(wave, 22050, 16000))
    tensor = torch.from_numpy(_noise(8000, 5))
    before = tensor.clone()
    pcm = chat.reply((tensor.numpy() * 32767).astype(np.int16), mode="s2t", history=False)   # int16 PCM is scaled
    chat.reply(tensor, mode="s2t", history=False)
    assert torch.equal(tensor, before) and np.abs(pcm.question).max() <= 1.0


# ----------------------------------------------------------------------------------------------------------
# Multi-turn
# ----------------------------------------------------------------------------------------------------------
def test_history_is_bounded_to_the_last_eight_turns_and_reset_clears_it(chat):
    questions = [_noise(4000 + 800 * i, seed=i) for i in range(MAX_HISTORY_TURNS + 2)]       # distinct lengths
    for i, question in enumerate(questions):
        reply = chat.reply(question, mode="s2t")
        assert reply.timings["history_turns"] == min(i, MAX_HISTORY_TURNS)
    assert len(chat.history) == MAX_HISTORY_TURNS
    assert [turn.wave.size for turn in chat.history] == [q.size for q in questions[2:]]      # the oldest dropped
    new = _noise(6000, 99)
    inputs, turns = chat.build_inputs(new, "s2t")
    assert turns == MAX_HISTORY_TURNS
    frames = inputs["speech_attention_mask"].sum(dim=1).tolist()                               # one row per audio
    assert frames == [int(q.size / 16000 * 25) for q in [*questions[2:], new]]
    im_start = chat.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert int((inputs["input_ids"] == im_start).sum()) == 1 + 2 * (MAX_HISTORY_TURNS + 1)     # system, 9 user, 9 assistant
    chat.reply(new, mode="s2t", history=False)                                                  # neither read nor kept
    assert len(chat.history) == MAX_HISTORY_TURNS and chat.history[-1].wave.size == questions[-1].size
    chat.reset()
    assert chat.history == [] and chat.build_inputs(new, "s2t")[1] == 0


def test_turns_that_do_not_fit_the_context_drop_first(chat):
    for i in range(3):
        chat.reply(_noise(8000, seed=i), mode="s2t")
    question = _noise(8000, seed=9)
    lengths = [chat.build_inputs(question, "s2t", history=False)[0]["input_ids"].shape[1],       # no turn
               chat.build_inputs(question, "s2t")[0]["input_ids"].shape[1]]                      # all 3 turns
    turns = list(chat.history)
    chat.history = turns[-1:]
    lengths.insert(1, chat.build_inputs(question, "s2t")[0]["input_ids"].shape[1])              # the last turn
    chat.history = turns
    assert lengths[0] < lengths[1] < lengths[2]
    context = chat.model.config.text_config.max_position_embeddings
    chat.max_new_tokens = context - lengths[1]               # room for the question and one previous turn
    inputs, turns = chat.build_inputs(question, "s2t")
    assert turns == 1 and inputs["input_ids"].shape[1] == lengths[1]
    chat.max_new_tokens = context - lengths[0] + 1           # not even the question alone fits
    with pytest.raises(ValueError, match="shorter question"):
        chat.build_inputs(question, "s2t")


# ----------------------------------------------------------------------------------------------------------
# Timings and modes
# ----------------------------------------------------------------------------------------------------------
def test_s2m_timings_are_complete_and_ordered(s2m_reply):
    t = s2m_reply.timings
    assert t["first_token_s"] <= t["first_text_s"] <= t["total_s"]
    assert t["first_token_s"] <= t["first_speech_s"] <= t["first_audio_s"] <= t["total_s"]
    assert t["llm_steps"] == len(s2m_reply.text_ids) and t["history_turns"] == 0
    assert t["audio_s"] == s2m_reply.audio_s == s2m_reply.wave.size / 16000 > 0
    assert t["rtf"] == pytest.approx(t["total_s"] / t["audio_s"])
    assert list(t["stages"]) == [*STAGES, "other"] and all(v >= 0 for v in t["stages"].values())
    assert all(t["stages"][name] > 0 for name in STAGES)
    assert sum(t["stages"].values()) == pytest.approx(t["total_s"], abs=1e-3)
    times = [event.time_s for event in s2m_reply.timeline]
    assert times == sorted(times) and times[-1] <= t["total_s"]
    audio_events = [event for event in s2m_reply.timeline if event.kind == "audio"]
    assert audio_events[0].time_s == t["first_audio_s"]
    assert sum(event.payload for event in audio_events) == s2m_reply.wave.size
    assert s2m_reply.sampling_rate == 16000 and s2m_reply.speaker == "spk00" and s2m_reply.mode == "s2m"


def test_s2t_has_text_and_no_audio(chat):
    reply = chat.reply(_noise(8000), mode="s2t", history=False)
    t = reply.timings
    assert reply.wave.size == 0 and reply.wave.dtype == np.float32 and reply.mel is None and reply.speaker is None
    assert t["first_audio_s"] is None and t["first_speech_s"] is None and t["audio_s"] == 0 and t["rtf"] is None
    assert t["first_token_s"] <= t["first_text_s"] <= t["total_s"]
    assert t["stages"]["srh"] == t["stages"]["flow"] == t["stages"]["vocoder"] == 0
    assert {event.kind for event in reply.timeline} == {"text"}


def test_greedy_replies_repeat_and_seeded_sampling_reproduces(tiny_model, tokenizer, tiny_detokenizer, s2m_reply):
    again = VoiceChat(tiny_model, tokenizer, tiny_detokenizer, max_new_tokens=16).reply(_noise(8000), history=False)
    assert torch.equal(again.speech_ids, s2m_reply.speech_ids) and again.text == s2m_reply.text
    sampled = [VoiceChat(tiny_model, tokenizer, tiny_detokenizer, max_new_tokens=16, do_sample=True, seed=seed)
               .reply(_noise(8000), history=False).speech_ids for seed in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    assert not torch.equal(sampled[0], s2m_reply.speech_ids)


def test_the_reply_voice_can_be_chosen(chat, s2m_reply, tiny_detokenizer):
    other = chat.reply(_noise(8000), speaker="spk01", history=False)
    assert other.speaker == "spk01" and torch.equal(other.speech_ids, s2m_reply.speech_ids)
    assert not np.allclose(other.wave, s2m_reply.wave)
    embedding = tiny_detokenizer.speakers["spk01"]
    by_embedding = chat.reply(_noise(8000), speaker=embedding, history=False)
    np.testing.assert_array_equal(by_embedding.wave, other.wave)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wave, rate, message", [
    (np.zeros(0, np.float32), 16000, "empty"),
    (_noise(639), 16000, "40 ms"),
    (_noise(1000), 44100, "40 ms"),
    (np.array([0.1, np.nan] * 800, np.float32), 16000, "NaN"),
    (np.array([0.1, np.inf] * 800, np.float32), 16000, "NaN or infinite"),
    (np.stack([_noise(8000), _noise(8000, 1)]), 16000, "average the channels"),
    (np.zeros(8000, np.float32), 16000, "silent"),
    (_noise(8000), 0, "positive"),
    (_noise(8000), -16000, "positive"),
    (_noise(8000), float("nan"), "positive"),
])
def test_bad_audio_is_a_clear_value_error(chat, wave, rate, message):
    with pytest.raises(ValueError, match=message):
        chat.reply(wave, rate)
    assert chat.history == []


def test_bad_mode_speaker_and_settings_are_value_errors(chat, tiny_model, tokenizer, tiny_detokenizer):
    with pytest.raises(ValueError, match="mode='s2s'"):
        chat.reply(_noise(8000), mode="s2s")
    with pytest.raises(ValueError, match="unknown speaker 'nobody'"):
        chat.reply(_noise(8000), speaker="nobody")
    with pytest.raises(ValueError, match="unknown speaker"):
        VoiceChat(tiny_model, tokenizer, tiny_detokenizer, speaker="spk09")
    with pytest.raises(ValueError, match="max_new_tokens"):
        VoiceChat(tiny_model, tokenizer, tiny_detokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown corpus voice"):
        chat.ask("Where does Rafael Wren live?", voice="spk42")
    with pytest.raises(ValueError, match="non-empty"):
        chat.ask("  ")
    released_ids = FunAudioChat(FunAudioChatConfig()).eval()                 # codes 0..6560: too many for the flow
    with pytest.raises(ValueError, match="speech codes"):
        VoiceChat(released_ids, tokenizer, tiny_detokenizer)


def test_a_missing_checkpoint_names_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="saved mini Fun-Audio-Chat"):
        VoiceChat.from_pretrained(tmp_path / "nothing")
    import fac_mini.chat

    monkeypatch.setattr(fac_mini.chat, "CHAT_DIR", DATA_DIR / "no_such_chat_model")
    with pytest.raises(FileNotFoundError, match="data/cocktail"):
        VoiceChat.from_pretrained()
    if not (DATA_DIR / "dpo" / "config.json").is_file():
        monkeypatch.setattr(fac_mini.chat, "CHAT_DIR", DATA_DIR / "dpo")
        with pytest.raises(FileNotFoundError, match="python -m fac_mini dpo train"):
            VoiceChat.from_pretrained()


def test_ask_speaks_the_question_in_a_corpus_voice(chat):
    reply = chat.ask("Where does Rafael Wren live?", voice="spk03", mode="s2t", history=False)
    assert reply.question.dtype == np.float32 and reply.question.size > 16000 // 2
    assert reply.timings["question_s"] == reply.question.size / 16000


# ----------------------------------------------------------------------------------------------------------
# The shipped checkpoint (a few seconds)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_chat():
    return VoiceChat.from_pretrained(SHIPPED)


def test_the_shipped_chat_answers_a_shipped_clip(shipped_chat):
    from fac_mini.audio import load_audio
    from fac_mini.corpus import audio_path, read_metadata
    from fac_mini.dialogue import build_dialogue

    example = build_dialogue()["heldout_speech_facts"][0]
    row = next(r for r in read_metadata() if r["id"] == example.user_id)
    reply = shipped_chat.reply(load_audio(audio_path(row)), history=False)
    assert reply.text and reply.wave.size > 16000 // 2 and reply.wave.dtype == np.float32
    assert reply.sampling_rate == 16000 and np.abs(reply.wave).max() <= 1.0
    assert reply.timings["first_audio_s"] < reply.timings["total_s"]
    assert len(reply.speech_ids) > 0 and int(reply.speech_ids.max()) < shipped_chat.model.config.discrete.bos_token_id


def test_chat_eval_prints_one_json_object_with_the_goals(capsys):
    assert main_eval(["--path", str(SHIPPED), "--limit", "1", "--dnsmos-clips", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overall"]["n"] == 2 and result["threads"] == 1 and result["limit_per_set"] == 1
    assert set(result["sets"]) == {"heldout_speech_facts", "heldout_text_facts"}
    for row in result["sets"].values():
        assert {"s2t_fact_accuracy", "s2t_exact_match", "s2m_fact_accuracy", "s2m_exact_match"} <= set(row)
    assert 0 < result["reference"]["tokenizer_cer_real_speech"] < 1
    assert {"first_audio_s_max<=1.0", "rtf<=0.5", "s2m_fact_accuracy>=cocktail_s2t-0.05",
            "consistency_cer_from_ids<=1.5x_tokenizer"} == set(result["goals"])
    assert result["latency"]["s2m_first_audio_s"]["median"] <= result["latency"]["s2m_total_s"]["max"]
