"""fac_mini.detokenize: ids -> wave offline and streaming (streamed chunks vs offline decoding), the voices, the
errors; and the shipped detokenizer's contracts (COURSE.md §6)."""
import numpy as np
import pytest
import torch

from fac_mini.detokenize import (PRE_LOOKAHEAD, TOKEN_HOP, Detokenizer, chunk_noise, speech_ids_to_wave,
                                 vocoder_context_frames)
from fac_mini.flow import FlowConfig, FlowDetokenizer
from fac_mini.vocoder import VocosConfig, VocosVocoder

TINY_FLOW = FlowConfig(vocab_size=11, dim=32, depth=2, heads=2, lookahead_channels=16)   # chunk 30 frames = 15 ids


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    flow = FlowDetokenizer(TINY_FLOW).eval()
    for block in flow.blocks:                               # AdaLN-Zero would make every block the identity
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    torch.nn.init.normal_(flow.final_modulation.weight, std=0.1)
    vocoder = VocosVocoder(VocosConfig(dim=32, intermediate_dim=64, num_layers=2)).eval()
    voices = {f"spk0{i}": torch.nn.functional.normalize(torch.rand(256), dim=0) for i in range(2)}
    return Detokenizer(flow, vocoder, voices)


def _ids(n, seed=0):
    return torch.randint(0, TINY_FLOW.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_chunk_noise_is_prefix_consistent():
    assert torch.equal(chunk_noise(45, 80, 3, 30)[:20], chunk_noise(20, 80, 3, 30))
    assert not torch.equal(chunk_noise(20, 80, 3, 30), chunk_noise(20, 80, 4, 30))


def test_offline_shapes(tiny):
    ids = _ids(20)
    mel = tiny.mel(ids, "spk00")
    assert mel.shape == (80, 40)
    wave = tiny.wave(ids, "spk00")
    assert wave.dtype == np.float32 and wave.shape == ((40 - 1) * 320,)
    assert not np.allclose(wave, tiny.wave(ids, "spk01"))              # the voice matters


def _stream(tiny, ids, pieces, **kwargs):
    stream = tiny.stream("spk00", **kwargs)
    chunks, start = [], 0
    for size in pieces:
        chunks += stream.push(ids[start: start + size])
        start += size
    chunks.append(stream.finish())
    return stream, chunks


@pytest.mark.parametrize("pieces", [[1] * 50, [7, 13, 30], [50]])
def test_streaming_mel_equals_offline(tiny, pieces):
    ids = _ids(50, seed=1)
    stream, _ = _stream(tiny, ids, pieces)
    offline = tiny.mel(ids, "spk00")
    assert stream.mel.shape == offline.shape
    torch.testing.assert_close(stream.mel, offline, rtol=0, atol=1e-5)


def test_streaming_wave_equals_offline_with_the_full_vocoder_context(tiny):
    ids = _ids(50, seed=2)
    context = vocoder_context_frames(tiny.vocoder)
    assert context == 3 * (1 + 2) + 2
    _, chunks = _stream(tiny, ids, [1] * 50, vocoder_lookahead=context)
    streamed, offline = np.concatenate(chunks), tiny.wave(ids, "spk00")
    assert streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() < 1e-5


def test_streaming_with_a_short_vocoder_lookahead_differs_only_slightly(tiny):
    """The default waits 6 mel frames (120 ms) instead of the vocoder's full context: the seams differ a little."""
    ids = _ids(50, seed=3)
    stream, chunks = _stream(tiny, ids, [5] * 10)
    streamed, offline = np.concatenate(chunks), tiny.wave(ids, "spk00")
    assert streamed.shape == offline.shape
    error = streamed - offline
    snr_db = 10 * np.log10(np.sum(offline ** 2) / max(np.sum(error ** 2), 1e-20))
    assert snr_db > 15, snr_db
    assert len(chunks) >= 3 and len(stream.timings) == len(chunks)


def test_first_chunk_needs_one_hop_plus_lookahead(tiny):
    stream = tiny.stream("spk00")
    assert stream.push(_ids(TOKEN_HOP + PRE_LOOKAHEAD - 1)) == []
    chunks = stream.push(_ids(1, seed=9))
    assert len(chunks) == 1 and chunks[0].size > 0


def test_errors(tiny):
    with pytest.raises(ValueError, match="outside the speech codebook"):
        tiny.wave([1, 2, 11])
    with pytest.raises(ValueError, match="empty"):
        tiny.wave([])
    with pytest.raises(ValueError, match="integers"):
        tiny.wave(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="unknown voice"):
        tiny.wave([1, 2, 3], "nobody")
    with pytest.raises(ValueError, match="150 ms"):
        tiny.wave([1, 2, 3], np.full(1000, 0.1, dtype=np.float32))
    with pytest.raises(ValueError, match="silent"):
        tiny.wave([1, 2, 3], np.zeros(16000, dtype=np.float32))
    stream = tiny.stream()
    with pytest.raises(ValueError, match="nothing to speak"):
        stream.finish()
    with pytest.raises(ValueError, match="chunk"):
        tiny.stream(hop=10)


def test_batched_call_returns_one_wave_per_sequence(tiny):
    waves, rate = speech_ids_to_wave([_ids(10), _ids(14, seed=1)], "spk01", detokenizer=tiny)
    assert rate == 16000 and [len(w) for w in waves] == [(20 - 1) * 320, (28 - 1) * 320]
    single, _ = speech_ids_to_wave(np.array(_ids(10)), "spk01", detokenizer=tiny)
    np.testing.assert_array_equal(single, waves[0])


def test_audio_chunk_steps_is_the_streams_own_schedule(tiny):
    from fac_mini.detokenize import audio_chunk_steps

    rng = np.random.default_rng(5)
    for hop, lookahead in ((15, 3), (15, 5)):         # the hop is the flow's attention chunk
        counts = [0, 0] + [int(n) for n in rng.integers(0, 7, size=16)]
        stream = tiny.stream("spk00", hop=hop, lookahead=lookahead)
        ids, released = _ids(sum(counts), seed=hop), []
        for step, count in enumerate(counts):
            pushed, ids = ids[:count], ids[count:]
            released += [step] * len(stream.push(pushed))
        released.append(len(counts) - 1)                                   # finish() flushes after the last step
        assert released == audio_chunk_steps(counts, hop, lookahead)
    assert audio_chunk_steps([0, 0]) == [] and audio_chunk_steps([18]) == [0, 0]
