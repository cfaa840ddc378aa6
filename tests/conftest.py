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


@pytest.fixture
def no_kernels():
    """Run the PyTorch forms instead of moekit's fused C++ CPU kernels (layers/kernels) for this test."""
    from moekit.layers import kernels

    saved = kernels._module, kernels._tried
    kernels._module, kernels._tried = None, True
    yield
    kernels._module, kernels._tried = saved


@pytest.fixture
def fused_kernels():
    """moekit's fused C++ CPU kernels, built if needed; the test fails (does not skip) where they cannot be built."""
    from moekit.layers import kernels

    module = kernels.cpu_kernels()
    assert module is not None, "moekit's C++ kernels did not build on this machine (see the warning above)"
    return module
