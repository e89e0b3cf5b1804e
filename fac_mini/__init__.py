"""fac_mini: Fun-Audio-Chat built from scratch, one module per idea (see the course's notebooks)."""
from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

__version__ = "0.1.0"
__all__ = ["set_seed", "file_sha256", "atomic_write", "warmup_cosine_lr", "REPO_ROOT", "DATA_DIR", "CACHE_DIR", "__version__"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"                       # shipped in git (<= 60 MB)
CACHE_DIR = Path(os.environ.get("FAC_CACHE", DATA_DIR / "cache"))  # rebuilt on demand, ignored by git


def set_seed(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) and return a fresh ``torch.Generator`` seeded likewise.

    Use the returned generator for sampling that must not depend on what other code drew before.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (what every manifest of the course records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path | str, write) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one step, so a crash never leaves a
    half-written checkpoint or manifest behind (``write`` is e.g. ``lambda tmp: torch.save(obj, tmp)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def warmup_cosine_lr(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Learning rate of 0-based ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to
    ``floor · peak`` at ``steps`` (the schedule of the speech tokenizer and the SRH study)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
