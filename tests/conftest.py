"""Fixtures shared across the test tree."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from two threads, and on a busy 2-core machine OpenMP threads that wait for each
    other make a step up to 100x slower. Test modules opt in with an autouse fixture that requests this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
