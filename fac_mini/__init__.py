"""fac_mini: Fun-Audio-Chat built from scratch, one module per idea (see the course's notebooks)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__version__ = "0.1.0"
__all__ = ["set_seed", "REPO_ROOT", "DATA_DIR", "CACHE_DIR", "__version__"]

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
