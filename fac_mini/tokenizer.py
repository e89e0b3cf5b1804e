"""The course's text tokenizer: a small byte-level BPE trained on the mini world's text.

It carries the special tokens of the released model's tokenizer (chat markers, the audio placeholder and
markers, and the text-side silence token ``<|sil|>``), and it is saved in the Hugging Face format so that
``transformers.AutoTokenizer``/``PreTrainedTokenizerFast`` loads it, as the released checkpoint's tokenizer is.
"""
from __future__ import annotations

from pathlib import Path

from . import DATA_DIR
from .world import build_world

__all__ = ["SPECIAL_TOKENS", "TOKENIZER_DIR", "train_tokenizer", "load_tokenizer"]

TOKENIZER_DIR = DATA_DIR / "tokenizer"
# The same strings (and the same order) as the released Qwen3-based tokenizer's specials.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                  "<|audio_eos|>", "<|audio_pad|>", "<|sil|>")
VOCAB_SIZE = 512


def train_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on every text of the world (statements, questions, answers); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    world = build_world(seed)
    corpus = sorted({text for t in world.texts for text in (t.text, t.answer) if text})
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def load_tokenizer(path: Path | str = TOKENIZER_DIR):
    """Load the shipped tokenizer (``data/tokenizer``) with transformers; clear error if it is missing."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; run `python -m fac_mini data build`")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
