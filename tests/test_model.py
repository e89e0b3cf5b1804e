"""fac_mini.model: parallel streams, released label construction, fusion, continuous replace, losses, gradients."""
import pytest
import torch
import torch.nn.functional as F

from fac_mini.grouping import mean_group
from fac_mini.model import (FunAudioChat, FunAudioChatConfig, align_text_to_groups, build_assistant_labels,
                            fuse_text_and_speech)
from fac_mini.srh import srh_position_ids

IGN, SP_EOS, SP_BOS, SP_PAD = -100, 6562, 6561, 6563
AUDIO, ABOS, AEOS, SIL, TEXT_PAD, TEXT_EOS = 3, 4, 5, 7, 0, 2       # the default (course tokenizer) ids
K = 5

# One dialogue (B = 1): a user audio of 8 speech frames (2 groups) and an assistant reply of 12 (3 groups).
#            0  1  2     3      4      5     6  7  8  9     10     11     12     13    14
INPUT_IDS = [1, 9, ABOS, AUDIO, AUDIO, AEOS, 2, 1, 11, ABOS, AUDIO, AUDIO, AUDIO, AEOS, 2]
ASSISTANT_START = 9                                                   # labels are -100 before this position
SPEECH_IDS = [[SP_PAD] * 12, list(range(100, 112))]                  # user: placeholders; assistant: S3 ids
SPEECH_MASK = [[1] * 8 + [0] * 4, [1] * 12]
TEXT_IDS = [[TEXT_PAD] * 3, [20, 21, TEXT_PAD]]                      # user: no transcript; assistant: 2 tokens
TEXT_MASK = [0, 1]


def _model(seed=0, **config):
    torch.manual_seed(seed)
    return FunAudioChat(FunAudioChatConfig(**config)).eval()


def _batch(with_features=True, with_text=True, mask_dtype=torch.long):
    input_ids = torch.tensor([INPUT_IDS])
    labels = input_ids.masked_fill(torch.arange(len(INPUT_IDS))[None] < ASSISTANT_START, IGN)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids, dtype=mask_dtype),
                 speech_ids=torch.tensor(SPEECH_IDS), speech_attention_mask=torch.tensor(SPEECH_MASK, dtype=mask_dtype),
                 labels=labels)
    if with_features:                                   # 30 mel frames -> 7 frames at 25 Hz for the user audio
        batch.update(input_features=torch.randn(1, 128, 30, generator=torch.Generator().manual_seed(1)),
                     feature_attention_mask=torch.ones(1, 30, dtype=mask_dtype),
                     feature_exist_mask=torch.tensor([1, 0], dtype=mask_dtype))
    if with_text:
        batch.update(text_ids=torch.tensor(TEXT_IDS), text_attention_mask=torch.tensor(TEXT_MASK, dtype=mask_dtype))
    return batch


# expected labels, written out from the rules of docs/released_model.md §5
EXPECTED_TEXT_LABELS = [IGN] * 9 + [ABOS, 20, 21, SIL, AEOS, 2]      # <|AUDIO|> -> aligned transcript, <|sil|> pad
EXPECTED_TEXT_LABELS_NO_TRANSCRIPT = [IGN] * 9 + [ABOS, IGN, IGN, IGN, AEOS, 2]
EXPECTED_SPEECH_LABELS = (
    [[IGN] * 5] * 10                         # system/user (label -100) and <|audio_bos|> (not an <|AUDIO|>)
    + [[100, 101, 102, 103, 104], [105, 106, 107, 108, 109], [110, 111, IGN, IGN, IGN]]
    + [[SP_EOS] * 5]                         # the position labelled <|audio_eos|>
    + [[IGN] * 5])                           # <|im_end|>


def test_state_dict_names_as_released_and_tied_speech_table():
    model = _model()
    keys = set(model.state_dict())
    for key in ("continuous_audio_tower.conv1.weight", "continuous_audio_tower.audio_bos_eos_token.weight",
                "audio_tower.embed_tokens.weight", "audio_tower.output_matching.weight",
                "audio_tower.continual_output_matching.weight", "audio_invert_tower.pre_matching.bias",
                "audio_invert_tower.lm_head.weight", "audio_invert_tower.crq_transformer.norm.weight",
                "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert key in keys, key
    assert not any(k.startswith("audio_invert_tower.crq_transformer.embed_tokens") for k in keys)
    assert model.audio_invert_tower.lm_head.weight is model.audio_tower.embed_tokens.weight
    assert model.audio_tower.embed_tokens.padding_idx == SP_PAD
    assert model.audio_tower.output_matching.bias is None and model.audio_tower.continual_output_matching.bias is None


def test_config_dict_round_trip_and_released_layout():
    for config in (FunAudioChatConfig(), FunAudioChatConfig.released_8b()):
        data = config.to_dict()
        assert data["model_type"] == "funaudiochat"
        assert data["audio_config"]["crq_transformer_config"]["model_type"] == "qwen3"
        assert FunAudioChatConfig.from_dict(data) == config
    released = FunAudioChatConfig.released_8b().to_dict()
    assert released["audio_token_index"] == 151669 and released["text_config"]["sil_index"] == 151673
    assert released["audio_config"]["codebook_size"] == 6565 and released["audio_config"]["group_size"] == 5
    assert released["audio_config"]["continuous_features_mode"] == "replace"
    with pytest.raises(ValueError, match="model_type"):
        FunAudioChatConfig.from_dict({**released, "model_type": "qwen3"})


def test_forward_shapes():
    model = _model()
    out = model(**_batch())
    length, vocab = len(INPUT_IDS), model.config.text_config.vocab_size
    assert out.text_logits.shape == (1, length, vocab)
    assert out.speech_logits.shape == (1, K * length, 6565)
    assert out.inputs_embeds.shape == out.last_hidden_state.shape == (1, length, model.config.hidden_size)
    assert out.speech_labels.shape == (1, K * length) and out.text_labels.shape == (1, length)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, out.text_loss + out.speech_loss)
    plain = model(torch.tensor([[1, 9, 2]]))                          # text only: no audio, no labels
    assert plain.loss is None and plain.speech_logits.shape == (1, 3 * K, 6565)


def test_label_construction_matches_hand_derived_example():
    model = _model()
    out = model(**_batch())
    assert out.text_labels[0].tolist() == EXPECTED_TEXT_LABELS
    assert out.speech_labels.view(-1, K).tolist() == EXPECTED_SPEECH_LABELS
    no_text = model(**_batch(with_text=False))
    assert no_text.text_labels[0].tolist() == EXPECTED_TEXT_LABELS_NO_TRANSCRIPT
    assert no_text.speech_labels.view(-1, K).tolist() == EXPECTED_SPEECH_LABELS


def test_build_assistant_labels_with_delay_and_consistency_with_forward():
    turn = build_assistant_labels(torch.tensor([20, 21, 22]), torch.arange(100, 107), speech_delay=5)
    # 5 bos + 7 codes = 12 speech ids -> 3 groups; the text runs one group ahead of the speech
    assert turn.input_ids.tolist() == [ABOS, AUDIO, AUDIO, AUDIO, AEOS]
    assert turn.text_stream.tolist() == [20, 21, 22]
    assert turn.speech_groups.tolist() == [[SP_BOS] * 5, [100, 101, 102, 103, 104], [105, 106] + [SP_PAD] * 3]
    assert turn.text_labels.tolist() == [ABOS, 20, 21, 22, AEOS]
    assert turn.speech_labels.tolist() == [[IGN] * 5, [SP_BOS] * 5, [100, 101, 102, 103, 104],
                                           [105, 106, IGN, IGN, IGN], [SP_EOS] * 5]
    reply = build_assistant_labels(torch.tensor([20, 21]), torch.arange(100, 112))   # the forward's assistant audio
    out = _model()(**_batch())
    span = slice(ASSISTANT_START, ASSISTANT_START + len(reply.input_ids))
    assert torch.equal(out.text_labels[0, span], reply.text_labels)
    assert torch.equal(out.speech_labels.view(-1, K)[span], reply.speech_labels)


def test_align_text_to_groups_cuts_pads_and_silences():
    assert align_text_to_groups(torch.tensor([5, 6, 7, 8]), 2, SIL).tolist() == [5, 6]
    silenced = align_text_to_groups(torch.tensor([5, TEXT_EOS]), 4, SIL, (TEXT_EOS, TEXT_PAD))
    assert silenced.tolist() == [5, SIL, SIL, SIL]
    batch = torch.tensor([[5, TEXT_PAD], [6, 9]])
    assert align_text_to_groups(batch, 3, SIL, (TEXT_EOS, TEXT_PAD)).tolist() == [[5, SIL, SIL], [6, 9, SIL]]
    assert batch.tolist() == [[5, TEXT_PAD], [6, 9]]                  # caller's ids untouched


def test_inputs_are_never_mutated():
    model = _model()
    batch = _batch()
    batch["text_ids"] = torch.tensor([[TEXT_EOS, TEXT_PAD, 9], [20, 21, TEXT_EOS]])   # ids the forward silences
    before = {k: v.clone() for k, v in batch.items()}
    out = model(**batch)
    out.loss.backward()
    for name, value in batch.items():
        assert torch.equal(value, before[name]), name


def test_integer_and_bool_masks_give_identical_outputs():
    model = _model()
    as_int, as_bool = model(**_batch(mask_dtype=torch.long)), model(**_batch(mask_dtype=torch.bool))
    for name in ("text_logits", "speech_logits", "loss", "text_labels", "speech_labels"):
        assert torch.equal(getattr(as_int, name), getattr(as_bool, name)), name
    bad = _batch()
    bad["feature_exist_mask"] = torch.tensor([2, 0])
    with pytest.raises(ValueError, match="feature_exist_mask"):
        model(**bad)


def test_errors_name_the_argument_and_shape():
    model = _model()
    batch = _batch()
    batch["speech_attention_mask"] = torch.tensor([[1] * 12, [1] * 12])   # user audio now makes 3 groups, not 2
    with pytest.raises(ValueError, match=r"5 <\|AUDIO\|>.*6 groups"):
        model(**batch)
    batch = _batch()
    batch["input_features"] = torch.randn(2, 128, 30)                     # only one audio is marked as having them
    with pytest.raises(ValueError, match="input_features"):
        model(**batch)
    batch = _batch()
    del batch["input_features"], batch["feature_attention_mask"]
    with pytest.raises(ValueError, match="feature_exist_mask"):
        model(**batch)
    batch = _batch()
    batch["speech_attention_mask"] = torch.tensor([[0] + [1] * 11, [1] * 12])
    with pytest.raises(ValueError, match="prefix"):
        model(**batch)
    batch = _batch()
    batch["text_ids"] = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="text_ids"):
        model(**batch)
    batch = _batch()
    batch["labels"] = batch["labels"][:, :-1]
    with pytest.raises(ValueError, match="labels"):
        model(**batch)


def _manual_ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGN)


def test_text_loss_is_shifted_cross_entropy():
    out = _model()(**_batch())
    expected = _manual_ce(out.text_logits[:, :-1], out.text_labels[:, 1:])
    assert torch.allclose(out.text_loss, expected, atol=1e-6)


def test_speech_loss_uses_the_five_step_shift_and_matches_the_srh_module():
    model = _model()
    batch = _batch(with_text=False)
    out = model(**batch)
    expected = _manual_ce(out.speech_logits[:, :-K], out.speech_labels[:, K:])   # logits at j vs label j + 5
    assert torch.allclose(out.speech_loss, expected, atol=1e-6)
    assert not torch.allclose(out.speech_loss, _manual_ce(out.speech_logits[:, :-1], out.speech_labels[:, 1:]))
    # the same pass through fac_mini.srh's teacher forcing (text embeds = plain input embeddings without text_ids)
    text_embeds = model.language_model.model.embed_tokens(batch["input_ids"])
    reference = model.audio_invert_tower(out.last_hidden_state, out.speech_labels, text_embeds=text_embeds,
                                         attention_mask=batch["attention_mask"])
    assert torch.allclose(out.speech_logits, reference.logits, atol=1e-5)
    assert torch.allclose(out.speech_loss, reference.loss, atol=1e-6)


@torch.no_grad()
def test_continuous_features_replace_the_placeholder_groups():
    model = _model()
    batch = _batch(with_text=False)
    out = model(**batch)
    features = model.continuous_audio_tower(batch["input_features"]).features           # (1, 7, H) at 25 Hz
    padded = F.pad(features, (0, 0, 0, 15 - features.shape[1]))                          # zeros to 15 frames
    expected_user = model.audio_tower.continual_output_matching(mean_group(padded, K))[0, :2]
    assert torch.allclose(out.inputs_embeds[0, 3:5], expected_user, atol=1e-6)
    speech_table = model.audio_tower.embed_tokens.weight
    assistant = torch.cat((torch.arange(100, 112), torch.full((3,), SP_PAD)))          # padded to 15 = 3 groups
    expected_assistant = model.audio_tower.output_matching(speech_table[assistant].view(3, K, -1).mean(1))
    assert torch.allclose(out.inputs_embeds[0, 10:13], expected_assistant, atol=1e-6)
    embed = model.language_model.model.embed_tokens.weight
    assert torch.equal(out.inputs_embeds[0, 9], embed[ABOS])                            # text positions untouched
    other = dict(batch, speech_ids=torch.tensor([[42] * 12, list(range(100, 112))]))
    assert torch.equal(model(**other).inputs_embeds, out.inputs_embeds)                 # placeholders play no role


@torch.no_grad()
def test_transcripts_are_averaged_or_summed_with_speech():
    for fusion in ("average", "sum"):
        model = _model(speech_text_fusion=fusion)
        with_text, without = model(**_batch()), model(**_batch(with_text=False))
        embed = model.language_model.model.embed_tokens.weight
        text = embed[torch.tensor([20, 21, SIL])]
        speech = without.inputs_embeds[0, 10:13]
        assert torch.allclose(with_text.inputs_embeds[0, 10:13], fuse_text_and_speech(text, speech, fusion), atol=1e-6)
        user = without.inputs_embeds[0, 3:5] / (2 if fusion == "average" else 1)           # released halving quirk
        assert torch.allclose(with_text.inputs_embeds[0, 3:5], user, atol=1e-6)


def test_gradients_reach_the_intended_parts():
    model = _model().train()
    out = model(**_batch())
    out.text_loss.backward(retain_graph=True)
    grad = {name: p.grad for name, p in model.named_parameters()}
    assert grad["continuous_audio_tower.conv1.weight"].abs().sum() > 0
    assert grad["audio_tower.continual_output_matching.weight"].abs().sum() > 0
    assert grad["audio_tower.output_matching.weight"].abs().sum() > 0
    assert grad["language_model.lm_head.weight"].abs().sum() > 0
    assert grad["audio_invert_tower.pre_matching.weight"] is None                      # SRH: speech loss only
    table = grad["audio_tower.embed_tokens.weight"]
    assert table[100:112].abs().sum() > 0 and table[SP_PAD].abs().sum() == 0            # user placeholders replaced
    model.zero_grad(set_to_none=True)
    out.speech_loss.backward()
    grad = {name: p.grad for name, p in model.named_parameters()}
    assert grad["language_model.lm_head.weight"] is None                               # text head: text loss only
    assert grad["language_model.model.layers.0.mlp.up_proj.weight"].abs().sum() > 0     # speech loss trains the LLM
    assert grad["audio_invert_tower.crq_transformer.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grad["audio_tower.embed_tokens.weight"].abs().sum() > 0                      # tied lm_head + inputs


def test_srh_positions_follow_the_released_padding_rule():
    positions = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 3]])                # row 0: right padding after position 2
    assert srh_position_ids(positions, 2).tolist() == [[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]]
