"""The windowed (banded) reference of multi_source_attention, which runs in O(T * window): against the
previous windowed reference (SDPA per block of 256 queries, quadratic in T through its backward) and against
an explicit float64 masked softmax, forward and every gradient, on fresh random ragged batches."""
from __future__ import annotations

import pytest
import torch

from cmath_mer.bench.long import blocked_reference_before
from cmath_mer.kernels.attention import reference
from cmath_mer.kernels.attention.naive import naive_multi_source_attention
from cmath_mer.kernels.attention.reference import banded_attention, reference_multi_source_attention
from cmath_mer.kernels.cu_seqlens import key_range

from helpers import assert_rel_close, cu_seqlens_from, grads, make_inputs, rel_err


def check_all(got, want, tol, names=("o", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        # a gradient that is exactly zero in the definition (dq, dk for S = 1, window 0) is compared by
        # its absolute norm against the scale of the output
        scale = max(b.norm().item(), got[0].norm().item() * 1e-3)
        err = (a.double() - b.double()).norm().item() / scale
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"


RAGGED = [[1, 6, 13, 9], [40, 1, 77, 3, 129], [300], [2, 1, 1, 64, 65]]
WINDOWS = [0, 1, 3, 20, 500]                 # 500: larger than every conversation


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("lengths", RAGGED, ids=lambda n: "n" + "-".join(map(str, n)))
def test_banded_matches_float64_dense_and_previous_reference(lengths, S, window):
    q, k, v, do, cu = make_inputs(lengths, S, 2, 8, torch.float64, seed=1000 * S + window + len(lengths))
    got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    before = grads(lambda q, k, v: blocked_reference_before(q, k, v, cu, window=window), q, k, v, do)
    check_all(got, dense, 1e-12)
    check_all(got, before, 1e-12)


@pytest.mark.parametrize("block", [1, 4, 7, 16])
@pytest.mark.parametrize("window", [0, 1, 3, 20])
def test_banded_any_block_size_and_many_chunks(monkeypatch, block, window):
    # tiny query blocks make the band span up to 2 * 20 + 1 blocks; a score budget of one block makes
    # every query block its own chunk (the last one partial, lengths not multiples of the block)
    monkeypatch.setattr(reference, "query_block", lambda w: block)
    monkeypatch.setattr(reference, "CHUNK_SCORES", 1)
    lengths = [1, 6, 13, 9, 50]
    q, k, v, do, cu = make_inputs(lengths, 2, 2, 8, torch.float64, seed=block * 100 + window)
    got = grads(lambda q, k, v: banded_attention(q, k, v, cu, window, 8 ** -0.5), q, k, v, do)
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    check_all(got, dense, 1e-12)


@pytest.mark.parametrize("chunk_scores", [1, 5000, 1 << 22])
def test_banded_result_does_not_depend_on_the_chunking(monkeypatch, chunk_scores):
    monkeypatch.setattr(reference, "CHUNK_SCORES", chunk_scores)
    q, k, v, do, cu = make_inputs([700, 33, 1], 2, 2, 16, torch.float64, seed=5)
    got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu, window=64), q, k, v, do)
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=64), q, k, v, do)
    check_all(got, dense, 1e-12)


def test_banded_float32_and_float16_against_float64():
    q, k, v, do, cu = make_inputs([5, 1, 140, 12], 3, 2, 16, torch.float32, seed=23)
    for window in (0, 2, 37):
        got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
        want = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do.double())
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert a.dtype == torch.float32
            assert_rel_close(name, a, b, 1e-5)
    h = [x.half() for x in (q, k, v, do)]
    got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu, window=5), *h)
    want = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=5), *h[:3], h[3].double())
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float16
        assert_rel_close(name, a, b, 5e-3)


def test_banded_gradcheck_float64():
    q, k, v, _, cu = make_inputs([3, 1, 6], 2, 1, 3, torch.float64, seed=7)
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: banded_attention(q, k, v, cu, 2, 0.7), inputs, atol=1e-7)


def test_banded_backward_accepts_stride0_grad_and_kv_views():
    q, k, v, _, cu = make_inputs([5, 17], 2, 2, 16, torch.float64, seed=11)
    kv = torch.stack([k, v]).requires_grad_()                 # k, v as views of one tensor
    qq = q.clone().requires_grad_()
    reference_multi_source_attention(qq, kv[0], kv[1], cu, window=2, scale=0.3).sum().backward()
    qd, kvd = q.clone().requires_grad_(), kv.detach().clone().requires_grad_()
    naive_multi_source_attention(qd, kvd[0], kvd[1], cu, window=2, scale=0.3).sum().backward()
    assert rel_err(qq.grad, qd.grad) < 1e-12 and rel_err(kv.grad, kvd.grad) < 1e-12


def test_key_range_stays_in_the_conversation_and_the_window():
    lo, hi = key_range(cu_seqlens_from([1, 4, 3]), 8, 1)
    assert lo.tolist() == [0, 1, 1, 2, 3, 5, 5, 6]
    assert hi.tolist() == [0, 2, 3, 4, 4, 6, 7, 7]


def test_whole_conversation_path_is_taken_when_the_window_reaches_across(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "banded_attention", lambda *a: calls.append(a))
    q, k, v, _, cu = make_inputs([5, 9], 1, 1, 8, torch.float64, seed=2)
    reference_multi_source_attention(q, k, v, cu, window=8)       # 8 >= 9 - 1: every key is in reach
    reference_multi_source_attention(q, k, v, cu, window=None)
    assert not calls
    reference_multi_source_attention(q, k, v, cu, window=7)
    assert len(calls) == 1


def test_banded_backward_touches_each_key_block_a_bounded_number_of_times(monkeypatch):
    """The property that makes the backward linear: dk, dv are written by slice adds over the chunk's own
    key rows (never a full-size gradient per block, which made the previous reference quadratic)."""
    sizes = []
    real_add = torch.Tensor.add_

    def spy(self, other, *a, **kw):
        sizes.append(other.numel())
        return real_add(self, other, *a, **kw)

    monkeypatch.setattr(reference, "CHUNK_SCORES", 1)
    q, k, v, do, cu = make_inputs([600], 1, 1, 4, torch.float64, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = reference_multi_source_attention(q, k, v, cu, window=8)
    monkeypatch.setattr(torch.Tensor, "add_", spy)
    o.backward(do)
    block = reference.query_block(8)
    assert sizes and max(sizes) <= (1 + 2 * -(-8 // block)) * block * 4   # one chunk's band of rows x H x D


def test_windowed_model_recomputes_to_the_same_gradients():
    """CMATH with a window on the long-batch path (every branch, reconstruction and fusion recomputed in
    the backward) gives the gradients of the plain path; the banded attention is part of what is redone."""
    from cmath_mer.model.cmath import CMATH

    from helpers import random_batch, small_config
    torch.manual_seed(8)
    plain = CMATH(small_config(dropout=0.1, recompute_from=None, window=3))
    recomputed = CMATH(small_config(dropout=0.1, recompute_from=1, window=3))
    recomputed.load_state_dict(plain.state_dict())
    batch = random_batch([6, 13, 40], seed=5)
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(99)                                              # the same dropout masks
        model(batch, seed=4).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
