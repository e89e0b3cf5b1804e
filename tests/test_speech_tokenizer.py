"""fac_mini.speech_tokenizer and its recipe: the 25 Hz rate rule, batching, CTC pieces, a few training steps,
checkpoints and exact resume, the shipped checkpoint, and bad input. Tiny configs keep it fast (FSQ: test_fsq.py)."""
import json

import numpy as np
import pytest
import torch

from fac_mini.encoder import AudioEncoderConfig, encoder_output_lengths
from fac_mini.speech_tokenizer import (BLANK, PAD_ID, SPEECH_TOKENIZER_DIR, SpeechTokenizer, SpeechTokenizerConfig,
                                       build_char_vocab, ctc_greedy_decode, num_speech_tokens, text_to_ids)
from fac_mini.train.loop import TrainConfig
from fac_mini.train.speech_tokenizer import evaluate_speech_tokenizer, read_manifest, train_speech_tokenizer
from fac_mini.train.store import file_sha256


def tiny_config(**overrides) -> SpeechTokenizerConfig:
    settings = dict(levels=(3, 3, 3, 3), head_dim=32,
                    encoder=AudioEncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                               encoder_ffn_dim=64))
    settings.update(overrides)
    return SpeechTokenizerConfig(**settings)


def tiny_model(seed: int = 0) -> SpeechTokenizer:
    torch.manual_seed(seed)
    return SpeechTokenizer(tiny_config()).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clips():
    """Eight shipped test utterances as plain dicts (audio decoded once)."""
    from fac_mini.corpus import load_corpus

    dataset = load_corpus("test")
    return [dataset[i] for i in range(8)]


# --- characters, CTC decoding, distances ---------------------------------------------------------------
def test_text_vocab_and_decode():
    vocab = build_char_vocab(["Ab c.", "ca'b"])
    assert vocab == (BLANK, " ", "'", "a", "b", "c")
    assert text_to_ids("C a", vocab) == [5, 1, 3]
    with pytest.raises(ValueError, match="not in the CTC vocabulary"):
        text_to_ids("xyz", vocab)
    # best path [a a _ a b b _] -> "aab"
    path = torch.tensor([[3, 3, 0, 3, 4, 4, 0, 5]])
    log_probs = torch.nn.functional.one_hot(path, len(vocab)).float().log()
    assert ctc_greedy_decode(log_probs, torch.tensor([7]), vocab) == ["aab"]


# --- rates, batching, bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("seconds", [0.04, 0.5, 1.0, 1.02, 1.03, 2.0, 2.37, 4.56])
def test_token_rate_is_25_hz(seconds):
    model = tiny_model()
    samples = round(seconds * 16000)
    wave = np.random.default_rng(0).normal(scale=0.1, size=samples).astype(np.float32)
    ids = model.tokenize(wave)
    # rule: frames = samples // 160 mel frames; ids = (frames + 1) // 4 (a last partial 40 ms counts from 30 ms)
    assert ids.shape == (num_speech_tokens(samples),) == ((samples // 160 + 1) // 4,)
    assert ids.shape[0] == int(encoder_output_lengths(samples // 160)[1])
    if samples % 640 == 0:
        assert ids.shape[0] == samples // 640 == round(25 * seconds)
    assert {1.0: 25, 1.02: 25, 1.03: 26, 2.0: 50}.get(seconds, ids.shape[0]) == ids.shape[0]
    assert int(ids.min()) >= 0 and int(ids.max()) < model.codebook_size


def test_batched_equals_unbatched(clips):
    model = tiny_model()
    waves = [clip["audio"]["array"] for clip in clips[:5]]
    tokens = model.encode(waves)
    assert tokens.ids.shape[0] == 5 and tokens.ids.dtype == torch.long and tokens.mask.dtype == torch.bool
    for row, wave in enumerate(waves):
        alone = model.tokenize(wave)
        length = int(tokens.mask[row].sum())
        assert length == num_speech_tokens(len(wave)) == alone.shape[0]
        assert torch.equal(tokens.ids[row, :length], alone)
        assert (tokens.ids[row, length:] == PAD_ID).all()
    assert model.transcribe(waves[:2]) == [model.transcribe([w])[0] for w in waves[:2]]


def test_bad_input(clips):
    model = tiny_model()
    wave = clips[0]["audio"]["array"]
    original = wave.copy()
    stereo = np.stack([wave, 0.5 * wave])                       # (2, samples): averaged to mono
    assert torch.equal(model.tokenize(stereo), model.tokenize(0.75 * wave))
    assert np.array_equal(wave, original)                       # never mutated
    with pytest.raises(ValueError, match="NaN"):
        model.tokenize(np.where(np.arange(wave.size) == 100, np.nan, wave).astype(np.float32))
    with pytest.raises(ValueError, match="shorter than one 25 Hz"):
        model.tokenize(np.ones(300, dtype=np.float32) * 0.1)
    with pytest.raises(ValueError, match="clip 1"):
        model.encode([wave, np.zeros(100, dtype=np.float32)])
    with pytest.raises(ValueError, match="tokenize"):
        model.encode(np.stack([wave, wave]))                    # 2-D is ambiguous: a list of clips, please
    with pytest.raises(ValueError, match="mel bins"):
        model.encode(torch.zeros(1, 80, 100))


# --- training, checkpoints, resume ---------------------------------------------------------------------------
def test_few_steps_lower_the_loss(clips):
    train = clips[:4]
    result = train_speech_tokenizer(tiny_config(), TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup=3, log_every=1),
                                    dataset=train, progress=False)
    losses = [row["loss"] for row in result.log]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert result.model.config.char_vocab == build_char_vocab([clip["text"] for clip in train])


def test_save_load_round_trip(clips, tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    loaded = SpeechTokenizer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    waves = [clip["audio"]["array"] for clip in clips[:2]]
    assert torch.equal(model.encode(waves).ids, loaded.encode(waves).ids)
    assert not list(tmp_path.glob(".*tmp*"))                   # atomic writes leave no temporary files
    with pytest.raises(FileNotFoundError, match="config.json"):
        SpeechTokenizer.from_pretrained(tmp_path / "missing")
    config = json.loads((tmp_path / "config.json").read_text())
    config["head_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        SpeechTokenizer.from_pretrained(tmp_path)


def test_resume_is_exact(clips, tmp_path):
    train = clips[:6]
    config = TrainConfig(steps=6, batch_size=2, lr=3e-3, warmup=2, log_every=1, checkpoint_every=2)
    common = dict(dataset=train, progress=False)
    straight = train_speech_tokenizer(tiny_config(), config, state_dir=tmp_path / "a", **common)
    partial = train_speech_tokenizer(tiny_config(), config, state_dir=tmp_path / "b", stop_after=3, **common)
    assert partial.step == 3 and len(list((tmp_path / "b").glob("speech_tokenizer-*.pt"))) == 1   # 3 batches/epoch
    resumed = train_speech_tokenizer(tiny_config(), config, state_dir=tmp_path / "b", **common)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert straight.log == resumed.log and len(straight.log) == 6


def test_eval_rejects_an_empty_limit(clips):
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        evaluate_speech_tokenizer(tiny_model(), dataset=clips, limit=0)


# --- the shipped checkpoint ------------------------------------------------------------------------------------
@pytest.mark.skipif(not (SPEECH_TOKENIZER_DIR / "manifest.json").is_file(), reason="no shipped speech tokenizer")
def test_shipped_checkpoint(clips):
    manifest = read_manifest()
    for name, digest in manifest["files_sha256"].items():
        assert file_sha256(SPEECH_TOKENIZER_DIR / name) == digest, name
    assert (SPEECH_TOKENIZER_DIR / "model.safetensors").stat().st_size < 5 * 2**20
    model = SpeechTokenizer.from_pretrained(SPEECH_TOKENIZER_DIR)
    metrics = evaluate_speech_tokenizer(model, dataset=clips, limit=5, invariance=False)
    # deterministic: the same transcripts as when shipped (the test split's first 5 clips are the shipped clips)
    assert metrics["cer"] == manifest["metrics_first5"]["cer"]
    assert metrics["examples"] == manifest["metrics_first5"]["examples"]
    assert metrics["tokens_per_second"] == pytest.approx(25, abs=0.5)


def test_transcribe_ids_reads_the_same_text_from_ids_alone(clips):
    model = SpeechTokenizer.from_pretrained(SPEECH_TOKENIZER_DIR)
    waves = [clip["audio"]["array"] for clip in clips[:4]]
    ids, mask = model.encode(waves)
    assert model.transcribe_ids([row[keep] for row, keep in zip(ids, mask)]) == model.transcribe(waves)
    rows = [ids[0][mask[0]][:12], ids[1][mask[1]]]                    # different lengths: padding must not leak
    assert model.transcribe_ids(rows) == [model.transcribe_ids([row])[0] for row in rows]
    for bad in ([], [torch.tensor([], dtype=torch.long)], [torch.tensor([1.0, 2.0])], [torch.tensor([0, 243])],
                [torch.tensor([[1, 2]])]):
        with pytest.raises(ValueError, match="transcribe_ids|ids must lie"):
            model.transcribe_ids(bad)
