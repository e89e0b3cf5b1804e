"""Loading and saving a Fun-Audio-Chat checkpoint folder in the released (Hugging Face) layout.

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

``save_released`` writes that layout, replacing the folder atomically.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..encoder import AudioEncoder, sinusoidal_positions
from ..llm import Qwen3Model, RotaryEmbedding
from ..model import FunAudioChat, FunAudioChatConfig
from ..train.store import atomic_directory, atomic_write_text, read_json, save_safetensors
from .config import build_on_meta, tied_parameter_groups

__all__ = ["CONFIG_NAME", "SINGLE_FILE_NAME", "INDEX_NAME", "load_released", "save_released", "parse_size",
           "dtype_name", "recompute_buffers"]

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


def recompute_buffers(model: nn.Module, device: torch.device) -> None:
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
    recompute_buffers(model, device)
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


def dtype_name(dtype: torch.dtype) -> str:
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
    config["torch_dtype"] = dtype_name(dtypes.pop()) if len(dtypes) == 1 else "float32"

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
