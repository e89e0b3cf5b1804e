"""The Speech Refined Head (SRH): one 5 Hz LLM hidden state -> k = 5 speech tokens at 25 Hz, autoregressively.

Paper, eqs. (2)–(4): h_ug = W_p · h_L, split h_ug into k slices, generate the k speech tokens of a group one
after another (L_SRH = −Σ_i log P(s_i | s_<i, H_<i)). The released model (``audio_invert_tower``) does:

    x_p = h_p + stopgrad(e_p)                       LLM final hidden + embedding of the text token at p  (B, L, H)
    U   = ungroup(pre_matching(x))                  Linear H -> k·H (bias); slice s of p -> 25 Hz k·p+s  (B, k·L, H)
    z_j = U_j + E_speech[previous speech token]     rows of the speech table (tied with lm_head)          (B, k·L, H)
    logits = lm_head(output_matching(CRQ(input_matching(z))))   H -> h -> Qwen3 (no embed table) -> h -> H -> C

Teacher forcing (released shift, ``forward``): the previous-token embeddings are those of the labels rolled by
−(k−1), and the labels are shifted by k (one LLM step), so 25 Hz position j reads label j + k − 1 and predicts
label j + k: sub-step s of LLM position p predicts token s of the group attached to position p + 1.

Generation (``generate_step``, once per LLM forward, with a KV cache spanning the whole dialogue): sub-step 0
feeds all new positions except the last k − 1, each plus the *same* previous-token embedding (bos on the first
call, else the last token sampled); sub-steps 1..k−1 feed one position plus the token just sampled.

``ParallelSpeechHead`` is the naive baseline: Linear H -> k·C predicts the k tokens of a group independently.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .constants import CODEBOOK_SIZE, GROUP_SIZE, SPEECH_BOS_ID, SPEECH_PAD_ID
from .grouping import group_mask_to_frame_mask, ungroup
from .llm import IGNORE_INDEX, KVCache, LLMConfig, Qwen3Model, init_weights, sample_next_token

__all__ = [
    "SpeechHeadOutput", "SpeechStepOutput", "SRHState", "teacher_forcing_ids", "srh_position_ids", "speech_loss", "SpeechRefinedHead",
    "ParallelSpeechHead",
]



@dataclass
class SpeechHeadOutput:
    """logits (B, k·L, C) at 25 Hz positions k·p + s; loss (scalar) when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


@dataclass
class SpeechStepOutput:
    """tokens (B, k): the group sampled for the last LLM position; logits (B, k, C) float32 they came from."""

    tokens: torch.Tensor
    logits: torch.Tensor


@dataclass
class SRHState:
    """What the SRH carries across the LLM steps of one ``generate`` call (updated in place by ``generate_step``).

    cache: the CRQ transformer's keys/values (positions continue from ``cache.seq_length``).
    prev_embedding: (B, H) speech embedding of the last sampled token; None before the first call (-> bos).
    speech_history: (B, n) speech ids appended so far (for the repetition penalty).
    """

    cache: KVCache
    prev_embedding: torch.Tensor | None = None
    speech_history: torch.Tensor | None = None


def _flat_speech_labels(speech_labels: torch.Tensor, batch: int, length: int, group_size: int) -> torch.Tensor:
    """Accept (B, k·L) or (B, L, k) labels; return (B, k·L)."""
    if speech_labels.is_floating_point():
        raise ValueError(f"speech_labels must be integer ids (or -100), got dtype {speech_labels.dtype}")
    if speech_labels.dim() == 3 and tuple(speech_labels.shape) == (batch, length, group_size):
        return speech_labels.reshape(batch, length * group_size)
    if tuple(speech_labels.shape) != (batch, length * group_size):
        raise ValueError(f"speech_labels must be (B, k·L) = ({batch}, {length * group_size}) or (B, L, k) = "
                         f"({batch}, {length}, {group_size}), got {tuple(speech_labels.shape)}")
    return speech_labels


def teacher_forcing_ids(speech_labels: torch.Tensor, group_size: int = GROUP_SIZE,
                        pad_id: int = SPEECH_PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """The released teacher-forcing shift at 25 Hz. speech_labels (B, k·L), -100 where there is no speech.

    Returns ``(previous, targets)``, both (B, k·L): 25 Hz position j = k·p + s adds the embedding of
    ``previous[j]`` = label j + k − 1 (-100 read as ``pad_id``; the last k − 1 positions wrap around, harmlessly,
    since their targets are -100) and is scored against ``targets[j]`` = label j + k (-100 for the last k).
    So sub-step s of LLM position p predicts token s of the next group, having seen token s − 1 of it
    (for s = 0: the last token of the current group).
    """
    if speech_labels.dim() != 2:
        raise ValueError(f"speech_labels must be (B, k·L), got {tuple(speech_labels.shape)}")
    previous = speech_labels.masked_fill(speech_labels == IGNORE_INDEX, pad_id).roll(-(group_size - 1), dims=1)
    ignore = speech_labels.new_full((speech_labels.shape[0], min(group_size, speech_labels.shape[1])),
                                    IGNORE_INDEX)
    targets = torch.cat((speech_labels[:, group_size:], ignore), dim=1)                  # (B, k·L)
    return previous, targets


def srh_position_ids(position_ids: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """LLM positions (B, L) -> SRH positions (B, k·L): k·p + s, and 0 after the last non-zero position of each
    row (the released rule for right padding, read from the position ids, not the attention mask)."""
    batch, length = position_ids.shape
    steps = torch.arange(group_size, device=position_ids.device, dtype=position_ids.dtype)
    positions = (group_size * position_ids[:, :, None] + steps).flatten(1)                  # (B, k·L)
    nonzero = position_ids != 0
    last_nonzero_end = torch.where(nonzero.any(dim=1), length - nonzero.flip(1).long().argmax(dim=1), 0)  # (B,)
    padding = torch.arange(length, device=position_ids.device)[None] >= last_nonzero_end[:, None]
    return positions.masked_fill(group_mask_to_frame_mask(padding, group_size), 0)


def speech_loss(logits: torch.Tensor, speech_labels: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Cross-entropy with the released shift: logits at 25 Hz position j against label j + k; -100 is skipped.

    logits (B, k·L, C), speech_labels (B, k·L). Returns 0 (with a graph) when every label is ignored.
    """
    if logits.dim() != 3 or tuple(speech_labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"logits (B, T, C) and speech_labels (B, T) disagree: {tuple(logits.shape)} vs "
                         f"{tuple(speech_labels.shape)}")
    _, targets = teacher_forcing_ids(speech_labels, group_size)
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _check_hidden(lm_hidden: torch.Tensor, text_embeds: torch.Tensor | None, hidden_size: int) -> torch.Tensor:
    """Validate lm_hidden (B, L, H) and optional text_embeds (B, L, H); return x = h + stopgrad(e)."""
    if lm_hidden.dim() != 3 or lm_hidden.shape[-1] != hidden_size or lm_hidden.shape[1] == 0:
        raise ValueError(f"lm_hidden must be (B, L, {hidden_size}) with L >= 1, got {tuple(lm_hidden.shape)}")
    if text_embeds is None:
        return lm_hidden
    if text_embeds.shape != lm_hidden.shape:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} must match lm_hidden {tuple(lm_hidden.shape)}")
    return lm_hidden + text_embeds.detach()


class SpeechRefinedHead(nn.Module):
    """The released ``audio_invert_tower``: pre_matching, input_matching, crq_transformer, output_matching, lm_head.

    hidden_size: H, the LLM width. crq_config: the CRQ transformer (its hidden_size is h; vocab is unused).
    speech_embedding: the speech token table (C, H) to tie ``lm_head`` to (the released
    ``audio_tower.embed_tokens``); previous-token embeddings are always rows of ``lm_head.weight``.
    """

    def __init__(self, hidden_size: int, crq_config: LLMConfig, codebook_size: int = CODEBOOK_SIZE,
                 group_size: int = GROUP_SIZE, bos_id: int = SPEECH_BOS_ID, pad_id: int = SPEECH_PAD_ID,
                 speech_embedding: nn.Embedding | None = None):
        super().__init__()
        if not 0 <= bos_id < codebook_size or not 0 <= pad_id < codebook_size:
            raise ValueError(f"bos_id={bos_id} and pad_id={pad_id} must be < codebook_size={codebook_size}")
        self.hidden_size, self.group_size, self.codebook_size = hidden_size, group_size, codebook_size
        self.bos_id, self.pad_id = bos_id, pad_id
        inner = crq_config.hidden_size
        self.pre_matching = nn.Linear(hidden_size, group_size * hidden_size, bias=True)   # W_p (eq. 2) + bias
        self.input_matching = nn.Linear(hidden_size, inner, bias=False)
        self.crq_transformer = Qwen3Model(crq_config, with_embeddings=False)
        self.output_matching = nn.Linear(inner, hidden_size, bias=False)
        self.lm_head = nn.Linear(hidden_size, codebook_size, bias=False)
        init_weights(self, crq_config.initializer_range)
        if speech_embedding is not None:
            if tuple(speech_embedding.weight.shape) != (codebook_size, hidden_size):
                raise ValueError(f"speech_embedding must be ({codebook_size}, {hidden_size}), got "
                                 f"{tuple(speech_embedding.weight.shape)}")
            self.lm_head.weight = speech_embedding.weight                                 # tied, as released

    # -- pieces shared by teacher forcing and generation ------------------------------------------------
    def embed_speech(self, ids: torch.Tensor) -> torch.Tensor:
        """Speech ids (...) -> embeddings (..., H): rows of the (tied) lm_head weight. The pad row gets no gradient
        from these inputs, as through the released ``audio_tower.embed_tokens`` (``padding_idx`` = pad)."""
        return F.embedding(ids, self.lm_head.weight, padding_idx=self.pad_id)

    def ungrouped_inputs(self, lm_hidden: torch.Tensor, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, H) -> U (B, k·L, H): pre_matching of h + stopgrad(e), slice s of p at 25 Hz position k·p + s."""
        x = _check_hidden(lm_hidden, text_embeds, self.hidden_size)
        return ungroup(self.pre_matching(x), self.group_size)

    def refine(self, inputs: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """25 Hz inputs (B, T, H) -> logits (B, T, C): input_matching, CRQ transformer, output_matching, lm_head."""
        hidden = self.crq_transformer(inputs_embeds=self.input_matching(inputs), attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache)               # (B, T, h)
        return self.lm_head(self.output_matching(hidden))                                # (B, T, C)

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, lm_hidden: torch.Tensor, speech_labels: torch.Tensor | None = None, *,
                text_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> SpeechHeadOutput:
        """The teacher-forced pass with the released semantics (the one path, also behind ``FunAudioChat``).

        lm_hidden, text_embeds: (B, L, H). speech_labels: (B, k·L) or (B, L, k), the k speech ids attached to
        each LLM position, -100 where there is no speech (embedded as the pad id, skipped by the loss); without
        labels no previous-token embeddings are added and no loss is computed (as released at inference).
        attention_mask: (B, L) LLM mask, repeated k times. position_ids: (B, L) LLM positions p, mapped to
        k·p + s and to 0 after each row's last non-zero position (:func:`srh_position_ids`, the released rule);
        default 0 .. k·L − 1.
        """
        inputs = self.ungrouped_inputs(lm_hidden, text_embeds)                              # (B, k·L, H)
        batch, length = lm_hidden.shape[:2]
        frame_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"attention_mask must be (B, L) = ({batch}, {length}), got "
                                 f"{tuple(attention_mask.shape)}")
            frame_mask = group_mask_to_frame_mask(attention_mask, self.group_size)          # (B, k·L)
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
                raise ValueError(f"position_ids must be (B, L) with L = {length}, got {tuple(position_ids.shape)}")
            position_ids = srh_position_ids(position_ids, self.group_size)                # (B, k·L)
        labels = None
        if speech_labels is not None:
            labels = _flat_speech_labels(speech_labels, batch, length, self.group_size)    # (B, k·L)
            previous, _ = teacher_forcing_ids(labels, self.group_size, self.pad_id)       # j reads label j + k − 1
            inputs = inputs + self.embed_speech(previous)
        logits = self.refine(inputs, attention_mask=frame_mask, position_ids=position_ids)
        return SpeechHeadOutput(logits=logits,
                                loss=None if labels is None else speech_loss(logits, labels, self.group_size))

    # -- generation --------------------------------------------------------------------------------------
    def new_state(self) -> SRHState:
        """A fresh state for one ``generate`` call (empty cache, bos as the first previous token)."""
        return SRHState(cache=self.crq_transformer.new_cache())

    @torch.no_grad()
    def generate_step(self, lm_hidden: torch.Tensor, state: SRHState, text_embeds: torch.Tensor | None = None, *,
                      do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
                      update_history: bool = True) -> SpeechStepOutput:
        """Sample the k speech tokens for the last of the L new LLM positions (L = prompt length at prefill, 1 after).

        The cache, ``prev_embedding`` and (if ``update_history``) ``speech_history`` of ``state`` advance in
        place; the history conditions the repetition penalty only. Greedy when ``do_sample`` is False.
        """
        inputs = self.ungrouped_inputs(lm_hidden, text_embeds)                              # (B, k·L, H)
        batch, frames = inputs.shape[:2]
        k = self.group_size
        previous = state.prev_embedding
        if previous is None:
            previous = self.embed_speech(torch.full((batch,), self.bos_id, dtype=torch.long,
                                                    device=inputs.device))
        if previous.shape != (batch, self.hidden_size):
            raise ValueError(f"state.prev_embedding is {tuple(previous.shape)}, expected ({batch}, "
                             f"{self.hidden_size}): use one SRHState per batch")
        history = state.speech_history
        if history is None:
            history = torch.zeros(batch, 0, dtype=torch.long, device=inputs.device)
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, generator=generator)
        # sub-step 0: every new position but the last k − 1, each plus the same previous-token embedding
        step_inputs = inputs[:, :frames - k + 1] + previous[:, None]                      # (B, k·L − k + 1, H)
        tokens, step_logits = [], []
        for sub_step in range(k):
            if sub_step > 0:                                                                # one position
                step_inputs = inputs[:, frames - k + sub_step:frames - k + sub_step + 1] + previous[:, None]
            logits = self.refine(step_inputs, cache=state.cache)[:, -1].float()             # (B, C)
            token = sample_next_token(logits, torch.cat([history] + [t[:, None] for t in tokens], dim=1),
                                      **sampling)                                          # (B,)
            tokens.append(token)
            step_logits.append(logits)
            previous = self.embed_speech(token)                                            # (B, H)
        group = torch.stack(tokens, dim=1)                                                  # (B, k)
        state.prev_embedding = previous
        if update_history:
            state.speech_history = torch.cat((history, group), dim=1)
        return SpeechStepOutput(tokens=group, logits=torch.stack(step_logits, dim=1))


class ParallelSpeechHead(nn.Module):
    """Naive baseline: Linear H -> k·C predicts the k tokens of the next group independently (no AR within it)."""

    def __init__(self, hidden_size: int, codebook_size: int = CODEBOOK_SIZE, group_size: int = GROUP_SIZE):
        super().__init__()
        self.hidden_size, self.group_size, self.codebook_size = hidden_size, group_size, codebook_size
        self.lm_head = nn.Linear(hidden_size, group_size * codebook_size, bias=False)
        init_weights(self)

    def forward(self, lm_hidden: torch.Tensor, speech_labels: torch.Tensor | None = None, *,
                text_embeds: torch.Tensor | None = None) -> SpeechHeadOutput:
        """lm_hidden (B, L, H) -> logits (B, k·L, C); labels and loss shift exactly as ``SpeechRefinedHead``."""
        x = _check_hidden(lm_hidden, text_embeds, self.hidden_size)
        logits = ungroup(self.lm_head(x), self.group_size)                                 # (B, k·L, C)
        loss = None
        if speech_labels is not None:
            labels = _flat_speech_labels(speech_labels, *lm_hidden.shape[:2], self.group_size)
            loss = speech_loss(logits, labels, self.group_size)
        return SpeechHeadOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate_step(self, lm_hidden: torch.Tensor, text_embeds: torch.Tensor | None = None, *,
                      do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> SpeechStepOutput:
        """The k tokens for the last LLM position, each drawn from its own logits."""
        logits = self.forward(lm_hidden[:, -1:], text_embeds=None if text_embeds is None else text_embeds[:, -1:])
        logits = logits.logits.float()                                                     # (B, k, C)
        flat = logits.reshape(-1, self.codebook_size)                                      # (B·k, C)
        tokens = sample_next_token(flat, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
        return SpeechStepOutput(tokens=tokens.view(-1, self.group_size), logits=logits)
