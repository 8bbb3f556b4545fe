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

@pytest.fixture
def nan_poison(monkeypatch):
    """Every torch.empty / empty_like the library makes comes back full of NaN: unwritten elements show."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out
        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
