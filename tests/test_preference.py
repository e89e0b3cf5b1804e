"""fac_mini.preference: degradations, each task's scoring, the prompts and the pairs of the multi-task DPO data."""
import dataclasses

import numpy as np
import pytest
import torch

from fac_mini import preference as P
from fac_mini.dialogue import DialogueExample, build_dialogue
from fac_mini.tts import VOICES

pytestmark = pytest.mark.usefixtures("one_thread")


def _wave(seconds=1.0, seed=0):
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _example(**changes):
    base = DialogueExample(kind="s2t", user_id="test-spk03-00086", user_text="Where does Mira Castell live?",
                           answer="Mira Castell lives in Kelby.", answer_speech_id=None, person="Mira Castell",
                           attribute="town", value="Kelby", fact="speech", phrasing="heldout")
    return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------------------------------------
# Degradations
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", P.DEGRADATIONS)
def test_degradations_are_seeded_and_change_the_clip(kind):
    wave = _wave()
    a, b, c = P.degrade(wave, kind, 1), P.degrade(wave, kind, 1), P.degrade(wave, kind, 2)
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    if kind != "speed":
        assert a.shape == wave.shape and not np.allclose(a, wave, atol=1e-3)


def test_noise_snr_is_in_its_range():
    wave = _wave(2.0)
    for seed in range(5):
        noise = P.degrade(wave, "noise", seed) - wave
        snr = 10 * np.log10(np.mean(wave ** 2) / np.mean(noise ** 2))
        assert -0.5 <= snr <= 10.5


def test_speed_changes_the_length_by_its_factor():
    wave = _wave(2.0)
    for seed in range(5):
        ratio = P.degrade(wave, "speed", seed).size / wave.size
        assert 1 / 1.15 - 0.01 <= ratio <= 1 / 0.85 + 0.01 and abs(ratio - 1) > 1e-3


def test_reverb_keeps_the_peak():
    wave = _wave()
    assert np.isclose(np.abs(P.degrade(wave, "reverb", 0)).max(), np.abs(wave).max(), rtol=1e-5)


@pytest.mark.parametrize("wave, kind, match", [
    (_wave(), "echo", "unknown degradation"), (np.zeros(0, np.float32), "noise", "empty"),
    (np.zeros(16000, np.float32), "noise", "silent")])
def test_degrade_bad_input(wave, kind, match):
    with pytest.raises(ValueError, match=match):
        P.degrade(wave, kind, 0)


# ----------------------------------------------------------------------------------------------------------
# Answers and scores
# ----------------------------------------------------------------------------------------------------------
def test_voice_height_follows_the_espeak_pitch():
    heights = {v.speaker_id: P.voice_height(v.speaker_id) for v in VOICES}
    assert sum(h == "high" for h in heights.values()) == 5 and heights["spk06"] == "low" and heights["spk09"] == "high"
    assert {P.voice_height(s) for s in P.HELD_OUT_VOICES} == {"high", "low"}
    with pytest.raises(ValueError, match="unknown corpus voice"):
        P.voice_height("spk99")
    with pytest.raises(ValueError, match="high' or 'low"):
        P.voice_answer("medium")


@pytest.mark.parametrize("text, attribute", [
    ("Mira Castell lives in Kelby.", "town"), ("Simon Wren works as a teacher.", "job"),
    ("Leon Ashby keeps a dog.", "pet"), ("The favourite colour of Simon Wren is green.", "colour"),
    ("Mira Castell has a house in Kelby.", None), ("Kelby.", None), ("lives in Kelby.", None)])
def test_reply_attribute(text, attribute):
    assert P.reply_attribute(text) == attribute


@pytest.mark.parametrize("text, instruction, ok", [
    ("Kelby.", P.ONE_WORD, True), ("Kelby", P.ONE_WORD, True), ("In Kelby.", P.ONE_WORD, False),
    ("Mira Castell lives in Kelby.", P.ONE_WORD, False), ("Mira Castell lives in Kelby.", P.FULL_SENTENCE, True),
    ("Kelby.", P.FULL_SENTENCE, False), ("Mira lives there", P.FULL_SENTENCE, False)])
def test_follows_instruction(text, instruction, ok):
    assert P.follows_instruction(text, instruction) is ok


def test_follows_instruction_rejects_other_instructions():
    with pytest.raises(ValueError, match="not a style instruction"):
        P.follows_instruction("Kelby.", P.VOICE_QUESTION)


def test_voice_reply_needs_the_right_word_only():
    assert P.voice_reply_is_right("The voice is high.", "high")
    assert not P.voice_reply_is_right("The voice is high or low.", "high")
    assert not P.voice_reply_is_right("The voice is highish.", "high")
    assert not P.voice_reply_is_right("Mira Castell lives in Kelby.", "low")


def test_scores_by_hand():
    example = _example()
    prompts = [P.Prompt("robustness", dataclasses.replace(example, user_id="test-spk03-00086~noise")),
               P.Prompt("robustness", dataclasses.replace(example, user_id="test-spk03-00086~speed")),
               P.Prompt("style", dataclasses.replace(example, answer="Kelby."), P.ONE_WORD),
               P.Prompt("style", example, P.FULL_SENTENCE),
               P.Prompt("voice", dataclasses.replace(example, answer="The voice is high."), P.VOICE_QUESTION)]
    replies = ["Mira Castell lives in Kelby.", "Leon Ashby lives in Lindon.", "Lindon.", "Kelby.",
               "The voice is high."]
    scores = P.score_replies(prompts, replies)          # spk03 is a high voice, not held out
    rob = scores["robustness"]
    assert (rob["attribute_accuracy"], rob["fact_accuracy"], rob["person_accuracy"], rob["exact_match"]) == \
        (1.0, 0.5, 0.5, 0.5)
    assert rob["attribute_accuracy_noise"] == 1.0 and rob["attribute_accuracy_reverb"] is None
    assert scores["style"] == {"compliance": 0.5, "one_word": 1.0, "full_sentence": 0.0,
                               "one_word_fact_accuracy": 0.0, "n": 2}
    assert scores["voice"]["accuracy"] == 1.0 and scores["voice"]["held_out_voices"] is None
    with pytest.raises(ValueError, match="prompts but"):
        P.score_replies(prompts, replies[:2])


# ----------------------------------------------------------------------------------------------------------
# Prompts and pairs
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return build_dialogue()


def test_evaluation_prompts_use_the_test_split_only(data):
    prompts = P.evaluation_prompts(data)
    counts = {d: sum(p.dimension == d for p in prompts) for d in P.DIMENSIONS}
    assert counts == {"robustness": 160, "style": 320, "voice": 160}
    assert all(p.clip[0].startswith("test-") for p in prompts)
    assert {p.clip[1] for p in prompts if p.dimension == "robustness"} == set(P.DEGRADATIONS)
    assert all(p.clip[1] is None for p in prompts if p.dimension != "robustness")


def test_training_prompts_keep_dev_and_held_out_voices_apart(data):
    prompts = P.training_prompts(data)
    train_clips = {p.clip[0] for p in prompts["train"]}
    dev_clips = {p.clip[0] for p in prompts["dev"]}
    assert train_clips.isdisjoint(dev_clips) and all(c.startswith("train-") for c in train_clips | dev_clips)
    speakers = {p.clip[0].split("-")[1] for p in prompts["train"] if p.dimension == "voice"}
    assert speakers.isdisjoint(P.HELD_OUT_VOICES) and len(speakers) == 8
    styles = [p.instruction for p in prompts["train"] if p.dimension == "style"]
    assert abs(styles.count(P.ONE_WORD) - styles.count(P.FULL_SENTENCE)) <= 1


def test_pair_examples_share_the_prompt_and_collate_chosen_first(processor):
    from fac_mini.model import FunAudioChatConfig

    example = _example(user_id="u")
    tensors = {"features": {"u": torch.randn(128, 160)}, "num_samples": {"u": torch.tensor([16000])},
               "speech_ids": {"a": torch.randint(0, 243, (40,)), "b": torch.randint(0, 243, (30,))}}
    pairs = [P.PreferencePair(P.Prompt("style", example, P.ONE_WORD), "s2t", "Kelby.",
                              "Mira Castell lives in Kelby.", "on-policy"),
             P.PreferencePair(P.Prompt("robustness", example), "s2m", example.answer, "Leon Ashby keeps a dog.",
                              "on-policy", "a", "b")]
    chosen, rejected = pairs[1].examples()
    assert chosen.user_id == rejected.user_id and (chosen.answer_speech_id, rejected.answer_speech_id) == ("a", "b")
    batch = P.collate_pairs(pairs, tensors, processor.tokenizer, FunAudioChatConfig())
    assert batch["input_ids"].shape[0] == 4
    decoded = [processor.tokenizer.decode(row[row != -100].tolist()) for row in batch["labels"]]
    assert decoded[0].startswith("Kelby.") and decoded[2].startswith("Mira Castell lives in Kelby.")
    prompt_text = processor.tokenizer.decode(batch["input_ids"][0].tolist())
    assert P.ONE_WORD in prompt_text and P.ONE_WORD not in processor.tokenizer.decode(batch["input_ids"][1].tolist())
    with pytest.raises(ValueError, match="at least one pair"):
        P.collate_pairs([], tensors, processor.tokenizer, FunAudioChatConfig())


def test_pairs_round_trip_through_json(tmp_path):
    pair = P.PreferencePair(P.Prompt("voice", _example(answer="The voice is high."), P.VOICE_QUESTION), "s2t",
                            "The voice is high.", "The voice is low.", "constructed")
    path = P.save_pairs([pair, pair], tmp_path / "pairs.jsonl")
    assert P.load_pairs(path) == [pair, pair]
    assert P.pairs_fingerprint([pair]) != P.pairs_fingerprint([pair, pair])
    assert P.pair_summary([pair, pair]) == {"voice/s2t/constructed": 2}


class Scripted:
    """Stands in for generate_replies: fixed replies per call."""

    def __init__(self, calls):
        self.calls = list(calls)

    def __call__(self, model, prompts, tensors, tokenizer, **kwargs):
        replies = self.calls.pop(0)
        assert len(replies) == len(prompts)
        return replies


def test_build_pairs_ranks_samples_and_follows_the_rules(monkeypatch):
    good = _example()
    prompts = [P.Prompt("robustness", dataclasses.replace(good, user_id="x~noise")),
               P.Prompt("robustness", dataclasses.replace(good, user_id="y~speed")),
               P.Prompt("style", dataclasses.replace(good, answer="Kelby."), P.ONE_WORD),
               P.Prompt("style", good, P.FULL_SENTENCE),
               P.Prompt("style", dataclasses.replace(good, answer="Kelby."), P.ONE_WORD),
               P.Prompt("voice", dataclasses.replace(good, answer="The voice is low."), P.VOICE_QUESTION)]
    samples = [[good.answer, "Leon Ashby keeps a dog.", "Mira Castell lives in Lindon.", good.answer],
               [good.answer] * 4]                                   # all exact: no pair
    greedy = [["Mira Castell lives in Kelby."], ["Mira Castell lives in Kelby."], ["Kelby."]]
    monkeypatch.setattr(P, "generate_replies", Scripted([samples, greedy]))
    spoken = {good.answer: "utt-a", "Leon Ashby keeps a dog.": "utt-b"}
    pairs = P.build_pairs(None, prompts, {}, None, spoken)
    summary = [(p.prompt.dimension, p.kind, p.chosen, p.rejected, p.source) for p in pairs]
    assert summary == [
        ("robustness", "s2t", good.answer, "Leon Ashby keeps a dog.", "on-policy"),     # the lowest-ranked draw
        ("robustness", "s2m", good.answer, "Leon Ashby keeps a dog.", "on-policy"),
        ("style", "s2t", "Kelby.", "Mira Castell lives in Kelby.", "on-policy"),
        ("style", "s2t", good.answer, "Kelby.", "constructed"),
        ("voice", "s2t", "The voice is low.", "The voice is high.", "constructed")]    # third style: already right
    assert (pairs[1].chosen_speech_id, pairs[1].rejected_speech_id) == ("utt-a", "utt-b")
