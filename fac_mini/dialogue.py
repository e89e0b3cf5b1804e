"""Spoken dialogues from the mini world: what the mini Fun-Audio-Chat is pre-aligned and fine-tuned on.

Three kinds of example, each one chat in the released format (``fac_mini.released.processing``: system prompt per
mode, the user's audio slot, the assistant's reply):

- ``s2t``  a spoken question -> the canonical answer sentence as text (system: "generate text tokens");
- ``s2m``  a spoken question -> the answer as text *and* speech (system: "both text and speech tokens"); the
  assistant's audio slot holds the 25 Hz ids of the answer sentence spoken in the corpus (every voice the corpus
  has for it), delayed by 10 bos ids, with the transcript aligned to the 5 Hz groups (``fac_mini.model``);
- ``asr``  a spoken statement -> its transcript (the pre-alignment pairs, speech <-> transcript; user instruction
  "Repeat what you heard.").

**The fact split.** The 160 facts are split like a checkerboard: fact (person p, attribute a) is a *speech fact*
when p + a is even, a *text fact* otherwise, so every person and every attribute has both kinds (80 each). Speech
training data (all three kinds) covers speech facts only; M0 learned every fact from text. A spoken question about
a text fact therefore measures whether text knowledge carries over to the speech interface (the paper's claim).

**Phrasings.** Training questions are the train question templates (0-2) spoken in the corpus ``train`` split; the
held-out template (3) of each attribute, which no training text has (``fac_mini.world``), is never trained on:
its 160 spoken questions (corpus ``test`` split, shipped) are the evaluation sets, 80 per fact kind. A third set
asks text facts with the *train* phrasings (the easier transfer question: the phrasing was heard, the fact not).

Everything is a pure function of the world and the corpus metadata (:func:`build_dialogue`); the big per-utterance
tensors (log-mel features of the released processor, the speech tokenizer's 25 Hz ids) are cached in
``data/cache/dialogue/`` under the sha256 of the corpus and the tokenizer (:func:`dialogue_tensors`).
:func:`collate_dialogue` turns examples into the keyword inputs of ``FunAudioChat.forward`` (labels included).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import CACHE_DIR
from .llm import IGNORE_INDEX
from .released.processing import (AUDIO_TEMPLATE, FunAudioChatProcessor, S2M_SYSTEM_PROMPT, S2T_SYSTEM_PROMPT,
                                  audio_chat_prompt, expand_audio_tokens, num_audio_tokens, num_speech_frames)
from .world import ATTRIBUTES, HELD_OUT_QUESTION, VALUES, World, build_world

__all__ = [
    "DIALOGUE_CACHE", "KINDS", "ASR_INSTRUCTION", "SPEECH_DELAY", "DialogueExample", "DialogueData",
    "is_speech_fact", "build_dialogue", "dialogue_tensors", "example_tensors", "collate_dialogue", "answer_is_exact",
    "answer_has_fact", "prompt_text",
]

DIALOGUE_CACHE = CACHE_DIR / "dialogue"
KINDS = ("s2t", "s2m", "asr")
ASR_INSTRUCTION = "Repeat what you heard."
SPEECH_DELAY = 10                      # bos ids before the assistant's speech (released training data)
END = "<|im_end|>"


@dataclass(frozen=True)
class DialogueExample:
    """One chat. ``user_id``: corpus utterance of the user's audio; ``answer_speech_id``: corpus utterance whose
    speech ids the assistant speaks (``s2m`` only). ``fact``: "speech" or "text" (see the module doc);
    ``phrasing``: "train" or "heldout" (the question template's split; statements: "train")."""

    kind: str
    user_id: str
    user_text: str
    answer: str
    answer_speech_id: str | None
    person: str
    attribute: str
    value: str
    fact: str
    phrasing: str


@dataclass
class DialogueData:
    """The named example lists of :func:`build_dialogue` (each in a fixed order)."""

    sets: dict[str, list[DialogueExample]]

    def __getitem__(self, name: str) -> list[DialogueExample]:
        if name not in self.sets:
            raise KeyError(f"no dialogue set {name!r}; have {sorted(self.sets)}")
        return self.sets[name]

    def utterance_ids(self) -> list[str]:
        """Every corpus utterance any set uses (user audio and answer speech), sorted."""
        ids = {e.user_id for examples in self.sets.values() for e in examples}
        ids |= {e.answer_speech_id for examples in self.sets.values() for e in examples if e.answer_speech_id}
        return sorted(ids)

    def fingerprint(self) -> str:
        """sha256 of every example (what a training run's key depends on)."""
        payload = json.dumps({name: [asdict(e) for e in examples] for name, examples in self.sets.items()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def summary(self) -> dict[str, int]:
        return {name: len(examples) for name, examples in self.sets.items()}


def is_speech_fact(world: World, person: str, attribute: str) -> bool:
    """The checkerboard split: (person p, attribute a) is a speech fact when p + a is even."""
    return (world.people.index(person) + ATTRIBUTES.index(attribute)) % 2 == 0


def build_dialogue(world: World | None = None, metadata: Sequence[dict] | None = None) -> DialogueData:
    """All dialogue sets, deterministically, from the world (seed 0) and the corpus metadata.

    Sets: ``train_s2t``, ``train_s2m`` (every train-split spoken train-phrasing question about a speech fact; S2M
    cycles through the answer's corpus voices), ``prealign_asr`` (every train-split spoken statement about a speech
    fact), and the evaluation sets ``heldout_speech_facts`` / ``heldout_text_facts`` (the held-out phrasing, 80
    each) and ``seen_phrasing_text_facts`` (train phrasings about text facts: for fact number i the train
    template i mod 3, from any split). Each evaluation set has one utterance per text (the first by corpus id: 80
    per set); its examples carry the answer speech too (for teacher-forced speech metrics).
    """
    from .corpus import read_metadata

    world = build_world(0) if world is None else world
    rows = list(read_metadata() if metadata is None else metadata)
    by_text: dict[str, list[dict]] = {}
    for row in rows:
        by_text.setdefault(row["text"], []).append(row)
    about: dict[str, Any] = {text.text: text for text in world.texts}     # text -> its TextExample
    answer_rows = {}
    for fact in world.facts:
        spoken = sorted(by_text.get(fact.answer, []), key=lambda r: r["id"])
        if not spoken:
            raise ValueError(f"the corpus has no recording of the answer {fact.answer!r}; rebuild it with "
                             "`python -m fac_mini data build`")
        answer_rows[(fact.person, fact.attribute)] = spoken

    def example(kind: str, row: dict, turn: int) -> DialogueExample:
        text = about[row["text"]]
        fact = world.fact(text.person, text.attribute)
        speech = answer_rows[(fact.person, fact.attribute)]
        answer = text.text if kind == "asr" else fact.answer
        return DialogueExample(kind=kind, user_id=row["id"], user_text=row["text"], answer=answer,
                               answer_speech_id=None if kind == "asr" else speech[turn % len(speech)]["id"],
                               person=fact.person, attribute=fact.attribute, value=fact.value,
                               fact="speech" if is_speech_fact(world, fact.person, fact.attribute) else "text",
                               phrasing=text.split)

    sets: dict[str, list[DialogueExample]] = {name: [] for name in (
        "train_s2t", "train_s2m", "prealign_asr", "heldout_speech_facts", "heldout_text_facts",
        "seen_phrasing_text_facts")}
    turns: dict[tuple[str, str], int] = {}
    evaluated: set[str] = set()                         # texts already in an evaluation set (one voice each)
    for row in sorted(rows, key=lambda r: r["id"]):
        text = about.get(row["text"])
        if text is None:
            raise ValueError(f"corpus utterance {row['id']} ({row['text']!r}) is not a text of the world")
        speech_fact = is_speech_fact(world, text.person, text.attribute)
        if text.kind == "statement":
            if speech_fact and row["split"] == "train":
                sets["prealign_asr"].append(example("asr", row, 0))
            continue
        if text.template == HELD_OUT_QUESTION or not speech_fact:
            fact_index = world.facts.index(world.fact(text.person, text.attribute))
            if row["text"] in evaluated or (text.template != HELD_OUT_QUESTION and text.template != fact_index % 3):
                continue
            evaluated.add(row["text"])
            name = "seen_phrasing_text_facts" if text.template != HELD_OUT_QUESTION else \
                "heldout_speech_facts" if speech_fact else "heldout_text_facts"
            sets[name].append(example("s2t", row, 0))
        elif row["split"] == "train":
            key = (text.person, text.attribute)
            turn = turns.get(key, 0)
            turns[key] = turn + 1
            sets["train_s2t"].append(example("s2t", row, turn))
            sets["train_s2m"].append(example("s2m", row, turn))
    return DialogueData(sets)


# ----------------------------------------------------------------------------------------------------------
# Tensors: log-mel features and speech ids of every utterance used (cached)
# ----------------------------------------------------------------------------------------------------------
def dialogue_tensors(data: DialogueData, *, cache_dir: Path | str = DIALOGUE_CACHE,
                     progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``{"features": {utterance id: (128, F) float32 log-mel of the released processor}, "speech_ids": {id: (T,)
    25 Hz ids of the shipped speech tokenizer}, "num_samples": {id: (1,) samples}}`` for every utterance of
    ``data``; cached under the sha256 of the corpus audio, the speech tokenizer and the utterance list."""
    from tqdm.auto import tqdm

    from .audio import load_audio
    from .corpus import audio_path, read_manifest, read_metadata
    from .speech_tokenizer import SPEECH_TOKENIZER_DIR
    from .tokenizer import load_tokenizer
    from .train.srh_study import corpus_speech_tokens
    from .train.store import atomic_write, file_sha256

    wanted = data.utterance_ids()
    digest = hashlib.sha256(json.dumps([read_manifest()["pcm_sha256_of_all"],
                                        file_sha256(Path(SPEECH_TOKENIZER_DIR) / "model.safetensors"), wanted])
                            .encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tensors-{digest}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    rows = {row["id"]: row for row in read_metadata()}
    speech_ids = {}
    for split in sorted({rows[i]["split"] for i in wanted}):
        for row in corpus_speech_tokens(split, progress=progress):
            speech_ids[row["id"]] = row["ids"]
    processor = FunAudioChatProcessor(load_tokenizer())
    features, samples = {}, {}
    for name in tqdm(wanted, desc="log-mel", disable=not progress):
        wave = load_audio(audio_path(rows[name]))
        mel, mask = processor.features([wave])                                            # (1, 128, F), (1, F)
        features[name] = mel[0, :, :int(mask.sum())].clone()
        samples[name] = torch.tensor([wave.size])
    tensors = {"features": features, "speech_ids": {i: speech_ids[i] for i in wanted}, "num_samples": samples}
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    return tensors


def example_tensors(examples: Sequence[DialogueExample], speech_tokenizer=None) -> dict[str, dict[str, torch.Tensor]]:
    """What :func:`dialogue_tensors` gives, for ``examples`` only and without the cache: log-mel of their user
    audio, the speech tokenizer's ids of their answer speech (e.g. for a notebook on the shipped test split).
    ``FileNotFoundError`` names a clip whose audio is not on disk (the train/dev splits live in the cache)."""
    from .audio import load_audio
    from .corpus import audio_path, read_metadata
    from .speech_tokenizer import load_speech_tokenizer
    from .tokenizer import load_tokenizer

    rows = {row["id"]: row for row in read_metadata()}
    processor = FunAudioChatProcessor(load_tokenizer())
    tensors: dict[str, dict[str, torch.Tensor]] = {"features": {}, "speech_ids": {}, "num_samples": {}}
    for example in examples:
        for name in filter(None, (example.user_id, example.answer_speech_id)):
            path = audio_path(rows[name])
            if not path.is_file():
                raise FileNotFoundError(f"{path} (utterance {name}) is missing; `python -m fac_mini data build` "
                                        "synthesises the train and dev splits")
            wave = load_audio(path)
            if name == example.user_id:
                mel, mask = processor.features([wave])                                    # (1, 128, F), (1, F)
                tensors["features"][name] = mel[0, :, :int(mask.sum())].clone()
                tensors["num_samples"][name] = torch.tensor([wave.size])
            else:
                speech_tokenizer = speech_tokenizer or load_speech_tokenizer()
                tensors["speech_ids"][name] = speech_tokenizer.tokenize(wave)
    return tensors


# ----------------------------------------------------------------------------------------------------------
# Collation: examples -> FunAudioChat keyword inputs
# ----------------------------------------------------------------------------------------------------------
def prompt_text(example: DialogueExample, num_groups: int, instruction: str | None = None) -> str:
    """The chat up to the assistant's reply, audio slot expanded to ``num_groups`` ``<|AUDIO|>``; ``instruction``
    (a text line after the user's audio, e.g. "Answer in one word.") replaces the kind's own (asr: "Repeat what
    you heard.", otherwise none)."""
    if example.kind not in KINDS:
        raise ValueError(f"unknown example kind {example.kind!r}; use one of {KINDS}")
    system = S2M_SYSTEM_PROMPT if example.kind == "s2m" else S2T_SYSTEM_PROMPT
    if instruction is None and example.kind == "asr":
        instruction = ASR_INSTRUCTION
    return expand_audio_tokens(audio_chat_prompt(system, instruction), [num_groups])


def collate_dialogue(examples: Sequence[DialogueExample], tensors: dict[str, dict[str, torch.Tensor]], tokenizer,
                     config, *, with_labels: bool = True, speech_delay: int = SPEECH_DELAY,
                     padding_side: str = "right",
                     instructions: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
    """A batch of chats as ``FunAudioChat.forward`` keyword inputs, built by the released rules.

    Per example: the prompt of :func:`prompt_text` (user placeholders: ``num_speech_frames(samples)`` speech pad
    ids, ceil(frames / k) ``<|AUDIO|>``, the processor's log-mel features); with ``with_labels`` the reply is
    appended: text ``answer<|im_end|>`` (s2t, asr) or the audio slot ``<|audio_bos|> <|AUDIO|> x G
    <|audio_eos|><|im_end|>`` (s2m; speech = ``speech_delay`` bos ids + the answer's ids, transcript in
    ``text_ids``), and ``labels`` = the reply's ids (-100 on the prompt and padding). Audios are listed in reading
    order (user, then assistant): ``feature_exist_mask`` marks user audio, ``text_attention_mask`` the assistant's.
    Without labels the batch is a generation prompt (``padding_side="left"``, as the processor pads).
    ``instructions``: one text line (or None) per example, written after its audio (see :func:`prompt_text`).
    """
    if not examples:
        raise ValueError("collate_dialogue needs at least one example")
    if instructions is None:
        instructions = [None] * len(examples)
    elif len(instructions) != len(examples):
        raise ValueError(f"got {len(instructions)} instructions for {len(examples)} examples; give one per example")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")
    disc = config.discrete
    sequences, label_rows, audios, mels, transcripts = [], [], [], [], []
    for example, instruction in zip(examples, instructions):
        samples = int(tensors["num_samples"][example.user_id][0])
        frames = num_speech_frames(samples)
        prompt = tokenizer(prompt_text(example, num_audio_tokens(frames, disc.group_size), instruction),
                           add_special_tokens=False)["input_ids"]
        audios.append((torch.full((frames,), disc.pad_token_id), True))
        mels.append(tensors["features"][example.user_id])
        reply: list[int] = []
        if with_labels:
            if example.kind == "s2m":
                answer_speech = tensors["speech_ids"][example.answer_speech_id]
                speech = torch.cat((answer_speech.new_full((speech_delay,), disc.bos_token_id), answer_speech))
                slot = expand_audio_tokens(AUDIO_TEMPLATE, [num_audio_tokens(len(speech), disc.group_size)])
                reply = tokenizer(slot + END, add_special_tokens=False)["input_ids"]
                audios.append((speech, False))
                transcripts.append(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
            else:
                reply = tokenizer(example.answer + END, add_special_tokens=False)["input_ids"]
        sequences.append(prompt + reply)
        label_rows.append([IGNORE_INDEX] * len(prompt) + reply)
    longest = max(len(ids) for ids in sequences)
    pad = config.text_pad_token_id
    input_ids = torch.full((len(sequences), longest), pad, dtype=torch.long)                # (B, L)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    labels = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, target) in enumerate(zip(sequences, label_rows)):
        span = slice(0, len(ids)) if padding_side == "right" else slice(longest - len(ids), longest)
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
        labels[row, span] = torch.tensor(target)
    length = disc.group_size * num_audio_tokens(max(len(ids) for ids, _ in audios), disc.group_size)
    speech_ids = torch.full((len(audios), length), disc.pad_token_id, dtype=torch.long)      # (A, T)
    speech_mask = torch.zeros((len(audios), length), dtype=torch.long)
    for row, (ids, _) in enumerate(audios):
        speech_ids[row, :len(ids)] = ids
        speech_mask[row, :len(ids)] = 1
    frames = max(mel.shape[1] for mel in mels)
    features = torch.zeros(len(mels), mels[0].shape[0], frames)                              # (A_feat, 128, F)
    feature_mask = torch.zeros(len(mels), frames, dtype=torch.long)
    for row, mel in enumerate(mels):
        features[row, :, :mel.shape[1]] = mel
        feature_mask[row, :mel.shape[1]] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "speech_ids": speech_ids,
             "speech_attention_mask": speech_mask, "input_features": features, "feature_attention_mask": feature_mask,
             "feature_exist_mask": torch.tensor([user for _, user in audios])}
    if with_labels:
        batch["labels"] = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if transcripts:
            width = max(len(ids) for ids in transcripts)
            text_ids = torch.full((len(audios), width), pad, dtype=torch.long)               # (A, n)
            has_text = torch.tensor([not user for _, user in audios])
            for row, ids in zip(has_text.nonzero().flatten().tolist(), transcripts):
                text_ids[row, :len(ids)] = torch.tensor(ids)
            batch.update(text_ids=text_ids, text_attention_mask=has_text)
    return batch


# ----------------------------------------------------------------------------------------------------------
# Scoring answers
# ----------------------------------------------------------------------------------------------------------
def answer_is_exact(answer: str, example: DialogueExample) -> bool:
    """The generated answer equals the canonical sentence (whitespace stripped)."""
    return answer.strip() == example.answer


def answer_has_fact(answer: str, example: DialogueExample) -> bool:
    """The right value appears as a word and no other value of that attribute does (M0's "fact accuracy")."""
    found = {v for v in VALUES[example.attribute] if re.search(rf"\b{re.escape(v)}\b", answer)}
    return found == {example.value}
