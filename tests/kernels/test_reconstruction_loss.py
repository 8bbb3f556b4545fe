"""The fused reconstruction loss (KERNELS.md section 2) against the PyTorch reference and float64, under the
Triton interpreter: loss and every gradient, odd sizes, NaN-poisoned outputs, gradcheck, dispatch, and the
promise that the (T, M) reconstruction is never allocated."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_rel_close, needs_triton, reconstruction_inputs

pytestmark = needs_triton

TOL_F64 = {torch.float32: 1e-5, torch.float16: 5e-3}
TOL_REF = {torch.float32: 1e-5, torch.float16: 5e-3}

SHAPES = [  # (T, M, K): single row, odd widths, a block and a block + 1 of rows, K chunk boundaries
    (1, 37, 16),
    (7, 300, 64),
    (64, 37, 16),
    (65, 301, 64),
    (130, 37, 200),   # one 256-wide K chunk in the rows kernel, a K loop in the cols kernel
    (7, 37, 300),     # K loop in both kernels
]


_inputs = reconstruction_inputs


def _float64_truth(h, w, b, target, g_out):
    """Loss and closed-form gradients in float64, independent of both implementations."""
    h, w, b, target = (x.double() for x in (h, w, b, target))
    T, M = target.shape
    r = h @ w.t() + b - target
    scale = 2.0 * g_out / (T * M)
    return (r ** 2).sum() / (T * M), scale * r @ w, scale * r.t() @ h, scale * r.sum(0)


def _run(fn, h, w, b, target, g_out):
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = fn(*leaves, target)
    grads = torch.autograd.grad(loss, leaves, grad_outputs=torch.tensor(g_out, dtype=loss.dtype))
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,M,K", SHAPES)
def test_loss_and_grads_match_reference_and_float64(T, M, K, dtype, nan_poison):
    from cmath_mer.kernels import naive_reconstruction_loss
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    h, w, b, target = _inputs(T, M, K, dtype, seed=T * 1000 + M * 10 + K)
    # fp16 gradients of a mean over T*M elements underflow in any implementation; scale the seed gradient
    # as a loss scaler would, so the comparison measures the kernel and not fp16's subnormal range.
    g_out = float(T * M) / 8 if dtype == torch.float16 else 1.0
    loss, grads = _run(fused_reconstruction_loss, h, w, b, target, g_out)
    truth = _float64_truth(h, w, b, target, g_out)
    ref_loss, ref_grads = _run(naive_reconstruction_loss, h, w, b, target, g_out)
    for name, out, t64, ref in zip(("loss", "dh", "dW", "db"), (loss, *grads), truth, (ref_loss, *ref_grads)):
        assert out.dtype == dtype
        assert_rel_close(f"{name} vs float64", out, t64, TOL_F64[dtype])
        assert_rel_close(f"{name} vs reference", out, ref, TOL_REF[dtype])


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_partial_requires_grad_and_no_grad_forward(needs, nan_poison):
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    h, w, b, target = _inputs(33, 45, 16, torch.float32, seed=7)
    truth = _float64_truth(h, w, b, target, 1.0)
    leaves = [x.clone().requires_grad_(n) for x, n in zip((h, w, b), needs)]
    loss = fused_reconstruction_loss(*leaves, target)
    wanted = [x for x in leaves if x.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted))
    for x, n, t in zip(leaves, needs, truth[1:]):
        if n:
            assert_rel_close("grad", next(grads), t, 1e-5)
    with torch.no_grad():
        assert_rel_close("no-grad loss", fused_reconstruction_loss(h, w, b, target), truth[0], 1e-5)


def test_stride0_grad_output_and_noncontiguous_inputs(nan_poison):
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    h, w, b, target = _inputs(20, 37, 16, torch.float32, seed=3)
    hw = torch.cat([h, h], 1)[:, :h.shape[1]].detach().requires_grad_()   # a strided (non-contiguous) leaf
    w_t = w.t().contiguous().t().requires_grad_()                         # a transposed one
    loss = fused_reconstruction_loss(hw, w_t, b.requires_grad_(), target.t().contiguous().t())
    (loss.expand(3, 4) * 1.0).sum().backward()                   # grad_output reaches backward as 12x
    truth = _float64_truth(h, w, b, target, 12.0)
    for name, out, t in zip(("dh", "dW", "db"), (hw.grad, w_t.grad, b.grad), truth[1:]):
        assert_rel_close(name, out, t, 1e-5)


def test_deterministic_bitwise():
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    h, w, b, target = _inputs(130, 37, 16, torch.float32, seed=11)
    runs = [_run(fused_reconstruction_loss, h, w, b, target, 1.0) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for g0, g1 in zip(runs[0][1], runs[1][1]):
        assert torch.equal(g0, g1)


def test_gradcheck_float64_triton_and_reference():
    from cmath_mer.kernels import naive_reconstruction_loss
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    h, w, b, target = _inputs(3, 5, 4, torch.float64, seed=5)
    for fn in (fused_reconstruction_loss, naive_reconstruction_loss):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        assert torch.autograd.gradcheck(lambda *xs: fn(*xs, target), leaves, eps=1e-6, atol=1e-8)


class _RecordShapes(TorchDispatchMode):
    """Every tensor a torch op (Python or C++) creates while active, as (numel, op). In-place ops (copy_,
    set_, fill_: the interpreter copies kernel arguments in and out this way) and views allocate nothing."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.__name__.split(".")[0].endswith("_"):
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numels.append((t.numel(), str(func)))
        return out


def test_never_allocates_the_reconstruction(monkeypatch):
    from cmath_mer.kernels import naive_reconstruction_loss
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    T, M, K = 130, 301, 16          # T * M = 39130, larger than every other buffer (dh: 2080, dW: 4816)
    h, w, b, target = _inputs(T, M, K, torch.float32, seed=1)
    seen = []
    for name in ("empty", "zeros", "empty_like", "zeros_like", "full", "ones", "empty_strided"):
        orig = getattr(torch, name)

        def spy(*args, _orig=orig, **kwargs):
            out = _orig(*args, **kwargs)
            seen.append(out.numel())
            return out
        monkeypatch.setattr(torch, name, spy)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    with _RecordShapes() as rec:
        loss = fused_reconstruction_loss(*leaves, target)
        loss.backward()
    biggest = max(seen + [n for n, _ in rec.numels])
    assert seen, "the spy saw no allocation at all"
    assert biggest < T * M, f"an allocation of {biggest} elements >= T*M = {T * M}: {rec.numels}"
    with _RecordShapes() as rec_ref:             # the check itself sees the reference's (T, M) tensor
        naive_reconstruction_loss(*leaves, target).backward()
    assert max(n for n, _ in rec_ref.numels) >= T * M


def test_public_dispatch_uses_the_kernel(monkeypatch):
    import cmath_mer.kernels as K
    import cmath_mer.kernels.reconstruction.fused as fused
    calls = []
    real = fused.fused_reconstruction_loss

    def spy(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(fused, "fused_reconstruction_loss", spy)
    h, w, b, target = _inputs(9, 37, 16, torch.float32, seed=2)
    out = K.reconstruction_loss(h, w, b, target, backend="triton")
    assert calls == [1]
    assert_rel_close("dispatched loss", out, K.naive_reconstruction_loss(h, w, b, target), 1e-5)
    K.reconstruction_loss(h, w, b, target, backend="torch")
    assert calls == [1]


def test_bad_shapes_are_rejected():
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    h, w, b, target = _inputs(4, 6, 8, torch.float32, seed=0)
    with pytest.raises(ValueError):
        fused_reconstruction_loss(h, w[:, :4], b, target)
    with pytest.raises(ValueError):
        fused_reconstruction_loss(h, w, b, target[:, :5])


def test_double_backward_is_refused_not_silently_zero():
    """A GPU-only fault: the gradients are computed in the forward; a second derivative through them would be
    zero. It must raise."""
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    h, w, b, target = _inputs(5, 7, 16, torch.float32, seed=2)
    h.requires_grad_()
    (dh,) = torch.autograd.grad(fused_reconstruction_loss(h, w, b, target), h, create_graph=True)
    assert dh.requires_grad                            # part of the graph, so the second backward is loud
    with pytest.raises(RuntimeError, match="differentiate"):
        dh.pow(2).sum().backward()


def test_fp16_dh_keeps_small_gradients_until_the_loss_scale():
    """A GPU-only fault: with a small residual, 2/M r W lies below fp16's normal range; stored in fp16 before
    the loss scale is applied it rounds to subnormals/zero. The scaled gradient must match float64."""
    from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
    T, M, K = 4, 300, 16
    g = torch.Generator().manual_seed(5)
    h = torch.randn(T, K, generator=g, dtype=torch.float64)
    w = torch.randn(M, K, generator=g, dtype=torch.float64) * 1e-2 / K ** 0.5
    b = torch.zeros(M, dtype=torch.float64)
    h, w, b = (x.half() for x in (h, w, b))
    target = (h.double() @ w.double().t() + 1e-4 * torch.randn(T, M, generator=g, dtype=torch.float64)).half()
    g_out = 16384.0                                   # a loss scale: the final dh is in fp16's normal range
    loss, (dh, dw, db) = _run(fused_reconstruction_loss, h, w, b, target, g_out)
    truth = _float64_truth(h, w, b, target, g_out)
    assert truth[1].abs().max() > 6.1e-5 * 4          # the true scaled dh is a normal fp16 number
    assert (truth[1] * T / g_out).abs().max() < 6.1e-5   # ... and the unscaled one is not
    assert_rel_close("dh", dh, truth[1], 5e-3)

