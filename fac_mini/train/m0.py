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

Commands (wired in ``python -m fac_mini m0 ...``, flags of ``fac_mini.train.cli``): :func:`main_train` trains M0
with the course's loop and writes a folder (model.safetensors, config.json, train_log.json, manifest.json) under
``data/cache/runs/m0``, or rebuilds the shipped ``data/m0`` with ``--out data/m0``; :func:`main_eval` prints the
knowledge metrics of a checkpoint. The resumable training state lives in ``data/cache/state/m0`` (not in git): a
rerun of the same command continues from it, bit for bit.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .. import DATA_DIR
from ..llm import IGNORE_INDEX, LLMConfig, Qwen3ForCausalLM, generate_greedy, llm_config_from_hf
from ..tokenizer import TOKENIZER_DIR, load_tokenizer
from .cli import (RecipeParser, add_eval_flags, add_train_flags, config_from_flags, output_folder, run_command,
                  shipped_flags, write_manifest)
from .loop import TrainConfig, TrainResult, adamw, torch_threads, train
from .seal import refresh_seal
from .store import (atomic_directory, atomic_write_json, check_state_dict, file_sha256, read_json, read_safetensors,
                    save_safetensors)
from ..world import ATTRIBUTES, VALUES, TextExample, World, build_world

__all__ = [
    "M0_CONFIG", "M0_DIR", "M0_TRAIN", "TRAIN_COMMAND", "chat_prompt", "chat_text", "statement_text",
    "qa_labels", "encode_statement", "encode_qa", "build_m0_sequences", "collate", "KindBucketSampler", "M0Recipe",
    "train_m0", "save_m0",
    "load_m0", "answer_questions", "evaluate_knowledge", "main_train", "main_eval",
]

M0_DIR = DATA_DIR / "m0"               # shipped artefacts (git)
TRAIN_COMMAND = "python -m fac_mini m0 train"
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
# The shipped run: `python -m fac_mini m0 train --out data/m0` with these defaults.
# 600 steps = 20 epochs of the 960 sequences (30 batches of 32 per epoch); ~0.5-0.7 s a step on one CPU thread.
M0_TRAIN = TrainConfig(steps=600, batch_size=32, lr=3e-3, warmup=30, min_lr_ratio=0.1, weight_decay=0.1, seed=0,
                       log_every=10, checkpoint_every=100)

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
# Training (the shared loop of fac_mini.train.loop; M0 brings its model, optimiser, sampler and loss)
# ----------------------------------------------------------------------------------------------------------
class KindBucketSampler:
    """Batches of one kind each, to save padding: statements (~12 tokens) and chat exchanges (~36 tokens) are
    shuffled separately every epoch, cut into batches (a short remainder is dropped), and the batches of both kinds
    are shuffled together. All draws come from the sampler's own generator (seeded with ``seed``)."""

    def __init__(self, sequences: Sequence[tuple[list[int], int]], batch_size: int, seed: int):
        self.kinds = [[i for i, (_, prompt) in enumerate(sequences) if (prompt > 0) == is_chat]
                      for is_chat in (False, True)]
        smallest = min(len(kind) for kind in self.kinds)
        if batch_size > smallest:
            raise ValueError(f"batch_size={batch_size} exceeds the {smallest} sequences of a kind (statements or "
                             f"chats); batches hold one kind")
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches: list[list[int]] = []
        self.position = 0

    def _epoch(self) -> list[list[int]]:
        batches = []
        for kind in self.kinds:
            members = torch.tensor(kind)[torch.randperm(len(kind), generator=self.generator)].tolist()
            batches += [members[i:i + self.batch_size]
                        for i in range(0, len(members) - self.batch_size + 1, self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]

    def next_batch(self) -> list[int]:
        if self.position == len(self.batches):             # a new epoch
            self.batches, self.position = self._epoch(), 0
        self.position += 1
        return self.batches[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches": self.batches, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches, self.position = state["batches"], state["position"]


class M0Recipe:
    """M0 from scratch on the world's text: a Qwen3 of ``config``, AdamW with betas (0.9, 0.95) and weight decay
    on matrices only (as in LLM pretraining), batches of one kind, the causal-LM loss of ``fac_mini.llm``."""
    name = "m0"

    def __init__(self, config: LLMConfig = M0_CONFIG, tokenizer=None, world: World | None = None):
        self.config = config
        self.tokenizer = load_tokenizer() if tokenizer is None else tokenizer
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the tokenizer "
                             f"({len(self.tokenizer)})")
        self.sequences = build_m0_sequences(self.tokenizer, world)

    def build_model(self) -> Qwen3ForCausalLM:
        return Qwen3ForCausalLM(self.config)

    def build_optimizer(self, model, train_config: TrainConfig):
        return adamw(model, train_config, betas=(0.9, 0.95), decay_matrices_only=True)

    def build_sampler(self, train_config: TrainConfig) -> KindBucketSampler:
        return KindBucketSampler(self.sequences, train_config.batch_size, train_config.seed)

    def loss(self, model, batch: list[int]) -> torch.Tensor:
        inputs = collate([self.sequences[i] for i in batch], self.tokenizer.pad_token_id)
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"]).loss

    def fingerprint(self) -> Any:
        return {"config": self.config.to_dict(), "data": self.sequences}


def train_m0(config: LLMConfig = M0_CONFIG, train_config: TrainConfig = M0_TRAIN, *,
             state_dir: Path | str | None = None, resume: bool = True, stop_after: int | None = None,
             threads: int | None = 1, progress: bool = True, tokenizer=None, world: World | None = None) -> TrainResult:
    """Train M0 from scratch on the world's text with the course's loop (:func:`fac_mini.train.loop.train`).

    Warm-up + cosine schedule, gradient clipping at 1, seeded initial weights and batch order; with ``state_dir``
    the run is resumable to bit-identical weights. Returns the loop's ``TrainResult`` (model in eval mode, log rows
    of mean loss and learning rate every ``train_config.log_every`` steps).
    """
    return train(M0Recipe(config, tokenizer, world), train_config, state_dir=state_dir, resume=resume,
                 stop_after=stop_after, threads=threads, progress=progress)


def save_m0(model: Qwen3ForCausalLM, out_dir: Path | str, log: list[dict] | None = None,
            dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write ``model.safetensors`` (weights in ``dtype``), ``config.json`` (HF Qwen3 style) and, if given,
    ``train_log.json`` to ``out_dir``, each atomically; return their paths."""
    out_dir = Path(out_dir)
    paths = {"model": out_dir / WEIGHTS_FILE, "config": out_dir / CONFIG_FILE}
    save_safetensors({name: tensor.to(dtype) for name, tensor in model.state_dict().items()}, paths["model"])
    hf_config = dict(model.config.to_hf_dict(), architectures=["Qwen3ForCausalLM"], torch_dtype=str(dtype)[6:],
                     bos_token_id=None, eos_token_id=2, pad_token_id=0)
    atomic_write_json(paths["config"], hf_config)
    if log is not None:
        paths["log"] = out_dir / LOG_FILE
        atomic_write_json(paths["log"], {"columns": ["step", "loss", "lr"],
                                         "rows": [[r["step"], r["loss"], r["lr"]] for r in log]}, indent=None)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def load_m0(path: Path | str = M0_DIR, tokenizer_path: Path | str = TOKENIZER_DIR):
    """Load a checkpoint written by :func:`save_m0` -> (model in eval mode, float32, tokenizer).

    Raises ``FileNotFoundError`` naming a missing file, ``ValueError`` naming a corrupt file, a bad config,
    missing/unexpected keys, or a tensor whose shape differs from the config's.
    """
    path = Path(path)
    hint = f"rebuild M0 with `{TRAIN_COMMAND}` or restore the shipped files with `git checkout -- data/m0`"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing; {hint}")
    config_data = read_json(path / CONFIG_FILE, "M0 config", hint)
    try:
        config = llm_config_from_hf(config_data)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: {error}") from None
    weights = read_safetensors(path / WEIGHTS_FILE, hint)
    model = Qwen3ForCausalLM(config)
    check_state_dict(weights, model.state_dict(), path / WEIGHTS_FILE)
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
def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini m0 train``: train M0 and write its folder (weights, config, log, manifest with the
    knowledge metrics). The shipped ``data/m0`` is rebuilt only by ``m0 train --out data/m0`` with the defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    t = M0_TRAIN
    parser = RecipeParser(prog=TRAIN_COMMAND, description=main_train.__doc__)
    add_train_flags(parser, "m0", t)
    args = parser.parse_args(argv)
    out = output_folder(parser, args, "m0", M0_DIR, shipped_flags(t))
    run_config = config_from_flags(args, t)
    started = time.perf_counter()
    result = train_m0(M0_CONFIG, run_config, state_dir=args.state_dir, resume=not args.restart,
                      threads=args.threads)
    with atomic_directory(out) as folder:
        save_m0(result.model, folder, log=result.log)
        model, tokenizer = load_m0(folder)                 # evaluate exactly what is shipped
        with torch_threads(args.threads):
            metrics = {split: evaluate_knowledge(model, tokenizer, split) for split in ("heldout", "train")}
            metrics["heldout_first20"] = evaluate_knowledge(model, tokenizer, "heldout", limit=20)  # the test reruns it
        manifest = write_manifest(
            folder, "m0", run_command(TRAIN_COMMAND, argv), (WEIGHTS_FILE, CONFIG_FILE, LOG_FILE),
            config=M0_CONFIG.to_dict(), train=run_config.to_dict(), threads=args.threads, run_key=result.run_key,
            parameters=sum(p.numel() for p in model.parameters()), train_seconds=result.train_seconds,
            wall_seconds=round(time.perf_counter() - started, 1), final_loss=result.log[-1]["loss"],
            tokenizer_sha256=file_sha256(TOKENIZER_DIR / "tokenizer.json"), metrics=metrics)
    refresh_seal(out)
    print(json.dumps({"out": str(out), "train_seconds": manifest["train_seconds"],
                      "final_loss": manifest["final_loss"], "heldout": metrics["heldout"]}, indent=1))
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``python -m fac_mini m0 eval``: knowledge metrics of an M0 checkpoint (default data/m0)."""
    parser = RecipeParser(prog="python -m fac_mini m0 eval", description=main_eval.__doc__)
    add_eval_flags(parser, M0_DIR)
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--show-errors", type=int, default=5, help="print up to N wrong answers")
    args = parser.parse_args(argv)
    model, tokenizer = load_m0(args.path)
    with torch_threads(args.threads):
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
