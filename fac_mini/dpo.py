"""Direct Preference Optimisation (DPO), from scratch: completion log-probabilities, the sigmoid loss, its metrics.

Given a prompt x, a preferred completion y_w ("chosen") and a worse one y_l ("rejected"), DPO trains the policy
π_θ against a frozen reference π_ref (the checkpoint DPO starts from) with

    L_DPO = −E log σ( β·[log π_θ(y_w|x) − log π_ref(y_w|x)] − β·[log π_θ(y_l|x) − log π_ref(y_l|x)] )

where log π(y|x) is the *sum* of the log-probabilities of the completion tokens only (prompt and padding excluded)
and r(x, y) = β·(log π_θ(y|x) − log π_ref(y|x)) is the implicit reward. Derivation, trl's conventions and
CosyVoice's settings: docs/dpo.md.

Label convention (the course's, that of ``FunAudioChat`` and transformers): labels are *unshifted* and -100 where
nothing is scored. ``logits[:, t]`` scores ``labels[:, t + shift]``: ``shift = 1`` for a causal LM's text stream
(``fac_mini.llm.causal_lm_loss``), ``shift = k`` (the group size, 5) for the Speech Refined Head's 25 Hz stream
(``fac_mini.srh.speech_loss``: 25 Hz position j predicts label j + k).

    completion_logps(logits, labels)            -> (B,) summed log-probs over the scored positions
    completion_logps_and_counts(logits, labels) -> ((B,), (B,)) and how many positions were scored
    funaudiochat_logps(output)                  -> text + speech stream log-probs of one FunAudioChat forward
    dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
                                                -> (loss, chosen_rewards, rejected_rewards), trl's conventions
    dpo_metrics(chosen_rewards, rejected_rewards) -> reward means, margin, DPO accuracy (trl's rewards/* logs)
    sft_loss(chosen_logps, chosen_counts)       -> the per-token NLL of the chosen completions (CosyVoice's extra term)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F

from .llm import IGNORE_INDEX
from .model import FunAudioChatOutput

__all__ = ["COSYVOICE_BETA", "COSYVOICE_SFT_WEIGHT", "completion_logps", "completion_logps_and_counts",
           "SequenceLogps", "funaudiochat_logps", "dpo_loss", "dpo_metrics", "sft_loss"]

COSYVOICE_BETA = 0.01          # CosyVoice's DPOLoss(beta=0.01): ten times smaller than trl's default 0.1
COSYVOICE_SFT_WEIGHT = 1.0     # CosyVoice adds the chosen sequence's cross-entropy to the DPO loss unweighted


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities of the completion
# ----------------------------------------------------------------------------------------------------------
def completion_logps_and_counts(logits: torch.Tensor, labels: torch.Tensor, *, shift: int = 1,
                                ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(label) over the scored positions, and how many positions were scored.

    logits (B, T, V) float; labels (B, T) integer ids, *unshifted*, ``ignore_index`` (-100) wherever nothing is
    scored (prompt, padding). ``logits[:, t]`` scores ``labels[:, t + shift]`` (shift 1: text; k: SRH speech).
    Returns ``logps`` (B,) float32 (0 for a row with no scored position) and ``counts`` (B,) int64.
    Ignored positions contribute exactly nothing: they are neither added nor counted (CosyVoice #1449 averaged
    over the ignored positions instead; see docs/dpo.md).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a float tensor (B, T, V), got {shape}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be (B, T) = {tuple(logits.shape[:2])} like the logits, got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer ids (or {ignore_index}), got dtype {labels.dtype}")
    if isinstance(shift, bool) or not isinstance(shift, int) or not 1 <= shift < logits.shape[1]:
        raise ValueError(f"shift={shift!r} must be an int in [1, T) = [1, {logits.shape[1]}): logits at t score "
                         "the label at t + shift")
    vocab = logits.shape[-1]
    targets = labels[:, shift:]                                                        # (B, T − shift)
    scored = targets != ignore_index                                                   # (B, T − shift)
    if scored.any() and (targets[scored].min() < 0 or targets[scored].max() >= vocab):
        bad = targets[scored & ((targets < 0) | (targets >= vocab))][0]
        raise ValueError(f"labels hold {int(bad)}, outside [0, {vocab}) and not {ignore_index}: use "
                         f"{ignore_index} for positions that are not part of the completion")
    log_probs = logits[:, :-shift].float().log_softmax(dim=-1)                         # (B, T − shift, V)
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)         # (B, T − shift)
    picked = torch.where(scored, picked, torch.zeros_like(picked))                      # ignored: exactly 0
    return picked.sum(dim=1), scored.sum(dim=1)


def completion_logps(logits: torch.Tensor, labels: torch.Tensor, *, shift: int = 1,
                     ignore_index: int = IGNORE_INDEX, average: bool = False) -> torch.Tensor:
    """log π(y|x) of each sequence (B,): the sum over the completion positions (``average=True``: the mean per
    completion token, 0 for a row without any). Arguments and label convention: ``completion_logps_and_counts``."""
    logps, counts = completion_logps_and_counts(logits, labels, shift=shift, ignore_index=ignore_index)
    return logps / counts.clamp(min=1) if average else logps


@dataclass
class SequenceLogps:
    """Completion log-probabilities of the two streams of one ``FunAudioChat`` forward, one value per row (B,).

    text / speech: summed log p of the scored text labels (shift 1) / SRH speech labels (shift k);
    text_tokens / speech_tokens: how many labels each sum covers.
    """

    text: torch.Tensor
    speech: torch.Tensor
    text_tokens: torch.Tensor
    speech_tokens: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """log π(y|x) of the whole reply (B,): text stream + speech stream (the quantity DPO compares)."""
        return self.text + self.speech

    @property
    def tokens(self) -> torch.Tensor:
        """Scored labels per row (B,), both streams: the denominator of a per-token average or SFT term."""
        return self.text_tokens + self.speech_tokens


def funaudiochat_logps(output: FunAudioChatOutput) -> SequenceLogps:
    """Text- and speech-stream completion log-probs of a ``FunAudioChat`` forward that was given ``labels``.

    ``output`` is the ``FunAudioChatOutput``: text_logits (B, L, V) against its text_labels (B, L) with shift 1
    (as ``text_loss``); speech_logits (B, k·L, C) against speech_labels (B, k·L) with shift k (as the SRH's
    ``speech_loss``: 25 Hz position j predicts label j + k). The labels the model built already carry -100 on the
    prompt (system, user turns, user audio) and padding, so only the assistant's reply is scored. Without speech
    labels (a text-only batch) the speech terms are 0. For DPO, run chosen and rejected through the same call
    (e.g. one batch of 2B rows, chosen first) and split the result.
    """
    text_logits, text_labels = getattr(output, "text_logits", None), getattr(output, "text_labels", None)
    if not isinstance(text_logits, torch.Tensor) or text_logits.dim() != 3:
        raise ValueError("output must be a FunAudioChatOutput with text_logits (B, L, V)")
    if text_labels is None:
        raise ValueError("output.text_labels is None: call the model with labels (input ids, -100 outside the "
                         "assistant's reply) so that the completion positions are known")
    text, text_tokens = completion_logps_and_counts(text_logits, text_labels, shift=1)
    speech_labels = output.speech_labels
    if speech_labels is None:
        return SequenceLogps(text=text, speech=torch.zeros_like(text), text_tokens=text_tokens,
                             speech_tokens=torch.zeros_like(text_tokens))
    speech_logits = output.speech_logits
    batch, length = text_logits.shape[:2]
    if speech_logits.dim() != 3 or speech_logits.shape[0] != batch or speech_logits.shape[1] % length:
        raise ValueError(f"speech_logits {tuple(speech_logits.shape)} must be (B, k·L, C) with B = {batch}, "
                         f"L = {length}")
    group_size = speech_logits.shape[1] // length
    speech, speech_tokens = completion_logps_and_counts(speech_logits, speech_labels, shift=group_size)
    return SequenceLogps(text=text, speech=speech, text_tokens=text_tokens, speech_tokens=speech_tokens)


# ----------------------------------------------------------------------------------------------------------
# The loss and what to watch
# ----------------------------------------------------------------------------------------------------------
def _check_logps(**tensors: torch.Tensor) -> tuple[int, ...]:
    shapes = {}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (B,), got "
                             f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
        shapes[name] = tuple(value.shape)
    first = next(iter(shapes.values()))
    if len(first) != 1 or first[0] == 0 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"the log-probs must all be (B,) with B >= 1, one value per pair; got {shapes}")
    return first


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss with trl's conventions (``DPOTrainer``, ``loss_type="sigmoid"``).

    All four inputs are (B,) sequence log-probs (sums over the completion, e.g. ``completion_logps``); the
    reference ones are treated as constants (detached). Returns
      loss             scalar: mean over the B pairs of −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]);
      chosen_rewards   (B,) β·(π_c − ref_c), detached (trl's ``rewards/chosen`` averages them);
      rejected_rewards (B,) β·(π_r − ref_r), detached.
    β > 0 sets how far the policy may move from the reference (small β: weak KL leash). ValueError on
    mismatched shapes, non-float inputs or a β that is not a finite positive number.
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta={beta!r} must be a finite number > 0 (trl's default 0.1, CosyVoice's 0.01)")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps.detach()              # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps.detach()        # (B,)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))                 # (B,)
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """What DPO training logs, as trl does (``rewards/*``) and CosyVoice (``dpo_acc``), from (B,) rewards:

    chosen_reward / rejected_reward: the batch means; reward_margin: mean of chosen − rejected;
    accuracy: the fraction of pairs whose chosen reward is strictly larger (0.5 is chance; ties count as wrong).
    """
    _check_logps(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
            "reward_margin": (chosen - rejected).mean().item(),
            "accuracy": (chosen > rejected).float().mean().item()}


def sft_loss(chosen_logps: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token of the chosen completions: −Σ logps / Σ counts over the batch.

    chosen_logps (B,) summed log-probs and chosen_counts (B,) their token counts (``completion_logps_and_counts``
    or ``SequenceLogps.total`` / ``.tokens``). This is the token-mean cross-entropy of the chosen completions,
    trl's ``loss_type="sft"`` term and CosyVoice's extra term; CosyVoice trains on
    ``dpo_loss(...)[0] + COSYVOICE_SFT_WEIGHT * sft_loss(...)`` with β = ``COSYVOICE_BETA`` (docs/dpo.md).
    """
    _check_logps(chosen_logps=chosen_logps)
    if not isinstance(chosen_counts, torch.Tensor) or tuple(chosen_counts.shape) != tuple(chosen_logps.shape):
        raise ValueError(f"chosen_counts must be (B,) = {tuple(chosen_logps.shape)} like chosen_logps")
    total = int(chosen_counts.sum())
    if total <= 0:
        raise ValueError("chosen_counts sum to 0: no chosen completion token to score")
    return -chosen_logps.sum() / total
