"""``python -m fac_mini bench load``: peak resident memory and time of ``load_released`` on a >= 1 GB checkpoint
in the released layout (random weights with the released widths, built shard by shard)."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..model import FunAudioChatConfig
from ..train.store import save_safetensors
from .checkpoint import CONFIG_NAME, INDEX_NAME, dtype_name, parse_size
from .config import build_on_meta, count_parameters, tied_parameter_groups

__all__ = ["bench_checkpoint_config", "build_random_checkpoint", "bench_load", "main_bench_load"]


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
    config_dict["torch_dtype"] = dtype_name(dtype)
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
from fac_mini.released.load_benchmark import _peak_rss_bytes
from fac_mini.released import load_released
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
    from .. import CACHE_DIR

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
