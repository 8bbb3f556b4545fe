"""The cuBLAS row-chunk reconstruction loss (kernels/reconstruction/chunked.py): loss and gradients against
float64, chunk boundaries, no (T, M) temporary, the op contract (opcheck), and the CMATH_RECONSTRUCTION switch."""
from __future__ import annotations

import pytest
import torch

from cmath_mer.kernels import naive_reconstruction_loss, reconstruction_loss
from cmath_mer.kernels.reconstruction import chunked

from helpers import assert_rel_close, reconstruction_inputs

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


_inputs = reconstruction_inputs


def _loss_and_grads(fn, h, w, b, t):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    loss = fn(*leaves, t)
    return [loss, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("T,M,K,rows", [(1, 3, 5, 64), (130, 17, 16, 64), (257, 80, 33, 100), (64, 64, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_and_gradients_match_float64_across_chunk_boundaries(T, M, K, rows, dtype, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * M * rows)      # `rows` rows per chunk (at least 64)
    h, w, b, t = _inputs(T, M, K, dtype, seed=int(torch.randint(0, 10_000, ())))
    got = _loss_and_grads(chunked.chunked_reconstruction_loss, h, w, b, t)
    ref = _loss_and_grads(naive_reconstruction_loss, *(x.double() for x in (h, w, b)), t.double())
    for name, a, r in zip(("loss", "dh", "dW", "db"), got, ref):
        assert a.dtype == dtype, name
        assert_rel_close(name, a, r, TOL[dtype])


def test_no_temporary_of_the_whole_reconstruction(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 40 * 64)        # 64-row chunks of a (300, 40) target
    shapes = []
    real = torch.addmm

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch, "addmm", spy)
    h, w, b, t = _inputs(300, 40, 8, torch.float32, seed=1)
    _loss_and_grads(chunked.chunked_reconstruction_loss, h, w, b, t)
    assert shapes and max(s[0] for s in shapes) == 64 and len(shapes) == 5        # ceil(300 / 64) chunks


def test_the_op_passes_opcheck():
    h, w, b, t = _inputs(70, 24, 16, torch.float32, seed=2)
    rg = [x.clone().requires_grad_() for x in (h, w, b)]
    torch.library.opcheck(chunked.chunked_reconstruction_op, (*rg, t, True, True))
    torch.library.opcheck(chunked.chunked_reconstruction_op, (h, w, b, t, False, False))


def test_mixed_dtypes_under_cpu_autocast():
    h, w, b, t = _inputs(90, 20, 16, torch.float32, seed=3)
    h = h.to(torch.float16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked.chunked_reconstruction_loss(h, w, b, t)
    assert loss.dtype == torch.float32
    loss.backward()
    ref = naive_reconstruction_loss(h.detach().double(), w.double(), b.double(), t.double())
    assert_rel_close("loss", loss, ref, 5e-3)


def test_the_switch_picks_the_chunked_op_on_the_triton_backend(monkeypatch):
    pytest.importorskip("triton")
    calls = []
    import cmath_mer.kernels as kernels
    real = chunked.chunked_reconstruction_loss
    # the public op calls the name it imported (kernels/__init__): patched there
    monkeypatch.setattr(kernels, "chunked_reconstruction_loss", lambda *a: calls.append(1) or real(*a))
    h, w, b, t = _inputs(20, 8, 16, torch.float32, seed=4)
    monkeypatch.setenv("CMATH_RECONSTRUCTION", "chunked")
    chunked_loss = reconstruction_loss(h, w, b, t, backend="triton")
    assert calls == [1]
    monkeypatch.setenv("CMATH_RECONSTRUCTION", "kernel")
    kernel_loss = reconstruction_loss(h, w, b, t, backend="triton")
    assert calls == [1]
    assert_rel_close("loss", chunked_loss, kernel_loss, 1e-5)
    monkeypatch.setenv("CMATH_RECONSTRUCTION", "nope")
    with pytest.raises(ValueError, match="CMATH_RECONSTRUCTION"):
        reconstruction_loss(h, w, b, t, backend="triton")


def test_auto_runs_the_chunks_on_cuda_and_the_kernels_elsewhere(monkeypatch):
    """The routing rule of the triton backend's reconstruction (docs/KERNELS.md): auto, the default, is the cuBLAS
    row chunks on CUDA and the Triton kernels elsewhere; CMATH_RECONSTRUCTION overrides it on any device."""
    from cmath_mer.kernels.backend import reconstruction_impl
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("CMATH_RECONSTRUCTION", raising=False)
    assert [reconstruction_impl(d) for d in (cuda, cpu, None)] == ["chunked", "kernel", "kernel"]
    monkeypatch.setenv("CMATH_RECONSTRUCTION", "auto")
    assert [reconstruction_impl(d) for d in (cuda, cpu)] == ["chunked", "kernel"]
    for name in ("kernel", "chunked"):
        monkeypatch.setenv("CMATH_RECONSTRUCTION", name)
        assert [reconstruction_impl(d) for d in (cuda, cpu)] == [name, name]


def test_the_public_op_asks_the_rule_with_the_inputs_device(monkeypatch):
    """With a stand-in for the device check (the rule answers as for CUDA), the public op on the triton backend
    runs the chunks; the rule is asked about the inputs' device."""
    pytest.importorskip("triton")
    import cmath_mer.kernels as kernels
    from cmath_mer.kernels.backend import reconstruction_impl
    monkeypatch.delenv("CMATH_RECONSTRUCTION", raising=False)
    asked, ran = [], []
    monkeypatch.setattr(kernels, "reconstruction_impl",
                        lambda device: asked.append(device) or reconstruction_impl(torch.device("cuda", 0)))
    real = chunked.chunked_reconstruction_loss
    monkeypatch.setattr(kernels, "chunked_reconstruction_loss", lambda *a: ran.append(1) or real(*a))
    h, w, b, t = _inputs(int(torch.randint(5, 90, ())), 12, 16, torch.float32, seed=int(torch.randint(0, 999, ())))
    got = _loss_and_grads(lambda *x: reconstruction_loss(*x, backend="triton"), h, w, b, t)
    assert asked == [h.device] and ran == [1]
    want = _loss_and_grads(naive_reconstruction_loss, h.double(), w.double(), b.double(), t.double())
    for name, a, c in zip(("loss", "dh", "dW", "db"), got, want):
        assert_rel_close(name, a, c, TOL[torch.float32])


def test_the_target_is_folded_into_the_projection_gemm(monkeypatch):
    """Each chunk's residual is one addmm(target_c, h_c, W^T, beta=-1): the target enters the GEMM, not a separate
    subtraction over a (chunk, M) projection."""
    calls = []
    real = torch.addmm

    def spy(inp, *args, **kwargs):
        calls.append((inp.data_ptr(), kwargs.get("beta")))
        return real(inp, *args, **kwargs)
    monkeypatch.setattr(torch, "addmm", spy)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 24 * 64)                     # 64-row chunks
    T = int(torch.randint(65, 300, ()))
    h, w, b, t = _inputs(T, 24, 16, torch.float32, seed=int(torch.randint(0, 999, ())))
    _loss_and_grads(chunked.chunked_reconstruction_loss, h, w, b, t)
    starts = [t[r0:].data_ptr() for r0 in range(0, T, 64)]
    assert calls == [(p, -1) for p in starts]
