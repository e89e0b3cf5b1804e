"""fac_mini.quality: PESQ-WB, STOI, MCD (cross-checked against scipy's DCT and librosa), DNSMOS, Griffin-Lim
(cross-checked against librosa's mel_to_audio), the speech tokenizer's read-back, and bad input. A few short corpus
clips keep the module to seconds; DNSMOS runs on one clip only."""
import numpy as np
import pytest
import torch

from fac_mini.audio import VOCODER_HOP, vocoder_mel
from fac_mini.quality import (copy_synthesis_report, dct_matrix, dnsmos, griffin_lim, mel_cepstra,
                              mel_cepstral_distortion, pesq_wb, read_back, read_back_cer, stoi)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    from fac_mini.corpus import load_corpus

    return load_corpus("test")


@pytest.fixture(scope="module")
def clips(corpus):
    return [corpus[i]["audio"]["array"] for i in range(2)]


def _with_noise(wave, snr_db, seed=0):
    """``wave`` plus white noise at ``snr_db`` below the clip's mean power."""
    noise = np.random.default_rng(seed).standard_normal(wave.size)
    noise *= np.sqrt(np.mean(wave.astype(np.float64) ** 2) / 10 ** (snr_db / 10) / np.mean(noise ** 2))
    return (wave + noise).astype(np.float32)


def test_identity_scores(clips):
    wave = clips[0]
    assert abs(pesq_wb(wave, wave) - 4.64) < 0.01
    assert abs(stoi(wave, wave) - 1.0) < 1e-6
    assert mel_cepstral_distortion(wave, wave) == 0.0


def test_white_noise_lowers_pesq_and_raises_mcd(clips):
    wave = clips[0]
    noisy = _with_noise(wave, 20)
    noise = (noisy - wave).astype(np.float64)
    measured_snr = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert abs(measured_snr - 20) < 0.01
    assert pesq_wb(wave, noisy) < 3.0                  # 4.64 for the clean clip
    assert stoi(wave, noisy) < 1.0
    assert mel_cepstral_distortion(wave, noisy) > 2.0
    # more noise, worse on every metric
    noisier = _with_noise(wave, 5)
    assert pesq_wb(wave, noisier) < pesq_wb(wave, noisy)
    assert stoi(wave, noisier) < stoi(wave, noisy)
    assert mel_cepstral_distortion(wave, noisier) > mel_cepstral_distortion(wave, noisy)


def test_lengths_are_trimmed_to_the_shorter(clips):
    wave = clips[0]
    noisy = _with_noise(wave, 20)
    longer = np.concatenate([noisy, np.full(700, 0.01, np.float32)])   # 700 extra samples are ignored
    assert pesq_wb(wave, longer) == pesq_wb(wave, noisy)
    assert stoi(wave, longer) == stoi(wave, noisy)
    assert mel_cepstral_distortion(wave, longer) == mel_cepstral_distortion(wave, noisy)
    assert mel_cepstral_distortion(longer, wave) == mel_cepstral_distortion(noisy, wave)


def test_dct_matrix_is_scipys_orthonormal_dct():
    from scipy.fft import dct

    x = np.random.default_rng(0).standard_normal((80, 7))
    matrix = dct_matrix(80)
    assert np.abs(matrix @ x - dct(x, type=2, norm="ortho", axis=0)).max() < 1e-12
    assert np.abs(matrix @ matrix.T - np.eye(80)).max() < 1e-12
    assert np.abs(mel_cepstra(torch.from_numpy(x)) - dct(x, type=2, norm="ortho", axis=0)).max() < 1e-12


def test_mcd_matches_an_independent_librosa_computation(clips):
    """The whole MCD again from librosa alone: its STFT and mel filters (melspectrogram, magnitude), the natural log
    with the same floor, its MFCC (an orthonormal DCT-II), coefficients 1..13, the same formula."""
    import librosa

    wave = clips[1]
    noisy = _with_noise(wave, 15, seed=1)

    def librosa_cepstra(y):
        mel = librosa.feature.melspectrogram(y=y.astype(np.float64), sr=16000, n_fft=1280, hop_length=320,
                                             power=1.0, n_mels=80, fmax=8000, center=True, pad_mode="reflect")
        log_mel = np.log(np.maximum(mel, 1e-5))
        return librosa.feature.mfcc(S=log_mel, n_mfcc=14, dct_type=2, norm="ortho")[1:], log_mel

    reference, reference_log_mel = librosa_cepstra(wave)
    degraded, _ = librosa_cepstra(noisy)
    speech = reference_log_mel.max(axis=0) > np.log(1e-5) + 1e-4
    expected = np.mean(10 / np.log(10) * np.sqrt(2 * ((reference - degraded)[:, speech] ** 2).sum(axis=0)))
    ours = mel_cepstral_distortion(wave, noisy)
    assert abs(ours - expected) / expected < 1e-3, (ours, expected)


def test_mcd_leaves_out_digital_silence(clips):
    wave = clips[0]
    noisy = _with_noise(wave, 20)
    silence = np.zeros(16000, np.float32)                               # 1 s: 50 frames of exact zeros
    padded = mel_cepstral_distortion(np.concatenate([wave, silence]), np.concatenate([noisy, silence]))
    plain = mel_cepstral_distortion(wave, noisy)
    assert abs(padded - plain) / plain < 0.02
    # counting the 50 silent frames (distortion 0) would have lowered the mean by about a third
    frames = vocoder_mel(wave).shape[1]
    assert plain * frames / (frames + 50) < 0.8 * padded


def test_dnsmos_on_one_clip(clips):
    scores = dnsmos(clips[0])
    assert set(scores) == {"ovrl", "sig", "bak", "p808"}
    assert all(isinstance(value, float) and 1.0 <= value <= 5.0 for value in scores.values())
    assert scores["ovrl"] <= max(scores["sig"], scores["bak"])           # the overall is not above both parts


def test_griffin_lim_is_deterministic_and_is_librosas_mel_to_audio(clips, monkeypatch):
    import librosa

    log_mel = vocoder_mel(clips[0][:8000]).numpy()                      # 0.5 s: 26 frames
    wave = griffin_lim(log_mel, n_iter=8, seed=3)
    assert wave.shape == ((log_mel.shape[1] - 1) * VOCODER_HOP,) and wave.dtype == np.float32
    assert np.array_equal(wave, griffin_lim(torch.from_numpy(log_mel), n_iter=8, seed=3))
    assert not np.array_equal(wave, griffin_lim(log_mel, n_iter=8, seed=4))
    assert np.array_equal(griffin_lim(log_mel, n_iter=8, seed=None), griffin_lim(log_mel, n_iter=8, seed=None))
    # mel_to_audio draws its random phase from np.random.default_rng(); hand it the same seeded generator
    monkeypatch.setattr(np.random, "default_rng", lambda *args: np.random.RandomState(3))
    expected = librosa.feature.inverse.mel_to_audio(np.exp(log_mel), sr=16000, n_fft=1280, hop_length=320,
                                                    win_length=1280, power=1.0, n_iter=8, pad_mode="reflect",
                                                    fmax=8000, length=wave.size)
    assert np.abs(wave - expected).max() < 1e-6


def test_griffin_lim_of_a_corpus_clip(clips):
    """The zero-training baseline, 32 iterations (measured on 16 test clips: PESQ-WB 2.0, STOI 0.90)."""
    wave = clips[1]
    synthesis = griffin_lim(vocoder_mel(wave))
    assert 1.6 < pesq_wb(wave, synthesis) < 3.2
    assert stoi(wave, synthesis) > 0.85
    report = copy_synthesis_report([wave, wave], [synthesis, wave])
    assert report["clips"] == 2 and set(report) == {"clips", "pesq_wb", "stoi", "mcd_db"}
    assert abs(report["mcd_db"] - round(mel_cepstral_distortion(wave, synthesis) / 2, 4)) < 1e-3


def test_read_back_is_the_tokenizer_evaluation(corpus):
    """read_back_cer of the first test clips equals the speech tokenizer recipe's own CER on them."""
    from fac_mini.speech_tokenizer import load_speech_tokenizer
    from fac_mini.train.speech_tokenizer import evaluate_speech_tokenizer

    count = 5
    waves = [corpus[i]["audio"]["array"] for i in range(count)]
    texts = corpus["text"][:count]
    expected = evaluate_speech_tokenizer(load_speech_tokenizer(), "test", dataset=corpus, limit=count,
                                         invariance=False)
    transcripts = read_back(waves)
    assert len(transcripts) == count and all(isinstance(text, str) for text in transcripts)
    assert [example["hypothesis"] for example in expected["examples"]] == transcripts[:3]
    assert round(read_back_cer(waves, texts), 4) == expected["cer"]
    assert read_back(waves, batch_size=2) == transcripts                 # batching does not change transcripts
    assert read_back_cer(waves, texts) < read_back_cer(waves[::-1], texts)   # wrong texts score worse


def test_inputs_are_not_modified(clips):
    reference = torch.from_numpy(clips[0].copy())
    degraded = _with_noise(clips[0], 20)
    before = (reference.clone(), degraded.copy())
    pesq_wb(reference, degraded), stoi(reference, degraded), mel_cepstral_distortion(reference, degraded)
    log_mel = vocoder_mel(clips[0][:4000])
    log_mel_before = log_mel.clone()
    griffin_lim(log_mel, n_iter=2)
    assert torch.equal(reference, before[0]) and np.array_equal(degraded, before[1])
    assert torch.equal(log_mel, log_mel_before)


def test_bad_input(clips):
    wave = clips[0]
    for metric in (pesq_wb, stoi, mel_cepstral_distortion):
        with pytest.raises(ValueError, match="empty"):
            metric(np.zeros(0, np.float32), wave)
        with pytest.raises(ValueError, match="NaN"):
            metric(wave, np.full(wave.size, np.nan, np.float32))
        with pytest.raises(ValueError, match="degraded is silent"):
            metric(wave, np.zeros_like(wave))
        with pytest.raises(ValueError, match="reference is silent"):
            metric(np.zeros_like(wave), wave)
    with pytest.raises(ValueError, match="1/4 s|4000 samples"):
        pesq_wb(wave[:3000], wave[:3000])
    with pytest.raises(ValueError, match="30 frames"):
        stoi(wave[:5000], wave[:5000])
    with pytest.raises(ValueError, match="empty"):
        dnsmos(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="silent"):
        dnsmos(np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match=r"\(80, frames"):
        griffin_lim(np.zeros((128, 50), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        griffin_lim(np.full((80, 50), np.nan, np.float32))
    with pytest.raises(ValueError, match="n_iter"):
        griffin_lim(np.zeros((80, 50), np.float32), n_iter=0)
    with pytest.raises(ValueError, match="no clips"):
        read_back([])
    with pytest.raises(ValueError, match="list of clips"):
        read_back(wave)
    with pytest.raises(ValueError, match="clip 1"):
        read_back([wave, wave[:100]])
    with pytest.raises(ValueError, match="texts"):
        read_back_cer([wave], ["one", "two"])
    with pytest.raises(ValueError, match="clip 1"):
        copy_synthesis_report([wave, wave], [wave, np.zeros_like(wave)])
    with pytest.raises(ValueError, match="syntheses"):
        copy_synthesis_report([wave], [])
