"""fac_mini.released.processing: placeholder counts, the chat template, Whisper features as released, batching, errors."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from fac_mini.released.processing import (AUDIO_TEMPLATE, S2M_SYSTEM_PROMPT, S2T_SYSTEM_PROMPT,
                                          FunAudioChatProcessor, audio_chat_prompt, expand_audio_tokens,
                                          num_audio_tokens, num_speech_frames)
from fac_mini.tokenizer import load_tokenizer

AUDIO, ABOS, AEOS, PAD = 3, 4, 5, 0          # course tokenizer ids
SPEECH_PAD = 6563


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return FunAudioChatProcessor(tokenizer)


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128)


def _noise(samples, seed=0, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(samples) * scale).astype(np.float32)


@pytest.mark.parametrize("seconds, frames, groups", [
    (0.04, 1, 1), (0.5, 12, 3), (0.99, 24, 5), (1.0, 25, 5), (1.03, 25, 5), (1.23, 30, 6), (2.0, 50, 10)])
def test_placeholder_counts(processor, seconds, frames, groups):
    samples = round(seconds * 16000)
    assert num_speech_frames(samples) == int(samples / 16000 * 25) == frames
    assert num_audio_tokens(frames) == math.ceil(frames / 5) == groups
    inputs = processor(audio=_noise(samples))
    assert (inputs["input_ids"] == AUDIO).sum().item() == groups
    speech_ids, speech_mask = inputs["speech_ids"], inputs["speech_attention_mask"]
    assert speech_ids.shape == (1, 5 * groups) and speech_ids.shape[1] % 5 == 0
    assert torch.all(speech_ids == SPEECH_PAD)
    assert speech_mask.tolist() == [[1] * frames + [0] * (5 * groups - frames)]
    assert inputs["feature_exist_mask"].tolist() == [True]


def test_chat_template_exact(processor, tokenizer):
    inputs = processor(audio=_noise(8000))                                  # 0.5 s -> 12 frames -> 3 groups
    expected = ("<|im_start|>system\nYou are asked to generate text tokens.<|im_end|>\n<|im_start|>user\n"
                "<|audio_bos|><|AUDIO|><|AUDIO|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n")
    assert processor.decode(inputs["input_ids"][0], skip_special_tokens=False) == expected
    assert inputs["input_ids"][0].tolist() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    inputs = processor(audio=_noise(8000), task="s2m", instruction="Answer briefly.")
    expected = ("<|im_start|>system\nYou are asked to generate both text and speech tokens at the same time."
                "<|im_end|>\n<|im_start|>user\n<|audio_bos|><|AUDIO|><|AUDIO|><|AUDIO|><|audio_eos|>\n"
                "Answer briefly.<|im_end|>\n<|im_start|>assistant\n")
    assert processor.decode(inputs["input_ids"][0], skip_special_tokens=False) == expected
    assert processor.prompt("s2m") == audio_chat_prompt(S2M_SYSTEM_PROMPT)
    assert processor.prompt("s2t") == audio_chat_prompt(S2T_SYSTEM_PROMPT)
    assert processor.prompt(system="Be kind.").startswith("<|im_start|>system\nBe kind.<|im_end|>")


def test_expand_audio_tokens_adds_markers_only_when_missing():
    assert expand_audio_tokens("x<|AUDIO|>y", [2]) == "x<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>y"
    assert expand_audio_tokens(f"a{AUDIO_TEMPLATE}b{AUDIO_TEMPLATE}", [1, 2]) == \
        "a<|audio_bos|><|AUDIO|><|audio_eos|>b<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>"
    with pytest.raises(ValueError, match="1 <\\|AUDIO\\|> placeholders but 2 audios"):
        expand_audio_tokens("<|AUDIO|>", [1, 1])


@pytest.mark.parametrize("samples", [8000, 16480, 16001, 12345, 32000])
def test_features_equal_released_extractor_on_valid_frames(processor, whisper, samples):
    wave = _noise(samples, seed=samples)
    wave[-60:] *= 5                                            # loud end: the zero right context matters
    reference = whisper(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                        return_tensors="pt")                    # the released call: 30 s, 3000 frames
    valid = int(reference.attention_mask.sum())
    assert valid == math.ceil(samples / 160)
    inputs = processor(audio=wave)
    features, mask = inputs["input_features"], inputs["feature_attention_mask"]
    assert features.shape == (1, 128, valid) and mask.tolist() == [[1] * valid]
    assert (features[0] - reference.input_features[0, :, :valid]).abs().max().item() <= 1e-5
    full = FunAudioChatProcessor(processor.tokenizer, feature_padding="max_length")(audio=wave)
    assert full["input_features"].shape == (1, 128, 3000)
    assert (full["input_features"] - reference.input_features).abs().max().item() <= 1e-5
    assert torch.equal(full["feature_attention_mask"], reference.attention_mask.long())


def test_batch_is_left_padded_and_rows_match_single_calls(processor):
    waves = [_noise(8000, seed=1), _noise(16480, seed=2)]
    batch = processor(audio=waves, task="s2m")
    singles = [processor(audio=wave, task="s2m") for wave in waves]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and mask.shape == ids.shape
    for row, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert ids[row, ids.shape[1] - n:].tolist() == single["input_ids"][0].tolist()
        assert torch.all(ids[row, :ids.shape[1] - n] == PAD)
        valid = int(single["feature_attention_mask"].sum())
        assert int(batch["feature_attention_mask"][row].sum()) == valid
        assert torch.equal(batch["input_features"][row, :, :valid], single["input_features"][0, :, :valid])
    assert batch["speech_ids"].shape == (2, 25)
    assert batch["speech_attention_mask"].sum(1).tolist() == [12, 25]
    assert batch["feature_exist_mask"].tolist() == [True, True]


def test_explicit_text_with_two_audios_and_right_padding(tokenizer):
    processor = FunAudioChatProcessor(tokenizer, padding_side="right")
    text = ["<|im_start|>user\nfirst <|AUDIO|> then <|AUDIO|><|im_end|>\n", "<|im_start|>user\nno audio<|im_end|>\n"]
    inputs = processor(text, [_noise(8000), _noise(16000)])
    assert (inputs["input_ids"][0] == AUDIO).sum().item() == 3 + 5
    assert (inputs["input_ids"][1] == AUDIO).sum().item() == 0
    assert inputs["attention_mask"][1, 0].item() == 1                # right padding: real tokens first
    assert inputs["speech_ids"].shape == (2, 25)


def test_resampled_audio_counts_frames_at_16k(processor):
    inputs = processor(audio=_noise(11025), sampling_rate=22050)     # 0.5 s -> 8000 samples at 16 kHz
    assert inputs["speech_attention_mask"].sum().item() == 12
    assert inputs["feature_attention_mask"].sum().item() == 50


def test_long_audio_warns_and_keeps_all_placeholders(processor):
    with pytest.warns(UserWarning, match="features stop at 30.0 s"):
        inputs = processor(audio=_noise(31 * 16000))
    assert inputs["speech_attention_mask"].sum().item() == 775
    assert (inputs["input_ids"] == AUDIO).sum().item() == 155
    assert inputs["feature_attention_mask"].sum().item() == 3000


def test_processor_output_feeds_the_model(processor):
    from fac_mini.model import FunAudioChat, FunAudioChatConfig

    torch.manual_seed(0)
    model = FunAudioChat(FunAudioChatConfig()).eval()
    processor.check_config(model.config)
    inputs = processor(audio=[_noise(8000), _noise(12345, seed=3)], task="s2m")
    with torch.no_grad():
        out = model(**inputs)
    assert out.text_logits.shape == (2, inputs["input_ids"].shape[1], 512)


def test_inputs_are_not_mutated(processor):
    wave = _noise(8000)
    tensor = torch.from_numpy(_noise(9000, seed=4))
    before = (wave.copy(), tensor.clone())
    texts = [audio_chat_prompt(), audio_chat_prompt()]
    texts_before = copy.deepcopy(texts)
    processor(texts, [wave, tensor])
    assert np.array_equal(wave, before[0]) and torch.equal(tensor, before[1]) and texts == texts_before


def test_from_pretrained_reads_the_folder(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"audio_config": {"pad_token_id": 6563, "group_size": 5}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"feature_size": 128, "chunk_length": 30, "sampling_rate": 16000}))
    processor = FunAudioChatProcessor.from_pretrained(tmp_path)
    assert (processor.audio_token_id, processor.audio_bos_id, processor.audio_eos_id, processor.sil_id) == (3, 4, 5, 7)
    assert processor.speech_pad_id == 6563 and processor.max_feature_seconds == 30.0
    assert processor(audio=_noise(8000))["input_ids"].tolist() == \
        FunAudioChatProcessor(tokenizer)(audio=_noise(8000))["input_ids"].tolist()
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        FunAudioChatProcessor.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        FunAudioChatProcessor.from_pretrained(tmp_path / "empty")


def test_check_config_catches_other_ids(processor):
    from fac_mini.model import FunAudioChatConfig

    with pytest.raises(ValueError, match="audio_token_index=9"):
        processor.check_config(FunAudioChatConfig(audio_token_index=9))


@pytest.mark.parametrize("audio, message", [
    (np.zeros(0, np.float32), "is empty"),
    (np.zeros(600, np.float32), "shorter than one 25 Hz speech frame"),
    (np.full(1000, np.nan, np.float32), "NaN or infinite"),
])
def test_bad_audio_is_rejected(processor, audio, message):
    with pytest.raises(ValueError, match=message):
        processor(audio=audio)


def test_bad_calls_are_rejected(processor):
    with pytest.raises(ValueError, match="1 <\\|AUDIO\\|> placeholders in all but 2 audios"):
        processor(audio_chat_prompt(), [_noise(8000), _noise(8000)])
    with pytest.raises(ValueError, match="pass audio"):
        processor()
    with pytest.raises(ValueError, match="task='t2t'"):
        processor(audio=_noise(8000), task="t2t")
    with pytest.raises(ValueError, match="instruction/system only build the default prompt"):
        processor(audio_chat_prompt(), _noise(8000), instruction="hi")
    with pytest.raises(ValueError, match="feature_padding"):
        FunAudioChatProcessor(processor.tokenizer, feature_padding="30s")


def test_tokenizer_without_audio_token_is_rejected():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "a": 2}
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                    unk_token="[UNK]", pad_token="<|endoftext|>")
    with pytest.raises(ValueError, match="has no <\\|AUDIO\\|> token"):
        FunAudioChatProcessor(plain)
