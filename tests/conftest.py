"""Shared fixtures of the unit tests."""
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
