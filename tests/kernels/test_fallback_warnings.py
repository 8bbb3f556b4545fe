"""Fallbacks to the PyTorch reference on a GPU (fp32 without TF32, float64, a K not a multiple of 16) are
reported once per process per (op, reason), naming the op and the reason. The CPU stands in for the GPU: the
device check (fallbacks.reference_reason) is asked about a CUDA device while the tensors live on the CPU."""
from __future__ import annotations

import warnings

import pytest
import torch

from cmath_mer.kernels.cu_seqlens import cu_seqlens_from

from helpers import needs_triton, reconstruction_inputs

pytestmark = needs_triton


@pytest.fixture
def as_if_cuda(monkeypatch):
    """The fused modules' device check answers for cuda:0 (TF32 off), and no (op, reason) was reported yet."""
    from cmath_mer.kernels import fallbacks
    from cmath_mer.kernels.attention import fused as attention
    from cmath_mer.kernels.reconstruction import fused as reconstruction
    real = fallbacks.reference_reason

    def on_cuda(dtype, device, k_dim=None):
        return real(dtype, torch.device("cuda", 0), k_dim)
    for mod in (attention, reconstruction):
        monkeypatch.setattr(mod, "reference_reason", on_cuda)
    monkeypatch.setattr(fallbacks, "_REPORTED", set())
    monkeypatch.setattr(fallbacks, "tf32_allowed", lambda: False)
    return attention, reconstruction, fallbacks.ReferenceFallbackWarning


def _reported(fn, category):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if issubclass(w.category, category)]


def test_each_op_and_reason_is_reported_once(as_if_cuda):
    attention, reconstruction, category = as_if_cuda
    lengths = [int(n) for n in torch.randint(1, 9, (3,))]
    T = sum(lengths)

    def attend(dtype):
        q, k, v = torch.randn(T, 2, 16, dtype=dtype), torch.randn(1, T, 2, 16, dtype=dtype), \
            torch.randn(1, T, 2, 16, dtype=dtype)
        return lambda: attention.fused_multi_source_attention(q, k, v, cu_seqlens_from(lengths))

    first = _reported(attend(torch.float32), category)
    assert len(first) == 1 and "multi_source_attention" in first[0] and "fp32" in first[0] and "TF32" in first[0]
    assert _reported(attend(torch.float32), category) == []                   # once per (op, reason)
    fp64 = _reported(attend(torch.float64), category)
    assert len(fp64) == 1 and "float64" in fp64[0]                            # another reason: reported

    K = 16 * int(torch.randint(1, 4, ())) + int(torch.randint(1, 16, ()))     # not a multiple of 16
    h, w, b, target = reconstruction_inputs(T, 8, K, torch.float16, seed=int(torch.randint(0, 999, ())))
    rec = _reported(lambda: reconstruction.fused_reconstruction_loss(h.float(), w.float(), b.float(),
                                                                     target.float()), category)
    assert len(rec) == 1 and "reconstruction_loss" in rec[0] and "fp32" in rec[0]
    odd = _reported(lambda: reconstruction.fused_reconstruction_loss(h, w, b, target), category)
    assert len(odd) == 1 and "reconstruction_loss" in odd[0] and "multiple of 16" in odd[0]
    assert _reported(lambda: reconstruction.fused_reconstruction_loss(h, w, b, target), category) == []


def test_inputs_the_kernels_take_report_nothing(as_if_cuda):
    attention, reconstruction, category = as_if_cuda
    T = int(torch.randint(4, 20, ()))
    q, k, v = torch.randn(T, 2, 16, dtype=torch.float16), torch.randn(1, T, 2, 16, dtype=torch.float16), \
        torch.randn(1, T, 2, 16, dtype=torch.float16)
    from cmath_mer.kernels import fallbacks
    assert fallbacks.reference_reason(torch.float16, torch.device("cuda", 0)) is None
    assert fallbacks.reference_reason(torch.float32, torch.device("cpu")) is None      # the interpreter runs all
    assert fallbacks.reference_reason(torch.bfloat16, torch.device("cuda", 0), k_dim=32) is None
    assert _reported(lambda: attention.fused_multi_source_attention(q, k, v, cu_seqlens_from([T])), category) == []
