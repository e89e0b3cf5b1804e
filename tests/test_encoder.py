"""fac_mini.encoder: cross-checks against transformers' Qwen2.5-Omni audio tower and Whisper encoder, batching,
the window mask, lengths, and bad input. Tiny configs (d_model 32, windows of 16 or 10 mel frames) keep it fast."""
import numpy as np
import pytest
import torch

from fac_mini.audio import log_mel_batch
from fac_mini.encoder import (AudioEncoder, AudioEncoderConfig, encoder_output_lengths, sinusoidal_positions,
                              window_attention_mask)

TINY = dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
            max_source_positions=16, output_dim=24)
ATOL = 1e-5


def tiny_encoder(n_window: int = 8, seed: int = 0) -> AudioEncoder:
    """A tiny encoder whose every parameter (LayerNorms included) is random, so no weight hides a bug."""
    torch.manual_seed(seed)
    encoder = AudioEncoder(AudioEncoderConfig(n_window=n_window, **TINY)).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return encoder


def features_with_junk_padding(lengths, frames, seed=0):
    """(batch, 128, frames) random log-mels whose frames past each length are NaN: they must be ignored."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), 128, frames, generator=generator)
    for row, length in enumerate(lengths):
        features[row, :, length:] = float("nan")
    return features


@pytest.mark.parametrize("n_window", [8, 5])  # 8: pairs never cross windows; 5: odd windows, pairs do cross
def test_matches_qwen2_5_omni_audio_encoder(n_window):
    from transformers import Qwen2_5OmniAudioEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    config = Qwen2_5OmniAudioEncoderConfig(n_window=n_window, **TINY)
    config._attn_implementation = "eager"  # plain matmul-softmax, independent of our SDPA call
    torch.manual_seed(1)
    reference = Qwen2_5OmniAudioEncoder(config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    encoder = AudioEncoder(AudioEncoderConfig(n_window=n_window, **TINY)).eval()
    # Same names, no mapping: both keep the sinusoid table as a non-persistent buffer.
    assert set(encoder.state_dict()) == set(reference.state_dict())
    encoder.load_state_dict(reference.state_dict(), strict=True)
    assert torch.equal(encoder.positional_embedding, reference.positional_embedding.positional_embedding)

    window = 2 * n_window
    lengths = [2 * window + 5, window, window + 5]  # partial last window, exact multiple, one window + a bit
    features = features_with_junk_padding(lengths, max(lengths) + 3)
    with torch.no_grad():
        output = encoder(features, mel_lengths=lengths)
        # The reference takes the real frames of all clips concatenated, (128, sum(lengths)), and their lengths.
        packed = torch.cat([features[row, :, :length] for row, length in enumerate(lengths)], dim=1)
        expected = reference(input_features=packed, feature_lens=torch.tensor(lengths)).last_hidden_state

    tokens = encoder_output_lengths(lengths, n_window)[1]
    assert output.mask.sum(dim=1).tolist() == tokens.tolist()
    assert expected.shape == (int(tokens.sum()), TINY["output_dim"])
    diffs = [(output.features[row, :count] - part).abs().max().item()
             for row, (count, part) in enumerate(zip(tokens.tolist(), expected.split(tokens.tolist())))]
    assert max(diffs) <= ATOL, diffs
    assert not output.features[~output.mask].any()  # padding tokens are exactly zero


def test_matches_whisper_encoder_inside_one_window():
    """With one full window (2 * n_window frames) there is no windowing, and Whisper's encoder computes the
    same 50 Hz states. Whisper has no pooling or projection; its final ``layer_norm`` sits where our
    ``ln_post`` sits but acts on 50 Hz states. So we compare (a) Whisper's output with ``ln_post`` of our
    50 Hz states, and (b) our 25 Hz output with pool -> ln_post -> proj applied to Whisper's last layer output."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    n_window = 8
    encoder = tiny_encoder(n_window)
    config = WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, max_source_positions=n_window)  # Whisper wants exactly 2*8 frames
    config._attn_implementation = "eager"
    whisper = WhisperEncoder(config).eval()
    # Key map: conv*, layers.* unchanged; ln_post -> layer_norm; our fixed sinusoids -> Whisper's (learned)
    # embed_positions; proj and audio_bos_eos_token have no Whisper counterpart.
    state = {("layer_norm." + key[len("ln_post."):] if key.startswith("ln_post.") else key): value
             for key, value in encoder.state_dict().items()
             if not key.startswith(("proj.", "audio_bos_eos_token."))}
    state["embed_positions.weight"] = encoder.positional_embedding[:n_window]
    whisper.load_state_dict(state, strict=True)

    last_layer = {}
    hook = whisper.layers[-1].register_forward_hook(
        lambda module, args, output: last_layer.update(states=output[0] if isinstance(output, tuple) else output))
    features = torch.randn(2, 128, 2 * n_window, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_50hz = whisper(features).last_hidden_state                  # (2, 8, 32)
        ours_50hz, mask = encoder.encode_50hz(features)
        ours = encoder(features)
        pooled = (last_layer["states"][:, 0::2] + last_layer["states"][:, 1::2]) / 2
        expected_25hz = encoder.proj(encoder.ln_post(pooled))                 # (2, 4, 24)
    hook.remove()
    assert mask.all() and ours.mask.all()
    assert (encoder.ln_post(ours_50hz) - expected_50hz).abs().max().item() <= ATOL
    assert (ours.features - expected_25hz).abs().max().item() <= ATOL


def test_batched_equals_unbatched_on_log_mel_batch():
    encoder = tiny_encoder(8)
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (6000, 700, 3300)]  # 38, 5, 21 mel frames
    features, frames_mask = log_mel_batch(waves)
    with torch.no_grad():
        batched = encoder(features, frames_mask)
        for row, real in enumerate(frames_mask):
            alone = encoder(features[row:row + 1, :, : int(real.sum())])
            count = int(alone.mask.sum())
            assert batched.mask[row].sum() == count
            assert (batched.features[row, :count] - alone.features[0]).abs().max() <= ATOL


def test_window_attention_mask_is_block_diagonal_and_matches_the_window_batching():
    mask = window_attention_mask([9, 5], n_window=2)  # 9 frames -> 5 tokens in windows [0,1] [2,3] [4]
    expected_first = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                                   [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert mask.shape == (2, 5, 5) and torch.equal(mask[0], expected_first)
    assert torch.equal(mask[1], expected_first & (torch.arange(5) < 3)[:, None] & (torch.arange(5) < 3)[None])

    # Running the layers on whole padded clips with this mask gives what the encoder's window batching gives.
    encoder = tiny_encoder(5)
    lengths = [37, 12]
    features = features_with_junk_padding(lengths, 40)
    with torch.no_grad():
        hidden, real = encoder.embed(features, mel_lengths=lengths)          # (2, 19, 32)
        allowed = window_attention_mask(lengths, 5) | torch.eye(hidden.shape[1], dtype=torch.bool)
        for layer in encoder.layers:
            hidden = layer(hidden, allowed[:, None])                         # (2, 1, 19, 19) broadcast over heads
        windowed, _ = encoder.encode_50hz(features, mel_lengths=lengths)
    assert (hidden[real] - windowed[real]).abs().max() <= ATOL


def test_output_lengths():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    lengths = torch.arange(3, 700)
    lengths_50hz, lengths_25hz = encoder_output_lengths(lengths, n_window=100)
    hf_50hz, hf_25hz = Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, lengths)
    assert torch.equal(lengths_50hz, hf_50hz) and torch.equal(lengths_25hz, hf_25hz)
    assert encoder_output_lengths(3000)[1].item() == 750  # 30 s -> 3000 mel frames -> 1500 -> 750 tokens
    assert encoder_output_lengths([5, 4], n_window=2)[0].tolist() == [3, 2]


def test_positions_restart_in_every_window():
    encoder = tiny_encoder(8)
    with torch.no_grad():
        encoder.conv2.weight.zero_()
        encoder.conv2.bias.fill_(-10.0)                   # GELU(-10) ~ 0: what is left are the positions
        hidden, _ = encoder.embed(torch.randn(1, 128, 40))  # 20 tokens: windows of 8, 8, 4
    table = sinusoidal_positions(8, 32)
    assert torch.allclose(hidden[0, :8], table, atol=1e-6) and torch.allclose(hidden[0, 8:16], table, atol=1e-6)
    assert torch.allclose(hidden[0, 16:], table[:4], atol=1e-6)


def test_inputs_not_mutated():
    encoder = tiny_encoder(8)
    features = features_with_junk_padding([30, 20], 32)
    frames_mask = torch.arange(32)[None] < torch.tensor([[30], [20]])
    features_before, mask_before = features.clone(), frames_mask.clone()
    with torch.no_grad():
        encoder(features, frames_mask)
    assert torch.equal(features.nan_to_num(), features_before.nan_to_num()) and torch.equal(frames_mask, mask_before)
    assert torch.equal(features.isnan(), features_before.isnan())


def test_released_8b_names_and_shapes():
    with torch.device("meta"):  # no memory: only names and shapes
        encoder = AudioEncoder(AudioEncoderConfig.released_8b())
    shapes = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    assert len(shapes) == 4 + 32 * 15 + 2 + 2 + 1
    assert shapes["conv1.weight"] == (1280, 128, 3) and shapes["conv2.weight"] == (1280, 1280, 3)
    assert shapes["layers.31.fc1.weight"] == (5120, 1280) and shapes["proj.weight"] == (4096, 1280)
    assert shapes["audio_bos_eos_token.weight"] == (2, 4096)
    assert "layers.0.self_attn.k_proj.bias" not in shapes and "layers.0.self_attn.q_proj.bias" in shapes
    assert "positional_embedding" not in shapes and tuple(encoder.positional_embedding.shape) == (1500, 1280)


@pytest.mark.parametrize("call, message", [
    (lambda e: e(torch.zeros(128, 40)), r"\(batch, 128, frames\), got \(128, 40\)"),
    (lambda e: e(torch.zeros(1, 80, 40)), r"shape \(1, 80, 40\): 80 mel bins"),
    (lambda e: e(torch.zeros(2, 128, 40), torch.ones(2, 39, dtype=torch.bool)), r"frames_mask has shape \(2, 39\)"),
    (lambda e: e(torch.zeros(1, 128, 40), torch.tensor([[True, False] * 20])), "prefix"),
    (lambda e: e(torch.zeros(2, 128, 40), mel_lengths=[40]), r"mel_lengths has shape \(1,\)"),
    (lambda e: e(torch.zeros(1, 128, 40), mel_lengths=[41]), "exceed the 40 frames"),
    (lambda e: e(torch.zeros(2, 128, 40), mel_lengths=[40, 2]), r"clips \[1\] have fewer than 3 mel frames"),
    (lambda e: e(torch.zeros(1, 128, 40), torch.ones(1, 40, dtype=torch.bool), mel_lengths=[40]), "not both"),
    (lambda e: e(torch.full((1, 128, 40), float("nan"))), "NaN"),
    (lambda e: e(torch.zeros(1, 128, 40, dtype=torch.long)), "floating point"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_encoder(8))


def test_bad_config_raises_value_error():
    with pytest.raises(ValueError, match="divisible"):
        AudioEncoderConfig(d_model=30, encoder_attention_heads=4)
    with pytest.raises(ValueError, match="n_window"):
        AudioEncoderConfig(n_window=20, max_source_positions=10)
    with pytest.raises(ValueError, match="activation_function"):
        AudioEncoderConfig(activation_function="relu")
