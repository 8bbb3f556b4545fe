"""multi_source_attention with k, v as lists of S source tensors (KERNELS.md, "No copies"): the list form equals the
(S, T, H, D) tensor form and the float64 definition on both backends, forward and every gradient; strided views
of each source's own kv projection are read in place (by the Triton op, and as MultiSourceAttention hands them
over: no torch.stack); other layouts still give the right answer; more sources than the kernels take is a clear
error."""
from __future__ import annotations

import pytest
import torch
from test_attention import SMALL, use_blocks

from cmath_mer.kernels import multi_source_attention
from cmath_mer.kernels.attention.naive import naive_multi_source_attention
from cmath_mer.model import cma_transformer
from cmath_mer.model.cma_transformer import MultiSourceAttention

from helpers import assert_rel_close, cu_seqlens_from, needs_triton

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
LENGTHS = [1, 6, 17, 9]                 # 1, odd, a 16-row block + 1 (the SMALL blocks of the Triton kernels)


def projections(lengths, S, H, D, dtype, seed):
    """q (T, H, D), S leaf kv projections (T, 2, H, D) and the upstream gradient do (T, H, D)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, H, D, generator=g).to(dtype).requires_grad_()
    proj = [torch.randn(T, 2, H, D, generator=g).to(dtype).requires_grad_() for _ in range(S)]
    return q, proj, torch.randn(T, H, D, generator=g).to(dtype), cu_seqlens_from(lengths)


def list_form(q, proj, do, cu, **kw):
    """o and (dq, dk, dv) with k, v the strided views proj[s][:, 0], proj[s][:, 1]; dk, dv (S, T, H, D)."""
    k, v = [p[:, 0] for p in proj], [p[:, 1] for p in proj]                # S x (T, H, D), stride (2HD, D, 1)
    assert not k[0].is_contiguous()
    o = multi_source_attention(q, k, v, cu, **kw)
    dq, *dproj = torch.autograd.grad(o, [q, *proj], do)
    return o, dq, torch.stack([g[:, 0] for g in dproj]), torch.stack([g[:, 1] for g in dproj])


def tensor_form(q, proj, do, cu, **kw):
    """The same with k, v as contiguous (S, T, H, D) tensors."""
    q = q.detach().clone().requires_grad_()
    k = torch.stack([p[:, 0] for p in proj]).detach().requires_grad_()
    v = torch.stack([p[:, 1] for p in proj]).detach().requires_grad_()
    o = multi_source_attention(q, k, v, cu, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def float64_definition(q, proj, do, cu, window):
    q = q.detach().double().requires_grad_()
    k = torch.stack([p[:, 0] for p in proj]).detach().double().requires_grad_()
    v = torch.stack([p[:, 1] for p in proj]).detach().double().requires_grad_()
    o = naive_multi_source_attention(q, k, v, cu, window=window)
    return (o, *torch.autograd.grad(o, (q, k, v), do.double()))


def _backend(request, backend, monkeypatch):
    if backend == "triton":
        request.getfixturevalue("nan_poison")      # unwritten kernel outputs show as NaN
        pytest.importorskip("triton")
        from cmath_mer.kernels.attention import fused
        use_blocks(monkeypatch, fused, SMALL)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("window", [None, 0, 1, 3, 50])
def test_list_form_equals_tensor_form_and_float64(request, monkeypatch, backend, S, window):
    _backend(request, backend, monkeypatch)
    seed = 100 * S + (window or 0) + 7 * (backend == "triton")
    q, proj, do, cu = projections(LENGTHS, S, 2, 16, torch.float32, seed=seed)
    got = list_form(q, proj, do, cu, window=window, backend=backend)
    same = tensor_form(q, proj, do, cu, window=window, backend=backend)
    truth = float64_definition(q, proj, do, cu, window)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), got, same, truth):
        assert torch.equal(a, b), f"{name}: list form != tensor form"    # one kernel, one order of operations
        assert_rel_close(f"{name} vs float64", a, c, TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("window", [None, 2])
def test_list_form_fp16_matches_float64(request, monkeypatch, window):
    _backend(request, "triton", monkeypatch)
    q, proj, do, cu = projections([5, 16, 1], 2, 1, 32, torch.float16, seed=31 + (window or 0))
    got = list_form(q, proj, do, cu, window=window, backend="triton")
    for name, a, c in zip(("o", "dq", "dk", "dv"), got, float64_definition(q, proj, do, cu, window)):
        assert a.dtype == torch.float16
        assert_rel_close(f"{name} vs float64", a, c, TOL[torch.float16])


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_sources_of_different_layouts(request, monkeypatch, backend):
    """A contiguous source, a strided view, and one whose last dim is not contiguous (heads x rows
    transposed): the op takes them all (copying the odd ones out, see fused._layout) and stays exact."""
    _backend(request, backend, monkeypatch)
    g = torch.Generator().manual_seed(41)
    T, H, D = sum(LENGTHS), 2, 16
    cu = cu_seqlens_from(LENGTHS)
    q = torch.randn(T, H, D, generator=g, requires_grad=True)
    leaves = [torch.randn(T, H, D, generator=g), torch.randn(T, 2, H, D, generator=g),
              torch.randn(D, H, T, generator=g)]
    leaves = [x.requires_grad_() for x in leaves]
    k = [leaves[0], leaves[1][:, 0], leaves[2].permute(2, 1, 0)]          # strides (HD, D, 1), (2HD, D, 1), (1, T, HT)
    v = [leaves[1][:, 1], leaves[0] * 2, leaves[2].permute(2, 1, 0) + 1]
    do = torch.randn(T, H, D, generator=g)
    o = multi_source_attention(q, k, v, cu, window=3, backend=backend)
    grads = torch.autograd.grad(o, [q, *leaves], do)
    k64 = [x.detach().double().requires_grad_() for x in (q, *leaves)]
    q64, l0, l1, l2 = k64
    want = naive_multi_source_attention(q64, torch.stack([l0, l1[:, 0], l2.permute(2, 1, 0)]),
                           torch.stack([l1[:, 1], l0 * 2, l2.permute(2, 1, 0) + 1]), cu, window=3)
    want_grads = torch.autograd.grad(want, k64, do.double())
    for name, a, b in zip(("o", "dq", "d_contiguous", "d_view", "d_transposed"), (o, *grads), (want, *want_grads)):
        assert_rel_close(name, a, b, TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("S", [1, 2, 3])
def test_triton_op_reads_the_views_in_place(monkeypatch, S):
    """The launchers get the very tensors the caller passed (same storage address, same strides): no stack,
    no contiguous copy, forward or backward; the gradients come back as slices of one (S, T, H, D) buffer."""
    from cmath_mer.kernels.attention import fused
    seen = []
    for name in ("attention_forward", "attention_backward"):
        real = getattr(fused, name)

        def spy(q, k, v, *rest, _real=real, _name=name):
            seen.append((_name, [(x.data_ptr(), x.stride()) for x in (*k, *v)]))
            return _real(q, k, v, *rest)
        monkeypatch.setattr(fused, name, spy)
    q, proj, do, cu = projections(LENGTHS, S, 2, 16, torch.float32, seed=S)
    k, v = [p[:, 0] for p in proj], [p[:, 1] for p in proj]
    o = fused.fused_multi_source_attention(q, k, v, cu, window=1)
    dq, *dk = torch.autograd.grad(o, [q, *k], do)
    passed = [(x.data_ptr(), x.stride()) for x in (*k, *v)]
    assert [name for name, _ in seen] == ["attention_forward", "attention_backward"]
    assert all(ptrs == passed for _, ptrs in seen)
    assert all(g.data_ptr() == dk[0].data_ptr() + s * g.numel() * g.element_size() for s, g in enumerate(dk))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("S", [1, 2, 3])
def test_multi_source_attention_hands_over_projection_views(monkeypatch, backend, S):
    """MultiSourceAttention passes each source's k and v as views of that source's own kv projection output
    (k at its first element, v d elements on): were the projections stacked (or copied), the addresses would
    differ. On the Triton backend the addresses are taken at the launcher, so the whole path is copy-free."""
    d, H = 32, 4
    attn = MultiSourceAttention(d, H, S, dropout=0.0, window=2, backend=backend)
    outputs = []
    for proj in attn.kv:
        proj.register_forward_hook(lambda mod, args, out: outputs.append(out))
    received = []
    if backend == "triton":
        from cmath_mer.kernels.attention import fused
        real = fused.attention_forward

        def spy(q, k, v, *rest):
            received.append((k, v))
            return real(q, k, v, *rest)
        monkeypatch.setattr(fused, "attention_forward", spy)
    else:
        real = cma_transformer.multi_source_attention

        def spy(q, k, v, *args, **kwargs):
            received.append((k, v))
            return real(q, k, v, *args, **kwargs)
        monkeypatch.setattr(cma_transformer, "multi_source_attention", spy)
    g = torch.Generator().manual_seed(S)
    cu = cu_seqlens_from([3, 8])
    x = torch.randn(11, d, generator=g)
    sources = [torch.randn(11, d, generator=g) for _ in range(S)]
    attn(x, sources, cu).sum().backward()
    (k, v), = received
    assert len(outputs) == len(k) == len(v) == S
    for out, ks, vs in zip(outputs, k, v):                                 # out: (T, 2d) per source
        assert ks.data_ptr() == out.data_ptr() and vs.data_ptr() == out.data_ptr() + d * out.element_size()
        assert ks.shape == (11, H, d // H) and ks.stride() == vs.stride() == (2 * d, d // H, 1)


@needs_triton
def test_more_sources_than_the_kernels_take_is_a_clear_error():
    from cmath_mer.kernels.attention import fused
    q, proj, _, cu = projections([4, 3], fused.MAX_SOURCES + 1, 1, 16, torch.float32, seed=0)
    k, v = [p[:, 0] for p in proj], [p[:, 1] for p in proj]
    with pytest.raises(ValueError, match=f"1 to {fused.MAX_SOURCES}"):
        multi_source_attention(q, k, v, cu, backend="triton")
    with pytest.raises(ValueError, match=f"1 to {fused.MAX_SOURCES}"):
        fused.attention_op(q, k, v, cu, -1, 0.25)
    o = multi_source_attention(q, k, v, cu, backend="torch")               # the reference takes any S
    assert_rel_close("o", o, naive_multi_source_attention(q, torch.stack(k), torch.stack(v), cu), TOL[torch.float32])
