"""fac_mini.dialogue: the dialogue sets are deterministic, split the facts, keep the held-out phrasings out of
training, and are collated by the released rules (processor, chat template, labels, 10-id delay)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from released_tiny import BATCHES  # noqa: E402

from fac_mini.audio import load_audio
from fac_mini.corpus import audio_path, read_metadata
from fac_mini.dialogue import (ASR_INSTRUCTION, SPEECH_DELAY, answer_has_fact, answer_is_exact, build_dialogue,
                               collate_dialogue, is_speech_fact)
from fac_mini.model import build_assistant_labels
from fac_mini.released.processing import FunAudioChatProcessor
from fac_mini.tokenizer import load_tokenizer
from fac_mini.train.srh_study import StudyConfig
from fac_mini.world import ATTRIBUTES, HELD_OUT_QUESTION, VALUES, build_world

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN_SETS = ("train_s2t", "train_s2m", "prealign_asr")
EVAL_SETS = ("heldout_speech_facts", "heldout_text_facts", "seen_phrasing_text_facts")


@pytest.fixture(scope="module")
def data():
    return build_dialogue()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def config():
    return StudyConfig().chat_config          # the course ids and the 243-code speech vocabulary


def test_dialogue_is_deterministic(data):
    again = build_dialogue()
    assert again.fingerprint() == data.fingerprint() and again.summary() == data.summary()


def test_the_facts_are_split_like_a_checkerboard(data):
    world = build_world(0)
    speech = {(f.person, f.attribute) for f in world.facts if is_speech_fact(world, f.person, f.attribute)}
    assert len(speech) == len(world.facts) // 2
    for person in world.people:                       # every person and attribute has both kinds
        assert 0 < sum((person, a) in speech for a in ATTRIBUTES) < len(ATTRIBUTES)
    for attribute in ATTRIBUTES:
        assert 0 < sum((p, attribute) in speech for p in world.people) < len(world.people)
    for name in TRAIN_SETS:
        assert data[name] and all((e.person, e.attribute) in speech and e.fact == "speech" for e in data[name])
    assert all(e.fact == "text" for name in ("heldout_text_facts", "seen_phrasing_text_facts") for e in data[name])
    assert all(e.fact == "speech" for e in data["heldout_speech_facts"])
    # one utterance per evaluated fact: 80 held-out questions per fact kind
    assert len(data["heldout_speech_facts"]) == len(speech) == len(data["heldout_text_facts"])


def test_held_out_phrasings_and_evaluation_audio_stay_out_of_training(data):
    world = build_world(0)
    held_out = {q.text for q in world.questions("heldout")}
    rows = {row["id"]: row for row in read_metadata()}
    trained_ids = {e.user_id for name in TRAIN_SETS for e in data[name]}
    trained_texts = {e.user_text for name in TRAIN_SETS for e in data[name]} | {
        e.answer for name in TRAIN_SETS for e in data[name]}
    assert not trained_texts & held_out
    assert all(rows[i]["split"] == "train" for i in trained_ids)
    for name in EVAL_SETS:
        assert not {e.user_id for e in data[name]} & trained_ids
        assert not {e.user_text for e in data[name]} & trained_texts
    assert {e.user_text for name in EVAL_SETS[:2] for e in data[name]} == held_out
    templates = {q.text: q.template for q in world.questions()}
    assert all(templates[e.user_text] != HELD_OUT_QUESTION for e in data["seen_phrasing_text_facts"])


def test_answers_are_the_canonical_sentences_spoken_in_the_corpus(data):
    world = build_world(0)
    rows = {row["id"]: row for row in read_metadata()}
    for example in data["train_s2m"]:
        assert example.answer == world.fact(example.person, example.attribute).answer
        assert rows[example.answer_speech_id]["text"] == example.answer
    voices = {rows[e.answer_speech_id]["speaker"] for e in data["train_s2m"]}
    assert len(voices) > 5                             # the answers are spoken by many voices
    assert all(e.answer == e.user_text and e.answer_speech_id is None for e in data["prealign_asr"])
    example = data["heldout_text_facts"][0]
    assert answer_is_exact(example.answer, example) and answer_has_fact(example.answer, example)
    other = next(v for v in VALUES[example.attribute] if v != example.value)
    assert not answer_has_fact(f"{example.answer} {other}", example)
    assert not answer_is_exact(example.answer.replace(example.value, other), example)


def _tensors(examples, answer_lengths=(23, 31)):
    """Real log-mel of the (shipped, test-split) user audio; answer speech ids drawn at random (any ids do)."""
    processor = FunAudioChatProcessor(load_tokenizer())
    rows = {row["id"]: row for row in read_metadata()}
    generator = torch.Generator().manual_seed(0)
    tensors = {"features": {}, "speech_ids": {}, "num_samples": {}}
    for i, example in enumerate(examples):
        wave = load_audio(audio_path(rows[example.user_id]))
        mel, mask = processor.features([wave])
        tensors["features"][example.user_id] = mel[0, :, :int(mask.sum())]
        tensors["num_samples"][example.user_id] = torch.tensor([wave.size])
        tensors["speech_ids"][example.answer_speech_id] = torch.randint(
            0, 243, (answer_lengths[i % len(answer_lengths)],), generator=generator)
    return tensors, rows


def test_prompts_equal_the_released_processor(data, tokenizer, config):
    examples = data["heldout_text_facts"][:3]
    tensors, rows = _tensors(examples)
    processor = FunAudioChatProcessor(tokenizer, speech_pad_id=config.discrete.pad_token_id)
    waves = [load_audio(audio_path(rows[e.user_id])) for e in examples]
    expected = processor(audio=waves, task="s2t")
    batch = collate_dialogue(examples, tensors, tokenizer, config, with_labels=False, padding_side="left")
    for key in ("input_ids", "attention_mask", "speech_ids", "speech_attention_mask", "input_features",
                "feature_attention_mask", "feature_exist_mask"):
        assert torch.equal(batch[key], expected[key]), key
    s2m = collate_dialogue([e.__class__(**{**e.__dict__, "kind": "s2m"}) for e in examples], tensors, tokenizer,
                           config, with_labels=False, padding_side="left")
    assert torch.equal(s2m["input_ids"], processor(audio=waves, task="s2m")["input_ids"])
    asr = collate_dialogue([e.__class__(**{**e.__dict__, "kind": "asr"}) for e in examples[:1]], tensors,
                           tokenizer, config, with_labels=False)
    assert tokenizer.decode(asr["input_ids"][0]).endswith(
        f"<|audio_eos|>\n{ASR_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")


def test_training_batches_follow_the_released_label_conventions(data, tokenizer, config):
    """Two S2M chats collate like the official fixture's ``train`` batch (audios in reading order, user rows with
    features and placeholder ids, assistant rows with 10 bos + codes and a transcript), and the labels FunAudioChat
    builds from them equal ``build_assistant_labels`` on the assistant's slot."""
    from fac_mini.model import FunAudioChat

    examples = [e.__class__(**{**e.__dict__, "kind": "s2m"}) for e in data["heldout_speech_facts"][:2]]
    tensors, _ = _tensors(examples)
    batch = collate_dialogue(examples, tensors, tokenizer, config)
    official = BATCHES["train"]
    for key in ("feature_exist_mask", "text_attention_mask"):
        assert batch[key].tolist() == official[key].tolist()
    for key in official:
        if key in batch:
            assert batch[key].dtype == official[key].dtype, key
    disc = config.discrete
    assert (batch["speech_ids"][0][batch["speech_attention_mask"][0] == 1] == disc.pad_token_id).all()
    assert batch["speech_ids"][1, :SPEECH_DELAY].eq(disc.bos_token_id).all()
    torch.manual_seed(0)
    model = FunAudioChat(config).eval()
    with torch.no_grad():
        out = model(**batch)
    for row, example in enumerate(examples):
        labels = batch["labels"][row]
        reply = (labels != -100).nonzero().flatten()
        assert torch.equal(labels[reply], batch["input_ids"][row, reply])        # labels = the reply's ids
        assert reply.max() - reply.min() + 1 == len(reply)                        # one span, then padding
        transcript = torch.tensor(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
        slot = build_assistant_labels(transcript, tensors["speech_ids"][example.answer_speech_id], config,
                                      speech_delay=SPEECH_DELAY)
        start = int(reply.min())
        span = slice(start, start + len(slot.input_ids))
        assert torch.equal(batch["input_ids"][row, span], slot.input_ids)
        assert torch.equal(out.text_labels[row, span], slot.text_labels)
        speech = out.speech_labels.view(len(examples), -1, disc.group_size)[row, span]
        assert torch.equal(speech, slot.speech_labels)
        assert tokenizer.decode(batch["input_ids"][row, start + len(slot.input_ids)]) == "<|im_end|>"


def test_collate_rejects_bad_input(data, tokenizer, config):
    with pytest.raises(ValueError, match="at least one"):
        collate_dialogue([], {}, tokenizer, config)
    examples = data["heldout_text_facts"][:1]
    tensors, _ = _tensors(examples)
    with pytest.raises(ValueError, match="kind"):
        collate_dialogue([examples[0].__class__(**{**examples[0].__dict__, "kind": "t2s"})], tensors, tokenizer,
                         config)
    with pytest.raises(ValueError, match="padding_side"):
        collate_dialogue(examples, tensors, tokenizer, config, padding_side="middle")
