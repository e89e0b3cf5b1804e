"""Notebook 07's experiment: the Speech Refined Head against the naive parallel head, on real corpus speech.

Both heads sit on the same small 5 Hz backbone that reads the assistant's two streams as Fun-Audio-Chat does
(``fac_mini.model``): at every ``<|AUDIO|>`` position the average of the aligned transcript token's embedding and
the grouped embedding of k = 5 speech ids, with the speech delayed by ``speech_delay`` bos ids (the released
training data uses 10) so that the text runs two groups ahead. The speech ids are the shipped 25 Hz tokenizer's
(``data/speech_tokenizer``, 243 FSQ codes); the transcript ids are the course BPE's.

* ``head="srh"``: :class:`fac_mini.srh.SpeechRefinedHead` (pre_matching, a 2-layer CRQ transformer at 25 Hz,
  lm_head tied to the speech table): token s of the next group is predicted *after* seeing token s − 1.
* ``head="parallel"``: :class:`fac_mini.srh.ParallelSpeechHead`: one Linear H -> k·C, the k tokens of the next
  group predicted independently from the same hidden state.

:func:`evaluate_head` scores the teacher-forced predictions of held-out utterances per sub-step s (accuracy and
perplexity on real speech codes), next to the "repeat the previous id" baseline that shows how much a 25 Hz token
depends on its predecessor. ``python -m fac_mini srh train`` trains both heads with the same seed, data and
steps on the train split, keeps each head's checkpoint with the lowest dev perplexity (measured every 100
steps: the parallel head starts to memorise the 1325 training utterances after about 500 steps, the SRH after
about 1000) and writes ``data/srh_study/`` (``srh/`` and ``parallel/`` checkpoints and ``manifest.json`` with the
training curves and the dev and test metrics; 304 of the 392 test replies are the world's held-out question
phrasings, sentence patterns that no training reply has).
``python -m fac_mini srh eval`` re-measures the shipped checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import CACHE_DIR, DATA_DIR
from ..llm import IGNORE_INDEX, LLMConfig, Qwen3Model
from ..model import (DiscreteAudioConfig, DiscreteAudioEncoder, FunAudioChatConfig, build_assistant_labels,
                     fuse_text_and_speech)
from ..srh import ParallelSpeechHead, SpeechHeadOutput, SpeechRefinedHead, teacher_forcing_ids
from .cli import (RecipeParser, add_eval_flags, add_train_flags, config_from_flags, output_folder, positive_int,
                  run_command, shipped_flags, write_manifest)
from .loop import TrainConfig, TrainResult, adamw, torch_threads, train
from .seal import refresh_seal
from .store import (atomic_directory, atomic_write, atomic_write_json, check_state_dict, file_sha256, read_json,
                    read_safetensors, save_safetensors)

__all__ = [
    "HEADS", "STUDY_DIR", "TRAIN_COMMAND", "StudyConfig", "SpeechStreamLM", "StreamBatch", "corpus_speech_tokens",
    "stream_examples", "collate_streams", "generate_reply_speech", "head_metrics", "summarize_metrics", "evaluate_head", "HEAD_TRAIN",
    "QueueSampler", "HeadRecipe", "train_head", "save_head", "load_head",
    "read_manifest", "main_train", "main_eval",
]

HEADS = ("srh", "parallel")
STUDY_DIR = DATA_DIR / "srh_study"                 # shipped checkpoints + manifest
TOKENS_DIR = CACHE_DIR / "srh_study"               # speech ids of the corpus, cached per tokenizer (not in git)
TRAIN_COMMAND = "python -m fac_mini srh train"
# The shipped run: 1500 steps of 32 replies per head, dev perplexity measured every 100 steps.
HEAD_TRAIN = TrainConfig(steps=1500, batch_size=32, lr=3e-3, warmup=100, min_lr_ratio=0.1, weight_decay=0.01, seed=0,
                         log_every=25, eval_every=100, checkpoint_every=100)


def _backbone_config() -> LLMConfig:
    return LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def _crq_config() -> LLMConfig:
    return LLMConfig(vocab_size=1, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=20480)


@dataclass
class StudyConfig:
    """Sizes and ids of the study model. Speech ids: ``codes`` tokenizer codes, then bos, eos, pad."""

    head: str = "srh"                                  # "srh" or "parallel"
    codes: int = 243                                   # the shipped speech tokenizer's FSQ codebook
    group_size: int = 5                                # k
    speech_delay: int = 10                             # bos ids before the speech (released training data)
    backbone: LLMConfig = field(default_factory=_backbone_config)   # the 5 Hz LLM (vocab = course BPE)
    crq: LLMConfig = field(default_factory=_crq_config)             # the SRH's 25 Hz transformer

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}; use one of {HEADS}")
        if self.codes < 1 or self.group_size < 1 or self.speech_delay < 0 or self.speech_delay % self.group_size:
            raise ValueError(f"need codes >= 1, group_size >= 1 and speech_delay a multiple of group_size (whole "
                             f"bos groups); got {self.codes}, {self.group_size}, {self.speech_delay}")

    @property
    def codebook_size(self) -> int:
        return self.codes + 3

    @property
    def discrete(self) -> DiscreteAudioConfig:
        return DiscreteAudioConfig(codebook_size=self.codebook_size, group_size=self.group_size,
                                   bos_token_id=self.codes, eos_token_id=self.codes + 1, pad_token_id=self.codes + 2)

    @property
    def chat_config(self) -> FunAudioChatConfig:
        """The FunAudioChat config whose stream and label rules (``build_assistant_labels``) the study uses."""
        from ..encoder import AudioEncoderConfig

        return FunAudioChatConfig(audio_config=AudioEncoderConfig(output_dim=self.backbone.hidden_size),
                                  discrete=self.discrete, crq_config=self.crq, text_config=self.backbone)

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "codes": self.codes, "group_size": self.group_size,
                "speech_delay": self.speech_delay, "backbone": self.backbone.to_dict(), "crq": self.crq.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudyConfig":
        return cls(head=data["head"], codes=data["codes"], group_size=data["group_size"],
                   speech_delay=data["speech_delay"], backbone=LLMConfig(**data["backbone"]),
                   crq=LLMConfig(**data["crq"]))


# ----------------------------------------------------------------------------------------------------------
# Data: corpus speech ids -> the assistant's parallel streams
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def corpus_speech_tokens(split: str, *, tokenizer_dir=None, cache_dir=TOKENS_DIR, batch_size: int = 32,
                         limit: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """The speech tokenizer's 25 Hz ids of every utterance of ``split``: ``[{"id", "text", "speaker", "ids"}]``.

    Cached in ``cache_dir`` under the sha256 of the tokenizer weights and of the corpus audio (tokenizing the 1325
    training clips takes about half a minute). ``limit`` takes the first N utterances (not cached).
    """
    from tqdm.auto import tqdm

    from ..corpus import load_corpus, read_manifest as read_corpus_manifest
    from ..speech_tokenizer import SPEECH_TOKENIZER_DIR, load_speech_tokenizer

    tokenizer_dir = Path(tokenizer_dir or SPEECH_TOKENIZER_DIR)
    digest = file_sha256(tokenizer_dir / "model.safetensors")[:12]
    corpus_digest = read_corpus_manifest()["pcm_sha256_of_all"][:12]
    cache_path = Path(cache_dir) / f"tokens-{split}-{digest}-{corpus_digest}.pt"
    if limit is None and cache_path.is_file():
        return torch.load(cache_path, weights_only=False)
    dataset = load_corpus(split)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    names, texts, speakers = dataset["id"], dataset["text"], dataset["speaker"]   # columns: no audio decoded
    tokenizer = load_speech_tokenizer(tokenizer_dir)
    rows = []
    for start in tqdm(range(0, count, batch_size), desc=f"tokenize {split}", disable=not progress):
        audio = dataset[start:min(start + batch_size, count)]["audio"]
        ids, mask = tokenizer.encode([a["array"] for a in audio], audio[0]["sampling_rate"])   # (b, T25) each
        for row in range(len(audio)):
            i = start + row
            rows.append({"id": names[i], "text": texts[i], "speaker": speakers[i], "ids": ids[row][mask[row]].clone()})
    if limit is None:
        atomic_write(cache_path, lambda tmp: torch.save(rows, tmp))
    return rows


@dataclass
class StreamBatch:
    """A right-padded batch of assistant replies, one row each (L = 5 Hz positions).

    input_ids (B, L): ``<|audio_bos|> <|AUDIO|> x G <|audio_eos|>``, then text pad. text_ids (B, L): the same with
    each ``<|AUDIO|>`` replaced by its aligned transcript token (``<|sil|>`` padded). speech_groups (B, L, k):
    the group each ``<|AUDIO|>`` reads (speech pad elsewhere). speech_labels (B, L, k): what the head learns
    (the released labels: groups at ``<|AUDIO|>``, speech eos at ``<|audio_eos|>``, -100 elsewhere).
    """

    input_ids: torch.Tensor
    text_ids: torch.Tensor
    speech_groups: torch.Tensor
    speech_labels: torch.Tensor


def stream_examples(rows: Sequence[dict[str, Any]], config: StudyConfig | None = None,
                    text_tokenizer=None) -> list[StreamBatch]:
    """One unbatched ``StreamBatch`` (tensors without the batch dim) per utterance of ``corpus_speech_tokens``."""
    from ..tokenizer import load_tokenizer

    config = config or StudyConfig()
    chat = config.chat_config
    text_tokenizer = text_tokenizer or load_tokenizer()
    examples = []
    for row in rows:
        transcript = torch.tensor(text_tokenizer(row["text"], add_special_tokens=False)["input_ids"])
        slot = build_assistant_labels(transcript, row["ids"], chat, speech_delay=config.speech_delay)
        audio = slot.input_ids == chat.audio_token_index                                     # (G + 2,)
        text_ids = slot.input_ids.clone()
        text_ids[audio] = slot.text_stream
        groups = torch.full((len(slot.input_ids), config.group_size), config.discrete.pad_token_id)
        groups[audio] = slot.speech_groups
        examples.append(StreamBatch(slot.input_ids, text_ids, groups, slot.speech_labels))
    return examples


def collate_streams(examples: Sequence[StreamBatch], text_pad_id: int = 0, speech_pad_id: int | None = None) -> StreamBatch:
    """Right-pad unbatched examples into one ``StreamBatch`` (pad: text ``text_pad_id``, speech pad, labels -100)."""
    if not examples:
        raise ValueError("collate_streams needs at least one example")
    if speech_pad_id is None:
        speech_pad_id = StudyConfig().discrete.pad_token_id

    def pad(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
        return nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)

    return StreamBatch(pad([e.input_ids for e in examples], text_pad_id),
                       pad([e.text_ids for e in examples], text_pad_id),
                       pad([e.speech_groups for e in examples], speech_pad_id),
                       pad([e.speech_labels for e in examples], IGNORE_INDEX))


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
class SpeechStreamLM(nn.Module):
    """FunAudioChat's assistant side, reduced to what a speech head needs (same fusion, labels and shift).

    embed_tokens (text), audio_tower (``DiscreteAudioEncoder``: mean of k speech embeddings + Linear), backbone
    (``Qwen3Model`` without its own table), and ``speech_head``: the SRH (lm_head tied to
    ``audio_tower.embed_tokens``, as released) or the parallel baseline.
    """

    def __init__(self, config: StudyConfig | None = None):
        super().__init__()
        self.config = config = config or StudyConfig()
        hidden, disc = config.backbone.hidden_size, config.discrete
        self.audio_token_index = config.chat_config.audio_token_index
        self.embed_tokens = nn.Embedding(config.backbone.vocab_size, hidden)
        self.audio_tower = DiscreteAudioEncoder(hidden, disc, config.backbone.initializer_range)
        self.backbone = Qwen3Model(config.backbone, with_embeddings=False)
        nn.init.normal_(self.embed_tokens.weight, std=config.backbone.initializer_range)
        if config.head == "srh":
            self.speech_head = SpeechRefinedHead(hidden, config.crq, disc.codebook_size, disc.group_size,
                                                 disc.bos_token_id, disc.pad_token_id,
                                                 speech_embedding=self.audio_tower.embed_tokens)
        else:
            self.speech_head = ParallelSpeechHead(hidden, disc.codebook_size, disc.group_size)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the backbone side (text table, audio tower, LLM) and of the head (tied table counted once)."""
        backbone = {id(p): p.numel() for name, p in self.named_parameters() if not name.startswith("speech_head.")}
        head = {id(p): p.numel() for p in self.speech_head.parameters() if id(p) not in backbone}
        return {"backbone": sum(backbone.values()), "head": sum(head.values()),
                "total": sum(backbone.values()) + sum(head.values())}

    def hidden_states(self, batch: StreamBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's last hidden states (B, L, H) and the text embeddings (B, L, H) the head adds."""
        audio = batch.input_ids == self.audio_token_index                                  # (B, L)
        text_embeds = self.embed_tokens(batch.text_ids)                                    # (B, L, H)
        speech = self.audio_tower(batch.speech_groups.flatten(1))                          # (B, L, H)
        fused = fuse_text_and_speech(text_embeds, speech)                                  # released: average
        inputs = torch.where(audio[..., None], fused, text_embeds)
        return self.backbone(inputs_embeds=inputs), text_embeds                            # causal

    def forward(self, batch: StreamBatch) -> SpeechHeadOutput:
        """Teacher-forced logits (B, k·L, C) at 25 Hz positions and the speech loss (released shift)."""
        hidden, text_embeds = self.hidden_states(batch)
        return self.speech_head(hidden, batch.speech_labels, text_embeds=text_embeds)


@torch.no_grad()
def generate_reply_speech(model: SpeechStreamLM, example: StreamBatch, *, do_sample: bool = False,
                          temperature: float = 1.0, top_p: float = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Free-running speech for one reply: the model says the reply's transcript on its own.

    ``example`` (unbatched, from :func:`stream_examples`) gives the text stream and the delay's bos groups; from
    the first group after them on, each group is the head's output for the previous position's hidden state
    (the SRH samples its 5 ids one after another with its KV cache, the parallel head all at once) and is fed
    back as that position's speech input, while the text input stays the reply's aligned transcript. Greedy
    unless ``do_sample`` (then ``temperature`` and nucleus ``top_p``, drawn with ``generator``). Returns the
    generated speech ids (n,) up to the first id that is not a speech code (eos, bos or pad), ready to be read
    back by the speech tokenizer (``SpeechTokenizer.transcribe_ids``).
    """
    config, head = model.config, model.speech_head
    if example.input_ids.dim() != 1:
        raise ValueError("generate_reply_speech takes one unbatched example (from stream_examples)")
    audio_positions = (example.input_ids == model.audio_token_index).nonzero().flatten()
    first = int(audio_positions[0]) + config.speech_delay // config.group_size           # first generated group
    last = int(audio_positions[-1])
    if first > last:
        raise ValueError("the reply has no speech group after the delay")
    sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)
    groups = example.speech_groups.clone()                                                 # (L, k), filled in
    state = head.new_state() if isinstance(head, SpeechRefinedHead) else None
    was_training = model.training
    model.eval()
    try:
        for position in range(first - 1, last):          # the hidden state at `position` says group position + 1
            prefix = StreamBatch(example.input_ids[None, :position + 1], example.text_ids[None, :position + 1],
                                 groups[None, :position + 1], example.speech_labels[None, :position + 1])
            hidden, text_embeds = model.hidden_states(prefix)                              # (1, position + 1, H)
            if state is None:
                step = head.generate_step(hidden[:, -1:], text_embeds[:, -1:], **sampling)
            else:                                        # prefill the SRH's cache once, then one position a step
                new = slice(0, position + 1) if position == first - 1 else slice(position, position + 1)
                step = head.generate_step(hidden[:, new], state, text_embeds[:, new], **sampling)
            groups[position + 1] = step.tokens[0]
    finally:
        model.train(was_training)
    ids = groups[first:last + 1].flatten()                                                 # (k·(last − first + 1),)
    stop = (ids >= config.codes).nonzero()
    return ids if not len(stop) else ids[:int(stop[0])]


# ----------------------------------------------------------------------------------------------------------
# Measuring a head
# ----------------------------------------------------------------------------------------------------------
def head_metrics(logits: torch.Tensor, speech_labels: torch.Tensor, group_size: int, codes: int,
                 pad_id: int) -> dict[str, torch.Tensor]:
    """Per-sub-step sums of one teacher-forced batch (add them over batches, then :func:`summarize_metrics`).

    logits (B, k·L, C), speech_labels (B, k·L). Position j = k·p + s is scored against label j + k when that
    is a real speech code (< ``codes``: the delay bos ids, eos and padding are left out). Returns (k,) tensors:
    ``count``, ``correct`` (argmax right), ``nll`` (summed −log p of the label) and ``repeat`` (the label equals
    the id the position read, label j + k − 1: what "repeat the previous id" would get right).
    """
    previous, targets = teacher_forcing_ids(speech_labels, group_size, pad_id)
    scored = (targets >= 0) & (targets < codes)                                            # (B, k·L)
    sub_step = torch.arange(targets.shape[1], device=targets.device) % group_size          # (k·L,)
    safe = targets.clamp(min=0)
    nll = -logits.float().log_softmax(dim=-1).gather(-1, safe[..., None])[..., 0]          # (B, k·L)
    correct = logits.argmax(dim=-1) == safe
    repeat = previous == safe

    def per_step(values: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(group_size, dtype=torch.float64, device=values.device)
        return sums.index_add(0, sub_step.expand_as(values)[scored], values[scored].double())

    return {"count": per_step(torch.ones_like(nll)), "correct": per_step(correct.float()), "nll": per_step(nll),
            "repeat": per_step(repeat.float())}


def summarize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Rounded accuracy / perplexity overall and per sub-step s = 0..k−1, and the repeat baseline's accuracy
    (None for a sub-step without scored tokens)."""
    count = sums["count"]
    if not count.sum() > 0:
        raise ValueError("no speech token was scored")

    def round4(value):
        return None if math.isnan(float(value)) else round(float(value), 4)

    return {"tokens": int(count.sum()),
            "accuracy": round4(sums["correct"].sum() / count.sum()),
            "perplexity": round4(math.exp(sums["nll"].sum() / count.sum())),
            "repeat_accuracy": round4(sums["repeat"].sum() / count.sum()),
            "per_sub_step": {"accuracy": [round4(v) for v in sums["correct"] / count],
                             "perplexity": [round4(math.exp(v) if not math.isnan(v) else v)
                                            for v in (sums["nll"] / count).tolist()],
                             "repeat_accuracy": [round4(v) for v in sums["repeat"] / count],
                             "tokens": [int(v) for v in count]}}


@torch.no_grad()
def evaluate_head(model: SpeechStreamLM, examples: Sequence[StreamBatch], batch_size: int = 64) -> dict[str, Any]:
    """Teacher-forced metrics of ``model`` on ``examples`` (see :func:`head_metrics`: accuracy and perplexity over
    the speech codes only) and ``loss``, the training loss: the mean cross-entropy over *all* speech targets,
    the delay's bos ids and the eos group included (easy ones, so exp(loss) is below the perplexity)."""
    config = model.config
    was_training = model.training
    model.eval()
    sums, losses, weights = None, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_streams(examples[start:start + batch_size], speech_pad_id=config.discrete.pad_token_id)
        output = model(batch)
        labels = batch.speech_labels.flatten(1)
        part = head_metrics(output.logits, labels, config.group_size, config.codes, config.discrete.pad_token_id)
        sums = part if sums is None else {name: sums[name] + part[name] for name in sums}
        scored = int((teacher_forcing_ids(labels, config.group_size)[1] != IGNORE_INDEX).sum())
        losses, weights = losses + float(output.loss) * scored, weights + scored
    model.train(was_training)
    return summarize_metrics(sums) | {"loss": round(losses / weights, 4)}


# ----------------------------------------------------------------------------------------------------------
# Training, saving, loading
# ----------------------------------------------------------------------------------------------------------
class QueueSampler:
    """Batches drawn from a queue of shuffled example indices, refilled with a fresh permutation (from the sampler's
    own generator) whenever fewer than ``batch_size`` are left, so epochs run into one another."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> list[int]:
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(self.size, generator=self.generator).tolist()
        chosen, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"]


class HeadRecipe:
    """One head of the study (``"srh"`` or ``"parallel"``) on the shared backbone, trained from scratch on
    ``examples``; both heads get the same seed, and so the same batches in the same order."""

    def __init__(self, head: str, examples: Sequence[StreamBatch], config: StudyConfig | None = None,
                 eval_examples: Sequence[StreamBatch] | None = None):
        if head not in HEADS:
            raise ValueError(f"head={head!r}; use one of {HEADS}")
        if not examples:
            raise ValueError("the study needs at least one training example")
        self.name, self.examples, self.eval_examples = head, list(examples), eval_examples
        self.config = dataclasses.replace(config or StudyConfig(), head=head)

    def build_model(self) -> SpeechStreamLM:
        return SpeechStreamLM(self.config)

    def build_optimizer(self, model, train_config: TrainConfig):
        return adamw(model, train_config)

    def build_sampler(self, train_config: TrainConfig) -> QueueSampler:
        return QueueSampler(len(self.examples), train_config.batch_size, train_config.seed)

    def loss(self, model: SpeechStreamLM, batch: list[int]) -> torch.Tensor:
        streams = collate_streams([self.examples[i] for i in batch], speech_pad_id=self.config.discrete.pad_token_id)
        return model(streams).loss

    def evaluate(self, model: SpeechStreamLM) -> dict[str, float]:
        measured = evaluate_head(model, self.eval_examples)
        return {"eval_loss": measured["loss"], "eval_perplexity": measured["perplexity"],
                "eval_accuracy": measured["accuracy"]}

    def fingerprint(self) -> bytes:
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for example in self.examples + list(self.eval_examples or []):
            for tensor in (example.input_ids, example.text_ids, example.speech_groups, example.speech_labels):
                digest.update(tensor.numpy().tobytes())
        return digest.digest()


def train_head(head: str, examples: Sequence[StreamBatch], train_config: TrainConfig = HEAD_TRAIN, *,
               config: StudyConfig | None = None, eval_examples: Sequence[StreamBatch] | None = None,
               state_dir=None, resume: bool = True, stop_after: int | None = None, threads: int | None = 1,
               progress: bool = True) -> TrainResult:
    """Train a ``SpeechStreamLM`` with the given head from scratch on ``examples`` with the course's loop.

    With ``eval_examples`` (held-out utterances, e.g. the dev split) the model is measured every
    ``train_config.eval_every`` steps and the weights with the lowest held-out perplexity are returned
    (``result.best_step``): every step is run, and a model this size starts to memorise the 1325 training
    utterances long before the last one. With ``state_dir`` the run is resumable to bit-identical weights.
    """
    recipe = HeadRecipe(head, examples, config, eval_examples)
    return train(recipe, train_config, state_dir=state_dir, resume=resume, stop_after=stop_after, threads=threads,
                 progress=progress, evaluate=recipe.evaluate if eval_examples is not None else None,
                 select="eval_perplexity" if eval_examples is not None else None)


def save_head(model: SpeechStreamLM, directory) -> dict[str, str]:
    """Write ``model.safetensors`` and ``config.json`` to ``directory``, each atomically; return their sha256 by
    file name. The SRH's lm_head is tied to the speech table and stored once."""
    directory = Path(directory)
    weights = {name: t for name, t in model.state_dict().items()
               if name != "speech_head.lm_head.weight" or model.config.head != "srh"}
    save_safetensors(weights, directory / "model.safetensors")
    atomic_write_json(directory / "config.json", model.config.to_dict())
    return {name: file_sha256(directory / name) for name in ("model.safetensors", "config.json")}


def load_head(head: str, directory=STUDY_DIR) -> SpeechStreamLM:
    """A checkpoint written by :func:`save_head` (default: the shipped ``data/srh_study/<head>``), in eval mode.
    A missing or corrupt file, a wrong key or shape raises an error naming the file."""
    if head not in HEADS:
        raise ValueError(f"head={head!r}; use one of {HEADS}")
    folder = Path(directory) / head
    hint = f"rebuild it with `{TRAIN_COMMAND} --out data/srh_study` or `git checkout -- data/srh_study`"
    config_data = read_json(folder / "config.json", "SRH study config", hint)
    try:
        config = StudyConfig.from_dict(config_data)
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{folder / 'config.json'}: {error}") from None
    if config.head != head:
        raise ValueError(f"{folder / 'config.json'} is a {config.head!r} head, expected {head!r}")
    model = SpeechStreamLM(config)
    weights = read_safetensors(folder / "model.safetensors", hint)
    tied = ("speech_head.lm_head.weight",) if config.head == "srh" else ()      # stored once, as the speech table
    check_state_dict(weights, model.state_dict(), folder / "model.safetensors", ignore_missing=tied)
    model.load_state_dict(weights, strict=False)
    return model.eval()


def read_manifest(directory=STUDY_DIR) -> dict[str, Any]:
    """The study's manifest: training curves, dev and test metrics, sha256 of the checkpoints."""
    return read_json(Path(directory) / "manifest.json", "SRH study manifest",
                     f"rebuild it with `{TRAIN_COMMAND} --out data/srh_study`")


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def main_train(argv: Sequence[str] | None = None) -> int:
    """Train both heads (checkpoint chosen on dev) and write the study folder with the training curves and the
    dev and test metrics (shipped: ``--out data/srh_study``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t = HEAD_TRAIN
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    add_train_flags(parser, "srh_study", t)
    parser.add_argument("--eval-every", type=positive_int, default=t.eval_every,
                        help="steps between dev measurements (the checkpoint with the lowest dev perplexity is kept)")
    args = parser.parse_args(argv)
    out = output_folder(parser, args, "srh_study", STUDY_DIR, shipped_flags(t, eval_every=t.eval_every))
    run_config = config_from_flags(args, t, eval_every=args.eval_every)
    config = StudyConfig()
    train_set, dev, test = (stream_examples(corpus_speech_tokens(split, progress=True), config)
                            for split in ("train", "dev", "test"))
    manifest: dict[str, Any] = {"train": run_config.to_dict(), "threads": args.threads,
                                "seed": run_config.seed, "steps": run_config.steps,
                                "batch_size": run_config.batch_size, "lr": run_config.lr,
                                "utterances": {"train": len(train_set), "dev": len(dev), "test": len(test)},
                                "speech_tokenizer_sha256": file_sha256(
                                    DATA_DIR / "speech_tokenizer" / "model.safetensors"), "heads": {}}
    results = {head: train_head(head, train_set, run_config, config=config, eval_examples=dev,
                                state_dir=args.state_dir, resume=not args.restart, threads=args.threads)
               for head in HEADS}
    with atomic_directory(out) as folder:
        files = []
        for head, result in results.items():
            save_head(result.model, folder / head)
            files += [f"{head}/model.safetensors", f"{head}/config.json"]
            model = load_head(head, folder)                  # measure exactly what is written
            with torch_threads(args.threads):
                measured = {"dev": evaluate_head(model, dev), "test": evaluate_head(model, test)}
            manifest["heads"][head] = {"train_seconds": result.train_seconds, "best_step": result.best_step,
                                       "run_key": result.run_key, "parameters": model.parameter_counts(),
                                       "log": result.log, **measured}
            summary = {split: {k: measured[split][k] for k in ("accuracy", "perplexity")} for split in measured}
            print(json.dumps({head: {"train_seconds": result.train_seconds, "best_step": result.best_step} | summary}))
        write_manifest(folder, "srh_study", run_command(TRAIN_COMMAND, argv), files, **manifest)
    refresh_seal(out)
    print(f"wrote {out}")
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """Teacher-forced metrics of both heads of a study folder (default the shipped one)."""
    parser = RecipeParser(prog="python -m fac_mini srh eval", description=main_eval.__doc__)
    add_eval_flags(parser, STUDY_DIR)
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))
    args = parser.parse_args(argv)
    models = {head: load_head(head, args.path) for head in HEADS}
    examples = stream_examples(corpus_speech_tokens(args.split, progress=not args.json),
                               models["srh"].config)[:args.limit]
    with torch_threads(args.threads):
        results = {head: evaluate_head(model, examples) | {"parameters": model.parameter_counts()}
                   for head, model in models.items()}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"SRH study {args.path} on {len(examples)} {args.split} replies (teacher-forced, speech codes only)")
    for head, result in results.items():
        print(f"  {head:<9} accuracy {result['accuracy']:.3f}  perplexity {result['perplexity']:.1f}")
    return 0
