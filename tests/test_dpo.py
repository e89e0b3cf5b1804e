"""fac_mini.dpo: completion log-probs against hand computations (the ignored positions of CosyVoice #1449), the
DPO loss and rewards against the formula and against trl's DPOTrainer on a tiny transformers Qwen3, and the
speech-stream log-probs of a FunAudioChat forward (the released tiny checkpoint)."""
import math

import pytest
import torch

from fac_mini.dpo import (COSYVOICE_BETA, completion_logps, completion_logps_and_counts, dpo_loss, dpo_metrics,
                          funaudiochat_logps, sft_loss)
from fac_mini.llm import LLMConfig, Qwen3ForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


def _log_softmax_at(row: list[float], index: int) -> float:
    """log p(index) of one row of logits, in plain Python."""
    top = max(row)
    return row[index] - top - math.log(sum(math.exp(value - top) for value in row))


# ----------------------------------------------------------------------------------------------------------
# Completion log-probabilities on a toy batch, by hand
# ----------------------------------------------------------------------------------------------------------
TOY_LOGITS = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.5, -0.5, 0.0], [0.0, 3.0, 1.0]],
                           [[-1.0, 0.0, 1.0], [0.7, 0.7, -2.0], [0.0, 0.0, 0.0], [4.0, 1.0, 2.0]]])  # (2, 4, 3)
# unshifted labels: position 0 is the prompt, -100 marks prompt and padding (row 0 ends with one pad)
TOY_LABELS = torch.tensor([[-100, 2, 0, -100],
                           [-100, -100, 1, -100]])


def _toy_by_hand(labels: list[list[int]], shift: int = 1) -> tuple[list[float], list[int]]:
    logits = TOY_LOGITS.tolist()
    sums, counts = [], []
    for row_logits, row_labels in zip(logits, labels):
        scored = [(t, row_labels[t + shift]) for t in range(len(row_labels) - shift) if row_labels[t + shift] != -100]
        sums.append(sum(_log_softmax_at(row_logits[t], label) for t, label in scored))
        counts.append(len(scored))
    return sums, counts


def test_completion_logps_equal_a_hand_computation():
    expected, counts = _toy_by_hand(TOY_LABELS.tolist())
    logps, got_counts = completion_logps_and_counts(TOY_LOGITS, TOY_LABELS)
    assert got_counts.tolist() == counts == [2, 1]
    assert torch.allclose(logps, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(completion_logps(TOY_LOGITS, TOY_LABELS), logps)
    # row 1 by hand, written out: logits[1, 1] = (0.7, 0.7, −2.0) scores label 1
    assert math.isclose(expected[1], 0.7 - math.log(2 * math.exp(0.7) + math.exp(-2.0)), abs_tol=1e-12)


def test_speech_shift_scores_label_t_plus_shift():
    labels = torch.tensor([[-100, -100, 0, 2], [-100, 1, -100, 0]])
    expected, counts = _toy_by_hand(labels.tolist(), shift=2)
    logps, got_counts = completion_logps_and_counts(TOY_LOGITS, labels, shift=2)
    assert got_counts.tolist() == counts == [2, 1]
    assert torch.allclose(logps, torch.tensor(expected), atol=1e-6)


def test_average_is_over_completion_positions_only_cosyvoice_1449():
    """The per-token average divides by the completion tokens; CosyVoice once averaged over the ignored
    positions (mask ``target == IGNORE_ID``), which gives a different number on this batch."""
    sums, counts = _toy_by_hand(TOY_LABELS.tolist())
    average = completion_logps(TOY_LOGITS, TOY_LABELS, average=True)
    assert torch.allclose(average, torch.tensor([s / c for s, c in zip(sums, counts)]), atol=1e-6)
    logits, labels = TOY_LOGITS.tolist(), TOY_LABELS.tolist()
    for row in range(2):
        # mistake 1 (CosyVoice #1449): the mask inverted, i.e. the ignored positions averaged (their label read as 0)
        ignored = [t for t in range(3) if labels[row][t + 1] == -100]
        inverted = sum(_log_softmax_at(logits[row][t], 0) for t in ignored) / max(len(ignored), 1)
        # mistake 2: the completion sum divided by every position, ignored ones included
        over_all_positions = sums[row] / 3
        for wrong in (inverted, over_all_positions):
            assert abs(wrong - average[row].item()) > 0.1
    # and changing logits where the target is ignored changes nothing
    perturbed = TOY_LOGITS.clone()
    perturbed[1, 0] += torch.tensor([5.0, -3.0, 1.0])            # position 0 of row 1 scores label -100
    perturbed[:, -1] += 7.0                                      # the last position scores nothing
    assert torch.equal(completion_logps(perturbed, TOY_LABELS), completion_logps(TOY_LOGITS, TOY_LABELS))


def test_row_without_completion_is_zero_and_inputs_unchanged():
    labels = torch.tensor([[-100, -100, -100, -100], [-100, 0, 1, 2]])
    frozen_logits, frozen_labels = TOY_LOGITS.clone(), labels.clone()
    logps, counts = completion_logps_and_counts(TOY_LOGITS, labels)
    assert logps[0].item() == 0.0 and counts[0].item() == 0
    assert completion_logps(TOY_LOGITS, labels, average=True)[0].item() == 0.0
    assert torch.equal(TOY_LOGITS, frozen_logits) and torch.equal(labels, frozen_labels)


@pytest.mark.parametrize("logits, labels, shift, match", [
    (torch.zeros(2, 4), TOY_LABELS, 1, "logits must be a float tensor"),
    (TOY_LOGITS, TOY_LABELS[:, :3], 1, "labels must be"),
    (TOY_LOGITS, TOY_LABELS.float(), 1, "integer ids"),
    (TOY_LOGITS, TOY_LABELS, 0, "shift"),
    (TOY_LOGITS, TOY_LABELS, 4, "shift"),
    (TOY_LOGITS, torch.tensor([[-100, 3, 0, 1], [-100, -100, 1, -100]]), 1, "outside"),
    (TOY_LOGITS, torch.tensor([[-100, -1, 0, 1], [-100, -100, 1, -100]]), 1, "outside"),
])
def test_completion_logps_bad_input(logits, labels, shift, match):
    with pytest.raises(ValueError, match=match):
        completion_logps(logits, labels, shift=shift)


# ----------------------------------------------------------------------------------------------------------
# The loss, rewards and metrics, by the formula
# ----------------------------------------------------------------------------------------------------------
POLICY_CHOSEN, POLICY_REJECTED = [-4.0, -7.5, -2.0], [-6.0, -7.0, -9.0]
REFERENCE_CHOSEN, REFERENCE_REJECTED = [-5.0, -7.0, -3.5], [-5.5, -8.0, -8.0]


def _loss_by_hand(beta: float) -> tuple[float, list[float], list[float]]:
    chosen = [beta * (p - r) for p, r in zip(POLICY_CHOSEN, REFERENCE_CHOSEN)]
    rejected = [beta * (p - r) for p, r in zip(POLICY_REJECTED, REFERENCE_REJECTED)]
    losses = [math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen, rejected)]        # −log σ(x)
    return sum(losses) / len(losses), chosen, rejected


@pytest.mark.parametrize("beta", [0.1, COSYVOICE_BETA, 2.0])
def test_dpo_loss_and_rewards_equal_the_formula(beta):
    inputs = [torch.tensor(values) for values in (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN,
                                                  REFERENCE_REJECTED)]
    loss, chosen, rejected = dpo_loss(*inputs, beta=beta)
    expected_loss, expected_chosen, expected_rejected = _loss_by_hand(beta)
    assert math.isclose(loss.item(), expected_loss, rel_tol=1e-6)
    assert torch.allclose(chosen, torch.tensor(expected_chosen), atol=1e-6)
    assert torch.allclose(rejected, torch.tensor(expected_rejected), atol=1e-6)
    metrics = dpo_metrics(chosen, rejected)
    margins = [c - r for c, r in zip(expected_chosen, expected_rejected)]
    assert math.isclose(metrics["reward_margin"], sum(margins) / 3, rel_tol=1e-5)
    assert metrics["accuracy"] == pytest.approx(2 / 3)                      # pair 2 prefers the rejected one
    assert math.isclose(metrics["chosen_reward"], sum(expected_chosen) / 3, rel_tol=1e-5, abs_tol=1e-7)


def test_policy_equal_to_reference_gives_log_2_and_gradients_only_to_the_policy():
    policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    policy_rejected = torch.tensor(POLICY_REJECTED, requires_grad=True)
    reference_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                      torch.tensor(POLICY_REJECTED))
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    # d/dπ_c of −log σ(β·Δ) at Δ = 0 is −β·σ(0)/B = −0.1·0.5/3; the rejected side gets the opposite
    assert torch.allclose(policy_chosen.grad, torch.full((3,), -0.1 * 0.5 / 3))
    assert torch.allclose(policy_rejected.grad, torch.full((3,), 0.1 * 0.5 / 3))
    assert reference_chosen.grad is None


def test_ties_are_not_counted_as_correct():
    assert dpo_metrics(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5]))["accuracy"] == 0.5


def test_sft_loss_is_token_mean_nll():
    logps, counts = completion_logps_and_counts(TOY_LOGITS, TOY_LABELS)
    sums, token_counts = _toy_by_hand(TOY_LABELS.tolist())
    assert math.isclose(sft_loss(logps, counts).item(), -sum(sums) / sum(token_counts), rel_tol=1e-6)
    with pytest.raises(ValueError, match="sum to 0"):
        sft_loss(logps, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta"), (dict(beta=-0.1), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(beta="0.1"), "beta"), (dict(reference_rejected_logps=torch.zeros(2)), "one value per pair"),
    (dict(policy_chosen_logps=torch.zeros(3, 1)), "one value per pair"),
    (dict(policy_chosen_logps=torch.zeros(3, dtype=torch.long)), "float tensor"),
])
def test_dpo_loss_bad_input(kwargs, match):
    arguments = dict(policy_chosen_logps=torch.zeros(3), policy_rejected_logps=torch.zeros(3),
                     reference_chosen_logps=torch.zeros(3), reference_rejected_logps=torch.zeros(3), beta=0.1)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dpo_loss(**arguments)


# ----------------------------------------------------------------------------------------------------------
# Cross-check: trl's DPOTrainer on a tiny transformers Qwen3 with an offline word-level tokenizer
# ----------------------------------------------------------------------------------------------------------
WORDS = ["<pad>", "<eos>", "<unk>", "the", "sky", "is", "blue", "green", "grass", "red", "fire", "hot", "cold",
         "very"]
PAIRS = {"prompt": ["the sky is", "grass is", "fire is very"],
         "chosen": [" blue", " green", " hot"],
         "rejected": [" red", " very cold", " cold"]}          # different lengths: padding and masks matter
TINY_QWEN3 = LLMConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e6,
                       max_position_embeddings=64)
TRL_TOLERANCE = 1e-6


def _tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>")


def _hf_qwen3(seed: int):
    """transformers Qwen3ForCausalLM with seeded random weights large enough for informative log-probs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(**TINY_QWEN3.to_hf_dict(), pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3)
    return model


def _ours(hf_model) -> Qwen3ForCausalLM:
    """The course's from-scratch Qwen3 with the same weights."""
    ours = Qwen3ForCausalLM(TINY_QWEN3).eval()
    ours.load_state_dict({name: value.clone() for name, value in hf_model.state_dict().items()}, strict=True)
    return ours


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """A DPOTrainer (sigmoid + weighted SFT term) with an explicit, different reference model, and one batch
    of the three pairs as its own collator builds it: rows [chosen_0..2, rejected_0..2], right-padded."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    policy, reference = _hf_qwen3(0), _hf_qwen3(1)
    ours_policy, ours_reference = _ours(policy), _ours(reference)
    beta, sft_weight = 0.1, 0.7
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_dpo")), report_to=[], bf16=False, use_cpu=True,
                     beta=beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, sft_weight],
                     per_device_train_batch_size=3, save_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=datasets.Dataset.from_dict(PAIRS), processing_class=_tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS["prompt"]))])
    loss = trainer.compute_loss(trainer.model, batch)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return dict(beta=beta, sft_weight=sft_weight, batch=batch, loss=loss, logged=logged, policy=ours_policy,
                reference=ours_reference)


def _our_loss(setup):
    """Our functions on trl's batch: labels = input ids with everything outside the completion set to -100."""
    batch = setup["batch"]
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)           # (2B, T)
    with torch.no_grad():
        reference = completion_logps(setup["reference"](batch["input_ids"],
                                                        attention_mask=batch["attention_mask"]).logits, labels)
    policy, counts = completion_logps_and_counts(
        setup["policy"](batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
    policy_chosen, policy_rejected = policy.chunk(2)
    reference_chosen, reference_rejected = reference.chunk(2)
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                      reference_rejected, beta=setup["beta"])
    return loss, chosen_rewards, rejected_rewards, policy, counts


def test_batch_is_what_the_masking_assumes(trl_setup):
    batch = trl_setup["batch"]
    assert batch["input_ids"].shape == (6, 5)
    # EOS was appended to every completion and is scored; the prompt and the padding are not
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    assert labels[0].tolist() == [-100, -100, -100, WORDS.index("blue"), WORDS.index("<eos>")]
    assert labels[1].tolist() == [-100, -100, WORDS.index("green"), WORDS.index("<eos>"), -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0]


def test_loss_equals_trl_dpo_trainer(trl_setup):
    """trl's DPOTrainer.compute_loss (sigmoid DPO + 0.7 × SFT) equals dpo_loss + 0.7 × sft_loss on one batch."""
    loss, _, _, policy, counts = _our_loss(trl_setup)
    chosen_logps, chosen_counts = policy.chunk(2)[0], counts.chunk(2)[0]
    ours = loss + trl_setup["sft_weight"] * sft_loss(chosen_logps, chosen_counts)
    assert abs(loss.item() - math.log(2)) > 0.05                   # policy and reference really differ
    assert abs(ours.item() - trl_setup["loss"].item()) <= TRL_TOLERANCE


def test_rewards_and_logps_equal_trl_logs(trl_setup):
    _, chosen_rewards, rejected_rewards, policy, _ = _our_loss(trl_setup)
    logged = trl_setup["logged"]
    metrics = dpo_metrics(chosen_rewards, rejected_rewards)
    assert abs(metrics["chosen_reward"] - logged["rewards/chosen"]) <= TRL_TOLERANCE
    assert abs(metrics["rejected_reward"] - logged["rewards/rejected"]) <= TRL_TOLERANCE
    assert abs(metrics["reward_margin"] - logged["rewards/margins"]) <= TRL_TOLERANCE
    assert metrics["accuracy"] == logged["rewards/accuracies"]
    chosen, rejected = policy.chunk(2)
    assert abs(chosen.mean().item() - logged["logps/chosen"]) <= TRL_TOLERANCE * 10     # sums of ~2 log-probs
    assert abs(rejected.mean().item() - logged["logps/rejected"]) <= TRL_TOLERANCE * 10


# ----------------------------------------------------------------------------------------------------------
# FunAudioChat: text and speech streams of the released tiny checkpoint
# ----------------------------------------------------------------------------------------------------------
SPEECH_EOS = 97      # the released tiny checkpoint's speech eos id (tests/fixtures/released_tiny/README.md)


@pytest.fixture(scope="module")
def released_run():
    """The released tiny checkpoint's forward on its ``train`` batch: 2 dialogues, user audio then a spoken reply."""
    from released_tiny import BATCHES, CHECKPOINT

    from fac_mini.released import load_released

    model = load_released(CHECKPOINT).eval()
    batch = BATCHES["train"]
    with torch.no_grad():
        return batch, model(**{key: value.clone() for key, value in batch.items()})


def test_funaudiochat_logps_match_the_models_own_losses(released_run):
    _, out = released_run
    logps = funaudiochat_logps(out)
    # the model's losses are token means over the same positions, pooled over the batch
    assert math.isclose(-logps.text.sum().item() / logps.text_tokens.sum().item(), out.text_loss.item(),
                        rel_tol=1e-5)
    assert math.isclose(-logps.speech.sum().item() / logps.speech_tokens.sum().item(), out.speech_loss.item(),
                        rel_tol=1e-5)
    assert torch.allclose(logps.total, logps.text + logps.speech)
    assert torch.equal(logps.tokens, logps.text_tokens + logps.speech_tokens)


def test_only_completion_speech_positions_count(released_run):
    """By hand: 25 Hz position j scores speech label j + 5 where that label is a reply token; the user's audio,
    the prompt and the padding score nothing, so changing their logits changes nothing."""
    batch, out = released_run
    assert batch["feature_exist_mask"].tolist() == [True, False, True, False]      # audios 0, 2: the user's
    group_size = out.speech_logits.shape[1] // out.text_logits.shape[1]
    assert group_size == 5
    speech = funaudiochat_logps(out)
    labels, logits = out.speech_labels.tolist(), out.speech_logits
    for row in range(len(labels)):
        scored = [j for j in range(len(labels[row]) - group_size) if labels[row][j + group_size] != -100]
        by_hand = sum(_log_softmax_at(logits[row, j].tolist(), labels[row][j + group_size]) for j in scored)
        assert speech.speech_tokens[row].item() == len(scored)
        assert math.isclose(speech.speech[row].item(), by_hand, rel_tol=1e-5)
        # what is scored is the assistant's own speech (audio 1 of row 0, audio 3 of row 1: the delay bos ids, the
        # codes) and the eos group, never the user's audio (the placeholder pad ids of audios 0 and 2)
        audio = 2 * row + 1
        reply = batch["speech_ids"][audio][batch["speech_attention_mask"][audio].bool()].tolist()
        assert [labels[row][j + group_size] for j in scored] == reply + [SPEECH_EOS] * group_size
    perturbed = out.speech_logits.clone()
    targets = out.speech_labels[:, group_size:]
    unscored = torch.cat((targets == -100, torch.ones_like(targets[:, :group_size], dtype=torch.bool)), dim=1)
    perturbed[unscored] += torch.linspace(-4.0, 4.0, perturbed.shape[-1])
    changed = type(out)(**{**vars(out), "speech_logits": perturbed})
    assert torch.equal(funaudiochat_logps(changed).speech, speech.speech)
    changed.speech_logits[0, torch.nonzero(~unscored[0])[0, 0]] += torch.linspace(-4.0, 4.0, perturbed.shape[-1])
    assert funaudiochat_logps(changed).speech[0] != speech.speech[0]


def test_funaudiochat_logps_needs_labels(model):
    with torch.no_grad():
        out = model(torch.tensor([[10, 11, 12, 13]]))
    with pytest.raises(ValueError, match="call the model with labels"):
        funaudiochat_logps(out)
    with torch.no_grad():
        out = model(torch.tensor([[10, 11, 12, 13]]), labels=torch.tensor([[-100, -100, 12, 13]]))
    logps = funaudiochat_logps(out)                         # text only: the speech terms are zero
    assert logps.speech.tolist() == [0.0] and logps.text_tokens.tolist() == [2]
