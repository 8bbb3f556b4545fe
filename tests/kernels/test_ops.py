"""The three ops as first-class PyTorch ops: torch.library custom ops that pass opcheck, trace under
torch.compile(fullgraph=True) with no graph break, accept what an autocast region hands them, launch without a
host synchronisation, run every launch under the inputs' device, and the GPU faults the interpreter cannot
show (window sentinel overflow, unsupported head dims, cu_seqlens on another device, TF32 in fp32 dots)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cmath_mer.kernels as K
from cmath_mer.kernels import reference_ops
from cmath_mer.model.cmath import CMATH

from helpers import (
    assert_compiled_step_equals_eager,
    assert_rel_close,
    cu_seqlens_from,
    needs_triton,
    random_batch,
    small_config,
)

pytestmark = needs_triton


def _attn_inputs(lengths=(3, 1, 6), S=2, H=2, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, H, D, generator=g, dtype=dtype)
    kv = torch.randn(S, T, 2, H, D, generator=g, dtype=dtype)
    return q, kv[:, :, 0], kv[:, :, 1], cu_seqlens_from(list(lengths))      # k, v: strided views


def _recon_inputs(T=9, M=21, K_=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, K_, generator=g, dtype=dtype), torch.randn(M, K_, generator=g, dtype=dtype) / 4,
            torch.randn(M, generator=g, dtype=dtype), torch.randn(T, M, generator=g, dtype=dtype))


def _vf_inputs(C=2, T=7, Z=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, T, Z, generator=g, dtype=dtype), torch.randn(C, T, Z, generator=g, dtype=dtype)


def _fused():
    from cmath_mer.kernels.attention import fused as attn
    from cmath_mer.kernels.reconstruction import fused as recon
    from cmath_mer.kernels.variational import fused as vf
    return attn, recon, vf


# ----------------------------------------------------------------------------------------------------------
# opcheck: schema, fake impl, autograd registration, aot_dispatch, for all six ops (Triton under the
# interpreter and the PyTorch references)
# ----------------------------------------------------------------------------------------------------------
def _source_lists(S=2, seed=0):
    """q and the attention ops' Tensor[] k, v: S strided views (T, H, D) of S leaf projections (T, 2, H, D), as
    the model hands them over (read in place)."""
    q, _, _, cu = _attn_inputs(S=S, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    proj = [torch.randn(q.shape[0], 2, *q.shape[1:], generator=g).requires_grad_() for _ in range(S)]
    return q.clone().requires_grad_(), [p[:, 0] for p in proj], [p[:, 1] for p in proj], cu


def _opcheck_cases():
    attn, recon, vf = _fused()
    h, w, b, t = _recon_inputs()
    mu, lv = _vf_inputs()
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)      # the ops take the seed as a tensor

    def rg(*xs):
        return [x.clone().requires_grad_() for x in xs]
    return [
        ("attention_triton", attn.attention_op, (*_source_lists(S=2), 1, 0.3)),
        ("attention_triton_nowindow_S1", attn.attention_op, (*_source_lists(S=1), -1, 0.25)),
        ("attention_triton_S3", attn.attention_op, (*_source_lists(S=3), 2, 0.25)),
        # a host bound on the lengths (3, 1, 6): the one-pass backward
        ("attention_triton_onepass", attn.attention_op, (*_source_lists(S=2), 1, 0.3, 6)),
        ("attention_ref", reference_ops.attention_ref_op, (*_source_lists(S=2), 2, 0.25)),
        ("attention_ref_nowindow_S3", reference_ops.attention_ref_op, (*_source_lists(S=3), -1, 0.3)),
        ("reconstruction_triton", recon.reconstruction_loss_op, (*rg(h, w, b), t, True, True)),
        ("reconstruction_triton_nograd", recon.reconstruction_loss_op, (h, w, b, t, False, False)),
        ("variational_triton", vf.variational_fusion_op, (*rg(mu, lv), seed, True, False)),
        ("variational_triton_mean", vf.variational_fusion_op, (*rg(mu, lv), seed, False, True)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(index):
    name, op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_reference_op_gradients_equal_the_reference():
    """opcheck checks the autograd registration, not the numbers: the attention reference op's recomputing
    backward must give the reference function's own gradients (the CPU op keeping SDPA's lse: test_compile)."""
    q, k, v, cu = _attn_inputs(dtype=torch.float64)
    cases = [
        (lambda q, k, v: reference_ops.attention_ref_op(q, list(k.unbind(0)), list(v.unbind(0)), cu, 1, 0.3),
         lambda q, k, v: K.reference_multi_source_attention(q, k, v, cu, window=1, scale=0.3), (q, k, v)),
    ]
    for op, ref, inputs in cases:
        a = [x.clone().requires_grad_() for x in inputs]
        r = [x.clone().requires_grad_() for x in inputs]
        out_a, out_r = op(*a), ref(*r)
        torch.testing.assert_close(out_a, out_r)
        for ga, gr in zip(torch.autograd.grad(out_a.sum(), a), torch.autograd.grad(out_r.sum(), r)):
            torch.testing.assert_close(ga, gr)


def test_fake_tensors_give_shapes_without_running_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode
    attn, recon, vf = _fused()
    with FakeTensorMode():
        q = torch.empty(1000, 4, 32)
        k = [torch.empty(1000, 2, 4, 32)[:, i] for i in range(2)]          # Tensor[]: S strided (T, H, D)
        cu = torch.tensor([0, 400, 1000], dtype=torch.int32)
        o, lse = attn.attention_op(q, k, k, cu, 5, 0.2)
        dq, dk, dv = attn.attention_backward_op(q, k, k, o, lse, o, cu, 5, 0.2)
        dq1, dk1, dv1 = attn.attention_backward_op(q, k, k, o, lse, o, cu, 5, 0.2, 600)     # one-pass bound
        loss, dh, dw, db = recon.reconstruction_loss_op(torch.empty(1000, 64), torch.empty(80, 64), torch.empty(80),
                                                        torch.empty(1000, 80), True, True)
        outs = vf.variational_fusion_op(torch.empty(3, 1000, 8), torch.empty(3, 1000, 8),
                                        torch.zeros(1, dtype=torch.int64), True, True)
    assert o.shape == (1000, 4, 32) and lse.shape == (4, 1000) and dk.shape == dv.shape == (2, 1000, 4, 32)
    assert dq1.shape == dq.shape and dk1.shape == dv1.shape == dk.shape
    assert loss.shape == () and dh.shape == (1000, 64) and dw.shape == (80, 64) and db.shape == (80,)
    assert [tuple(x.shape) for x in outs] == [(1000, 8)] * 3 + [()] * 2


# ----------------------------------------------------------------------------------------------------------
# no host synchronisation in the Triton op path (CUDA-graph capturable)
# ----------------------------------------------------------------------------------------------------------
class _HostReads(TorchDispatchMode):
    """Records every read of a tensor value into Python (.item(), .tolist(), int(t), bool(t) all dispatch
    aten._local_scalar_dense), the host synchronisation a CUDA device would stall on."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_interpreter_reads(monkeypatch):
    """The interpreter itself copies kernel arguments to numpy; only the launchers' own code is under test, so
    the kernel calls are replaced by no-ops while the mode records."""
    import triton
    monkeypatch.setattr(triton.runtime.interpreter.InterpretedFunction, "run",
                        lambda self, *a, **k: None)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("lengths,max_seqlen", [((5, 70, 1), None), ((5, 7, 1), 7)])   # max_seqlen: one pass
def test_attention_launcher_never_reads_device_values(no_interpreter_reads, window, lengths, max_seqlen):
    attn, _, _ = _fused()
    q, k, v, cu = _attn_inputs(lengths=lengths, D=32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with _HostReads() as rec:
        o = attn.fused_multi_source_attention(q, k, v, cu, window=window, max_seqlen=max_seqlen)
        o.sum().backward()
    assert rec.reads == [], rec.reads


def test_reconstruction_and_fusion_launchers_never_read_device_values(no_interpreter_reads):
    _, recon, vf = _fused()
    h, w, b, t = (x.requires_grad_() if i < 3 else x for i, x in enumerate(_recon_inputs()))
    mu, lv = (x.requires_grad_() for x in _vf_inputs())
    with _HostReads() as rec:
        recon.fused_reconstruction_loss(h, w, b, t).backward()
        sum(o.sum() for o in vf.fused_variational_fusion(mu, lv, seed=1, sample=True)).backward()
    assert rec.reads == [], rec.reads


# ----------------------------------------------------------------------------------------------------------
# device guard: every launch runs with the inputs' device current
# ----------------------------------------------------------------------------------------------------------
def test_every_launcher_runs_under_the_inputs_device(monkeypatch):
    """A GPU-only fault: on a GPU the guard makes the tensors' device current (torch.cuda.device); here the
    guard's context is recorded for each launcher entry, which must name the inputs' device."""
    from cmath_mer.kernels import utils
    entered = []
    real = utils.device_context

    def spy(device):
        entered.append(device)
        return real(device)
    monkeypatch.setattr(utils, "device_context", spy)
    attn, recon, vf = _fused()
    q, k, v, cu = _attn_inputs()
    q.requires_grad_()
    attn.fused_multi_source_attention(q, k, v, cu).sum().backward()
    h, w, b, t = _recon_inputs()
    recon.fused_reconstruction_loss(h.requires_grad_(), w, b, t).backward()
    mu, lv = _vf_inputs()
    vf.fused_variational_fusion(mu.requires_grad_(), lv, seed=0, sample=True)[0].sum().backward()
    assert len(entered) == 5 and all(d == torch.device("cpu") for d in entered)   # 2 + 1 + 2 launchers
    assert utils.device_context(torch.device("cpu")).__class__ is contextlib.nullcontext


def test_cuda_guard_selects_the_tensor_device(monkeypatch):
    from cmath_mer.kernels import utils
    seen = []

    class FakeDevice:
        def __init__(self, index):
            seen.append(index)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    utils.device_context(torch.device("cuda", 1))
    assert seen == [1]


# ----------------------------------------------------------------------------------------------------------
# faults: window sentinel, head dim, device of cu_seqlens, TF32
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [2**31 - 1, 2**31 - 40, 10**12])
def test_huge_window_is_no_window(window):
    """A GPU-only fault: q0 + BM + W overflowed int32 and the output was all zeros."""
    attn, _, _ = _fused()
    q, k, v, cu = _attn_inputs(lengths=(70, 3), D=16)
    got = attn.fused_multi_source_attention(q, k, v, cu, window=window)
    want = attn.fused_multi_source_attention(q, k, v, cu, window=None)
    assert torch.equal(got, want)


def test_head_dim_over_128_is_refused():
    attn, _, _ = _fused()
    q, k, v, cu = _attn_inputs(D=144)
    with pytest.raises(ValueError, match="head dim 144"):
        attn.fused_multi_source_attention(q, k, v, cu)


def test_cu_seqlens_on_another_device_is_a_clear_error():
    """A GPU-only fault: a CPU cu_seqlens with CUDA q crashed at launch. Here q lives on 'meta' (no GPU)."""
    attn, _, _ = _fused()
    q, k, v, cu = _attn_inputs()
    with pytest.raises(ValueError, match="one device"):
        attn.fused_multi_source_attention(q.to("meta"), k.to("meta"), v.to("meta"), cu)


def test_fp32_on_gpu_uses_triton_dots_only_when_tf32_is_allowed():
    """A GPU-only fault: fp32 tl.dot runs in TF32 on NVIDIA. fp32 inputs go to the dot kernels only when the
    user allows TF32; 16-bit inputs always; the interpreter (exact) always."""
    from cmath_mer.kernels import utils
    cuda = torch.device("cuda", 0)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not utils.gpu_dots_ok(torch.float32, cuda) and not utils.gpu_dots_ok(torch.float64, cuda)
        assert utils.gpu_dots_ok(torch.bfloat16, cuda) and utils.gpu_dots_ok(torch.float16, cuda)
        assert utils.gpu_dots_ok(torch.float32, torch.device("cpu"))
        torch.backends.cuda.matmul.allow_tf32 = True
        assert utils.gpu_dots_ok(torch.float32, cuda)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("where", ["matmul", "generic"])
def test_tf32_set_through_the_current_api_routes_fp32_to_the_dot_kernels(where):
    """TF32 allowed the recommended way (torch >= 2.9: fp32_precision, for cuBLAS matmuls or for every backend)
    routes fp32 to the dot kernels, "ieee" to the reference; reading the legacy allow_tf32 flag then raises,
    so the routing must not touch it. The settings are restored after."""
    from cmath_mer.kernels import utils
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) is None:
        pytest.skip("this torch has no fp32_precision API")
    cuda = torch.device("cuda", 0)
    saved = (torch.backends.fp32_precision, matmul.fp32_precision)
    target = matmul if where == "matmul" else torch.backends
    try:
        if where == "generic":
            matmul.fp32_precision = "none"          # inherit: an earlier legacy set leaves matmul at "ieee"
        target.fp32_precision = "tf32"
        assert utils.gpu_dots_ok(torch.float32, cuda)
        target.fp32_precision = "ieee"
        assert not utils.gpu_dots_ok(torch.float32, cuda)
        assert utils.gpu_dots_ok(torch.bfloat16, cuda)
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = saved


def test_fp32_reconstruction_matches_float64_on_a_near_exact_fit():
    """A TF32 probe: target = h W^T + b + 1e-3 noise, so the loss is ~1e-6 and any TF32 rounding of
    the projection (~1e-3 relative) would dominate it. Exact under the interpreter; the same test on a GPU
    catches TF32."""
    g = torch.Generator().manual_seed(0)
    T, M, K_ = 40, 37, 64
    h = torch.randn(T, K_, generator=g, dtype=torch.float64)
    w = torch.randn(M, K_, generator=g, dtype=torch.float64) / 8
    b = torch.randn(M, generator=g, dtype=torch.float64)
    target = h @ w.t() + b + 1e-3 * torch.randn(T, M, generator=g, dtype=torch.float64)
    truth = K.naive_reconstruction_loss(h, w, b, target)
    got = K.reconstruction_loss(*(x.float() for x in (h, w, b, target)), backend="triton")
    assert_rel_close("loss", got, truth, 1e-3)


# ----------------------------------------------------------------------------------------------------------
# autocast: the ops accept the mixed dtypes of an autocast region and run in its dtype
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ops_accept_mixed_dtypes_under_cpu_autocast(backend):
    dt = torch.float16                  # the interpreter's bf16 arithmetic is wrong (KERNELS.md): fp16 here
    q, k, v, cu = _attn_inputs(D=16)
    h, w, b, t = _recon_inputs()
    mu, lv = _vf_inputs()
    with torch.autocast("cpu", dtype=dt):
        o = K.multi_source_attention(q.to(dt), k, v, cu, window=1, backend=backend)
        loss = K.reconstruction_loss(h.to(dt), w, b, t, backend=backend)
        outs = K.variational_fusion(mu.to(dt), lv, seed=2, sample=True, backend=backend)
    if backend == "triton":
        assert o.dtype == dt and loss.dtype == torch.float32
        assert [x.dtype for x in outs] == [dt] * 3 + [torch.float32] * 2
    assert_rel_close("attention", o.float(), K.reference_multi_source_attention(q.double(), k.double(), v.double(), cu,
                                                                             window=1), 5e-3)
    assert_rel_close("loss", loss.float(), K.naive_reconstruction_loss(*(x.double() for x in (h, w, b, t))), 5e-3)
    ref = K.naive_variational_fusion(mu.double(), lv.double(), seed=2, sample=True)
    for name, a, r in zip(("z", "mu_f", "logvar_f", "kl_prior", "kl_consistency"), outs, ref):
        assert_rel_close(name, a.float(), r, 5e-3)


def test_mixed_dtypes_outside_autocast_are_refused():
    q, k, v, cu = _attn_inputs()
    h, w, b, t = _recon_inputs()
    with pytest.raises(ValueError, match="autocast"):
        K.multi_source_attention(q.half(), k, v, cu, backend="triton")
    with pytest.raises(TypeError, match="autocast"):
        K.reconstruction_loss(h.half(), w, b, t, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_model_trains_under_cpu_autocast(backend):
    torch.manual_seed(3)
    model = CMATH(small_config(backend=backend, window=2))
    model.train()
    batch = random_batch([3, 9, 1], seed=4)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(batch, seed=5)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    ref = CMATH(small_config(backend="torch", window=2))
    ref.load_state_dict(model.state_dict())
    ref.train()
    assert_rel_close("loss vs fp32", out.loss.detach().float(), ref(batch, seed=5).loss.detach(), 2e-2)


# ----------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the whole CMATH forward and backward, both backends, no graph break
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow          # minutes of compiling; test_compile.py's fullgraph trace stays in the default run
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whole_model_compiles_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    torch.manual_seed(7)
    model = CMATH(small_config(backend=backend, window=2))
    model.train()
    batch = random_batch([4, 9, 1], seed=8)
    assert_compiled_step_equals_eager(model, batch, seed=3)
    explain = torch._dynamo.explain(model)(batch, seed=3)
    assert explain.graph_break_count == 0, explain.break_reasons


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", ["tensor", "list"])
def test_attention_compiles_fullgraph_in_both_forms(backend, form):
    """k, v as (S, T, H, D) tensors (unbound into views before the op) or as lists of strided views, traced with
    no graph break, forward and backward equal to eager."""
    torch._dynamo.reset()
    q, k, v, cu = _source_lists(S=2, seed=5)
    leaves = [x._base if x._base is not None else x for x in (q, k[0], k[1])]     # q, the two projections

    def fn(q, k, v):
        if form == "tensor":
            k, v = torch.stack(k), torch.stack(v)
        return K.multi_source_attention(q, k, v, cu, window=2, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got.square().sum(), leaves)
    want = fn(q, k, v)
    for name, a, b in zip(("o", "dq", "dproj0", "dproj1"), (got, *got_grads),
                          (want, *torch.autograd.grad(want.square().sum(), leaves))):
        assert_rel_close(name, a, b, 1e-5)


# ----------------------------------------------------------------------------------------------------------
# selective recompute keeps the Triton attention's outputs, as it keeps SDPA's
# ----------------------------------------------------------------------------------------------------------
def test_recompute_does_not_rerun_triton_attention(monkeypatch):
    attn, _, _ = _fused()
    calls = []
    real = attn.attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(attn, "attention_forward", counting)
    torch.manual_seed(0)
    model = CMATH(small_config(backend="triton", recompute_from=1))
    model.train()
    batch = random_batch([3, 5], seed=1)
    out = model(batch, seed=0)
    forward_calls = len(calls)
    out.loss.backward()
    assert forward_calls > 0 and len(calls) == forward_calls
