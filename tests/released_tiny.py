"""The tiny checkpoint saved by the official implementation, and the inputs it was run on (see
tests/fixtures/released_tiny/README.md); shared by the parity and the golden-generation tests."""
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "released_tiny"
CHECKPOINT = FIXTURE / "checkpoint"


def load_batches() -> dict[str, dict[str, torch.Tensor]]:
    """``inputs.safetensors`` (keys ``<batch>.<argument>``) as ``{batch: {argument: tensor}}``."""
    batches: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(FIXTURE / "inputs.safetensors")).items():
        name, argument = key.split(".", 1)
        batches.setdefault(name, {})[argument] = value
    return batches


BATCHES = load_batches()
