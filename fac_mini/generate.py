"""Generation: speech in -> text (S2T) or text + speech tokens (S2M), the released interleaved loop.

One LLM step emits one text token and, while the model speaks, one group of k = 5 speech tokens (200 ms)
from the Speech Refined Head (docs/released_model.md §4.3 and §4.4)::

    step 0   prefill: LLM + SRH over the whole prompt; text token (forced <|audio_bos|> if force_text_abos);
             the SRH group sampled here is discarded (not in speech mode yet)
    step 1   input = E_text(<|audio_bos|>)                                     -> text x1, group G1
    step t   input = (E_text(x_{t-1}) + output_matching(mean E_speech(G_{t-1}))) / 2   -> x_t, G_t
    ...      after the transcript the text stream emits <|sil|> while speech goes on
    end      a group holding the speech eos 6562 becomes five 6562, that step's text token becomes
             <|audio_eos|>, speech mode ends; the text stream then typically closes with <|im_end|>

Every LLM forward (prefill included, text-only steps too) also runs the SRH on h + E_text(token) with its own
KV cache, as released: the SRH cache spans prompt and all steps, and the previous-speech-token input carries
over (bos before the first call). Speech mode starts when the last text token is ``<|audio_bos|>``.

Sampling (``fac_mini.llm.process_logits`` = transformers' order: repetition penalty -> temperature -> top-k ->
top-p): the text head uses the whole sequence (prompt included) as repetition history, or takes the raw argmax
when ``text_greedy``; the SRH uses the same settings with the appended speech ids as history. Draws come from
``generator`` (SRH's five draws first, then the text draw, as released), so a seeded generator reproduces a run.

Batches (left-padded, ``FunAudioChatProcessor``) follow the batch-1 release semantics row by row. The release
couples rows; these couplings are not reproduced (identical results for batch 1):
- a row that is not in speech mode gets a group of speech pad ids (6563) when another row speaks (release:
  its unused SRH sample), and only a row in speech mode can end speech and get ``<|audio_eos|>`` (release: any
  row whose unused sample holds 6562); a row whose text finished produces no more speech;
- the fused speech input is used by a row once it has its own previous group (release: once any row has one).
As released, the SRH attends to the left padding of the prompt (it gets no mask), so S2M results of a padded
row differ from its batch-1 run; S2T (no SRH) is padding-invariant. Use batch 1 for reference outputs.

Streaming: ``on_step`` (optional) is called after every step, before the stop test, with a :class:`GenerationStep`
(step index, the (B,) text ids, the (B, k) speech group or None, seconds since the call began), so that a chat loop
can decode and play speech while the model still generates. It only observes: the outputs are the same with or
without it, and its own run time counts in the timings of the steps that follow (one thread does both).

``sp_gen_kwargs`` (released names): ``text_greedy`` (text = raw argmax), ``only_crq_sampling`` (True: the group
is what the SRH sampled; False: re-drawn from the SRH's 5 logits after the text token, with the speech history
reshaped to (B·5, n/5) as released; the SRH's own samples still condition its next step), ``disable_speech``
(no SRH at all), ``force_text_abos`` (step 0 emits ``<|audio_bos|>``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .constants import SPEECH_CODES, TOKEN_RATE_HZ
from .llm import KVCache, check_context_length, check_generation_settings, sample_next_token
from .model import FunAudioChat, fuse_text_and_speech, prepare_speech_ids

__all__ = [
    "DEFAULT_SP_GEN_KWARGS", "S2S_SP_GEN_KWARGS", "S2T_SP_GEN_KWARGS", "DEFAULT_S2M_GEN_KWARGS",
    "GenerationTiming", "GenerationStep", "GenerationOutput", "prompt_embeddings", "generate",
    "generate_s2t", "generate_s2m", "speech_ids_for_detokenizer", "save_speech_ids", "load_speech_ids",
]

# released defaults (utils/constant.py and the examples)
DEFAULT_SP_GEN_KWARGS = {"text_greedy": False, "only_crq_sampling": True, "disable_speech": False,
                         "force_text_abos": True}
S2S_SP_GEN_KWARGS = {**DEFAULT_SP_GEN_KWARGS, "text_greedy": True}          # the speech-to-speech example
S2T_SP_GEN_KWARGS = {"text_greedy": True, "only_crq_sampling": True, "disable_speech": True,
                     "force_text_abos": False}                              # the speech-to-text example
DEFAULT_S2M_GEN_KWARGS = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0,
                          "repetition_penalty": 1.2, "max_new_tokens": 512}
INPUT_KEYS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "feature_exist_mask",
              "speech_ids", "speech_attention_mask")


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GenerationTiming:
    """Wall-clock times of one call, in seconds from its start (``time.perf_counter``; on CUDA read after a
    ``torch.cuda.synchronize``).

    time_to_first_token_s: prompt encoding + prefill + the first text token. time_to_first_speech_s: until the
    first speech group was appended (None without speech). step_end_s[t]: when step t's token(s) were ready.
    """

    time_to_first_token_s: float
    time_to_first_speech_s: float | None
    total_s: float
    step_end_s: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """LLM forwards (= text tokens generated per row)."""
        return len(self.step_end_s)

    @property
    def tokens_per_s(self) -> float:
        """Text tokens per second over the whole call (prefill included)."""
        return self.steps / self.total_s if self.total_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Text tokens per second after the first one (KV-cached decoding speed; 1 step = 200 ms of speech)."""
        decode = self.total_s - self.time_to_first_token_s
        return (self.steps - 1) / decode if self.steps > 1 and decode > 0 else float("nan")


@dataclass(frozen=True)
class GenerationStep:
    """What one step of ``generate`` produced, as given to ``on_step``.

    step: the step index t (0 = prefill). text_ids (B,): the text token appended at this step (pad for finished
    rows; ``<|audio_eos|>`` where speech ended). speech_ids (B, k): the speech group appended at this step (speech
    pad ids for rows not speaking, k speech eos ids where speech ended), None when no group was appended.
    elapsed_s: seconds from the start of the call to the end of this step (= ``GenerationTiming.step_end_s[t]``).
    """

    step: int
    text_ids: torch.Tensor
    speech_ids: torch.Tensor | None
    elapsed_s: float


@dataclass
class GenerationOutput:
    """What ``generate`` returns.

    sequences (B, L + n): prompt + generated text ids (finished rows continue with the pad id).
    speech_ids (B, 5·G): the appended speech groups (eos groups included, as released), G groups.
    speech_steps (G,): the step that produced each group. text_logits / speech_logits: per step, (B, V) and
    (B, 5, C) float32 (SRH logits; None when speech is disabled), only with ``output_logits=True``.
    """

    sequences: torch.Tensor
    prompt_length: int
    speech_ids: torch.Tensor
    speech_steps: torch.Tensor
    timing: GenerationTiming
    text_logits: list[torch.Tensor] | None = None
    speech_logits: list[torch.Tensor | None] | None = None

    @property
    def text_ids(self) -> torch.Tensor:
        """The generated text ids (B, n) without the prompt."""
        return self.sequences[:, self.prompt_length:]

    def speech_ids_for_detokenizer(self, codebook: int = SPEECH_CODES) -> list[torch.Tensor]:
        """One 1-D tensor per row with only the S3 codes [0, 6561) (released post-processing)."""
        return speech_ids_for_detokenizer(self.speech_ids, codebook)

    def save_speech_ids(self, path: str | Path, codebook: int | None = SPEECH_CODES) -> Path:
        """Save the speech ids (filtered for the detokenizer unless ``codebook=None``); see ``save_speech_ids``."""
        ids = self.speech_ids if codebook is None else self.speech_ids_for_detokenizer(codebook)
        return save_speech_ids(path, ids)

    @property
    def speech_seconds(self) -> list[float]:
        """Seconds of audio per row (S3 codes at 25 Hz)."""
        return [row.numel() / TOKEN_RATE_HZ for row in self.speech_ids_for_detokenizer()]


def speech_ids_for_detokenizer(speech_ids: torch.Tensor, codebook: int = SPEECH_CODES):
    """Keep only ids in [0, codebook): (n,) -> (m,), or (B, n) -> list of B 1-D tensors (lengths differ)."""
    if not isinstance(speech_ids, torch.Tensor) or speech_ids.dim() not in (1, 2):
        raise ValueError(f"speech_ids must be a 1-D or 2-D tensor, got {getattr(speech_ids, 'shape', speech_ids)}")
    keep = lambda row: row[(row >= 0) & (row < codebook)].clone()                    # noqa: E731
    return keep(speech_ids) if speech_ids.dim() == 1 else [keep(row) for row in speech_ids]


def save_speech_ids(path: str | Path, speech_ids) -> Path:
    """Write speech ids: ``.npy`` for one 1-D or 2-D tensor/array (int64), ``.json`` for that or a list of rows
    of different lengths. Returns the path."""
    path = Path(path)
    rows = speech_ids if isinstance(speech_ids, (list, tuple)) else None
    if path.suffix == ".npy":
        if rows is not None:
            lengths = {len(row) for row in rows}
            if len(lengths) > 1:
                raise ValueError(f"rows have different lengths {sorted(lengths)}; save them as .json")
            array = np.stack([np.asarray(torch.as_tensor(row).cpu(), dtype=np.int64) for row in rows])
        else:
            array = np.asarray(torch.as_tensor(speech_ids).cpu(), dtype=np.int64)
        np.save(path, array)
    elif path.suffix == ".json":
        data = [torch.as_tensor(row).tolist() for row in rows] if rows is not None \
            else torch.as_tensor(speech_ids).tolist()
        path.write_text(json.dumps(data))
    else:
        raise ValueError(f"unknown speech-id file type {path.suffix!r} for {path}; use .npy or .json")
    return path


def load_speech_ids(path: str | Path):
    """Read what ``save_speech_ids`` wrote: a long tensor, or a list of 1-D long tensors for ragged JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"speech-id file not found: {path}")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)).long()
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if data and isinstance(data[0], list) and len({len(row) for row in data}) > 1:
            return [torch.tensor(row, dtype=torch.long) for row in data]
        return torch.tensor(data, dtype=torch.long)
    raise ValueError(f"unknown speech-id file type {path.suffix!r} for {path}; use .npy or .json")


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
def _as_tensor(key: str, value: Any) -> torch.Tensor:
    """A tensor as is; a NumPy array or a (nested) list/tuple converted with ``torch.as_tensor``; else TypeError."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"inputs[{key!r}] cannot be made a tensor ({error}); rows must have equal lengths "
                             "(pad them, as FunAudioChatProcessor does)") from error
    raise TypeError(f"inputs[{key!r}] must be a torch tensor, a NumPy array or a list, got {type(value).__name__}")


def _model_inputs(model: FunAudioChat, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Validate the processor's output; return the tensors on the model's device (new tensors, never the
    caller's when a move or cast is needed; never modified). NumPy arrays and lists are converted with
    ``torch.as_tensor`` (ids and masks stay integers, features are cast to the encoder's dtype)."""
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise ValueError("inputs must be a mapping with at least 'input_ids' (the output of FunAudioChatProcessor)")
    unknown = sorted(set(inputs) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(f"inputs hold keys generation does not use: {unknown}; expected a subset of {INPUT_KEYS}")
    device = model.language_model.lm_head.weight.device
    out = {key: _as_tensor(key, value).to(device) for key, value in inputs.items() if value is not None}
    if "input_features" in out:
        out["input_features"] = out["input_features"].to(model.continuous_audio_tower.conv1.weight.dtype)
    input_ids = out["input_ids"]
    if input_ids.dim() == 1:
        raise ValueError(f"input_ids must be (B, L), got a 1-D tensor of {input_ids.shape[0]} ids; add the batch "
                         "axis (input_ids[None], or [ids] for a list)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point() or \
            input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer ids (B, L) with L >= 1, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    vocab = model.config.text_config.vocab_size
    if input_ids.min() < 0 or input_ids.max() >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}); got [{int(input_ids.min())}, {int(input_ids.max())}]: "
                         "is the processor's tokenizer the one of this model?")
    mask = out.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    elif tuple(mask.shape) != tuple(input_ids.shape) or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"attention_mask must be 0/1 (or bool) of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    else:
        mask = mask != 0
    lengths = mask.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("a row of attention_mask is all zeros (empty prompt)")
    left_padded = torch.arange(mask.shape[1], device=mask.device)[None] >= (mask.shape[1] - lengths)[:, None]
    if not torch.equal(mask, left_padded):
        raise ValueError("attention_mask must be left-padded for generation (zeros first, then ones in every row); "
                         "use FunAudioChatProcessor(padding_side='left')")
    out["attention_mask"] = mask
    return out


@torch.no_grad()
def prompt_embeddings(model: FunAudioChat, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM input of the prompt and the SRH's text embeddings, both (B, L, H).

    inputs_embeds: E_text(input_ids) with the ``<|AUDIO|>`` positions replaced by the audio group vectors (the
    inference path of ``FunAudioChat.forward``: no ``text_ids``, so no halving). text_embeds: E_text(input_ids)
    (the ``<|AUDIO|>`` embedding at audio positions), what the released SRH adds to h at prefill.
    """
    config, disc = model.config, model.config.discrete
    inputs = _model_inputs(model, inputs)
    input_ids = inputs["input_ids"]
    text_embeds = model.language_model.model.embed_tokens(input_ids)                        # (B, L, H)
    slots = input_ids == config.audio_token_index                                           # (B, L)
    speech_ids = inputs.get("speech_ids")
    if speech_ids is None:
        if slots.any() or inputs.get("input_features") is not None:
            raise ValueError("input_ids hold <|AUDIO|> tokens or input_features were given, but speech_ids is "
                             "missing: pass the processor's speech_ids and speech_attention_mask")
        return text_embeds, text_embeds
    speech = prepare_speech_ids(speech_ids, inputs.get("speech_attention_mask"), disc.group_size,
                                disc.pad_token_id, disc.codebook_size, config.ignore_index)
    num_audios = speech.group_mask.shape[0]
    exist, continuous = model._continuous_inputs(inputs.get("input_features"), inputs.get("feature_attention_mask"),
                                                 inputs.get("feature_exist_mask"), num_audios, speech.ids.shape[1])
    groups = model.audio_tower(speech.ids, continuous, exist)                               # (A, G, H)
    count, real = int(slots.sum()), int(speech.group_mask.sum())
    if count != real:
        raise ValueError(f"input_ids hold {count} <|AUDIO|> tokens but speech_ids with its mask make {real} groups "
                         f"of {disc.group_size}; build the inputs with FunAudioChatProcessor")
    inputs_embeds = text_embeds.masked_scatter(slots[..., None], groups[speech.group_mask].to(text_embeds.dtype))
    return inputs_embeds, text_embeds


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start``; on CUDA after a synchronize, so queued kernels are counted where they belong."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _sp_gen_kwargs(given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, bool]:
    settings = dict(defaults)
    if given:
        unknown = sorted(set(given) - set(DEFAULT_SP_GEN_KWARGS))
        if unknown:
            raise ValueError(f"unknown sp_gen_kwargs {unknown}; known: {sorted(DEFAULT_SP_GEN_KWARGS)}")
        settings.update(given)
    return {key: bool(value) for key, value in settings.items()}


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: FunAudioChat, inputs: Mapping[str, Any], max_new_tokens: int = 512, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, sp_gen_kwargs: Mapping[str, Any] | None = None,
             output_logits: bool = False, on_step: Callable[[GenerationStep], Any] | None = None) -> GenerationOutput:
    """The released interleaved text/speech loop (module doc); KV caches for the LLM and the SRH.

    inputs: ``FunAudioChatProcessor`` output (input_ids, attention_mask left-padded, and the audio tensors).
    max_new_tokens: LLM steps at most (one text token each). eos_token_id / pad_token_id: default the config's
    ``text_eos_token_id`` (<|im_end|>) and ``text_pad_token_id``; a row stops at eos and continues with pad;
    the loop ends when every row stopped. sp_gen_kwargs: see ``DEFAULT_SP_GEN_KWARGS`` (the default here).
    generator: used for every draw; it must live on the model's device (``torch.Generator(device="cuda")``).
    output_logits: keep each step's text logits (B, V) and SRH logits (B, 5, C) (memory: V floats per step).
    on_step: called as ``on_step(GenerationStep(...))`` after every step (streaming; see the module doc); its
    return value is ignored and it cannot change the generation.

    Checked before any work (``ValueError``/``TypeError`` naming the argument): ``max_new_tokens`` an int >= 0;
    temperature, top_p, repetition_penalty finite (NaN is an error); prompt length L + ``max_new_tokens`` at most
    ``text_config.max_position_embeddings`` and, with speech, k·(L + ``max_new_tokens``) at most the SRH's
    ``crq_config.max_position_embeddings``. Inputs given as NumPy arrays or lists are converted to tensors.
    """
    max_new_tokens = check_generation_settings(max_new_tokens, do_sample=do_sample, temperature=temperature,
                                               top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if on_step is not None and not callable(on_step):
        raise ValueError(f"on_step must be a callable taking a GenerationStep, got {type(on_step).__name__}")
    settings = _sp_gen_kwargs(sp_gen_kwargs, DEFAULT_SP_GEN_KWARGS)
    speech_on = not settings["disable_speech"]
    config, disc = model.config, model.config.discrete
    k = disc.group_size
    eos = config.text_eos_token_id if eos_token_id is None else eos_token_id
    pad = (config.text_pad_token_id if config.text_pad_token_id is not None else eos) if pad_token_id is None \
        else pad_token_id
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, generator=generator)

    start = time.perf_counter()
    inputs = _model_inputs(model, inputs)
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"].long()                  # (B, L)
    batch, prompt_length = input_ids.shape
    check_context_length(prompt_length, max_new_tokens, config.text_config.max_position_embeddings,
                         "text_config.max_position_embeddings")
    srh_limit = config.crq_config.max_position_embeddings
    if speech_on and k * (prompt_length + max_new_tokens) > srh_limit:     # the SRH runs k positions per LLM one
        raise ValueError(f"with speech, the SRH needs {k} positions per LLM position: {k} x (prompt {prompt_length} + "
                         f"max_new_tokens {max_new_tokens}) = {k * (prompt_length + max_new_tokens)} > "
                         f"crq_config.max_position_embeddings={srh_limit}; pass max_new_tokens <= "
                         f"{max(0, srh_limit // k - prompt_length)} or a shorter prompt")
    device = input_ids.device
    inputs_embeds, text_embeds = prompt_embeddings(model, inputs)                            # (B, L, H) each
    # left padding: position 1 at padded slots, as transformers' prepare_inputs_for_generation sets them (their
    # LLM states reach the SRH, which attends to them as released; checked against the official golden output)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)                             # (B, L)
    embed_text = model.language_model.model.embed_tokens
    head = model.audio_invert_tower
    lm_cache: KVCache = model.language_model.new_cache()
    srh_state = head.new_state() if speech_on else None

    sequences = input_ids.long()
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    in_speech = torch.zeros(batch, dtype=torch.bool, device=device)     # released generate_speech
    has_group = torch.zeros(batch, dtype=torch.bool, device=device)     # a group was appended for the row last step
    speech_history = torch.zeros(batch, 0, dtype=torch.long, device=device)                 # (B, 5·G)
    speech_steps: list[int] = []
    text_logits: list[torch.Tensor] = []
    speech_logits: list[torch.Tensor | None] = []
    step_end: list[float] = []
    first_speech: float | None = None
    step_embeds, step_text = inputs_embeds, text_embeds

    for step in range(max_new_tokens):
        last = sequences[:, -1]                                                             # (B,)
        in_speech = in_speech | (last == config.audio_bos_index)
        if step > 0:                                           # 1. the input of this step (prompt at step 0)
            step_text = embed_text(last)[:, None]                                           # (B, 1, H)
            step_embeds = step_text
            use_speech = in_speech & has_group
            if speech_on and use_speech.any():
                speech_embeds = model.audio_tower(speech_history[:, -k:])                  # (B, 1, H): last group
                fused = fuse_text_and_speech(step_text, speech_embeds.to(step_text.dtype), config.speech_text_fusion)
                step_embeds = torch.where(use_speech[:, None, None], fused, step_text)
            mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)                        # (B, L + step)
            positions = positions[:, -1:] + 1                                               # (B, 1)
        # 2. LLM (cached) and SRH (cached, on every forward)
        lm = model.language_model(inputs_embeds=step_embeds, attention_mask=mask, position_ids=positions,
                                  cache=lm_cache)
        group_out = None
        if speech_on:
            group_out = head.generate_step(lm.last_hidden_state, srh_state, step_text, update_history=False,
                                           **sampling)                                     # tokens (B, k)
        # 3. the text token
        logits = lm.logits[:, -1].float()                                                   # (B, V)
        if settings["text_greedy"]:
            next_ids = logits.argmax(dim=-1)
        else:
            next_ids = sample_next_token(logits, sequences, **sampling)
        if step == 0 and settings["force_text_abos"]:
            next_ids = torch.full_like(next_ids, config.audio_bos_index)
        if eos is not None:
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad))
        was_unfinished = unfinished
        if eos is not None:
            unfinished = unfinished & (next_ids != eos)                # stop criterion before the speech rewrite
        # 4. the speech group
        speaking = in_speech & was_unfinished
        has_group = torch.zeros_like(has_group)
        group = None
        if speech_on and speaking.any():
            group = group_out.tokens                                                        # (B, k)
            if not settings["only_crq_sampling"]:        # released: re-draw from the 5 SRH logits, history
                group = sample_next_token(group_out.logits.reshape(batch * k, -1),  # viewed as (B·k, n / k)
                                          speech_history.reshape(batch * k, -1), **sampling).view(batch, k)
            finish = speaking & (group == disc.eos_token_id).any(dim=-1)
            group = group.masked_fill(finish[:, None], disc.eos_token_id)
            group = group.masked_fill(~speaking[:, None], disc.pad_token_id)
            speech_history = torch.cat((speech_history, group), dim=1)
            srh_state.speech_history = speech_history                  # repetition history: appended ids only
            speech_steps.append(step)
            next_ids = torch.where(finish, torch.full_like(next_ids, config.audio_eos_index), next_ids)
            in_speech = in_speech & ~finish
            has_group = speaking
            if first_speech is None:
                first_speech = _elapsed(start, sequences.device)
        sequences = torch.cat((sequences, next_ids[:, None]), dim=1)
        if output_logits:
            text_logits.append(logits)
            speech_logits.append(None if group_out is None else group_out.logits)
        step_end.append(_elapsed(start, sequences.device))
        if on_step is not None:
            on_step(GenerationStep(step=step, text_ids=next_ids.clone(),
                                   speech_ids=None if group is None else group.clone(), elapsed_s=step_end[-1]))
        if not unfinished.any():
            break

    total = _elapsed(start, sequences.device)
    timing = GenerationTiming(time_to_first_token_s=step_end[0] if step_end else total,
                              time_to_first_speech_s=first_speech, total_s=total, step_end_s=step_end)
    return GenerationOutput(sequences=sequences, prompt_length=prompt_length, speech_ids=speech_history,
                            speech_steps=torch.tensor(speech_steps, dtype=torch.long), timing=timing,
                            text_logits=text_logits if output_logits else None,
                            speech_logits=speech_logits if output_logits else None)


def generate_s2t(model: FunAudioChat, inputs: Mapping[str, Any], max_new_tokens: int = 256, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, sp_gen_kwargs: Mapping[str, Any] | None = None,
                 output_logits: bool = False,
                 on_step: Callable[[GenerationStep], Any] | None = None) -> GenerationOutput:
    """Speech -> text: the released S2T example (``S2T_SP_GEN_KWARGS``: greedy text, speech disabled, so the SRH
    never runs). Pass ``sp_gen_kwargs={"text_greedy": False}`` to sample text. ``on_step``: see ``generate``."""
    settings = _sp_gen_kwargs(sp_gen_kwargs, S2T_SP_GEN_KWARGS)
    if not settings["disable_speech"]:
        raise ValueError("generate_s2t produces text only; use generate_s2m for speech")
    return generate(model, inputs, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                    top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, generator=generator, sp_gen_kwargs=settings,
                    output_logits=output_logits, on_step=on_step)


def generate_s2m(model: FunAudioChat, inputs: Mapping[str, Any], max_new_tokens: int = 512, *,
                 do_sample: bool = True, temperature: float = 0.8, top_k: int = 0, top_p: float = 0.9,
                 repetition_penalty: float = 1.2, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, sp_gen_kwargs: Mapping[str, Any] | None = None,
                 output_logits: bool = False,
                 on_step: Callable[[GenerationStep], Any] | None = None) -> GenerationOutput:
    """Speech -> text + speech tokens. Defaults: the released ``DEFAULT_S2M_GEN_KWARGS`` sampling (T 0.8, top-p
    0.9, repetition penalty 1.2; text and SRH alike) and ``DEFAULT_SP_GEN_KWARGS`` (sampled text, forced
    ``<|audio_bos|>``); the S2S example uses ``S2S_SP_GEN_KWARGS`` (greedy text). ``do_sample=False`` is greedy.
    ``on_step``: see ``generate``."""
    settings = _sp_gen_kwargs(sp_gen_kwargs, DEFAULT_SP_GEN_KWARGS)
    if settings["disable_speech"]:
        raise ValueError("generate_s2m with disable_speech=True is generate_s2t")
    return generate(model, inputs, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                    top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, generator=generator, sp_gen_kwargs=settings,
                    output_logits=output_logits, on_step=on_step)
