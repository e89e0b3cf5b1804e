"""5 Hz dialogues, packed to a cutoff: the batches the full-scale training step eats.

A *dialogue* is one user turn with speech (continuous Whisper features, no transcript) and one assistant turn
that answers with text and speech at once (the parallel streams of ``fac_mini.model``):

    <|im_start|> user-text <|audio_bos|> <|AUDIO|> x G_u <|audio_eos|> <|im_end|>
    <|im_start|> reply-text <|audio_bos|> <|AUDIO|> x G_a <|audio_eos|> <|im_end|>

with labels -100 on the user turn and on the assistant's ``<|im_start|>`` (the released label rules, built by
``FunAudioChat.forward`` from ``labels``; docs/released_model.md §5). The released recipe trains with
``cutoff_len`` 2048 and *neat packing*: several whole dialogues share one row of 2048 LLM positions, each with its
own position ids 0, 1, ... (:func:`pack_dialogues`, first-fit decreasing; :func:`collate_rows`).

What neat packing also means in the release, and this course does not reproduce: FlashAttention-2 reads the
restarting position ids and stops a dialogue attending to the one before it in the row. The course's attention
takes a padding mask only, so within a packed row attention is causal over the whole row (LLaMA-Factory's plain
``packing``). Both training engines below see the same rows, so their comparison is exact either way.

The losses of ``FunAudioChat`` are means over the scored tokens of one forward call. To split one global batch
over ranks and micro-batches without changing the objective, every part's mean is re-weighted by its share of
the global count of scored tokens (:func:`scored_token_counts`; ``fac_mini.scale.fsdp.train_step``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..llm import IGNORE_INDEX
from ..model import (FunAudioChatConfig, align_text_to_groups, audio_slot_ids, build_training_labels,
                     prepare_speech_ids)
from ..srh import teacher_forcing_ids

__all__ = ["AudioSegment", "Dialogue", "synthetic_dialogue", "synthetic_dialogues", "pack_dialogues",
           "collate_rows", "scored_token_counts", "MEL_FRAMES_PER_SPEECH_TOKEN"]

MEL_FRAMES_PER_SPEECH_TOKEN = 4      # 100 Hz log-mel frames per 25 Hz speech token


@dataclass
class AudioSegment:
    """One audio of a dialogue: its 25 Hz speech ids (T,), and either Whisper features (mel bins, 4·T) for user
    speech or the aligned transcript ids (n,) for assistant speech."""

    speech_ids: torch.Tensor
    input_features: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None


@dataclass
class Dialogue:
    """input_ids, labels (L,): one user + assistant exchange; audios in reading order (one per audio slot)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    audios: list[AudioSegment]

    def __len__(self) -> int:
        return self.input_ids.numel()


def synthetic_dialogue(config: FunAudioChatConfig, generator: torch.Generator, im_start_id: int,
                       user_groups: int, reply_groups: int, text_tokens: int = 4, first_text_id: int = 8,
                       speech_delay: int = 10) -> Dialogue:
    """A random dialogue in the layout above (ids drawn from ``generator``): ``user_groups`` and ``reply_groups``
    5 Hz groups of speech, ``text_tokens`` ordinary text tokens per turn (ids from ``first_text_id`` up), the
    reply's speech delayed by ``speech_delay`` speech bos ids (the released data uses 10 = two groups)."""
    text_vocab, disc = config.text_config.vocab_size, config.discrete
    if not 0 <= first_text_id < text_vocab or user_groups < 1 or reply_groups < 1 or text_tokens < 1:
        raise ValueError(f"need 0 <= first_text_id < {text_vocab} and user_groups, reply_groups, text_tokens >= 1; "
                         f"got {first_text_id}, {user_groups}, {reply_groups}, {text_tokens}")
    k = disc.group_size

    def text(count: int) -> torch.Tensor:
        return torch.randint(first_text_id, text_vocab, (count,), generator=generator)

    def slot(groups: int) -> torch.Tensor:
        return audio_slot_ids(groups, config.audio_token_index, config.audio_bos_index, config.audio_eos_index)

    im_start, im_end = torch.tensor([im_start_id]), torch.tensor([config.text_eos_token_id])
    user = torch.cat((im_start, text(text_tokens), slot(user_groups), im_end))
    reply = torch.cat((im_start, text(text_tokens), slot(reply_groups), im_end))
    input_ids = torch.cat((user, reply))
    labels = input_ids.clone()
    labels[:user.numel() + 1] = IGNORE_INDEX                    # user turn and the assistant's <|im_start|>

    user_tokens = user_groups * k                                # placeholder ids: replaced by the features
    user_audio = AudioSegment(speech_ids=torch.full((user_tokens,), disc.pad_token_id),
                              input_features=torch.randn(config.audio_config.num_mel_bins,
                                                         MEL_FRAMES_PER_SPEECH_TOKEN * user_tokens,
                                                         generator=generator))
    spoken = reply_groups * k - speech_delay - int(torch.randint(0, k, (), generator=generator))
    if spoken < 1:
        raise ValueError(f"reply_groups={reply_groups} leaves no speech after the delay of {speech_delay} tokens")
    reply_speech = torch.cat((torch.full((speech_delay,), disc.bos_token_id),
                              torch.randint(0, disc.bos_token_id, (spoken,), generator=generator),
                              torch.full((1,), disc.eos_token_id)))[:reply_groups * k]
    reply_audio = AudioSegment(speech_ids=reply_speech, text_ids=text(reply_groups - 1))
    return Dialogue(input_ids=input_ids, labels=labels, audios=[user_audio, reply_audio])


def synthetic_dialogues(config: FunAudioChatConfig, count: int, seed: int, im_start_id: int,
                        user_groups: tuple[int, int], reply_groups: tuple[int, int], **kwargs) -> list[Dialogue]:
    """``count`` dialogues with group counts drawn uniformly from the inclusive ranges, reproducibly from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    dialogues = []
    for _ in range(count):
        user = int(torch.randint(user_groups[0], user_groups[1] + 1, (), generator=generator))
        reply = int(torch.randint(reply_groups[0], reply_groups[1] + 1, (), generator=generator))
        dialogues.append(synthetic_dialogue(config, generator, im_start_id, user, reply, **kwargs))
    return dialogues


def pack_dialogues(lengths: list[int], cutoff: int) -> list[list[int]]:
    """First-fit decreasing: dialogue indices grouped into rows of at most ``cutoff`` positions.

    Longest first, each into the first row with room; rows are returned in the order they were opened, each
    listing its dialogues in the order they were placed. A dialogue longer than ``cutoff`` is a ``ValueError``
    (cutting it would split an audio slot and break the one-<|AUDIO|>-per-group rule).
    """
    if cutoff < 1:
        raise ValueError(f"cutoff must be >= 1, got {cutoff}")
    too_long = [(index, length) for index, length in enumerate(lengths) if length > cutoff]
    if too_long:
        raise ValueError(f"dialogues (index, length) {too_long[:5]} are longer than cutoff={cutoff}; raise the "
                         "cutoff or drop them")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(cutoff - lengths[index])
    return rows


def _pad_stack(tensors: list[torch.Tensor], value: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_i, ...) tensors -> (N, max n, ...) padded with ``value`` along dim 0 of each, and the mask (N, max n)."""
    longest = max(t.shape[0] for t in tensors)
    padded = torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0]), value=value)
                          for t in tensors])
    mask = torch.arange(longest)[None] < torch.tensor([t.shape[0] for t in tensors])[:, None]
    return padded, mask


def collate_rows(rows: list[list[Dialogue]], cutoff: int, config: FunAudioChatConfig) -> dict[str, torch.Tensor]:
    """Packed rows -> the released keyword inputs of ``FunAudioChat`` (B = len(rows), L = cutoff).

    input_ids, attention_mask, position_ids (restarting at 0 in every dialogue; 0 on padding), labels: (B, L).
    speech_ids, speech_attention_mask: (A, T) one row per audio in reading order; input_features (A_feat, mel,
    frames) with feature_exist_mask (A,); text_ids (A, n) with text_attention_mask (A,).
    """
    input_ids = torch.full((len(rows), cutoff), config.text_pad_token_id or 0)
    labels = torch.full((len(rows), cutoff), IGNORE_INDEX)
    position_ids = torch.zeros((len(rows), cutoff), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), cutoff), dtype=torch.bool)
    audios: list[AudioSegment] = []
    for row, dialogues in enumerate(rows):
        start = 0
        for dialogue in dialogues:
            end = start + len(dialogue)
            if end > cutoff:
                raise ValueError(f"row {row} holds {end} positions, more than cutoff={cutoff}")
            input_ids[row, start:end] = dialogue.input_ids
            labels[row, start:end] = dialogue.labels
            position_ids[row, start:end] = torch.arange(len(dialogue))
            attention_mask[row, start:end] = True
            audios.extend(dialogue.audios)
            start = end
    if not audios:
        raise ValueError("the rows hold no audio; every dialogue has two")
    speech_ids, speech_mask = _pad_stack([audio.speech_ids for audio in audios], config.discrete.pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
             "labels": labels, "speech_ids": speech_ids, "speech_attention_mask": speech_mask}
    features = [audio.input_features.T for audio in audios if audio.input_features is not None]   # (frames, mel)
    batch["feature_exist_mask"] = torch.tensor([audio.input_features is not None for audio in audios])
    if features:
        padded, frames_mask = _pad_stack(features, 0.0)
        batch["input_features"], batch["feature_attention_mask"] = padded.transpose(1, 2), frames_mask
    empty = torch.zeros(0, dtype=torch.long)
    text_ids, _ = _pad_stack([audio.text_ids if audio.text_ids is not None else empty for audio in audios],
                             config.sil_index)
    batch["text_ids"] = text_ids
    batch["text_attention_mask"] = torch.tensor([audio.text_ids is not None for audio in audios])
    return batch


def scored_token_counts(config: FunAudioChatConfig, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(text, speech) tokens that ``FunAudioChat(config)(**batch)`` scores in its two losses: the same label
    construction (``prepare_speech_ids``, ``align_text_to_groups``, ``build_training_labels``,
    ``teacher_forcing_ids``) without running the network."""
    disc = config.discrete
    speech = prepare_speech_ids(batch["speech_ids"], batch.get("speech_attention_mask"), disc.group_size,
                                disc.pad_token_id, disc.codebook_size, config.ignore_index)
    num_audios, num_groups = speech.group_mask.shape
    group_text = None
    text_ids = batch.get("text_ids")
    if text_ids is not None and text_ids.numel():
        has_text = batch.get("text_attention_mask")
        has_text = torch.ones(num_audios, dtype=torch.bool) if has_text is None else has_text.bool()
        aligned = align_text_to_groups(text_ids, num_groups, config.sil_index,
                                       (config.text_eos_token_id, config.text_pad_token_id))
        group_text = aligned.masked_fill(~speech.group_mask | ~has_text[:, None], config.ignore_index)
        group_text = group_text[speech.group_mask]
    text_labels, speech_labels = build_training_labels(
        batch["input_ids"], batch["labels"], speech.labels.view(num_audios, num_groups, -1)[speech.group_mask],
        group_text, audio_token_index=config.audio_token_index, audio_eos_index=config.audio_eos_index,
        speech_eos_id=disc.eos_token_id, ignore_index=config.ignore_index)
    _, targets = teacher_forcing_ids(speech_labels.flatten(1), disc.group_size, disc.pad_token_id)
    return int((text_labels[:, 1:] != config.ignore_index).sum()), int((targets != config.ignore_index).sum())
