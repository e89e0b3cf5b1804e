"""Bad input gets a clear error (naming the argument, the value and the fix) or a documented conversion.

One test per case a tester found: audio at int16 scale given as floats, silent audio, bf16/fp16 audio, lists of
samples, mixed-dtype checkpoints, config values of the wrong type, a missing device, ids and labels outside the
vocabulary, labels that score nothing, generation settings (NaN, non-integer lengths, lists/NumPy inputs) and
running past the context. Valid inputs must still be computed exactly as before: see the last tests.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fac_mini.audio import MAX_FLOAT_PEAK, as_mono_float, load_audio, log_mel, log_mel_batch
from fac_mini.encoder import AudioEncoderConfig
from fac_mini.generate import generate_s2m, generate_s2t, prompt_embeddings
from fac_mini.llm import LLMConfig, Qwen3ForCausalLM, generate as llm_generate, llm_config_from_hf, process_logits
from fac_mini.model import FunAudioChat, FunAudioChatConfig
from fac_mini.released.processing import FunAudioChatProcessor
from fac_mini.released import INDEX_NAME, load_released
from fac_mini.tokenizer import load_tokenizer

CHECKPOINT = Path(__file__).parent / "fixtures" / "released_tiny" / "checkpoint"
VOCAB = 512                                   # FunAudioChatConfig() (the course tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(samples, seed=0, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(samples) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(processor):
    return processor(audio=_noise(8000), task="s2m")                 # 0.5 s: 3 <|AUDIO|> positions


@pytest.fixture(scope="module")
def small_lm():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      max_position_embeddings=8))


# ----------------------------------------------------------------------------------------------------------
# Audio: scale, silence, dtypes, lists
# ----------------------------------------------------------------------------------------------------------
def test_int16_scale_floats_are_rejected_everywhere_waves_enter(processor, tmp_path):
    loud = _noise(8000) * 32768                                          # int16 PCM values stored as floats
    for call in (lambda: log_mel(loud), lambda: log_mel(torch.from_numpy(loud)), lambda: log_mel_batch([loud]),
                 lambda: processor(audio=loud), lambda: processor.features([loud])):
        with pytest.raises(ValueError, match=r"peak \|x\| = \d+.*must lie in \[-1, 1\].*divide by 32768"):
            call()
    path = tmp_path / "float.wav"
    sf.write(str(path), loud, 16000, subtype="FLOAT")                    # a float file keeps the bad scale
    with pytest.raises(ValueError, match=r"float\.wav has float samples with peak .*divide by 32768"):
        load_audio(path)


def test_the_float_peak_tolerance_is_documented_and_int16_arrays_are_scaled():
    wave = _noise(8000)
    overshoot = wave / np.abs(wave).max() * 1.5                          # e.g. resampled or mixed full-scale audio
    assert log_mel(overshoot).shape == (128, 50) and MAX_FLOAT_PEAK == 2.0
    with pytest.raises(ValueError, match="peak"):
        log_mel(wave / np.abs(wave).max() * 2.5)
    pcm = (wave * 20000).astype(np.int16)                                # real int16 arrays are divided by 32768
    assert torch.equal(log_mel(pcm), log_mel(pcm.astype(np.float32) / 32768))


def test_silent_arrays_are_rejected_like_silent_files(processor, tmp_path):
    silence = np.zeros(16000, np.float32)
    path = tmp_path / "silent.wav"
    sf.write(str(path), silence, 16000)
    with pytest.raises(ValueError, match="silent.wav is silent"):
        load_audio(path)
    for call, name in ((lambda: log_mel(silence), "wave"),
                       (lambda: log_mel_batch([_noise(800), silence]), "waves\\[1\\]"),
                       (lambda: processor(audio=[_noise(800), silence]), "audio\\[1\\]"),
                       (lambda: processor.features([silence]), "waves\\[0\\]"),
                       (lambda: processor(audio=torch.zeros(8000)), "audio\\[0\\]")):
        with pytest.raises(ValueError, match=f"{name} is silent \\(all \\d+ samples are zero\\).*pass real audio"):
            call()
    # too short is reported before silent; the low-level as_mono_float keeps silence unless asked (documented)
    with pytest.raises(ValueError, match="shorter than one 25 Hz speech frame"):
        log_mel(np.zeros(100, np.float32))
    assert as_mono_float(silence).shape == (16000,)


def test_a_clip_whose_first_30_seconds_are_silent_is_still_accepted(processor):
    wave = np.concatenate([np.zeros(30 * 16000, np.float32), _noise(8000)])   # speech only after the window
    with pytest.warns(UserWarning, match="features stop at 30.0 s"):
        out = processor(audio=wave)
    assert out["input_features"].shape == (1, 128, 3000) and torch.all(out["input_features"] == -1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_and_fp16_audio_is_converted_to_float32(processor, dtype):
    half = torch.from_numpy(_noise(8000)).to(dtype)
    assert torch.equal(log_mel(half), log_mel(half.float()))              # exact: float32 holds both formats
    assert torch.equal(processor(audio=half)["input_features"], processor(audio=half.float())["input_features"])
    assert half.dtype == dtype                                            # the caller's tensor is untouched


def test_a_list_of_numbers_is_one_clip_and_a_list_of_clips_is_a_batch(processor):
    wave = _noise(8000)
    one = processor(audio=wave.tolist())
    assert torch.equal(one["input_features"], processor(audio=wave)["input_features"])
    assert one["speech_ids"].shape[0] == 1
    two = processor(audio=[wave.tolist(), _noise(4000, 1).tolist()])
    assert two["speech_ids"].shape[0] == 2
    with pytest.raises(ValueError, match=r"audio mixes numbers \(audio\[1\] = 0.5\) with clips"):
        processor(audio=[wave, 0.5])
    with pytest.raises(ValueError, match="is a single number"):
        log_mel(np.float32(0.25))
    assert torch.equal(log_mel(wave.tolist()), log_mel(wave))


def test_sampling_rate_of_the_wrong_type():
    with pytest.raises(TypeError, match="sampling rates must be numbers of Hz, got orig_sr='22050'"):
        log_mel(_noise(8000), sampling_rate="22050")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and configs
# ----------------------------------------------------------------------------------------------------------
def _copy_checkpoint(tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, target)
    return target


def test_a_mixed_dtype_checkpoint_names_the_file_and_key(tmp_path):
    directory = _copy_checkpoint(tmp_path)
    key = "language_model.lm_head.weight"
    shard = json.loads((directory / INDEX_NAME).read_text())["weight_map"][key]
    tensors = load_file(str(directory / shard))
    tensors[key] = tensors[key].bfloat16()
    save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=(r"several dtypes \(1 BF16, \d+ F32\).*pass dtype=torch.float32(.|\n)*"
                                          rf"{key}: BF16 in {shard}")):
        load_released(directory, dtype=None)
    loaded = load_released(directory, dtype=torch.float32)                 # casting all of them works
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}
    assert loaded(input_ids=torch.tensor([[1, 2, 9]])).text_logits.dtype == torch.float32


def _with_config_value(tmp_path: Path, section: str | None, key: str, value) -> Path:
    directory = _copy_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    target = config
    for part in (section.split(".") if section else []):
        target = target[part]
    target[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("section, key, value, message", [
    ("audio_config", "d_model", "16", r'audio_config\.d_model = "16" \(str\); expected an int'),
    ("audio_config", "d_model", None, r"audio_config\.d_model = null \(NoneType\); expected an int"),
    ("audio_config", "group_size", 5.0, r"audio_config\.group_size = 5\.0 \(float\); expected an int"),
    ("audio_config", "continuous_features_mode", None,
     r"audio_config\.continuous_features_mode = null \(NoneType\); expected a string"),
    ("text_config", "hidden_size", None, r"text_config\.hidden_size = null \(NoneType\); expected an int"),
    ("text_config", "hidden_size", "32", r'text_config\.hidden_size = "32" \(str\); expected an int'),
    ("text_config", "rope_theta", "1e6", r'text_config\.rope_theta = "1e6" \(str\); expected a number'),
    ("text_config", "tie_word_embeddings", "false",
     r'text_config\.tie_word_embeddings = "false" \(str\); expected true or false'),
    ("text_config", "sil_index", "7", r'text_config\.sil_index = "7" \(str\); expected an int'),
    ("audio_config.crq_transformer_config", "num_hidden_layers", 2.5,
     r"audio_config\.crq_transformer_config\.num_hidden_layers = 2\.5 \(float\); expected an int"),
    (None, "audio_token_index", "3", r'config\.audio_token_index = "3" \(str\); expected an int'),
])
def test_config_values_of_the_wrong_type_name_the_key(tmp_path, section, key, value, message):
    directory = _with_config_value(tmp_path, section, key, value)
    with pytest.raises(ValueError, match=r"config\.json: cannot build the model configuration: " + message):
        load_released(directory)


def test_config_dataclasses_check_types_too():
    with pytest.raises(ValueError, match=r"AudioEncoderConfig\.d_model must be a positive int, got '16' \(str\)"):
        AudioEncoderConfig(d_model="16")
    with pytest.raises(ValueError, match=r"LLMConfig\.rope_theta must be a finite number, got '1e6' \(str\)"):
        LLMConfig(rope_theta="1e6")
    with pytest.raises(ValueError, match=r"LLMConfig\.tie_word_embeddings must be True or False"):
        LLMConfig(tie_word_embeddings="false")
    with pytest.raises(ValueError, match=r"FunAudioChatConfig\.sil_index must be an int, got '7' \(str\)"):
        FunAudioChatConfig(sil_index="7")
    # null head_dim / num_key_value_heads mean "derive it", as in transformers
    derived = llm_config_from_hf({"vocab_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "num_key_value_heads": None, "head_dim": None,
                                  "rope_theta": 10000})
    assert (derived.head_dim, derived.num_key_value_heads, derived.rope_theta) == (8, 4, 10000.0)


def test_processor_config_values_of_the_wrong_type(tmp_path):
    load_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"feature_size": "128"}))
    with pytest.raises(ValueError, match=r'preprocessor_config\.json: feature_size = "128" \(str\), expected an int'):
        FunAudioChatProcessor.from_pretrained(tmp_path)


def test_a_device_this_machine_lacks_is_a_clear_error():
    if torch.cuda.is_available():
        missing, message = f"cuda:{torch.cuda.device_count()}", "CUDA device\\(s\\); use an index below"
    else:
        missing, message = "cuda", r"device='cuda' but CUDA is not available here.*device='cpu'"
    with pytest.raises(ValueError, match=message):
        load_released(CHECKPOINT, device=missing)
    with pytest.raises(ValueError, match="device='gpu' is not a torch device"):
        load_released(CHECKPOINT, device="gpu")


# ----------------------------------------------------------------------------------------------------------
# The forward: ids and labels
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_input_ids_outside_the_vocabulary(model, bad):
    with pytest.raises(ValueError, match=rf"input_ids holds id {bad}, outside the text vocabulary \[0, {VOCAB}\)"):
        model(input_ids=torch.tensor([[1, bad]]))


@pytest.mark.parametrize("model_bad, lm_bad, message", [
    (VOCAB + 5, 37, r"labels holds id {bad}, outside the vocabulary \[0, {vocab}\).*use -100"),
    (-5, -5, r"labels holds -5, a negative label other than -100"),
    (-101, -101, r"labels holds -101, a negative label other than -100"),
])
def test_labels_outside_the_vocabulary(model, small_lm, model_bad, lm_bad, message):
    ids = torch.tensor([[1, 2, 9]])
    with pytest.raises(ValueError, match=message.format(bad=model_bad, vocab=VOCAB)):
        model(input_ids=ids, labels=torch.tensor([[-100, 2, model_bad]]))
    with pytest.raises(ValueError, match=message.format(bad=lm_bad, vocab=32)):
        small_lm(ids, labels=torch.tensor([[-100, 2, lm_bad]]))


def test_float_labels_are_rejected(model):
    with pytest.raises(ValueError, match="labels must hold integer token ids \\(or -100\\), got dtype torch.float32"):
        model(input_ids=torch.tensor([[1, 2, 9]]), labels=torch.tensor([[1.0, 2.0, 9.0]]))


def test_labels_that_score_nothing_give_zero_loss_with_a_warning(model, small_lm):
    ids = torch.tensor([[1, 2, 9]])
    with pytest.warns(RuntimeWarning, match="labels score no token.*the loss is 0"):
        out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and not torch.signbit(out.loss)
    out.loss.backward()                                                  # a graph, with zero gradients
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    model.zero_grad(set_to_none=True)
    with pytest.warns(RuntimeWarning, match="labels score no token"):
        assert small_lm(ids, labels=torch.tensor([[5, -100, -100]])).loss.item() == 0.0   # only position 0


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ({"temperature": float("nan")}, "temperature=nan must be a finite number"),
    ({"temperature": 0.0}, r"temperature must be > 0 when sampling \(use do_sample=False for greedy\)"),
    ({"top_p": float("nan")}, "top_p=nan must be a finite number"),
    ({"top_p": 1.5}, "top_p=1.5 must be <= 1"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty=nan must be a finite number"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty=inf must be a finite number"),
])
def test_nan_and_out_of_range_sampling_settings(model, inputs, small_lm, setting, message):
    with pytest.raises(ValueError, match=message):
        generate_s2m(model, inputs, 3, **setting)
    with pytest.raises(ValueError, match=message):
        llm_generate(small_lm, torch.tensor([[1, 2]]), 2, do_sample=True, **setting)


def test_process_logits_rejects_nan():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        process_logits(torch.zeros(1, 4), temperature=float("nan"))
    with pytest.raises(ValueError, match="finite repetition_penalty > 0"):
        process_logits(torch.zeros(1, 4), repetition_penalty=float("nan"))


@pytest.mark.parametrize("steps, error, message", [
    (2.5, TypeError, r"max_new_tokens must be an int, got 2\.5 \(float\)"),
    ("3", TypeError, r"max_new_tokens must be an int, got '3' \(str\)"),
    (True, TypeError, r"max_new_tokens must be an int, got True \(bool\)"),
    (-1, ValueError, "max_new_tokens must be >= 0, got -1"),
])
def test_max_new_tokens_must_be_a_whole_number(model, inputs, small_lm, steps, error, message):
    with pytest.raises(error, match=message):
        generate_s2t(model, inputs, steps)
    with pytest.raises(error, match=message):
        llm_generate(small_lm, torch.tensor([[1, 2]]), steps)


def test_numpy_integers_are_whole_numbers(model, inputs):
    assert torch.equal(generate_s2t(model, inputs, np.int64(3)).sequences, generate_s2t(model, inputs, 3).sequences)


def test_inputs_as_lists_or_numpy_are_converted(model, inputs):
    reference = generate_s2t(model, inputs, 3).sequences
    as_lists = {key: value.tolist() for key, value in inputs.items()}
    as_numpy = {key: value.numpy() for key, value in inputs.items()}
    assert torch.equal(generate_s2t(model, as_lists, 3).sequences, reference)
    assert torch.equal(generate_s2t(model, as_numpy, 3).sequences, reference)
    for key, value in inputs.items():                                    # the caller's mapping is untouched
        assert isinstance(as_lists[key], list) and isinstance(as_numpy[key], np.ndarray), key
    with pytest.raises(ValueError, match=r"input_ids must be \(B, L\), got a 1-D tensor of 4 ids; add the batch axis"):
        generate_s2t(model, {"input_ids": [1, 2, 9, 1]}, 2)
    with pytest.raises(ValueError, match=r"inputs\['input_ids'\] cannot be made a tensor.*equal lengths"):
        generate_s2t(model, {"input_ids": [[1, 2, 9], [1, 2]]}, 2)
    with pytest.raises(TypeError, match=r"inputs\['input_ids'\] must be a torch tensor, a NumPy array or a list"):
        prompt_embeddings(model, {"input_ids": "1 2 9"})


def test_running_past_max_position_embeddings_is_an_error(model, inputs, small_lm):
    length, limit = inputs["input_ids"].shape[1], model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=(rf"prompt \({length} positions\) \+ max_new_tokens={limit} needs "
                                          rf"{length + limit} positions, more than text_config\.max_position_embeddings"
                                          rf"={limit}; pass max_new_tokens <= {limit - length}")):
        generate_s2t(model, inputs, limit)
    with pytest.raises(ValueError, match=r"more than config\.max_position_embeddings=8; pass max_new_tokens <= 5"):
        llm_generate(small_lm, torch.tensor([[1, 2, 3]]), 6)
    assert llm_generate(small_lm, torch.tensor([[1, 2, 3]]), 5).shape == (1, 8)     # exactly the context: fine


def test_the_speech_head_context_is_checked_too(inputs):
    config = FunAudioChatConfig()
    config.crq_config.max_position_embeddings = 5 * (inputs["input_ids"].shape[1] + 2)    # room for 2 steps
    torch.manual_seed(0)
    short_srh = FunAudioChat(config).eval()
    assert generate_s2m(short_srh, inputs, 2, do_sample=False).sequences.shape[1] <= inputs["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match=r"with speech, the SRH needs 5 positions per LLM position.*"
                                         r"crq_config\.max_position_embeddings=\d+; pass max_new_tokens <= 2"):
        generate_s2m(short_srh, inputs, 3)
    assert generate_s2t(short_srh, inputs, 3).sequences.shape[1] <= inputs["input_ids"].shape[1] + 3  # no SRH


# ----------------------------------------------------------------------------------------------------------
# Valid input is computed exactly as before
# ----------------------------------------------------------------------------------------------------------
def test_a_valid_text_loss_is_plain_cross_entropy_bit_for_bit(small_lm):
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    labels = ids.masked_fill(torch.tensor([[True, True, False, False], [False] * 4]), -100)
    out = small_lm(ids, labels=labels)
    reference = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, 32), labels[:, 1:].reshape(-1),
                                ignore_index=-100)
    assert torch.equal(out.loss, reference)


def test_valid_audio_features_are_unchanged(processor):
    wave = _noise(12345)
    padded = np.concatenate([wave, np.zeros(400, np.float32)])
    features = processor(audio=wave)["input_features"]                  # computed without validating twice
    assert torch.equal(features[0, :, :78], log_mel(padded)[:, :78])    # ceil(12345 / 160) = 78 valid frames
