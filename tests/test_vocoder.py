"""The vocoders (``fac_mini.vocoder``): the HiFi-GAN generator against transformers' ``SpeechT5HifiGan`` with the same
weights, the iSTFT head and notebook 10's overlap-add against ``torch.istft``, output lengths, the losses, files and
bad input, and the issue's goal: the shipped vocoder's copy-synthesis beats Griffin-Lim on the same mel (PESQ-WB)."""
import json
import math

import numpy as np
import pytest
import torch

from fac_mini import REPO_ROOT
from fac_mini.audio import VOCODER_HOP, VOCODER_N_FFT, vocoder_mel, vocoder_mel_padded
from fac_mini.constants import SAMPLE_RATE
from fac_mini.vocoder import (HiFiGANConfig, HiFiGANGenerator, ISTFTHead, VocosConfig, VocosVocoder, build_vocoder,
                              copy_synthesis, load_vocoder, mel_l1_loss, multi_resolution_stft_loss, save_vocoder,
                              vocode)

SMALL_HIFIGAN = HiFiGANConfig(upsample_initial_channel=32, upsample_rates=(4, 4, 4, 5),
                              upsample_kernel_sizes=(8, 8, 8, 11), resblock_kernel_sizes=(3, 5),
                              resblock_dilation_sizes=((1, 2), (2, 6)), leaky_relu_slope=0.2)
SMALL_VOCOS = VocosConfig(dim=32, intermediate_dim=96, num_layers=2)


@pytest.fixture(scope="module")
def test_clips():
    """The first 4 test-split clips of the corpus (float32, 16 kHz)."""
    from fac_mini.train.vocoder import load_waves

    return load_waves("test", 4)


def _seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter redrawn from a seeded normal (biases too), so that no path is all zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Cross-checks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [HiFiGANConfig(), SMALL_HIFIGAN], ids=["shipped config", "small, 2 kernels"])
def test_hifigan_generator_equals_speecht5_hifigan_with_the_same_weights(config):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    ours = _seeded(HiFiGANGenerator(config))
    theirs = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=config.n_mels, sampling_rate=SAMPLE_RATE, upsample_initial_channel=config.upsample_initial_channel,
        upsample_rates=list(config.upsample_rates), upsample_kernel_sizes=list(config.upsample_kernel_sizes),
        resblock_kernel_sizes=list(config.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in config.resblock_dilation_sizes],
        leaky_relu_slope=config.leaky_relu_slope, normalize_before=False)).eval()
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["mean", "scale"] and not result.unexpected_keys   # SpeechT5's buffers only
    mel = torch.randn(2, config.n_mels, 9, generator=torch.Generator().manual_seed(1)) - 4.0
    with torch.no_grad():
        expected = theirs(mel.transpose(1, 2))                       # SpeechT5HifiGan reads (batch, frames, mels)
        got = ours.full_forward(mel)
    assert got.shape == expected.shape == (2, 9 * VOCODER_HOP)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)     # measured: 0.0
    assert got.abs().max() > 1e-3                                    # not a trivially silent comparison


def test_istft_head_reconstructs_a_clip_from_its_true_stft(test_clips):
    wave = torch.from_numpy(test_clips[0][: 40 * VOCODER_HOP])       # 0.8 s of real speech
    window = torch.hann_window(VOCODER_N_FFT)
    spectrum = torch.stft(wave, VOCODER_N_FFT, VOCODER_HOP, window=window, center=True, return_complex=True)
    head = ISTFTHead(VOCODER_N_FFT + 2, VOCODER_N_FFT, VOCODER_HOP)
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(VOCODER_N_FFT + 2))        # features = [log |S|, angle S] per frame
        head.out.bias.zero_()
        features = torch.cat([spectrum.abs().clamp(min=1e-12).log(), spectrum.angle()]).T[None]   # (1, 41, 1282)
        rebuilt = head(features)[0]
        torch.testing.assert_close(head.spectrum(features)[0], spectrum, rtol=1e-4, atol=1e-4)
    assert rebuilt.shape == (40 * VOCODER_HOP,)
    istft = torch.istft(spectrum, VOCODER_N_FFT, VOCODER_HOP, window=window, center=True)
    torch.testing.assert_close(rebuilt, istft, rtol=0, atol=1e-6)
    torch.testing.assert_close(rebuilt, wave, rtol=0, atol=1e-5)     # perfect reconstruction


def _notebook_overlap_add():
    """The ``overlap_add`` that notebook 10's exercise defines (solutions/, the reference answer)."""
    notebook = json.loads((REPO_ROOT / "solutions" / "10_vocoder.ipynb").read_text())
    sources = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    source = next(s for s in sources if s.startswith("def overlap_add("))
    namespace = {"torch": torch, "check_overlap_add": lambda function: None}
    exec(source, namespace)
    return namespace["overlap_add"]


@pytest.mark.parametrize("n_fft, hop, window", [(VOCODER_N_FFT, VOCODER_HOP, "hann"), (64, 16, "hann"),
                                                (48, 12, "hamming"), (32, 16, "sqrt-hann")])
def test_notebook_overlap_add_equals_torch_istft(n_fft, hop, window):
    overlap_add = _notebook_overlap_add()
    window = {"hann": torch.hann_window(n_fft), "hamming": torch.hamming_window(n_fft),
              "sqrt-hann": torch.hann_window(n_fft).sqrt()}[window]
    generator = torch.Generator().manual_seed(2)
    signal = torch.randn(2, hop * 15, generator=generator)
    spectrum = torch.stft(signal, n_fft, hop, window=window, center=True, return_complex=True)
    arbitrary = torch.complex(torch.randn(spectrum.shape, generator=generator),
                              torch.randn(spectrum.shape, generator=generator))      # not the STFT of any signal
    for given in (spectrum, arbitrary):
        expected = torch.istft(given, n_fft, hop, window=window, center=True)
        torch.testing.assert_close(overlap_add(given, n_fft, hop, window), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(overlap_add(spectrum, n_fft, hop, window), signal, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Shapes, losses
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [VocosConfig(), HiFiGANConfig()], ids=["vocos", "hifigan"])
@pytest.mark.parametrize("frames", [2, 7, 41])
def test_output_has_frames_minus_one_hops(config, frames):
    model = build_vocoder(config).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 80, frames)).shape == (3, (frames - 1) * VOCODER_HOP)
    assert vocode(torch.randn(80, frames) - 5.0, model).shape == ((frames - 1) * VOCODER_HOP,)


@pytest.mark.parametrize("samples", [641, 1000, 16000, 16319])
def test_copy_synthesis_returns_whole_hops_of_16_khz_float32(samples):
    wave = np.sin(np.arange(samples) * 0.05).astype(np.float32) * 0.3
    out, rate = copy_synthesis(wave, vocoder=build_vocoder(SMALL_VOCOS).eval())
    assert rate == SAMPLE_RATE and out.dtype == np.float32 and out.shape == (samples // VOCODER_HOP * VOCODER_HOP,)
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0


def test_copy_synthesis_resamples_other_rates_and_keeps_the_input():
    wave = (np.sin(np.arange(22050) * 0.05) * 0.3).astype(np.float32)         # 1 s at 22.05 kHz
    before = wave.copy()
    out, rate = copy_synthesis(wave, 22050, vocoder=build_vocoder(SMALL_VOCOS).eval())
    assert rate == SAMPLE_RATE and out.shape == (SAMPLE_RATE // VOCODER_HOP * VOCODER_HOP,)
    np.testing.assert_array_equal(wave, before)


def test_losses_are_zero_on_identical_input_and_positive_otherwise():
    generator = torch.Generator().manual_seed(3)
    audio = torch.randn(2, 40 * VOCODER_HOP, generator=generator) * 0.1
    assert multi_resolution_stft_loss(audio, audio).item() == 0.0
    assert mel_l1_loss(audio, vocoder_mel_padded(audio)).item() == 0.0
    other = torch.randn(2, 40 * VOCODER_HOP, generator=generator) * 0.1
    assert multi_resolution_stft_loss(other, audio).item() > 0.1
    assert mel_l1_loss(other, vocoder_mel_padded(audio)).item() > 0.1


def test_stft_loss_of_a_half_scaled_signal_is_one_half_plus_ln_2():
    # |S_p| = |S_t| / 2 at every resolution: spectral convergence 1/2, log-magnitude L1 ln 2 (no bin at the clamp)
    audio = torch.randn(1, 40 * VOCODER_HOP, generator=torch.Generator().manual_seed(4)) * 0.1
    assert multi_resolution_stft_loss(audio / 2, audio).item() == pytest.approx(0.5 + math.log(2), rel=1e-4)


def test_losses_pass_gradients_to_the_vocoder():
    model = build_vocoder(SMALL_VOCOS)
    audio = torch.randn(2, 20 * VOCODER_HOP, generator=torch.Generator().manual_seed(5)) * 0.1
    mel = vocoder_mel_padded(audio)
    predicted = model(mel)
    (multi_resolution_stft_loss(predicted, audio[:, : predicted.shape[-1]]) + mel_l1_loss(predicted, mel)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.head.out.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SMALL_VOCOS, SMALL_HIFIGAN], ids=["vocos", "hifigan"])
def test_save_load_round_trip(config, tmp_path):
    model = _seeded(build_vocoder(config))
    save_vocoder(model, tmp_path / "vocoder")
    loaded = load_vocoder(tmp_path / "vocoder")
    assert type(loaded) is type(model) and loaded.config == config and not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    mel = torch.randn(1, 80, 6) - 5.0
    torch.testing.assert_close(vocode(mel, loaded), vocode(mel, model), rtol=0, atol=0)


def test_loader_names_the_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vocoder(tmp_path / "nowhere")
    folder = tmp_path / "vocoder"
    save_vocoder(build_vocoder(SMALL_VOCOS), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_vocoder(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_vocoder(folder)
    (folder / "config.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="config.json"):
        load_vocoder(folder)


def test_loader_rejects_unknown_kinds_and_weights_of_another_model(tmp_path):
    folder = tmp_path / "vocoder"
    save_vocoder(build_vocoder(SMALL_VOCOS), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"kind": "wavenet"}))
    with pytest.raises(ValueError, match="wavenet"):
        load_vocoder(folder)
    (folder / "config.json").write_text(json.dumps(config | {"dim": 48, "intermediate_dim": 144}))
    with pytest.raises(ValueError, match="model.safetensors.*shape"):                # same keys, other widths
        load_vocoder(folder)
    (folder / "config.json").write_text(json.dumps(SMALL_HIFIGAN.to_dict()))
    with pytest.raises(ValueError, match="model.safetensors.*missing keys"):         # a Vocos under a HiFi-GAN config
        load_vocoder(folder)


def test_hifigan_config_must_upsample_by_the_mel_hop():
    with pytest.raises(ValueError, match="320"):
        HiFiGANConfig(upsample_rates=(8, 8, 2, 2))                   # HiFi-GAN V1's 256 (22.05 kHz)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mel, message", [
    (torch.zeros(80), "shape"), (torch.zeros(81, 10), "shape"), (torch.zeros(1, 1, 80, 10), "shape"),
    (np.zeros((80, 10), dtype=np.float32), "tensor"), (torch.zeros(80, 1), "frame"),
    (torch.full((80, 5), float("nan")), "NaN"), (torch.full((2, 80, 5), float("inf")), "infinite")],
    ids=["1-D", "81 bins", "4-D", "numpy", "one frame", "NaN", "inf"])
def test_vocode_rejects_bad_mels(mel, message):
    with pytest.raises(ValueError, match=message):
        vocode(mel, build_vocoder(SMALL_VOCOS).eval())


@pytest.mark.parametrize("wave, message", [
    (np.zeros(16000, dtype=np.float32), "silent"), (np.full(100, 0.1, dtype=np.float32), "shorter"),
    (np.sin(np.arange(VOCODER_N_FFT // 2)).astype(np.float32) * 0.3, "short"),   # the centred STFT's pad is 640
    (np.array([0.1, float("nan")] * 800, dtype=np.float32), "NaN"), (np.zeros(0, dtype=np.float32), "empty"),
    (np.full(1600, 300.0, dtype=np.float32), "32768")],
    ids=["silent", "too short", "640 samples", "NaN", "empty", "int16 values as floats"])
def test_copy_synthesis_rejects_bad_audio(wave, message):
    with pytest.raises(ValueError, match=message):
        copy_synthesis(wave, vocoder=build_vocoder(SMALL_VOCOS).eval())


def test_vocode_does_not_change_the_callers_mel():
    mel = torch.randn(80, 6) - 5.0
    before = mel.clone()
    vocode(mel, build_vocoder(SMALL_VOCOS).eval())
    assert torch.equal(mel, before)


# ----------------------------------------------------------------------------------------------------------
# The goal, on the shipped checkpoint
# ----------------------------------------------------------------------------------------------------------
def test_shipped_vocoder_beats_griffin_lim_on_pesq(test_clips):
    from fac_mini.quality import griffin_lim, pesq_wb

    vocoder = load_vocoder()                                         # data/vocoder
    assert isinstance(vocoder, VocosVocoder)
    learnt = [pesq_wb(wave, copy_synthesis(wave)[0]) for wave in test_clips]
    baseline = [pesq_wb(wave, griffin_lim(vocoder_mel(wave))) for wave in test_clips]
    assert np.mean(learnt) > np.mean(baseline), (
        f"PESQ-WB on {len(test_clips)} test clips: shipped vocoder {np.round(learnt, 2).tolist()} (mean "
        f"{np.mean(learnt):.2f}), Griffin-Lim 32 iterations {np.round(baseline, 2).tolist()} (mean {np.mean(baseline):.2f})")
