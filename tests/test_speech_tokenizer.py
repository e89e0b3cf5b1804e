"""fac_mini.speech_tokenizer: FSQ against vector_quantize_pytorch, the 25 Hz rate rule, batching, CTC pieces,
a few training steps, checkpoints and exact resume, the shipped checkpoint, and bad input. Tiny configs keep it fast."""
import json

import numpy as np
import pytest
import torch

from fac_mini.audio import log_mel
from fac_mini.encoder import AudioEncoderConfig, encoder_output_lengths
from fac_mini.speech_tokenizer import (BLANK, FSQ, PAD_ID, SPEECH_TOKENIZER_DIR, SpeechTokenizer,
                                       SpeechTokenizerConfig, build_char_vocab, character_error_rate,
                                       ctc_greedy_decode, dedup_consecutive, edit_distance,
                                       evaluate_speech_tokenizer, fsq_codes_to_indices, fsq_indices_to_codes,
                                       fsq_quantize, normalize_text, normalized_edit_distance, num_speech_tokens,
                                       pad_features, read_manifest, text_to_ids, train_speech_tokenizer)


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


# --- FSQ --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [[3] * 8, [8, 5, 5, 5]])  # the released 3^8 = 6561, and one with an even level
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fsq_matches_vector_quantize_pytorch(levels, dtype):
    from vector_quantize_pytorch import FSQ as ReferenceFSQ

    reference = ReferenceFSQ(levels=levels)  # dim = len(levels): no projections, codes come out unchanged
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 4.0]).repeat_interleave(200)[None, :, None]  # small, medium, saturated
    z = (torch.randn(2, 600, len(levels), generator=generator) * scales).to(dtype)
    z_student = z.clone().requires_grad_(True)
    z_reference = z.clone().requires_grad_(True)
    expected_codes, expected_indices = reference(z_reference)
    codes = fsq_quantize(z_student, levels)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(fsq_codes_to_indices(codes, levels), expected_indices.long())
    # the straight-through gradient is the same too
    weights = torch.randn(z.shape, generator=generator, dtype=dtype)
    (codes * weights).sum().backward()
    (expected_codes * weights).sum().backward()
    assert torch.allclose(z_student.grad, z_reference.grad, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.equal(z, z_student.detach())  # input not changed
    # the whole implicit codebook, in the same id order
    size = int(np.prod(levels))
    assert torch.equal(fsq_indices_to_codes(torch.arange(size), levels), reference.implicit_codebook.float())
    assert torch.equal(fsq_codes_to_indices(fsq_indices_to_codes(torch.arange(size), levels), levels),
                       torch.arange(size))


def test_fsq_levels_grid_and_module():
    z = torch.linspace(-6, 6, 1001)[:, None].repeat(1, 2)
    codes = fsq_quantize(z, [5, 4])
    assert sorted(set(codes[:, 0].tolist())) == [-1.0, -0.5, 0.0, 0.5, 1.0]     # odd: symmetric
    assert sorted(set(codes[:, 1].tolist())) == [-1.0, -0.5, 0.0, 0.5]          # even: one more level below 0
    assert fsq_quantize(torch.zeros(1, 2), [5, 4]).abs().sum() == 0             # 0 stays on level 0
    quantizer = FSQ([3] * 8)
    assert quantizer.codebook_size == 6561 and len(list(quantizer.parameters())) == 0
    codes, ids = quantizer(torch.randn(2, 7, 8))
    assert codes.shape == (2, 7, 8) and ids.shape == (2, 7) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 6561
    with pytest.raises(ValueError, match="last axis"):
        fsq_quantize(torch.randn(3, 5), [3] * 4)
    with pytest.raises(ValueError, match="levels"):
        FSQ([3, 1])
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        fsq_indices_to_codes(torch.tensor([9]), [3, 3])


# --- characters, CTC decoding, distances ---------------------------------------------------------------
def test_text_vocab_decode_and_distances():
    assert normalize_text("  Where's  Dunmere?  Well-known, yes.") == "where's dunmere well known yes"
    vocab = build_char_vocab(["Ab c.", "ca'b"])
    assert vocab == (BLANK, " ", "'", "a", "b", "c")
    assert text_to_ids("C a", vocab) == [5, 1, 3]
    with pytest.raises(ValueError, match="not in the CTC vocabulary"):
        text_to_ids("xyz", vocab)
    # best path [a a _ a b b _] -> "aab"
    path = torch.tensor([[3, 3, 0, 3, 4, 4, 0, 5]])
    log_probs = torch.nn.functional.one_hot(path, len(vocab)).float().log()
    assert ctc_greedy_decode(log_probs, torch.tensor([7]), vocab) == ["aab"]
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], [1, 2]) == 2
    assert character_error_rate(["abcd"], ["abxd"]) == 0.25
    assert dedup_consecutive([5, 5, 7, 5, 5]) == [5, 7, 5]
    assert normalized_edit_distance([1, 1, 2, 2], [1, 2]) == 0.0
    assert normalized_edit_distance([1, 1, 2, 2], [1, 2], dedup=False) == 0.5


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
def test_few_steps_lower_the_loss(clips, tmp_path):
    train = clips[:4]
    model, manifest = train_speech_tokenizer(tiny_config(), 30, batch_size=4, lr=3e-3, warmup=3, dataset=train,
                                             out_dir=tmp_path / "out", work_dir=tmp_path / "work", evaluate=False,
                                             progress=False)
    losses = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert losses["steps"] == 30 and set(losses["files_sha256"]) == {"model.safetensors", "config.json"}
    state = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    assert np.mean(state["losses"][-5:]) < 0.8 * np.mean(state["losses"][:5])
    assert model.config.char_vocab == build_char_vocab([clip["text"] for clip in train])


def test_speaker_adversary_reverses_its_gradient(clips):
    from fac_mini.speech_tokenizer import _ReverseGradient

    x = torch.ones(3, requires_grad=True)
    (_ReverseGradient.apply(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-0.5, -1.0, -1.5]))
    torch.manual_seed(0)
    model = SpeechTokenizer(tiny_config(speaker_classes=2))
    features, lengths = pad_features([log_mel(clip["audio"]["array"]) for clip in clips[:2]])
    parts = model.losses(features, lengths, [clip["text"] for clip in clips[:2]], torch.tensor([0, 1]))
    assert set(parts) == {"ctc", "adversary", "total"} and parts["adversary"].item() > 0
    parts["adversary"].backward()
    # the adversary learns to recognise the voice, the encoder receives the opposite push
    classifier_grad = model.speaker_head.conv.weight.grad.clone()
    encoder_grad = model.encoder.proj.weight.grad.clone()
    model.zero_grad()
    plain = model(features, lengths)
    logits = model.speaker_head(plain.codes, plain.mask)
    labels = torch.tensor([0, 1])[:, None].expand(plain.mask.shape)
    torch.nn.functional.cross_entropy(logits[plain.mask], labels[plain.mask]).backward()
    assert torch.allclose(model.speaker_head.conv.weight.grad, classifier_grad)
    assert torch.allclose(model.encoder.proj.weight.grad, -encoder_grad, atol=1e-7)


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
    common = dict(batch_size=2, lr=3e-3, warmup=2, dataset=train, evaluate=False, progress=False, checkpoint_every=2)
    straight, _ = train_speech_tokenizer(tiny_config(), 6, out_dir=tmp_path / "a", work_dir=tmp_path / "wa", **common)
    _, partial = train_speech_tokenizer(tiny_config(), 6, out_dir=tmp_path / "b", work_dir=tmp_path / "wb",
                                        stop_after=3, **common)   # crosses an epoch boundary (3 batches/epoch)
    assert partial == {} and torch.load(tmp_path / "wb" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed, _ = train_speech_tokenizer(tiny_config(), 6, out_dir=tmp_path / "b", work_dir=tmp_path / "wb", **common)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    losses_a = torch.load(tmp_path / "wa" / "checkpoint.pt", weights_only=False)["losses"]
    losses_b = torch.load(tmp_path / "wb" / "checkpoint.pt", weights_only=False)["losses"]
    assert losses_a == losses_b and len(losses_a) == 6


# --- the shipped checkpoint ------------------------------------------------------------------------------------
@pytest.mark.skipif(not (SPEECH_TOKENIZER_DIR / "manifest.json").is_file(), reason="no shipped speech tokenizer")
def test_shipped_checkpoint(clips):
    import hashlib

    manifest = read_manifest()
    for name, digest in manifest["files_sha256"].items():
        assert hashlib.sha256((SPEECH_TOKENIZER_DIR / name).read_bytes()).hexdigest() == digest, name
    assert (SPEECH_TOKENIZER_DIR / "model.safetensors").stat().st_size < 5 * 2**20
    model = SpeechTokenizer.from_pretrained(SPEECH_TOKENIZER_DIR)
    metrics = evaluate_speech_tokenizer(model, dataset=clips, limit=5, invariance=False)
    assert abs(metrics["cer"] - manifest["metrics_first5"]["cer"]) < 0.02
    assert metrics["cer"] <= manifest["metrics"]["cer"] + 0.15
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


def test_check_fsq_quantize(capsys):
    from fac_mini.checks import check_fsq_quantize

    assert check_fsq_quantize(fsq_quantize) is None          # checks print their verdict, they return nothing
    assert "[pass]" in capsys.readouterr().out

    def without_even_shift(z, levels):  # a plausible mistake: no offset/shift for even levels
        half = (torch.tensor(levels) - 1) * (1 + 1e-3) / 2
        bounded = torch.tanh(z) * half
        return (bounded + (bounded.round() - bounded).detach()) / (torch.tensor(levels) // 2)

    for wrong in (without_even_shift, lambda z, levels: torch.tanh(z)):
        check_fsq_quantize(wrong)
        out = capsys.readouterr().out
        assert "[fail]" in out and "[pass]" not in out
