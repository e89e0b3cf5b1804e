"""The released Fun-Audio-Chat-8B checkpoint: its configuration, its size, and loading/saving its layout.

A checkpoint directory in the released (Hugging Face) layout holds

    config.json                          model_type "funaudiochat", nested audio_config (with
                                         crq_transformer_config) and text_config   (``released_config()``)
    model.safetensors                    one file, or
    model-00001-of-0000N.safetensors ... shards, plus
    model.safetensors.index.json         {"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}

Keys are the ``state_dict`` names of ``fac_mini.model.FunAudioChat`` (``continuous_audio_tower.*``,
``audio_tower.*``, ``audio_invert_tower.*``, ``language_model.*``), except that a tied tensor is stored once:
``audio_invert_tower.lm_head.weight`` *is* ``audio_tower.embed_tokens.weight`` (the SRH's output layer reuses the
speech embedding table), so the file holds only the latter, as ``save_pretrained`` writes it.

``load_released`` builds the model on the ``meta`` device (no memory, no random init), checks the checkpoint's
keys, shapes and dtypes against it (every problem reported in one ``ValueError``), then fills it tensor by tensor
from memory-mapped safetensors files straight into tensors of the requested dtype and device, and assigns them
(``load_state_dict(assign=True)``): the weights exist once, never twice. Buffers that are not in the checkpoint
(RoPE ``inv_freq``, the encoder's sinusoid table) are recomputed in float32, as transformers keeps them.
Peak memory is about the model's size plus a small read window (``python -m fac_mini bench load`` measures it).

``count_parameters`` reproduces the released split (about 9.42 B in all, docs/released_model.md §2.6).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .encoder import AudioEncoder, sinusoidal_positions
from .llm import Qwen3Model, RotaryEmbedding
from .model import FunAudioChat, FunAudioChatConfig
from .train.store import atomic_directory, atomic_write_text, read_json, save_safetensors

__all__ = [
    "CONFIG_NAME", "SINGLE_FILE_NAME", "INDEX_NAME", "RELEASED_UNCONFIRMED", "released_config", "count_parameters",
    "build_on_meta", "tied_parameter_groups", "load_released", "save_released", "parse_size",
    "bench_checkpoint_config", "build_random_checkpoint", "bench_load", "main_bench_load",
]

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# Keys that some checkpoints carry but the model computes itself: ignored by the strict key check.
KNOWN_UNUSED_KEYS = (
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),                                     # RoPE tables (old transformers)
    re.compile(r"^continuous_audio_tower\.positional_embedding(\.positional_embedding)?$"),   # sinusoid table
)

_CORRUPT_HINT = "a checkpoint folder in the released layout needs it whole (re-download or re-save it)"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_READ_WINDOW_BYTES = 64 << 20    # re-open a file after this many bytes were read through its memory map


# ----------------------------------------------------------------------------------------------------------
# The released configuration
# ----------------------------------------------------------------------------------------------------------
# Values of released_config() that no excerpt of the real config.json confirmed (docs/released_model.md §1).
RELEASED_UNCONFIRMED = {
    "audio_token_index": "151669 (<|AUDIO|>) from three ports; the code default 151646 is a stale Qwen2-Audio value",
    "audio_config.pad_token_id": "6563 from the MLX port; one vllm-omni file guesses 6564",
    "audio_config.output_dim": "4096 from ports, and required (audio groups become 4096-d LLM inputs)",
    "audio_config.n_window": "100 from ports (= code default)",
    "audio_config.num_mel_bins": "128 from ports (= code default, Whisper-large-v3)",
    "text_config": "the whole text_config is not visible in the config.json excerpt; values from ports",
    "text_config.rope_theta": "5e6 likely (Qwen3-VL-8B text tower, MLX port); plain Qwen3-8B would be 1e6",
    "text_config.max_position_embeddings": "262144 likely (MLX port, Qwen3-VL-8B)",
    "text_config.pad_token_id": "unknown; 151643 (<|endoftext|>) is what the generation examples pass",
    "text_config.eos_token_id": "unknown; 151645 (<|im_end|>) is what the generation examples pass",
    "text_config.sil_index": "151673 (<|sil|>) from the MLX port",
}


def released_config() -> dict[str, Any]:
    """The released ``config.json`` of Fun-Audio-Chat-8B as a dict (docs/released_model.md §1).

    Built from ``FunAudioChatConfig.released_8b().to_dict()`` plus the bookkeeping fields the release carries.
    Values not confirmed by the visible part of the real file are listed in ``RELEASED_UNCONFIRMED``; the most
    consequential is ``text_config.rope_theta`` (5e6 likely; it changes every output if wrong).
    """
    config = copy.deepcopy(FunAudioChatConfig.released_8b().to_dict())
    config.pop("speech_text_fusion", None)          # not a released key (the released code always averages)
    config["torch_dtype"] = "bfloat16"              # the release is stored in bfloat16
    audio = config["audio_config"]
    # confirmed by the config.json excerpt [HF-CFG]: activation gelu, dropouts 0, bos 6561, eos 6562,
    # codebook 6565, continuous_features_mode "replace", d_model 1280, 32 layers, 20 heads, ffn 5120,
    # enable_audio_invert_tower, group_size 5, initializer_range 0.02, max_source_positions 1500
    audio["num_hidden_layers"] = audio["encoder_layers"]   # the released config class stores both
    # the whole crq_transformer_config is confirmed [HF-CFG] (Qwen3-0.6B dims, rope_theta 1e6, bf16)
    audio["crq_transformer_config"]["torch_dtype"] = "bfloat16"
    text = config["text_config"]
    text["torch_dtype"] = "bfloat16"
    text["rope_theta"] = 5_000_000.0                # likely (see RELEASED_UNCONFIRMED)
    return config


# ----------------------------------------------------------------------------------------------------------
# Building without memory, and the parameter count
# ----------------------------------------------------------------------------------------------------------
_INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "trunc_normal_")


@contextmanager
def _no_init() -> Iterator[None]:
    """Turn ``torch.nn.init`` functions into no-ops (as transformers' ``no_init_weights``): on the meta device
    they do nothing useful, and they cost seconds for a 9 B-parameter model."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def build_on_meta(config: FunAudioChatConfig) -> FunAudioChat:
    """``FunAudioChat(config)`` on the meta device: shapes only, no memory, no random init."""
    with _no_init(), torch.device("meta"):
        return FunAudioChat(config)


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one shared Parameter, in module order (the first name is the one that is saved);
    for the released model ``[["audio_tower.embed_tokens.weight", "audio_invert_tower.lm_head.weight"]]``."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def count_parameters(config: FunAudioChatConfig | None = None) -> dict[str, int]:
    """Parameters per tower, each counted once (built on the meta device; the default is the released 8B).

    Keys: ``continuous_audio_tower``, ``audio_tower``, ``audio_invert_tower`` (without its tied ``lm_head``,
    which is ``audio_tower.embed_tokens``), ``language_model``, ``total``. Released: about 0.640 B, 0.060 B,
    0.533 B, 8.191 B and 9.424 B.
    """
    model = build_on_meta(config or FunAudioChatConfig.released_8b())
    seen: set[int] = set()
    counts: dict[str, int] = {}
    for name, tower in model.named_children():
        counts[name] = 0
        for parameter in tower.parameters():
            if id(parameter) not in seen:          # a tied parameter belongs to the tower that owns it first
                seen.add(id(parameter))
                counts[name] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


# ----------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory
# ----------------------------------------------------------------------------------------------------------
def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory and, for a sharded one, the index's key -> file map."""
    single, index = directory / SINGLE_FILE_NAME, directory / INDEX_NAME
    if single.exists() and index.exists():
        raise ValueError(f"{directory} holds both {SINGLE_FILE_NAME} and {INDEX_NAME}; keep one layout (delete "
                         "the stale file)")
    if single.exists():
        return [single], None
    if not index.exists():
        raise FileNotFoundError(f"{directory} holds neither {SINGLE_FILE_NAME} nor {INDEX_NAME}: no weights to load")
    data = read_json(index, "the shard index", _CORRUPT_HINT)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index} has no 'weight_map' of tensor name -> shard file; the index is corrupt")
    names = sorted(set(weight_map.values()))
    bad = [name for name in names if Path(name).name != name]
    if bad:
        raise ValueError(f"{index} names shard files outside the checkpoint directory: {bad}")
    missing = [str(directory / name) for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names {len(missing)} shard file(s) that do not exist: {missing}; the "
                                "download is incomplete")
    return [directory / name for name in names], dict(weight_map)


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:   # safetensors raises its own error type for bad headers and short files
        raise ValueError(f"{path} is not a readable safetensors file ({error}); it is truncated or corrupt, "
                         "download or save it again") from error


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Every tensor of every file: name -> (file, shape, safetensors dtype string). Reads headers only."""
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        handle = _open(path)
        try:
            for key in handle.keys():
                info = handle.get_slice(key)
                if key in found:
                    raise ValueError(f"tensor {key!r} is stored twice: in {found[key][0]} and in {path}")
                found[key] = (path, tuple(info.get_shape()), str(info.get_dtype()))
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(f"{path}: cannot read its tensor table ({error}); the file is corrupt") from error
        finally:
            del handle
    return found


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return f"{title} ({len(items)}):\n  " + "\n  ".join(shown)


def _check_keys(directory: Path, model: nn.Module, stored: dict[str, tuple[Path, tuple[int, ...], str]],
                weight_map: dict[str, str] | None) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Compare the checkpoint with the model; raise one ValueError listing every problem.

    Returns (key to load -> model key) for every stored tensor that is loaded, and the (saved name, alias)
    pairs of tied parameters whose alias is also stored (to be checked for equality after loading).
    """
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()}
    order = {name: position for position, name in enumerate(expected)}
    group_of = {name: names for names in tied_parameter_groups(model) for name in names}
    problems: list[str] = []

    if weight_map is not None:      # the index and the files must agree
        listed_elsewhere = [f"{key} (index: {weight_map[key]}, but not in that file)" for key in sorted(weight_map)
                            if key not in stored or stored[key][0].name != weight_map[key]]
        unlisted = [f"{key} (in {stored[key][0].name})" for key in sorted(stored) if key not in weight_map]
        if listed_elsewhere:
            problems.append(_listing(f"tensors named by {INDEX_NAME} but absent from their shard", listed_elsewhere))
        if unlisted:
            problems.append(_listing(f"tensors in shards but not in {INDEX_NAME}", unlisted))

    to_load: dict[str, str] = {}
    filled: set[str] = set()
    tied_pairs: list[tuple[str, str]] = []
    unexpected, wrong_shape, wrong_dtype = [], [], []
    for key, (path, shape, dtype) in sorted(stored.items(), key=lambda item: (order.get(item[0], -1), item[0])):
        if key not in expected:
            if not any(pattern.search(key) for pattern in KNOWN_UNUSED_KEYS):
                unexpected.append(f"{key} {list(shape)} in {path.name}")
            continue
        if shape != expected[key]:
            wrong_shape.append(f"{key}: {list(shape)} in {path.name}, model expects {list(expected[key])}")
            continue
        if dtype not in _SAFETENSORS_DTYPES:
            wrong_dtype.append(f"{key}: dtype {dtype} in {path.name}, expected a floating-point dtype")
            continue
        target = group_of.get(key, [key])[0]            # the model key this tensor fills (tied: the saved name)
        if target in filled:
            tied_pairs.append((target, key))            # a stored duplicate of a tied tensor: compared, dropped
        else:
            to_load[key] = target
            filled.add(target)
    missing = []
    for key, shape in expected.items():
        members = group_of.get(key, [key])
        if key == members[0] and not any(member in stored for member in members):
            missing.append(f"{key} {list(shape)}")      # a tied group is reported once, under its saved name
    if missing:
        problems.append(_listing("missing tensors", missing))
    if unexpected:
        problems.append(_listing("unexpected tensors", unexpected))
    if wrong_shape:
        problems.append(_listing("tensors with the wrong shape", wrong_shape))
    if wrong_dtype:
        problems.append(_listing("tensors with a non-float dtype", wrong_dtype))
    if problems:
        raise ValueError(f"checkpoint {directory} does not match the model its {CONFIG_NAME} describes:\n"
                         + "\n".join(problems))
    return to_load, tied_pairs


class _WindowedReader:
    """Reads tensors of one safetensors file through its memory map, re-opening the file every
    ``_READ_WINDOW_BYTES`` so the mapped pages (counted in the resident set) never exceed that window."""

    def __init__(self, path: Path):
        self.path, self.handle, self.read_bytes = path, None, 0

    def _slice(self, key: str):
        if self.handle is None or self.read_bytes >= _READ_WINDOW_BYTES:
            self.handle = None                              # unmaps the previous window
            self.handle, self.read_bytes = _open(self.path), 0
        return self.handle.get_slice(key)

    def read_into(self, key: str, out: torch.Tensor, stored_dtype: torch.dtype) -> None:
        """Copy tensor ``key`` into ``out`` (any dtype and device), in row blocks of at most one window."""
        try:
            if out.dim() == 0:
                self._slice(key)                             # (re)opens the file if needed
                out.copy_(self.handle.get_tensor(key))
                return
            row_bytes = max(1, out[0].numel() * stored_dtype.itemsize)
            rows = max(1, _READ_WINDOW_BYTES // row_bytes)
            for start in range(0, out.shape[0], rows):
                block = self._slice(key)[start:start + rows]
                out[start:start + rows].copy_(block)
                self.read_bytes += block.numel() * stored_dtype.itemsize
                del block
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(f"{self.path}: reading tensor {key!r} failed ({error}); the file is corrupt") from error

    def close(self) -> None:
        self.handle = None


def _recompute_buffers(model: nn.Module, device: torch.device) -> None:
    """Fill the non-persistent buffers (left on the meta device) exactly as a normal construction makes them.

    They stay float32 whatever the weights' dtype, as transformers keeps ``inv_freq`` (a bf16 RoPE table would
    move the angles of late positions).
    """
    for module in model.modules():
        if isinstance(module, Qwen3Model):
            module.rotary_emb.inv_freq = RotaryEmbedding(module.config.head_dim,
                                                         module.config.rope_theta).inv_freq.to(device)
        elif isinstance(module, AudioEncoder):
            module.positional_embedding = sinusoidal_positions(module.config.max_source_positions,
                                                               module.config.d_model).to(device)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"after loading, {len(left)} tensors are still on the meta device (a buffer this "
                           f"loader does not know how to rebuild): {left[:10]}")


def _set_parameter(model: nn.Module, name: str, parameter: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name) if module_name else model, leaf, parameter)


def _usable_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, checked to exist on this machine (one empty allocation); else ValueError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device ({error}); use 'cpu' or 'cuda'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here (torch.cuda.is_available() is "
                         f"False; torch {torch.__version__}, CUDA build {torch.version.cuda}); load on device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use an index below {torch.cuda.device_count()}")
    try:
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError) as error:
        raise ValueError(f"device={str(device)!r} is not usable here ({error}); load on device='cpu'") from error
    return device


def _check_one_dtype(directory: Path, stored: dict[str, tuple[Path, tuple[int, ...], str]],
                     to_load: dict[str, str]) -> None:
    """With ``dtype=None`` every loaded tensor keeps its stored dtype, so they must all have the same one."""
    by_dtype: dict[str, list[str]] = {}
    for key in to_load:
        by_dtype.setdefault(stored[key][2], []).append(key)
    if len(by_dtype) <= 1:
        return
    common = max(by_dtype, key=lambda name: len(by_dtype[name]))
    odd = [f"{key}: {name} in {stored[key][0].name}" for name, keys in sorted(by_dtype.items()) if name != common
           for key in keys]
    counts = ", ".join(f"{len(keys)} {name}" for name, keys in sorted(by_dtype.items()))
    raise ValueError(f"checkpoint {directory} stores tensors of several dtypes ({counts}) and dtype=None keeps "
                     "them, but the forward needs one dtype; pass dtype=torch.float32 (or torch.bfloat16) to cast "
                     "every tensor on loading, or save the checkpoint again in one dtype.\n"
                     + _listing(f"tensors not in {common}", odd))


def load_released(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu") -> FunAudioChat:
    """Load a checkpoint directory in the released layout; returns a ``FunAudioChat`` in eval mode.

    path: directory with ``config.json`` (``model_type: funaudiochat``) and ``model.safetensors`` or shards +
    ``model.safetensors.index.json``. dtype: floating dtype of the weights (``None`` keeps the stored dtypes);
    non-persistent buffers stay float32. device: where the weights are created (read straight there).

    The model's call takes the released keyword inputs (``input_ids``, ``attention_mask``, ``position_ids``,
    ``input_features``, ``feature_attention_mask``, ``feature_exist_mask``, ``speech_ids``,
    ``speech_attention_mask``, ``text_ids``, ``text_attention_mask``, ``labels``).

    Errors: ``FileNotFoundError`` for a missing directory, config, weights file or shard named by the index;
    ``ValueError`` for a wrong ``model_type``, a config value of the wrong type (named with its key, e.g.
    ``text_config.hidden_size = null``), a corrupt or truncated file (named), missing, unexpected or wrongly
    shaped tensors (all listed in one message), a ``device`` this machine lacks (e.g. ``"cuda"`` without CUDA),
    and, with ``dtype=None``, a checkpoint whose tensors have different dtypes (the forward needs one dtype:
    the message names the odd tensors and their files; pass ``dtype=`` to cast all of them). A stored
    ``audio_invert_tower.lm_head.weight`` must equal ``audio_tower.embed_tokens.weight`` (they are one tied
    Parameter); without it, it is tied.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (or None to keep the stored ones), got {dtype!r}")
    device = _usable_device(device)
    raw = read_json(directory / CONFIG_NAME, "the model configuration", _CORRUPT_HINT)
    if not isinstance(raw, dict) or raw.get("model_type") != "funaudiochat":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{directory / CONFIG_NAME} has model_type {found!r}, expected 'funaudiochat': not a "
                         "Fun-Audio-Chat checkpoint")
    try:
        config = FunAudioChatConfig.from_dict(raw)
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{directory / CONFIG_NAME}: cannot build the model configuration: {error}") from error

    files, weight_map = _weight_files(directory)
    stored = _headers(files)
    model = build_on_meta(config)
    groups = tied_parameter_groups(model)
    to_load, tied_pairs = _check_keys(directory, model, stored, weight_map)
    if dtype is None:
        _check_one_dtype(directory, stored, to_load)

    state: dict[str, torch.Tensor] = {}
    needed = {key for key in to_load} | {alias for _, alias in tied_pairs}
    by_file: dict[Path, list[str]] = {}
    for key in sorted(needed):
        by_file.setdefault(stored[key][0], []).append(key)
    alias_values: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        reader = _WindowedReader(file)
        try:
            for key in keys:
                _, shape, stored_dtype = stored[key]
                source_dtype = _SAFETENSORS_DTYPES[stored_dtype]
                out = torch.empty(shape, dtype=dtype or source_dtype, device=device)
                reader.read_into(key, out, source_dtype)
                if key in to_load:
                    state[to_load[key]] = out
                else:
                    alias_values[key] = out
        finally:
            reader.close()
    for saved, alias in tied_pairs:                       # a stored duplicate of a tied tensor must agree
        if not torch.equal(state[saved], alias_values[alias]):
            difference = (state[saved].float() - alias_values[alias].float()).abs().max().item()
            raise ValueError(f"checkpoint {directory}: {alias} differs from {saved} (max |difference| "
                             f"{difference:.3g}), but the model ties them into one Parameter")
    alias_values.clear()

    result = model.load_state_dict(state, strict=False, assign=True)
    tied_names = {name for names in groups for name in names[1:]}
    if result.unexpected_keys or set(result.missing_keys) - tied_names:
        raise RuntimeError(f"internal error: load_state_dict reported {result}")   # _check_keys prevents this
    for names in groups:
        primary = model.get_parameter(names[0])
        for alias in names[1:]:
            _set_parameter(model, alias, primary)
    _recompute_buffers(model, device)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10^9, as transformers), ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"size {size!r} not understood; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_released(model: FunAudioChat, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` in the released layout: ``config.json`` and ``model.safetensors``, or, when the weights
    exceed ``max_shard_size``, shards ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``.

    A tied parameter is stored once, under its first name (``audio_tower.embed_tokens.weight``; the SRH's
    ``lm_head.weight`` is left out, as ``save_pretrained`` does). Tensors keep their dtype, so
    ``load_released(path, dtype=None)`` gives back bit-identical weights. The folder is replaced atomically
    (:func:`fac_mini.train.store.atomic_directory`): weight files and config of an earlier save are gone, other
    files stay, and a failure mid-way leaves the earlier checkpoint as it was. Returns the directory.
    """
    if not isinstance(model, FunAudioChat):
        raise ValueError(f"save_released expects a fac_mini FunAudioChat model, got {type(model).__name__}")
    limit = parse_size(max_shard_size)
    directory = Path(path)
    reference_groups = tied_parameter_groups(build_on_meta(model.config))
    state = model.state_dict()
    for names in reference_groups:
        for alias in names[1:]:
            if state[alias].data_ptr() != state[names[0]].data_ptr() and not torch.equal(state[alias], state[names[0]]):
                raise ValueError(f"{alias} is no longer tied to {names[0]} and differs from it; the released "
                                 "layout stores them as one tensor. Re-tie them before saving")
            del state[alias]
    dtypes = {tensor.dtype for tensor in state.values()}

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += size

    config = model.config.to_dict()
    if config.get("speech_text_fusion") == "average":   # the released behaviour: no such key in a released config
        config.pop("speech_text_fusion")
    config["torch_dtype"] = _dtype_name(dtypes.pop()) if len(dtypes) == 1 else "float32"

    # Everything is written into a temporary sibling folder that replaces `directory` in one swap: a failure
    # half-way (disk full, a kill) leaves the old checkpoint loadable. Other files (a tokenizer, say) are kept.
    with atomic_directory(directory, replace=(CONFIG_NAME, SINGLE_FILE_NAME, INDEX_NAME, "model-*-of-*.safetensors")) \
            as folder:
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_safetensors({key: state[key] for key in shards[0]}, folder / SINGLE_FILE_NAME)
        else:
            weight_map: dict[str, str] = {}
            for number, keys in enumerate(shards, start=1):
                name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors({key: state[key] for key in keys}, folder / name)
                weight_map.update({key: name for key in keys})
            total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return directory


# ----------------------------------------------------------------------------------------------------------
# The load benchmark: peak resident memory while loading a >= 1 GB checkpoint in the released layout
# ----------------------------------------------------------------------------------------------------------
_BENCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bench_checkpoint_config(size_gb: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> FunAudioChatConfig:
    """A configuration with the released widths (and so the released key names and tensor shapes) whose
    checkpoint is about ``size_gb`` (10^9 bytes): one layer in each tower, then either more LLM layers (when
    that is still smaller) or a text vocabulary shrunk below 151936 (with the special text ids moved to its end).
    The released widths set a floor: about 0.83 GB in bfloat16 and 1.6 GB in float32 (vocabulary 1024).
    """
    if not size_gb > 0:
        raise ValueError(f"size_gb must be > 0, got {size_gb}")
    released = FunAudioChatConfig.released_8b()
    bytes_per = torch.empty((), dtype=dtype).element_size()
    target = size_gb * 1e9 / bytes_per                                   # parameters
    config = copy.deepcopy(released)
    config.audio_config.encoder_layers = 1
    config.crq_config.num_hidden_layers = 1
    config.text_config.num_hidden_layers = 1
    one_layer = count_parameters(config)["total"]
    hidden = config.text_config.hidden_size
    if one_layer < target:
        config.text_config.num_hidden_layers = 2
        per_layer = count_parameters(config)["total"] - one_layer
        config.text_config.num_hidden_layers = 1 + math.ceil((target - one_layer) / per_layer)
        return config
    vocab = config.text_config.vocab_size
    new_vocab = max(1024, int((target - (one_layer - 2 * hidden * vocab)) / (2 * hidden)))
    config.text_config.vocab_size = new_vocab
    end = new_vocab - 1        # <|endoftext|> ... <|sil|> in their released order, at the end of the vocabulary
    config.text_pad_token_id, config.text_eos_token_id = end - 7, end - 5
    config.audio_token_index, config.audio_bos_index, config.audio_eos_index = end - 4, end - 3, end - 2
    config.sil_index = end
    return FunAudioChatConfig(**{field: getattr(config, field) for field in config.__dataclass_fields__})


def build_random_checkpoint(config: FunAudioChatConfig, directory: str | os.PathLike,
                            dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = "500MB",
                            seed: int = 0) -> Path:
    """Write a checkpoint of ``config`` with random N(0, 0.02²) weights in the released layout, one shard at a
    time (never the whole model in memory). A file ``complete.json`` is written last, so an interrupted build
    is redone by the next call instead of being reused."""
    directory = Path(directory)
    marker = directory / "complete.json"
    if marker.is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    model = build_on_meta(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict(keep_vars=True).items()}
    for names in tied_parameter_groups(model):
        for alias in names[1:]:
            shapes.pop(alias)
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * item
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number, keys in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: torch.empty(shapes[key], dtype=dtype).normal_(0.0, 0.02, generator=generator) for key in keys}
        save_safetensors(tensors, directory / name)
        del tensors
        weight_map.update({key: name for key in keys})
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = _dtype_name(dtype)
    (directory / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
    total = sum(math.prod(shapes[key]) * item for key in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    marker.write_text(json.dumps({"total_size": total, "shards": len(shards)}) + "\n", encoding="utf-8")
    return directory


def _peak_rss_bytes() -> int:
    """High-water mark of the resident set of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_CHILD = """
import json, sys, time
import torch
from fac_mini.released import _peak_rss_bytes, load_released
before = _peak_rss_bytes()
start = time.perf_counter()
model = load_released(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_rss_bytes": _peak_rss_bytes(), "rss_before_load_bytes": before, "load_s": seconds,
                  "weights_bytes": weights}))
"""


def bench_load(size_gb: float = 1.0, dtype: str = "bfloat16", cache_dir: str | os.PathLike | None = None,
               config: FunAudioChatConfig | None = None) -> dict[str, Any]:
    """Build (or reuse) a random checkpoint of about ``size_gb`` in the released layout, load it with
    ``load_released`` in a fresh Python process, and report its peak resident memory and load time.

    Bound: peak RSS <= 1.3 x checkpoint size + 0.5 GB (the process's own baseline, Python + torch, included).
    ``config`` overrides the generated configuration (for tests).
    """
    from . import CACHE_DIR

    if dtype not in _BENCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(_BENCH_DTYPES)}")
    torch_dtype = _BENCH_DTYPES[dtype]
    config = config or bench_checkpoint_config(size_gb, torch_dtype)
    layout = (f"enc{config.audio_config.encoder_layers}-crq{config.crq_config.num_hidden_layers}-"
              f"llm{config.text_config.num_hidden_layers}-v{config.text_config.vocab_size}-"
              f"h{config.text_config.hidden_size}")
    directory = Path(cache_dir) if cache_dir is not None else CACHE_DIR / "released_bench"
    directory = directory / f"{dtype}-{layout}"
    start = time.perf_counter()
    built = not (directory / "complete.json").is_file()
    build_random_checkpoint(config, directory, torch_dtype)
    build_s = time.perf_counter() - start
    files = sorted(directory.glob("*.safetensors"))
    checkpoint_bytes = sum(file.stat().st_size for file in files)
    environment = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, "-c", _CHILD, str(directory), dtype], capture_output=True, text=True,
                           env=environment, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"the loading process failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    bound = 1.3 * checkpoint_bytes + 0.5e9
    gb = 1e9
    return {
        "checkpoint": str(directory), "checkpoint_gb": round(checkpoint_bytes / gb, 3),
        "checkpoint_bytes": checkpoint_bytes, "peak_rss_bytes": measured["peak_rss_bytes"], "shards": len(files),
        "dtype": dtype, "parameters": count_parameters(config)["total"], "built_now": built,
        "build_s": round(build_s, 2), "load_s": round(measured["load_s"], 2),
        "peak_rss_gb": round(measured["peak_rss_bytes"] / gb, 3),
        "rss_before_load_gb": round(measured["rss_before_load_bytes"] / gb, 3),
        "peak_over_checkpoint": round(measured["peak_rss_bytes"] / checkpoint_bytes, 3),
        "bound_gb": round(bound / gb, 3), "within_bound": measured["peak_rss_bytes"] <= bound,
        "layout": layout,
    }


def main_bench_load(argv: list[str] | None = None) -> int:
    """``python -m fac_mini bench load [--json] [--size-gb 1.0] [--dtype bfloat16]``: peak memory of
    ``load_released`` on a released-layout checkpoint (built once in the cache). Exit 1 if over the bound."""
    parser = argparse.ArgumentParser(prog="python -m fac_mini bench load", description=main_bench_load.__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size to build (10^9 bytes)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_BENCH_DTYPES),
                        help="dtype stored in the checkpoint and loaded (default: bfloat16, as released)")
    parser.add_argument("--cache", default=None, help="folder for the generated checkpoint (default: "
                                                      "fac_mini.CACHE_DIR/released_bench)")
    args = parser.parse_args(argv)
    result = bench_load(args.size_gb, args.dtype, args.cache)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"checkpoint {result['checkpoint_gb']} GB in {result['shards']} shards ({result['dtype']}, "
              f"{result['parameters'] / 1e9:.2f} B parameters, {result['layout']})")
        print(f"load {result['load_s']} s, peak RSS {result['peak_rss_gb']} GB "
              f"({result['peak_over_checkpoint']} x checkpoint; before loading {result['rss_before_load_gb']} GB)")
        print(f"bound 1.3 x checkpoint + 0.5 GB = {result['bound_gb']} GB: "
              f"{'ok' if result['within_bound'] else 'EXCEEDED'}")
    return 0 if result["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main_bench_load())
