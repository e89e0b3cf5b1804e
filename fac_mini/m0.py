"""M0: the course's pretrained text LLM, a small Qwen3 trained from scratch until it knows the mini world.

Fun-Audio-Chat starts from a pretrained text LLM (Qwen3) that already *knows* things; speech training then
risks erasing that knowledge (catastrophic forgetting, notebook 11). M0 is the course's stand-in for that
backbone: the decoder of ``fac_mini.llm`` trained on the mini world's text (``fac_mini.world``), so that its
knowledge can be measured before and after speech training.

Training text (960 sequences, every one ends with ``<|im_end|>``, the eos token):

- the 480 statements as plain pretraining text, ``"{statement}<|im_end|>"``, loss on every token;
- the 480 *train* question/answer pairs in the released chat format
  ``"<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>"`` with the prompt
  (everything up to and including ``<|im_start|>assistant\\n``) masked with ``IGNORE_INDEX`` (-100), as in
  supervised fine-tuning: the model learns to answer, not to ask.

The knowledge probe is the held-out question template of each attribute (160 questions, one per fact), a
phrasing that never occurs in the training text: answering it needs the fact *and* an understanding of the
question. :func:`evaluate_knowledge` scores greedy answers (exact match with the canonical sentence, and "fact
accuracy": the right value and no other value of that attribute) and a cheap teacher-forced metric (answer
negative log-likelihood and token accuracy), the one to plot along a forgetting curve.

Commands (wired in ``python -m fac_mini m0 ...``): :func:`main_train` rebuilds ``data/m0/`` (model.safetensors,
config.json, train_log.json, manifest.json); :func:`main_eval` prints the knowledge metrics of a checkpoint.
Training state checkpoints (model, optimizer, scheduler, RNG, data order, step) go to ``CACHE_DIR/m0`` (not in
git) and a rerun of the same command resumes from them, bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import CACHE_DIR, DATA_DIR, atomic_write, file_sha256, set_seed
from .llm import IGNORE_INDEX, LLMConfig, Qwen3ForCausalLM, generate_greedy, llm_config_from_hf
from .tokenizer import TOKENIZER_DIR, load_tokenizer
from .world import ATTRIBUTES, VALUES, TextExample, World, build_world

__all__ = [
    "M0_CONFIG", "M0_DIR", "M0_STATE_DIR", "DEFAULT_TRAIN_ARGS", "chat_prompt", "chat_text", "statement_text",
    "qa_labels", "encode_statement", "encode_qa", "build_m0_sequences", "collate", "train_m0", "save_m0",
    "load_m0", "answer_questions", "evaluate_knowledge", "main_train", "main_eval",
]

M0_DIR = DATA_DIR / "m0"               # shipped artefacts (git)
M0_STATE_DIR = CACHE_DIR / "m0"        # resumable training state (ignored by git)
WEIGHTS_FILE, CONFIG_FILE, LOG_FILE, MANIFEST_FILE = ("model.safetensors", "config.json", "train_log.json",
                                                      "manifest.json")

# A ~1.9 M-parameter Qwen3: 4 layers of width 192, 6 query heads sharing 2 key/value heads (GQA, 3:1) of width 32,
# SwiGLU inner width 512, separate lm_head (like the 8B backbone), RoPE θ = 1e6 as in Qwen3. Stored in fp32:
# ~7.5 MB. max_position_embeddings only documents the context the model was trained for (sequences <= 44).
M0_CONFIG = LLMConfig(
    vocab_size=512,                 # = len(load_tokenizer())
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
# The shipped run: `python -m fac_mini m0 train` with these defaults.
# 600 steps = 20 epochs of the 960 sequences (30 batches of 32 per epoch); ~0.5-0.7 s a step on one CPU thread.
DEFAULT_TRAIN_ARGS = dict(steps=600, batch_size=32, lr=3e-3, seed=0, warmup_steps=30, weight_decay=0.1,
                          min_lr_ratio=0.1, log_every=10, checkpoint_every=100, threads=1)

CHAT_USER = "<|im_start|>user\n"
CHAT_ASSISTANT = "<|im_start|>assistant\n"
END = "<|im_end|>"          # end of a turn, and the eos token


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def chat_prompt(question: str) -> str:
    """The released chat format up to the assistant's answer: what the model is given at question time.

    >>> chat_prompt("Where does Mira Castell live?")
    '<|im_start|>user\\nWhere does Mira Castell live?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return f"{CHAT_USER}{question}{END}\n{CHAT_ASSISTANT}"


def chat_text(question: str, answer: str) -> str:
    """A whole question/answer exchange: ``chat_prompt(question) + answer + "<|im_end|>"``."""
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"answer must be a non-empty string, got {answer!r}")
    return chat_prompt(question) + answer + END


def statement_text(statement: str) -> str:
    """A statement as plain pretraining text, closed by the eos token ``<|im_end|>``."""
    if not isinstance(statement, str) or not statement.strip():
        raise ValueError(f"statement must be a non-empty string, got {statement!r}")
    return statement + END


def qa_labels(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unshifted labels for a right-padded batch: the tokens themselves, ``IGNORE_INDEX`` (-100) on the prompt
    (the first ``prompt_lengths[b]`` positions of row b) and on padding (``attention_mask == 0``).

    input_ids (B, T) int, prompt_lengths (B,) int (0 for a statement: loss on everything), attention_mask (B, T)
    -> labels (B, T) int64, a new tensor (the inputs are not modified).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if prompt_lengths.shape != (input_ids.shape[0],):
        raise ValueError(f"prompt_lengths must be (B,) = ({input_ids.shape[0]},), got {tuple(prompt_lengths.shape)}")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]       # (1, T)
    in_prompt = positions < prompt_lengths.to(input_ids.device)[:, None]                 # (B, T)
    return input_ids.long().masked_fill(in_prompt | (attention_mask == 0), IGNORE_INDEX)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_statement(tokenizer, statement: str) -> tuple[list[int], int]:
    """-> (token ids of ``statement_text(statement)``, prompt length 0)."""
    return _encode(tokenizer, statement_text(statement)), 0


def encode_qa(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """-> (token ids of ``chat_text(question, answer)``, number of prompt tokens to mask).

    The prompt is tokenized on its own and must be a prefix of the whole exchange's tokens (it is: the prompt
    ends with a newline after a special token, so BPE cannot merge across the boundary); checked, not assumed.
    """
    prompt_ids = _encode(tokenizer, chat_prompt(question))
    ids = _encode(tokenizer, chat_text(question, answer))
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the prompt's tokens are not a prefix of the exchange's tokens for {question!r}")
    return ids, len(prompt_ids)


def build_m0_sequences(tokenizer, world: World | None = None) -> list[tuple[list[int], int]]:
    """M0's training set: every statement, then every *train* question/answer pair, as (ids, prompt_length).

    Held-out questions are never included (they are the knowledge probe). Order is fixed (the world's order).
    """
    world = build_world(0) if world is None else world
    sequences = [encode_statement(tokenizer, t.text) for t in world.statements()]
    sequences += [encode_qa(tokenizer, t.text, t.answer) for t in world.questions("train")]
    return sequences


def collate(sequences: Sequence[tuple[list[int], int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, prompt_length) into input_ids, attention_mask and labels, each (B, T_max)."""
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    longest = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)   # (B, T)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)           # (B, T)
    for row, (ids, _) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    prompt_lengths = torch.tensor([prompt for _, prompt in sequences], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": qa_labels(input_ids, prompt_lengths, attention_mask)}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def _lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norm weights), betas (0.9, 0.95) as in LLM pretraining."""
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


def _epoch_batches(sequences: list[tuple[list[int], int]], batch_size: int,
                   generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches (lists of sequence indices), bucketed by kind to save padding: statements (~12 tokens)
    and chat exchanges (~36 tokens) are shuffled separately, cut into batches (a short remainder is dropped), and
    the batches of both kinds are shuffled together. All draws come from ``generator``."""
    batches = []
    for is_chat in (False, True):
        members = torch.tensor([i for i, (_, prompt) in enumerate(sequences) if (prompt > 0) == is_chat])
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        batches += [members[i:i + batch_size] for i in range(0, len(members) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _run_key(config: LLMConfig, hparams: dict[str, Any], sequences: list) -> str:
    """A short hash of everything that determines the run, so a state file is only resumed by the same run."""
    blob = json.dumps({"config": config.to_dict(), "hparams": hparams, "data": sequences}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def train_m0(config: LLMConfig = M0_CONFIG, steps: int = DEFAULT_TRAIN_ARGS["steps"],
             batch_size: int = DEFAULT_TRAIN_ARGS["batch_size"], lr: float = DEFAULT_TRAIN_ARGS["lr"],
             seed: int = DEFAULT_TRAIN_ARGS["seed"], out_dir: Path | str | None = M0_DIR, resume: bool = True, *,
             state_dir: Path | str = M0_STATE_DIR, warmup_steps: int = DEFAULT_TRAIN_ARGS["warmup_steps"],
             weight_decay: float = DEFAULT_TRAIN_ARGS["weight_decay"],
             min_lr_ratio: float = DEFAULT_TRAIN_ARGS["min_lr_ratio"],
             log_every: int = DEFAULT_TRAIN_ARGS["log_every"],
             checkpoint_every: int = DEFAULT_TRAIN_ARGS["checkpoint_every"], stop_at: int | None = None,
             tokenizer=None, world: World | None = None, progress: bool = True) -> dict[str, Any]:
    """Train M0 from scratch on the world's text; return ``{"model", "log", "step", "train_seconds", "run_key"}``.

    AdamW (wd on matrices) + linear warm-up and cosine decay to ``min_lr_ratio · lr``, gradient clipping at 1,
    batches of ``batch_size`` sequences of one kind (statements or chats, see ``_epoch_batches``) drawn without
    replacement, in an order made by an explicit ``torch.Generator(seed)``; the initial weights come from
    ``set_seed(seed)`` (which reseeds the global RNGs). Every ``checkpoint_every`` steps the whole training state
    (model, optimizer, scheduler, generator and global RNG states, the epoch's batches and position, step, log,
    elapsed time) is written atomically to ``state_dir/state-<run_key>.pt``; ``run_key`` hashes the config,
    hyper-parameters and data, so only the same run resumes it. With ``resume=True`` a run continues from that
    state and ends with bitwise the same parameters as an uninterrupted run (same machine and thread count).

    ``stop_at`` stops after that step (state saved, no artefacts), as if interrupted. When the last step is
    reached and ``out_dir`` is not None, the artefacts ``model.safetensors``, ``config.json`` and
    ``train_log.json`` are written there (see :func:`save_m0`); the manifest is :func:`main_train`'s job.
    The log has one row per ``log_every`` steps: the mean training loss over those steps (nats per scored token)
    and the learning rate after that step's scheduler update.
    """
    from tqdm.auto import tqdm

    if steps <= 0 or batch_size <= 0 or not lr > 0 or warmup_steps < 0 or log_every <= 0 or checkpoint_every <= 0:
        raise ValueError(f"need steps, batch_size, log_every, checkpoint_every > 0, lr > 0 and warmup_steps >= 0; "
                         f"got steps={steps}, batch_size={batch_size}, lr={lr}, warmup_steps={warmup_steps}, "
                         f"log_every={log_every}, checkpoint_every={checkpoint_every}")
    tokenizer = load_tokenizer() if tokenizer is None else tokenizer
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    sequences = build_m0_sequences(tokenizer, world)
    smallest_kind = min(sum(prompt == 0 for _, prompt in sequences), sum(prompt > 0 for _, prompt in sequences))
    if batch_size > smallest_kind:
        raise ValueError(f"batch_size={batch_size} exceeds the {smallest_kind} sequences of a kind (statements or "
                         f"chats); batches hold one kind")
    hparams = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, warmup_steps=warmup_steps,
                   weight_decay=weight_decay, min_lr_ratio=min_lr_ratio)
    run_key = _run_key(config, hparams, sequences)
    state_dir = Path(state_dir)
    state_path = state_dir / f"state-{run_key}.pt"

    set_seed(seed)                                     # the model's initial weights come from the global RNG
    model = Qwen3ForCausalLM(config)
    optimizer = _make_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, steps, warmup_steps, min_lr_ratio))
    generator = torch.Generator().manual_seed(seed)    # batching order only
    batches, position, step, log, elapsed = _epoch_batches(sequences, batch_size, generator), 0, 0, [], 0.0
    window: list[float] = []                           # losses since the last log row
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        batches, position, step, log, elapsed, window = (state["batches"], state["position"], state["step"],
                                                         state["log"], state["elapsed_s"], state["window"])

    def save_state() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "batches": batches, "position": position, "step": step,
                 "log": log, "window": window, "elapsed_s": elapsed, "run_key": run_key,
                 "config": config.to_dict(), "hparams": hparams}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    last = steps if stop_at is None else min(steps, stop_at)
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc="M0", disable=not progress, dynamic_ncols=True)
    while step < last:
        if position == len(batches):                   # a new epoch
            batches, position = _epoch_batches(sequences, batch_size, generator), 0
        batch = collate([sequences[i] for i in batches[position]], tokenizer.pad_token_id)
        position += 1
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": round(sum(window) / len(window), 5),
                        "lr": round(optimizer.param_groups[0]["lr"], 8)})
            window = []
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
        bar.update(1)
        if step % checkpoint_every == 0 or step == last:
            elapsed += time.perf_counter() - started
            started = time.perf_counter()
            save_state()
    bar.close()
    model.eval()
    if step == steps and out_dir is not None:
        save_m0(model, out_dir, log=log)
    return {"model": model, "log": log, "step": step, "train_seconds": round(elapsed, 1), "run_key": run_key}


def save_m0(model: Qwen3ForCausalLM, out_dir: Path | str, log: list[dict] | None = None,
            dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write ``model.safetensors`` (weights in ``dtype``), ``config.json`` (HF Qwen3 style) and, if given,
    ``train_log.json`` to ``out_dir``, each atomically; return their paths."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().to(dtype).contiguous().clone() for name, tensor in model.state_dict().items()}
    paths = {"model": out_dir / WEIGHTS_FILE, "config": out_dir / CONFIG_FILE}
    atomic_write(paths["model"], lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    hf_config = dict(model.config.to_hf_dict(), architectures=["Qwen3ForCausalLM"], torch_dtype=str(dtype)[6:],
                     bos_token_id=None, eos_token_id=2, pad_token_id=0)
    _write_text(json.dumps(hf_config, indent=1) + "\n", paths["config"])
    if log is not None:
        paths["log"] = out_dir / LOG_FILE
        _write_text(json.dumps({"columns": ["step", "loss", "lr"],
                                "rows": [[r["step"], r["loss"], r["lr"]] for r in log]}) + "\n", paths["log"])
    return paths


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def load_m0(path: Path | str = M0_DIR, tokenizer_path: Path | str = TOKENIZER_DIR):
    """Load a checkpoint written by :func:`save_m0` -> (model in eval mode, float32, tokenizer).

    Raises ``FileNotFoundError`` naming a missing file, ``ValueError`` naming a bad config, missing/unexpected
    keys, or a tensor whose shape differs from the config's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; rebuild M0 with `python -m fac_mini m0 train`")
    try:
        config = llm_config_from_hf(json.loads((path / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON: {error}") from None
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except SafetensorError as error:
        raise ValueError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {error}") from None
    model = Qwen3ForCausalLM(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path / WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, strict=True)
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer at {tokenizer_path} has {len(tokenizer)} tokens, the model only "
                         f"{config.vocab_size}")
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_questions(model: Qwen3ForCausalLM, tokenizer, questions: Sequence[str], batch_size: int = 80,
                     max_new_tokens: int = 24) -> list[str]:
    """Greedy answers (decoded text up to ``<|im_end|>``) to ``questions``, in batches of left-padded prompts."""
    if isinstance(questions, str):
        raise ValueError("questions must be a list of strings, not one string")
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(END), tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [_encode(tokenizer, chat_prompt(q)) for q in questions[start:start + batch_size]]
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)        # (B, T) left-padded
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        out = generate_greedy(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                              eos_token_id=eos_id, pad_token_id=pad_id)                  # (B, T + n)
        for row in out[:, longest:].tolist():
            row = row[:row.index(eos_id)] if eos_id in row else row
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def _fact_correct(answer: str, attribute: str, value: str) -> bool:
    """The right value appears as a word and no other value of the same attribute does."""
    found = {v for v in VALUES[attribute] if re.search(rf"\b{re.escape(v)}\b", answer)}
    return found == {value}


@torch.no_grad()
def _teacher_forced(model: Qwen3ForCausalLM, tokenizer, examples: Sequence[TextExample],
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: summed answer NLL (nats), answer tokens predicted right (argmax), answer token count."""
    nll, correct, count = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = collate([encode_qa(tokenizer, e.text, e.answer) for e in examples[start:start + batch_size]],
                        tokenizer.pad_token_id)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]                                                  # (B, T-1)
        scored = targets != IGNORE_INDEX
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                    reduction="none")                                     # (B, T-1)
        nll.append(token_nll.sum(-1))
        correct.append(((logits.argmax(-1) == targets) & scored).sum(-1))
        count.append(scored.sum(-1))
    return torch.cat(nll), torch.cat(correct), torch.cat(count)


def evaluate_knowledge(model: Qwen3ForCausalLM, tokenizer, split: str = "heldout", world: World | None = None,
                       limit: int | None = None, batch_size: int = 80, return_answers: bool = False) -> dict:
    """How much of the world M0 knows, asked with the ``split`` questions ("heldout": the 160 unseen phrasings,
    "train": the 480 seen ones).

    ``limit`` keeps the first ``limit`` questions (facts are ordered person by person, four attributes each, so a
    multiple of 4 is balanced). Returns rounded floats:
    ``exact_match`` (greedy answer == canonical sentence), ``fact_accuracy`` (right value, no other value of that
    attribute), ``answer_nll`` (teacher-forced mean NLL per answer token, nats; includes ``<|im_end|>``),
    ``answer_token_accuracy`` (teacher-forced argmax accuracy on those tokens), ``per_attribute`` (the same four
    per attribute), ``n`` and, with ``return_answers``, the list of (question, expected, generated).
    """
    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
    examples = (build_world(0) if world is None else world).questions(split)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        examples = examples[:limit]
    was_training = model.training
    model.eval()
    answers = answer_questions(model, tokenizer, [e.text for e in examples], batch_size=batch_size)
    nll, correct, count = _teacher_forced(model, tokenizer, examples, batch_size)
    model.train(was_training)
    exact = torch.tensor([a == e.answer for a, e in zip(answers, examples)])
    fact = torch.tensor([_fact_correct(a, e.attribute, e.value) for a, e in zip(answers, examples)])

    def summary(keep: torch.Tensor) -> dict[str, float]:
        return {"exact_match": round(exact[keep].float().mean().item(), 4),
                "fact_accuracy": round(fact[keep].float().mean().item(), 4),
                "answer_nll": round((nll[keep].sum() / count[keep].sum()).item(), 4),
                "answer_token_accuracy": round((correct[keep].sum() / count[keep].sum()).item(), 4),
                "n": int(keep.sum())}

    attributes = [e.attribute for e in examples]
    result = dict(summary(torch.ones(len(examples), dtype=torch.bool)), split=split, per_attribute={
        a: summary(torch.tensor([x == a for x in attributes])) for a in ATTRIBUTES if a in attributes})
    if return_answers:
        result["answers"] = [(e.text, e.answer, a) for e, a in zip(examples, answers)]
    return result


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
def main_train(argv: list[str] | None = None) -> int:
    """``python -m fac_mini m0 train``: train M0, write data/m0/ (weights, config, log, manifest with metrics)."""
    d = DEFAULT_TRAIN_ARGS
    parser = argparse.ArgumentParser(prog="python -m fac_mini m0 train", description=main_train.__doc__)
    parser.add_argument("--steps", type=int, default=d["steps"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    parser.add_argument("--threads", type=int, default=d["threads"],
                        help="torch CPU threads (1 is fastest for this small model on a shared 2-core machine; "
                             "bitwise reproduction needs the same count)")
    parser.add_argument("--out", type=Path, default=M0_DIR, help="artefact folder (default data/m0)")
    parser.add_argument("--state-dir", type=Path, default=M0_STATE_DIR, help="resumable state (default cache/m0)")
    parser.add_argument("--no-resume", action="store_true", help="ignore a saved training state")
    args = parser.parse_args(argv)
    command = (f"python -m fac_mini m0 train --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} "
               f"--seed {args.seed} --warmup-steps {args.warmup_steps} --weight-decay {args.weight_decay} "
               f"--threads {args.threads}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = train_m0(M0_CONFIG, args.steps, args.batch_size, args.lr, args.seed, args.out, not args.no_resume,
                      state_dir=args.state_dir, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay)
    model, tokenizer = load_m0(args.out)               # evaluate exactly what was shipped
    metrics = {split: evaluate_knowledge(model, tokenizer, split) for split in ("heldout", "train")}
    metrics["heldout_first20"] = evaluate_knowledge(model, tokenizer, "heldout", limit=20)   # what the test reruns
    files = {name: file_sha256(args.out / name) for name in (WEIGHTS_FILE, CONFIG_FILE, LOG_FILE)}
    manifest = {"name": "m0", "command": command, "seed": args.seed, "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
                "weight_decay": args.weight_decay, "min_lr_ratio": d["min_lr_ratio"],
                "config": M0_CONFIG.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
                "train_seconds": result["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
                "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "run_key": result["run_key"],
                "final_loss": result["log"][-1]["loss"], "tokenizer_sha256": file_sha256(TOKENIZER_DIR / "tokenizer.json"),
                "files_sha256": files, "metrics": metrics}
    _write_text(json.dumps(manifest, indent=1) + "\n", args.out / MANIFEST_FILE)
    print(json.dumps({k: manifest[k] for k in ("train_seconds", "wall_seconds", "final_loss")}
                     | {"heldout": {k: v for k, v in metrics["heldout"].items()}}, indent=1))
    return 0


def main_eval(argv: list[str] | None = None) -> int:
    """``python -m fac_mini m0 eval``: knowledge metrics of an M0 checkpoint (default data/m0)."""
    parser = argparse.ArgumentParser(prog="python -m fac_mini m0 eval", description=main_eval.__doc__)
    parser.add_argument("--path", type=Path, default=M0_DIR)
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--show-errors", type=int, default=5, help="print up to N wrong answers")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    model, tokenizer = load_m0(args.path)
    result = evaluate_knowledge(model, tokenizer, args.split, limit=args.limit, return_answers=True)
    answers = result.pop("answers")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"M0 {args.path} on {result['n']} {args.split} questions")
    print(f"{'attribute':<10}{'exact':>8}{'fact':>8}{'nll':>8}{'tok acc':>9}{'n':>5}")
    for name, row in list(result["per_attribute"].items()) + [("all", result)]:
        print(f"{name:<10}{row['exact_match']:>8.3f}{row['fact_accuracy']:>8.3f}{row['answer_nll']:>8.3f}"
              f"{row['answer_token_accuracy']:>9.3f}{row['n']:>5}")
    wrong = [a for a in answers if a[1] != a[2]][:args.show_errors]
    for question, expected, got in wrong:
        print(f"  Q: {question}\n     expected: {expected}\n     got:      {got}")
    return 0

