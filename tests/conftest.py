"""Shared fixtures and markers of the unit tests."""
import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small models run fastest on one torch thread, and far faster than two when other work shares the two
    cores of the course machine (measured 10 ms -> 0.05 ms per tiny op). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; the previous setting is restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def processor():
    """The released input pipeline on the course's text tokenizer (test_processing.py defines its own)."""
    from fac_mini.released.processing import FunAudioChatProcessor
    from fac_mini.tokenizer import load_tokenizer

    return FunAudioChatProcessor(load_tokenizer())


@pytest.fixture(scope="module")
def model():
    """A default-size mini ``FunAudioChat`` with seeded random weights, in eval mode."""
    from fac_mini.model import FunAudioChat, FunAudioChatConfig

    torch.manual_seed(0)
    return FunAudioChat(FunAudioChatConfig()).eval()


# With ATEN_CPU_CAPABILITY forcing torch's AVX2 kernels on a CPU with AMX, torch's bf16 attention asks for
# AMX-packed operands that its AVX2 build cannot make ("pack_vnni2 is only supported when avx512 is supported"):
# an artefact of the override, not of the course's code. The override is there to check that float32 results do
# not depend on the instruction set, so tests marked bf16_cpu are skipped under it, and only under it.
def pytest_configure(config):
    config.addinivalue_line("markers", "bf16_cpu: computes in bfloat16 on the CPU; skipped when the environment "
                                       "sets ATEN_CPU_CAPABILITY (a torch artefact, see tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    if "ATEN_CPU_CAPABILITY" not in os.environ:
        return
    skip = pytest.mark.skip(reason="bf16 on CPU under a forced ATEN_CPU_CAPABILITY hits a torch artefact "
                                   "(pack_vnni2 needs the AVX-512 kernels)")
    for item in items:
        if item.get_closest_marker("bf16_cpu"):
            item.add_marker(skip)
