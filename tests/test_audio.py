"""fac_mini.audio: Whisper log-mel (contract in COURSE.md section 6), loading, and bad input."""
import numpy as np
import pytest
import soundfile as sf
import torch

from fac_mini.audio import MIN_SAMPLES, as_mono_float, load_audio, log_mel, log_mel_batch, mel_filterbank, resample


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128)


def _noise(samples, seed=0, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(samples) * scale).astype(np.float32)


def test_mel_filterbank_matches_librosa():
    import librosa

    ours = mel_filterbank(128, 400, 16000).numpy()
    reference = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128)
    assert ours.shape == (128, 201)
    assert np.abs(ours - reference).max() < 1e-7
    ours80 = mel_filterbank(80, 400, 16000, f_min=50.0, f_max=7000.0).numpy()
    assert np.abs(ours80 - librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, fmin=50.0, fmax=7000.0)).max() < 1e-7


@pytest.mark.parametrize("samples", [640, 12345, 16000, 5 * 16000 + 7])
def test_log_mel_matches_whisper_extractor(whisper, samples):
    wave = _noise(samples, seed=samples)
    reference = whisper(wave, sampling_rate=16000, padding="longest", return_tensors="pt").input_features[0]
    ours = log_mel(wave)
    assert ours.shape == reference.shape == (128, samples // 160)
    assert (ours - reference).abs().max().item() <= 1e-4


def test_log_mel_of_speech_matches_whisper(whisper):
    from fac_mini.corpus import load_corpus

    wave = load_corpus("test")[0]["audio"]["array"]
    reference = whisper(wave, sampling_rate=16000, padding="longest", return_tensors="pt").input_features[0]
    assert (log_mel(wave) - reference).abs().max().item() <= 1e-4


def test_log_mel_resamples_other_rates(whisper):
    import librosa

    wave = _noise(22050 * 2, seed=3)
    at_16k = librosa.resample(wave, orig_sr=22050, target_sr=16000)
    reference = whisper(at_16k, sampling_rate=16000, padding="longest", return_tensors="pt").input_features[0]
    ours = log_mel(wave, sampling_rate=22050)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4


def test_log_mel_accepts_torch_int16_and_stereo():
    wave = _noise(16000, seed=4)
    expected = log_mel(wave)
    assert torch.equal(log_mel(torch.from_numpy(wave)), expected)
    pcm = (wave * 32768).astype(np.int16)
    assert (log_mel(pcm) - log_mel(pcm.astype(np.float32) / 32768)).abs().max() == 0
    stereo = np.stack([wave, wave])                      # (channels, samples)
    assert torch.allclose(log_mel(stereo), expected)
    assert torch.allclose(log_mel(stereo.T), expected)   # (samples, channels)


def test_log_mel_does_not_mutate_input():
    tensor = torch.from_numpy(_noise(8000, seed=5))
    before = tensor.clone()
    log_mel(tensor)
    array = _noise(8000, seed=6)
    array_before = array.copy()
    log_mel(array, sampling_rate=8000)
    assert torch.equal(tensor, before) and np.array_equal(array, array_before)


def test_log_mel_batch_matches_whisper_padding_longest(whisper):
    waves = [_noise(16000, seed=7), _noise(24000, seed=8), _noise(9000, seed=9)]
    reference = whisper(waves, sampling_rate=16000, padding="longest", return_tensors="pt", return_attention_mask=True)
    features, frames_mask = log_mel_batch(waves)
    assert features.shape == reference.input_features.shape
    assert (features - reference.input_features).abs().max().item() <= 1e-4
    assert torch.equal(frames_mask, reference.attention_mask.bool())
    assert frames_mask.sum(1).tolist() == [100, 150, 57]


@pytest.mark.parametrize("bad, message", [
    (np.zeros(0, np.float32), "is empty"),
    (np.full(1000, np.nan, np.float32), "NaN or infinite"),
    (np.zeros((2, 2, 100), np.float32), "must be 1-D"),
    (np.zeros(MIN_SAMPLES - 1, np.float32), "shorter than one 25 Hz speech frame"),
    (np.ones(1000, dtype=bool), "has dtype bool"),
    (np.ones(1000, dtype=np.complex64), "has dtype complex64"),
])
def test_log_mel_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        log_mel(bad)


def test_too_short_after_resampling_is_rejected():
    with pytest.raises(ValueError, match="shorter than one 25 Hz speech frame"):
        log_mel(np.ones(500, np.float32) * 0.1, sampling_rate=22050)   # 500 samples at 22.05 kHz = 363 at 16 kHz


def test_resample_rejects_bad_rates():
    with pytest.raises(ValueError, match="sampling rates must be positive"):
        resample(np.zeros(10, np.float32), 0, 16000)


def test_as_mono_float_silence_rules():
    assert as_mono_float(np.zeros(100, np.float32)).shape == (100,)
    with pytest.raises(ValueError, match="is silent"):
        as_mono_float(np.zeros(100, np.float32), allow_silent=False)


def test_load_audio_reads_resamples_and_mixes(tmp_path):
    wave = _noise(22050, seed=10)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([wave, wave], axis=1), 22050, subtype="FLOAT")
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    assert abs(loaded.size - 16000) <= 1
    assert np.allclose(loaded, resample(wave, 22050, 16000), atol=1e-6)


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio file not found: .*missing.wav"):
        load_audio(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 3)
    with pytest.raises(ValueError, match="cannot decode audio file .*corrupt.wav"):
        load_audio(corrupt)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(1600, np.float32), 16000)
    with pytest.raises(ValueError, match="audio file .*silent.wav is silent"):
        load_audio(silent)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="audio file .*empty.wav is empty"):
        load_audio(empty)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="audio file .*nan.wav contains 1600 NaN"):
        load_audio(nan)
