"""The course's text tokenizer (shipped in data/tokenizer, loaded through transformers)."""
import pytest

from fac_mini.tokenizer import SPECIAL_TOKENS, load_tokenizer
from fac_mini.world import build_world


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>"
    assert tokenizer(text).input_ids[:1] == [1] and tokenizer.convert_tokens_to_ids("<|AUDIO|>") in tokenizer(text).input_ids


def test_round_trip_on_every_world_text(tokenizer):
    for example in build_world(0).texts:
        for text in (example.text, example.answer):
            if text:
                assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert len(tokenizer) == 512


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)
