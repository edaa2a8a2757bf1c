"""Diffusion tests are many small vectorised ops: one intra-op thread is fastest, and on a
shared machine extra threads mostly spin. Restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
