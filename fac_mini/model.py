"""The whole Fun-Audio-Chat model: audio encoders + parallel speech-text streams + LLM + Speech Refined Head.

Parallel streams (paper eq. 5; released code in brackets). On the assistant side every LLM position p inside an
audio slot ``<|audio_bos|> <|AUDIO|> x G <|audio_eos|>`` carries one text token t_p and one group of k = 5 speech
tokens s_p (200 ms), fused into one input vector

    c_p = E_text(t_p) + E_speech(s_p)                  paper eq. (5)
    c_p = (E_text(t_p) + E_speech(s_p)) / 2            [released code: the average]

E_speech(s_p) = output_matching(mean of the k token embeddings) (``fac_mini.grouping``). The transcript is
aligned token i <-> group i and the shorter stream is padded: text with ``<|sil|>`` (released: eos and pad ids
become ``<|sil|>`` too), speech with the speech pad id (the released training data also delays speech by two
``<|audio_bos|>`` groups). User audio has no transcript: its groups come from the continuous encoder
(``continuous_features_mode="replace"``: the placeholder groups are *replaced* by group means of the 25 Hz
Whisper-style features, zero padding included in the mean).

Labels (docs/released_model.md §5), built from ``labels`` (B, L) (= input ids, -100 outside the assistant):

    text labels    at <|AUDIO|> positions: the aligned transcript token (or -100 without ``text_ids``)
    speech labels  (B, L, k): at <|AUDIO|> positions the group's k speech ids (-100 where the speech tokenizer
                   padded), at the position labelled <|audio_eos|> five speech eos ids, -100 elsewhere and
                   wherever the text label was -100

Losses: text = causal-LM cross-entropy (shift 1); speech = SRH cross-entropy with the 5-step shift
(``fac_mini.srh``); total = text + speech. Submodules and keys are those of the released checkpoint
(``continuous_audio_tower``, ``audio_tower``, ``audio_invert_tower``, ``language_model``).

The released forward's in-place edits of ``labels``/``text_ids`` and its integer-mask indexing are *not*
reproduced: inputs are never modified, and masks may be bool or 0/1 integers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import AudioEncoder, AudioEncoderConfig
from .grouping import group_speech_ids, mean_group
from .llm import (IGNORE_INDEX, LLMConfig, Qwen3ForCausalLM, check_labels, check_token_ids, config_value,
                  init_weights, llm_config_from_hf)
from .constants import CODEBOOK_SIZE, GROUP_SIZE, SPEECH_BOS_ID, SPEECH_EOS_ID, SPEECH_PAD_ID
from .srh import SpeechRefinedHead

__all__ = [
    "DiscreteAudioConfig", "FunAudioChatConfig", "FunAudioChatOutput", "DiscreteAudioEncoder", "FunAudioChat",
    "SpeechBatch", "AssistantLabels", "fuse_text_and_speech", "align_text_to_groups", "prepare_speech_ids",
    "audio_slot_ids", "build_training_labels", "build_assistant_labels",
]

FUSION_MODES = ("average", "sum")           # released code / paper eq. (5)
CONTINUOUS_MODES = ("replace", "add")       # released 8B uses "replace"


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DiscreteAudioConfig:
    """The speech-token side (``audio_tower`` / SRH vocabulary). Defaults are the released values."""

    codebook_size: int = CODEBOOK_SIZE      # 6561 S3 codes + bos, eos, pad, one unused id
    group_size: int = GROUP_SIZE            # k: speech tokens per LLM position (25 Hz -> 5 Hz)
    bos_token_id: int = SPEECH_BOS_ID       # 6561
    eos_token_id: int = SPEECH_EOS_ID       # 6562
    pad_token_id: int = SPEECH_PAD_ID       # 6563 (padding_idx of audio_tower.embed_tokens)
    continuous_features_mode: str = "replace"   # continuous group means replace (or are added to) discrete ones

    def __post_init__(self):
        for name in ("codebook_size", "group_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"DiscreteAudioConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.codebook_size:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, codebook_size={self.codebook_size})")
        if self.continuous_features_mode not in CONTINUOUS_MODES:
            raise ValueError(f"continuous_features_mode={self.continuous_features_mode!r}; use one of "
                             f"{CONTINUOUS_MODES}")


def _mini_text_config() -> LLMConfig:
    return LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                     max_position_embeddings=4096)


def _mini_crq_config() -> LLMConfig:
    return LLMConfig(vocab_size=1, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e6,
                     max_position_embeddings=20480)


@dataclass
class FunAudioChatConfig:
    """Every size and special id of the model. Defaults: a CPU toy on the course tokenizer (``fac_mini.tokenizer``:
    ``<|endoftext|>`` 0, ``<|im_end|>`` 2, ``<|AUDIO|>`` 3, ``<|audio_bos|>`` 4, ``<|audio_eos|>`` 5, ``<|sil|>`` 7).

    ``released_8b()`` gives the released sizes and ids; ``from_dict``/``to_dict`` map to and from the released
    ``config.json`` layout (the only place that knows that layout).
    """

    audio_config: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)   # continuous_audio_tower
    discrete: DiscreteAudioConfig = field(default_factory=DiscreteAudioConfig)      # audio_tower, SRH vocabulary
    crq_config: LLMConfig = field(default_factory=_mini_crq_config)                  # SRH transformer (no vocab)
    text_config: LLMConfig = field(default_factory=_mini_text_config)                # language_model
    audio_token_index: int = 3          # <|AUDIO|>: one per 5 Hz group
    audio_bos_index: int = 4            # <|audio_bos|>
    audio_eos_index: int = 5            # <|audio_eos|>: its label position gets the speech eos group
    sil_index: int = 7                  # <|sil|>: pads the text stream
    text_pad_token_id: int | None = 0   # <|endoftext|>: becomes <|sil|> in text_ids
    text_eos_token_id: int | None = 2   # <|im_end|>: becomes <|sil|> in text_ids
    ignore_index: int = IGNORE_INDEX
    speech_text_fusion: str = "average"  # "average" (released) or "sum" (paper eq. 5)

    def __post_init__(self):
        if self.audio_config.output_dim != self.text_config.hidden_size:
            raise ValueError(f"audio_config.output_dim={self.audio_config.output_dim} must equal "
                             f"text_config.hidden_size={self.text_config.hidden_size}: audio groups become LLM inputs")
        for name in ("audio_token_index", "audio_bos_index", "audio_eos_index", "sil_index", "text_pad_token_id",
                     "text_eos_token_id", "ignore_index"):
            value = getattr(self, name)
            optional = name in ("text_pad_token_id", "text_eos_token_id")
            if (value is not None or not optional) and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"FunAudioChatConfig.{name} must be an int{' or None' if optional else ''}, got "
                                 f"{value!r} ({type(value).__name__})")
            if name != "ignore_index" and value is not None and not 0 <= value < self.text_config.vocab_size:
                raise ValueError(f"{name}={value} must lie in [0, text_config.vocab_size="
                                 f"{self.text_config.vocab_size})")
        if self.ignore_index != IGNORE_INDEX:
            raise ValueError(f"ignore_index={self.ignore_index}: only {IGNORE_INDEX} is supported (the losses use it)")
        if self.speech_text_fusion not in FUSION_MODES:
            raise ValueError(f"speech_text_fusion={self.speech_text_fusion!r}; use one of {FUSION_MODES}")

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @classmethod
    def released_8b(cls) -> "FunAudioChatConfig":
        """Fun-Audio-Chat-8B (docs/released_model.md §1): about 9.4 B parameters."""
        text = LLMConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=5e6,
                         max_position_embeddings=262144)
        return cls(audio_config=AudioEncoderConfig.released_8b(), discrete=DiscreteAudioConfig(),
                   crq_config=LLMConfig(max_position_embeddings=32768, tie_word_embeddings=True), text_config=text,
                   audio_token_index=151669, audio_bos_index=151670, audio_eos_index=151671, sil_index=151673,
                   text_pad_token_id=151643, text_eos_token_id=151645)

    # -- the released config.json layout -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The released ``config.json`` layout (transformers 4.52 style: ``rope_theta`` at top level)."""
        def qwen3(config: LLMConfig) -> dict[str, Any]:
            out = config.to_hf_dict()
            out["rope_theta"] = out.pop("rope_parameters")["rope_theta"]
            out.update(architectures=["Qwen3ForCausalLM"], rope_scaling=None, sliding_window=None)
            return out

        audio = {k: v for k, v in asdict(self.audio_config).items()}
        audio.update(asdict(self.discrete), model_type="funaudiochat_audio_encoder",
                     crq_transformer_config=qwen3(self.crq_config), enable_audio_invert_tower=True, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False,
                     initializer_range=self.crq_config.initializer_range)
        text = qwen3(self.text_config)
        text.update(audio_bos_index=self.audio_bos_index, audio_eos_index=self.audio_eos_index,
                    sil_index=self.sil_index, pad_token_id=self.text_pad_token_id, eos_token_id=self.text_eos_token_id)
        return {"model_type": "funaudiochat", "architectures": ["FunAudioChatForConditionalGeneration"],
                "audio_token_index": self.audio_token_index, "ignore_index": self.ignore_index,
                "hidden_size": self.hidden_size, "speech_text_fusion": self.speech_text_fusion,
                "audio_config": audio, "text_config": text}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "FunAudioChatConfig":
        """Build from a dict in the released ``config.json`` layout (``model_type: funaudiochat``); keys this
        implementation does not use are ignored, settings it cannot honour raise ``ValueError``, and so does a
        value of the wrong type, naming its key, e.g. ``audio_config.d_model = "16" (str); expected an int``."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
        if config.get("model_type") != "funaudiochat":
            raise ValueError(f"model_type is {config.get('model_type')!r}, expected 'funaudiochat'")
        for key in ("audio_config", "text_config", "audio_token_index"):
            if key not in config:
                raise ValueError(f"config lacks {key!r}; is this a Fun-Audio-Chat config.json?")
        for key in ("audio_config", "text_config"):
            if not isinstance(config[key], Mapping):
                raise ValueError(f"{key} = {config[key]!r} ({type(config[key]).__name__}); expected an object")
        audio, text = dict(config["audio_config"]), dict(config["text_config"])
        if "crq_transformer_config" not in audio:
            raise ValueError("audio_config lacks 'crq_transformer_config' (the Speech Refined Head's Qwen3 config)")
        if not audio.get("enable_audio_invert_tower", True):
            raise ValueError("enable_audio_invert_tower=False is not supported: this model always has the SRH")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if audio.get(name, 0):
                raise ValueError(f"audio_config.{name}={audio[name]} is not supported (the released model uses 0)")
        if audio.get("scale_embedding", False):
            raise ValueError("audio_config.scale_embedding=True is not supported")
        for name in ("bos_token_id", "eos_token_id", "codebook_size"):
            if audio.get(name) is None:
                raise ValueError(f"audio_config.{name} is missing; the speech vocabulary needs it")
        for name in ("audio_bos_index", "audio_eos_index", "sil_index"):
            if name not in text:
                raise ValueError(f"text_config.{name} is missing (the ids of <|audio_bos|>, <|audio_eos|>, <|sil|>)")
        kinds = {"int": int, "float": float, "bool": bool, "str": str}          # AudioEncoderConfig annotations
        encoder = {item.name: config_value(audio, item.name, kinds[item.type], where="audio_config")
                   for item in fields(AudioEncoderConfig) if item.name in audio}
        discrete = DiscreteAudioConfig(
            codebook_size=config_value(audio, "codebook_size", int, where="audio_config"),
            group_size=config_value(audio, "group_size", int, GROUP_SIZE, where="audio_config"),
            bos_token_id=config_value(audio, "bos_token_id", int, where="audio_config"),
            eos_token_id=config_value(audio, "eos_token_id", int, where="audio_config"),
            pad_token_id=config_value(audio, "pad_token_id", int, SPEECH_PAD_ID, where="audio_config"),
            continuous_features_mode=config_value(audio, "continuous_features_mode", str, "replace",
                                                  where="audio_config"))

        def token_id(key: str) -> int | None:     # null: no such token
            if text.get(key) is None:
                return None
            if isinstance(text[key], list):
                raise ValueError(f"text_config.{key} = {text[key]} (list); expected a single int or null (this "
                                 "implementation stops on one eos id)")
            return config_value(text, key, int, where="text_config")

        crq = audio["crq_transformer_config"]
        if not isinstance(crq, Mapping):
            raise ValueError(f"audio_config.crq_transformer_config = {crq!r}; expected an object (a Qwen3 config)")
        return cls(audio_config=AudioEncoderConfig(**encoder), discrete=discrete,
                   crq_config=llm_config_from_hf(crq, where="audio_config.crq_transformer_config"),
                   text_config=llm_config_from_hf(text, where="text_config"),
                   audio_token_index=config_value(config, "audio_token_index", int),
                   audio_bos_index=config_value(text, "audio_bos_index", int, where="text_config"),
                   audio_eos_index=config_value(text, "audio_eos_index", int, where="text_config"),
                   sil_index=config_value(text, "sil_index", int, where="text_config"),
                   text_pad_token_id=token_id("pad_token_id"), text_eos_token_id=token_id("eos_token_id"),
                   ignore_index=config_value(config, "ignore_index", int, IGNORE_INDEX),
                   speech_text_fusion=config_value(config, "speech_text_fusion", str, "average"))


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: streams and labels (usable on their own in a notebook)
# ----------------------------------------------------------------------------------------------------------
def _as_bool_mask(name: str, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Accept a bool or 0/1 mask of exactly ``shape``; return a new bool tensor. Anything else -> ValueError."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask.clone()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must hold only True/False or 0/1, got values {torch.unique(mask).tolist()[:8]}")
    return mask != 0


def fuse_text_and_speech(text_embeds: torch.Tensor, speech_embeds: torch.Tensor, mode: str = "average") -> torch.Tensor:
    """One LLM input per position from the two streams: ``"sum"`` (paper eq. 5) or ``"average"`` (released)."""
    if text_embeds.shape != speech_embeds.shape:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and speech_embeds {tuple(speech_embeds.shape)} "
                         "must have the same shape")
    if mode == "sum":
        return text_embeds + speech_embeds
    if mode == "average":
        return (text_embeds + speech_embeds) / 2
    raise ValueError(f"mode={mode!r}; use one of {FUSION_MODES}")


def align_text_to_groups(text_ids: torch.Tensor, num_groups: int, sil_id: int,
                         replace_ids: tuple[int | None, ...] = ()) -> torch.Tensor:
    """Transcript token i <-> speech group i: cut to ``num_groups``, pad with ``sil_id``, and turn every id in
    ``replace_ids`` (released: the text eos and pad ids) into ``sil_id``. (n,) -> (G,) or (A, n) -> (A, G)."""
    if text_ids.dim() not in (1, 2) or text_ids.is_floating_point() or text_ids.dtype == torch.bool:
        raise ValueError(f"text_ids must be integer ids (n,) or (A, n), got {text_ids.dtype} {tuple(text_ids.shape)}")
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    ids = text_ids[None] if text_ids.dim() == 1 else text_ids
    ids = F.pad(ids[:, :num_groups], (0, max(0, num_groups - ids.shape[1])), value=sil_id)   # (A, G), a copy
    for token in replace_ids:
        if token is not None:
            ids = ids.masked_fill(ids == token, sil_id)
    return ids[0] if text_ids.dim() == 1 else ids


@dataclass
class SpeechBatch:
    """Speech ids of A audios made ready for grouping (``prepare_speech_ids``).

    ids (A, k·G): padded with the speech pad id. labels (A, k·G): the ids, -100 where not real.
    group_mask (A, G) bool: group real (ceil(n/k) groups for n real tokens), in order -> one <|AUDIO|> each.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    group_mask: torch.Tensor


def prepare_speech_ids(speech_ids: torch.Tensor, speech_attention_mask: torch.Tensor | None, group_size: int,
                       pad_id: int, codebook_size: int, ignore_index: int = IGNORE_INDEX) -> SpeechBatch:
    """Validate speech_ids (A, T) and their mask (real tokens first), pad to a multiple of k (released: the
    ids with ``pad_id``, the labels with -100)."""
    if speech_ids.dim() != 2 or speech_ids.is_floating_point() or speech_ids.dtype == torch.bool:
        raise ValueError(f"speech_ids must be integer ids (num_audios, T), got {speech_ids.dtype} "
                         f"{tuple(speech_ids.shape)}")
    if speech_ids.numel() and (speech_ids.min() < 0 or speech_ids.max() >= codebook_size):
        raise ValueError(f"speech_ids must lie in [0, {codebook_size}) (pad with the speech pad id {pad_id}); got "
                         f"range [{int(speech_ids.min())}, {int(speech_ids.max())}]")
    if speech_attention_mask is None:
        real = torch.ones_like(speech_ids, dtype=torch.bool)
    else:
        real = _as_bool_mask("speech_attention_mask", speech_attention_mask, tuple(speech_ids.shape))
    lengths = real.sum(dim=1)
    if not torch.equal(real, torch.arange(real.shape[1], device=real.device)[None] < lengths[:, None]):
        raise ValueError("speech_attention_mask must be True on a prefix of each row (real tokens, then padding)")
    grouped, group_mask = group_speech_ids(speech_ids, group_size, pad_id, real)            # (A, G, k), (A, G)
    labels, _ = group_speech_ids(speech_ids.masked_fill(~real, ignore_index), group_size, ignore_index, real)
    return SpeechBatch(ids=grouped.flatten(1), labels=labels.flatten(1), group_mask=group_mask)


def audio_slot_ids(num_groups: int, audio_token_index: int, audio_bos_index: int, audio_eos_index: int,
                   dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``<|audio_bos|> <|AUDIO|> x num_groups <|audio_eos|>`` as ids (num_groups + 2,)."""
    if num_groups < 0:
        raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    return torch.tensor([audio_bos_index] + [audio_token_index] * num_groups + [audio_eos_index], dtype=dtype)


def build_training_labels(input_ids: torch.Tensor, labels: torch.Tensor, group_speech_labels: torch.Tensor,
                          group_text_labels: torch.Tensor | None = None, *, audio_token_index: int,
                          audio_eos_index: int, speech_eos_id: int,
                          ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """The released label construction (docs/released_model.md §5). Returns new tensors, inputs untouched.

    input_ids, labels: (B, L); labels unshifted, -100 where nothing is learned (system, user).
    group_speech_labels: (N, k) the k speech labels of each real group, N = number of <|AUDIO|> in input_ids,
    in reading order. group_text_labels: (N,) the aligned transcript token of each group (or None).
    Returns text_labels (B, L) and speech_labels (B, L, k):
      text    <|AUDIO|> labels -> -100; then <|AUDIO|> positions get the group's text label (if given) and
              positions whose original label was -100 stay -100;
      speech  -100, then <|AUDIO|> positions get their group, then -100 where the label is -100, and all k =
              speech eos where the label is <|audio_eos|>.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    audio = input_ids == audio_token_index                                                  # (B, L)
    count = int(audio.sum())
    if group_speech_labels.dim() != 2 or group_speech_labels.shape[0] != count:
        raise ValueError(f"group_speech_labels must be (N, k) with N = {count} <|AUDIO|> tokens in input_ids, got "
                         f"{tuple(group_speech_labels.shape)}")
    if group_text_labels is not None and tuple(group_text_labels.shape) != (count,):
        raise ValueError(f"group_text_labels must be ({count},), one per <|AUDIO|> token, got "
                         f"{tuple(group_text_labels.shape)}")
    unlabelled = labels == ignore_index
    speech_labels = labels.new_full((*labels.shape, group_speech_labels.shape[1]), ignore_index)   # (B, L, k)
    speech_labels[audio] = group_speech_labels.to(labels.dtype)
    speech_labels[unlabelled] = ignore_index
    speech_labels[labels == audio_eos_index] = speech_eos_id
    text_labels = labels.masked_fill(labels == audio_token_index, ignore_index)
    if group_text_labels is not None:
        text_labels[audio] = group_text_labels.to(labels.dtype)
        text_labels[unlabelled] = ignore_index
    return text_labels, speech_labels


@dataclass
class AssistantLabels:
    """One assistant audio slot as the model trains on it (``build_assistant_labels``).

    input_ids (G + 2,): <|audio_bos|> <|AUDIO|> x G <|audio_eos|>. text_stream (G,): aligned transcript, <|sil|>
    padded. speech_groups (G, k): speech ids, pad id padded. text_labels (G + 2,), speech_labels (G + 2, k).
    """

    input_ids: torch.Tensor
    text_stream: torch.Tensor
    speech_groups: torch.Tensor
    text_labels: torch.Tensor
    speech_labels: torch.Tensor


def build_assistant_labels(transcript_ids: torch.Tensor, speech_ids: torch.Tensor,
                           config: FunAudioChatConfig | None = None, speech_delay: int = 0) -> AssistantLabels:
    """The parallel streams and labels of one assistant reply: transcript ids (n,), speech ids (T,).

    ``speech_delay`` speech bos ids are put before the speech (the released training data uses 10, i.e. two
    groups of ``<|audio_bos|>``), so the text stream runs ahead of the speech. Same rules as ``FunAudioChat``.
    """
    config = config or FunAudioChatConfig()
    disc = config.discrete
    if transcript_ids.dim() != 1 or speech_ids.dim() != 1:
        raise ValueError(f"transcript_ids and speech_ids must be 1-D, got {tuple(transcript_ids.shape)} and "
                         f"{tuple(speech_ids.shape)}")
    speech_ids = torch.cat((speech_ids.new_full((speech_delay,), disc.bos_token_id), speech_ids))
    speech = prepare_speech_ids(speech_ids[None], None, disc.group_size, disc.pad_token_id, disc.codebook_size)
    num_groups = speech.group_mask.shape[1]
    text = align_text_to_groups(transcript_ids, num_groups, config.sil_index,
                                (config.text_eos_token_id, config.text_pad_token_id))
    input_ids = audio_slot_ids(num_groups, config.audio_token_index, config.audio_bos_index, config.audio_eos_index)
    text_labels, speech_labels = build_training_labels(
        input_ids[None], input_ids[None], speech.labels.view(num_groups, disc.group_size), text,
        audio_token_index=config.audio_token_index, audio_eos_index=config.audio_eos_index,
        speech_eos_id=disc.eos_token_id)
    return AssistantLabels(input_ids=input_ids, text_stream=text,
                           speech_groups=speech.ids.view(num_groups, disc.group_size),
                           text_labels=text_labels[0], speech_labels=speech_labels[0])


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------
class DiscreteAudioEncoder(nn.Module):
    """The released ``audio_tower``: speech ids (A, k·G) -> one vector per group (A, G, H).

    discrete groups:   output_matching(mean of the k rows of embed_tokens)   (pad row zero; no lookup gradient)
    continuous groups: continual_output_matching(mean of k 25 Hz encoder vectors)     (zero padding included)
    ``continuous_features_mode`` "replace": audios with features take the continuous result; "add": the sum.
    """

    def __init__(self, hidden_size: int, config: DiscreteAudioConfig, initializer_range: float = 0.02):
        super().__init__()
        self.group_size, self.mode = config.group_size, config.continuous_features_mode
        self.embed_tokens = nn.Embedding(config.codebook_size, hidden_size, padding_idx=config.pad_token_id)
        self.output_matching = nn.Linear(hidden_size, hidden_size, bias=False)
        self.continual_output_matching = nn.Linear(hidden_size, hidden_size, bias=False)
        init_weights(self, initializer_range)
        with torch.no_grad():
            self.embed_tokens.weight[config.pad_token_id].zero_()

    def forward(self, speech_ids: torch.Tensor, continuous_features: torch.Tensor | None = None,
                feature_exist_mask: torch.Tensor | None = None) -> torch.Tensor:
        """speech_ids (A, k·G); continuous_features (A_feat, k·G, H) for the audios where ``feature_exist_mask``
        (A,) bool is True (A_feat of them, in order) -> group vectors (A, G, H)."""
        groups = self.output_matching(mean_group(self.embed_tokens(speech_ids), self.group_size))   # (A, G, H)
        if continuous_features is None:
            return groups
        rows = feature_exist_mask.nonzero().flatten()                                       # (A_feat,)
        if continuous_features.shape[0] != rows.numel() or continuous_features.shape[1] != speech_ids.shape[1]:
            raise ValueError(f"continuous_features {tuple(continuous_features.shape)} must be (A_feat, T, H) = "
                             f"({rows.numel()}, {speech_ids.shape[1]}, H)")
        continuous = self.continual_output_matching(mean_group(continuous_features, self.group_size))
        if self.mode == "replace":
            return groups.index_copy(0, rows, continuous.to(groups.dtype))
        return groups.index_add(0, rows, continuous.to(groups.dtype))


@dataclass
class FunAudioChatOutput:
    """What ``FunAudioChat.forward`` returns.

    text_logits (B, L, V); speech_logits (B, k·L, C) at 25 Hz positions k·p + s; inputs_embeds (B, L, H) the
    fused LLM inputs; last_hidden_state (B, L, H) after the LLM's final norm. Given ``labels``: the built
    text_labels (B, L) and speech_labels (B, k·L), and loss = text_loss + speech_loss (speech_loss is None
    without ``speech_ids``).
    """

    text_logits: torch.Tensor
    speech_logits: torch.Tensor
    inputs_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    speech_loss: torch.Tensor | None = None
    text_labels: torch.Tensor | None = None
    speech_labels: torch.Tensor | None = None


class FunAudioChat(nn.Module):
    """Fun-Audio-Chat with the released submodule names and forward semantics (see the module doc)."""

    def __init__(self, config: FunAudioChatConfig | None = None):
        super().__init__()
        self.config = config = config or FunAudioChatConfig()
        disc, hidden = config.discrete, config.hidden_size
        self.continuous_audio_tower = AudioEncoder(config.audio_config)
        self.audio_tower = DiscreteAudioEncoder(hidden, disc, config.text_config.initializer_range)
        self.audio_invert_tower = SpeechRefinedHead(hidden, config.crq_config, disc.codebook_size, disc.group_size,
                                                    disc.bos_token_id, disc.pad_token_id,
                                                    speech_embedding=self.audio_tower.embed_tokens)   # tied lm_head
        self.language_model = Qwen3ForCausalLM(config.text_config)

    # -- pieces ------------------------------------------------------------------------------------------
    def continuous_features(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None,
                            length: int) -> torch.Tensor:
        """Encoder output (A_feat, T25, H) cut or zero-padded to ``length`` 25 Hz frames (released speech_maxlen)."""
        features = self.continuous_audio_tower(input_features, frames_mask=feature_attention_mask).features
        features = features[:, :length]
        return F.pad(features, (0, 0, 0, length - features.shape[1]))

    def speech_head(self, lm_hidden: torch.Tensor, text_embeds: torch.Tensor, speech_labels: torch.Tensor | None,
                    attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The released teacher-forced SRH pass (``SpeechRefinedHead.forward``, the one path): logits (B, k·L, C)
        and, with labels (B, k·L), the loss. Previous-token inputs are rows of the tied speech table (-100 -> pad,
        whose row gets no gradient from them), rolled by −(k − 1); without labels none are added (as released)."""
        out = self.audio_invert_tower(lm_hidden, speech_labels, text_embeds=text_embeds,
                                      attention_mask=attention_mask, position_ids=position_ids)
        return out.logits, out.loss

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                feature_attention_mask: torch.Tensor | None = None, feature_exist_mask: torch.Tensor | None = None,
                speech_ids: torch.Tensor | None = None, speech_attention_mask: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, text_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> FunAudioChatOutput:
        """The released training/prefill forward; every argument keeps its released name and meaning.

        input_ids, attention_mask, position_ids, labels: (B, L), the chat with one <|AUDIO|> per 5 Hz group.
        speech_ids, speech_attention_mask: (A, T) one row per audio (A audios in the batch, in reading order).
        input_features (A_feat, mel bins, frames), feature_attention_mask (A_feat, frames): the audios whose
        ``feature_exist_mask`` (A,) is True (default: all). text_ids (A, n): aligned transcripts (training);
        text_attention_mask (A,): which audios have one (default: all). Masks: bool or 0/1 integers.

        Errors (``ValueError``, naming the tensor): ``input_ids`` or ``labels`` outside the text vocabulary
        [0, ``text_config.vocab_size``) (labels may also be -100), wrong shapes or dtypes. Labels that score
        nothing (all -100) give ``text_loss`` 0 with a ``RuntimeWarning`` (``fac_mini.llm.causal_lm_loss``) and
        ``speech_loss`` 0, both keeping the graph, instead of NaN. The checks only read the id tensors (a min and
        a max); they never change how valid inputs are computed.
        """
        config, disc = self.config, self.config.discrete
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch tensor (B, L), got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer ids (B, L), got {input_ids.dtype} {tuple(input_ids.shape)}")
        check_token_ids("input_ids", input_ids, config.text_config.vocab_size, "text vocabulary")
        if attention_mask is not None:
            attention_mask = _as_bool_mask("attention_mask", attention_mask, tuple(input_ids.shape))
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels has shape {shape}, expected input_ids' {tuple(input_ids.shape)}")
            check_labels("labels", labels, config.text_config.vocab_size)
        embed_text = self.language_model.model.embed_tokens
        inputs_embeds = embed_text(input_ids)                                                # (B, L, H)
        text_embeds = inputs_embeds                                                          # SRH's stopgrad(e)
        audio_positions = input_ids == config.audio_token_index                              # (B, L)
        text_labels, speech_labels = labels, None

        if speech_ids is None:
            given = [name for name, value in (("input_features", input_features), ("text_ids", text_ids))
                     if value is not None]
            if given or audio_positions.any():
                raise ValueError(f"speech_ids is None but {given or 'input_ids'} "
                                 f"{'were' if given else 'hold <|AUDIO|> tokens'}: pass speech_ids (A, T) "
                                 "(placeholder ids for user audio) so the groups can be counted")
        else:
            speech = prepare_speech_ids(speech_ids, speech_attention_mask, disc.group_size, disc.pad_token_id,
                                        disc.codebook_size, config.ignore_index)
            num_audios, num_groups = speech.group_mask.shape
            exist, continuous = self._continuous_inputs(input_features, feature_attention_mask, feature_exist_mask,
                                                        num_audios, speech.ids.shape[1])
            audio_features = self.audio_tower(speech.ids, continuous, exist)                 # (A, G, H)
            group_text = text_features = None
            if text_ids is not None and text_ids.numel():
                if text_ids.dim() != 2 or text_ids.shape[0] != num_audios:
                    raise ValueError(f"text_ids has shape {tuple(text_ids.shape)}, expected (A, n) with A = "
                                     f"{num_audios} audios (the rows of speech_ids)")
                if text_ids.min() < 0 or text_ids.max() >= config.text_config.vocab_size:
                    raise ValueError(f"text_ids must lie in [0, {config.text_config.vocab_size})")
                has_text = torch.ones(num_audios, dtype=torch.bool, device=text_ids.device) \
                    if text_attention_mask is None else _as_bool_mask("text_attention_mask", text_attention_mask,
                                                                      (num_audios,))
                aligned = align_text_to_groups(text_ids, num_groups, config.sil_index,
                                               (config.text_eos_token_id, config.text_pad_token_id))  # (A, G)
                text_features = embed_text(aligned) * has_text[:, None, None]                # zero without text
                group_text = aligned.masked_fill(~speech.group_mask | ~has_text[:, None], config.ignore_index)
                audio_features = fuse_text_and_speech(text_features, audio_features, config.speech_text_fusion)
            count, groups = int(audio_positions.sum()), int(speech.group_mask.sum())
            if count != groups:
                raise ValueError(f"input_ids hold {count} <|AUDIO|> tokens (id {config.audio_token_index}) but "
                                 f"speech_ids {tuple(speech_ids.shape)} with its mask make {groups} groups of "
                                 f"{disc.group_size}; expand each audio to ceil(n / {disc.group_size}) placeholders")
            slots = audio_positions[..., None]                                               # (B, L, 1)
            inputs_embeds = inputs_embeds.masked_scatter(slots, audio_features[speech.group_mask])
            if text_features is not None:
                text_embeds = text_embeds.masked_scatter(slots, text_features[speech.group_mask])
            if labels is not None:
                text_labels, speech_labels = build_training_labels(
                    input_ids, labels, speech.labels.view(num_audios, num_groups, -1)[speech.group_mask],
                    None if group_text is None else group_text[speech.group_mask],
                    audio_token_index=config.audio_token_index, audio_eos_index=config.audio_eos_index,
                    speech_eos_id=disc.eos_token_id, ignore_index=config.ignore_index)
                speech_labels = speech_labels.flatten(1)                                     # (B, k·L)

        lm = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, labels=text_labels)
        speech_logits, speech_loss_value = self.speech_head(lm.last_hidden_state, text_embeds, speech_labels,
                                                            attention_mask, position_ids)
        loss = None
        if labels is not None:
            loss = lm.loss if speech_loss_value is None else lm.loss + speech_loss_value
        return FunAudioChatOutput(text_logits=lm.logits, speech_logits=speech_logits, inputs_embeds=inputs_embeds,
                                  last_hidden_state=lm.last_hidden_state, loss=loss, text_loss=lm.loss,
                                  speech_loss=speech_loss_value, text_labels=None if labels is None else text_labels,
                                  speech_labels=speech_labels)

    def _continuous_inputs(self, input_features, feature_attention_mask, feature_exist_mask, num_audios: int,
                           length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validate the continuous-path inputs; return (feature_exist_mask (A,) bool, features (A_feat, T, H))."""
        exist = None
        if feature_exist_mask is not None:
            exist = _as_bool_mask("feature_exist_mask", feature_exist_mask, (num_audios,))
        if input_features is None:
            if exist is not None and exist.any():
                raise ValueError(f"feature_exist_mask marks {int(exist.sum())} audios with features, but "
                                 "input_features is None")
            if feature_attention_mask is not None:
                raise ValueError("feature_attention_mask was given without input_features")
            return None, None
        if exist is None:
            exist = torch.ones(num_audios, dtype=torch.bool, device=input_features.device)
        if input_features.dim() != 3 or input_features.shape[0] != int(exist.sum()):
            raise ValueError(f"input_features has shape {tuple(input_features.shape)}, expected (A_feat, mel bins, "
                             f"frames) with A_feat = {int(exist.sum())} audios marked in feature_exist_mask")
        if feature_attention_mask is not None:
            feature_attention_mask = _as_bool_mask("feature_attention_mask", feature_attention_mask,
                                                   (input_features.shape[0], input_features.shape[2]))
        return exist, self.continuous_features(input_features, feature_attention_mask, length)
