"""Test setup. TRITON_INTERPRET must be set before any triton kernel module is imported, so it is set here,
before the tests import cmath_mer, and the Triton kernels run on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CMATH_BACKEND", "torch")   # tests that want triton ask for it explicitly

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
