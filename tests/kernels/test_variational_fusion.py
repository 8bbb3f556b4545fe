"""The fused variational fusion (KERNELS.md section 3) against the PyTorch reference and float64 under the
Triton interpreter: all five outputs and the gradients of mu and logvar, C = 1..3, odd Z, sample and
detach_teacher both ways, NaN-poisoned outputs, gradcheck, the eps mapping (philox.py = tl.randn4x word m % 4 of
counter m // 4, whatever the offset or the kernel config) and its distribution, dispatch."""
from __future__ import annotations

import math
import os

import pytest
import torch

from cmath_mer.kernels import variational_fusion

from helpers import assert_rel_close, needs_triton

pytestmark = needs_triton
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _randn_by_definition_kernel(OUT, n, seed, offset, BLOCK: tl.constexpr):
    """The mapping as written in philox.py, one element at a time: element m = offset + i is word m % 4 of
    tl.randn4x(seed, m // 4) (Triton's own generator; nothing shared with the fused kernel's tiling)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offset + i
    n1, n2, n3, n4 = tl.randn4x(seed, m // 4)
    w = m % 4
    tl.store(OUT + i, tl.where(w == 0, n1, tl.where(w == 1, n2, tl.where(w == 2, n3, n4))), mask=i < n)

NAMES = ("z", "mu_f", "logvar_f", "kl_prior", "kl_consistency")
TOL_F64 = {torch.float32: 1e-5, torch.float16: 5e-3}
TOL_REF = {torch.float32: 1e-5, torch.float16: 5e-3}


def _inputs(C, T, Z, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(C, T, Z, generator=g, dtype=torch.float64)
    logvar = torch.randn(C, T, Z, generator=g, dtype=torch.float64)   # precisions from ~0.05 to ~20
    return mu.to(dtype), logvar.to(dtype)


def _cotangents(T, Z, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(T, Z, generator=g, dtype=torch.float64) for _ in range(3)] + \
           [torch.randn((), generator=g, dtype=torch.float64) for _ in range(2)]


def _run(fn, mu, logvar, cot, **kw):
    """Outputs and d(sum_i <out_i, cot_i>)/d(mu, logvar): every output's gradient flows back."""
    mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    outs = fn(mu, logvar, **kw)
    total = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cot))
    grads = torch.autograd.grad(total, (mu, logvar))
    return [o.detach() for o in outs], grads


CASES = [(1, 7, 5), (2, 1, 17), (3, 130, 33), (2, 64, 16), (3, 65, 3)]


@pytest.mark.parametrize("detach_teacher", [True, False])
@pytest.mark.parametrize("sample", [True, False])
@pytest.mark.parametrize("C,T,Z", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_outputs_and_grads_match_reference_and_float64(dtype, C, T, Z, sample, detach_teacher, nan_poison):
    from cmath_mer.kernels import naive_variational_fusion
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    seed = C * 10007 + T * 101 + Z
    mu, logvar = _inputs(C, T, Z, dtype, seed)
    cot = _cotangents(T, Z, seed)
    kw = dict(seed=seed, sample=sample, detach_teacher=detach_teacher)
    outs, grads = _run(fused_variational_fusion, mu, logvar, cot, **kw)
    t64_outs, t64_grads = _run(naive_variational_fusion, mu.double(), logvar.double(), cot, **kw)
    ref_outs, ref_grads = _run(naive_variational_fusion, mu, logvar, cot, **kw)
    for name, out, t64, ref in zip(NAMES + ("dmu", "dlogvar"), outs + list(grads), t64_outs + list(t64_grads),
                                   ref_outs + list(ref_grads)):
        assert out.dtype == dtype, name
        assert_rel_close(f"{name} vs float64", out, t64, TOL_F64[dtype])
        assert_rel_close(f"{name} vs reference", out, ref, TOL_REF[dtype])


def test_detach_teacher_changes_only_the_consistency_gradient(nan_poison):
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    mu, logvar = _inputs(3, 40, 9, torch.float32, seed=4)
    only_kc = [torch.zeros(40, 9, dtype=torch.float64)] * 3 + [torch.tensor(0.0, dtype=torch.float64),
                                                                 torch.tensor(1.0, dtype=torch.float64)]
    rest = _cotangents(40, 9, seed=4)[:4] + [torch.tensor(0.0, dtype=torch.float64)]
    for cot, should_differ in ((only_kc, True), (rest, False)):
        g = [_run(fused_variational_fusion, mu, logvar, cot, seed=1, sample=True, detach_teacher=d)[1]
             for d in (True, False)]
        for a, b in zip(g[0], g[1]):
            assert torch.isfinite(a).all() and torch.isfinite(b).all()
            assert (not torch.allclose(a, b, rtol=1e-4, atol=1e-6)) == should_differ
    # the forward values do not depend on detach_teacher
    o = [fused_variational_fusion(mu, logvar, seed=1, sample=True, detach_teacher=d) for d in (True, False)]
    for a, b in zip(*o):
        assert torch.equal(a, b)


def test_unused_outputs_and_stride0_grads(nan_poison):
    """None gradients (outputs not used) and expanded stride-0 gradients (out.sum().backward())."""
    from cmath_mer.kernels import naive_variational_fusion
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    mu, logvar = _inputs(2, 30, 7, torch.float32, seed=8)
    for pick in ((0,), (1, 4), (2, 3), (0, 1, 2, 3, 4)):
        grads = []
        for fn, dt in ((fused_variational_fusion, torch.float32), (naive_variational_fusion, torch.float64)):
            m, lv = mu.to(dt).clone().requires_grad_(), logvar.to(dt).clone().requires_grad_()
            outs = fn(m, lv, seed=5, sample=True, detach_teacher=False)
            sum(outs[i].sum() for i in pick).backward()
            grads.append((m.grad, lv.grad))
        for name, a, b in zip(("dmu", "dlogvar"), *grads):
            assert_rel_close(f"{name} {pick}", a, b, 1e-5)


def test_same_seed_same_z_and_different_seed_different_z():
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    mu, logvar = _inputs(2, 50, 13, torch.float32, seed=9)
    z1 = fused_variational_fusion(mu, logvar, seed=77, sample=True)[0]
    z2 = fused_variational_fusion(mu, logvar, seed=77, sample=True)[0]
    z3 = fused_variational_fusion(mu, logvar, seed=78, sample=True)[0]
    mean = fused_variational_fusion(mu, logvar, seed=77, sample=False)[0]
    assert torch.equal(z1, z2)
    assert not torch.allclose(z1, z3)
    assert not torch.allclose(z1, mean)


def test_gradcheck_float64_triton_and_reference():
    from cmath_mer.kernels import naive_variational_fusion
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    mu, logvar = _inputs(2, 3, 3, torch.float64, seed=6)
    for fn in (fused_variational_fusion, naive_variational_fusion):
        # with detach_teacher the consistency gradient is deliberately not the derivative of its value, so
        # gradcheck sees kl_consistency only when the teacher is not detached
        for sample, detach in ((True, False), (False, False), (True, True)):
            def f(m, lv):
                outs = fn(m, lv, seed=3, sample=sample, detach_teacher=detach)
                return outs[:4] if detach else outs
            assert torch.autograd.gradcheck(f, (mu.clone().requires_grad_(), logvar.clone().requires_grad_()),
                                            eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 12345, 2**31 + 5, 2**32 + 7, 2**40 + 3])
def test_philox_randn_is_word_m_mod_4_of_tl_randn4x_at_every_offset(seed):
    """philox.py (the reference's eps) against tl.randn4x by the mapping's definition, at offsets 0..7 (every
    alignment to the four words), one past 2**32 counters (the counter's high word) and a large one."""
    from cmath_mer.kernels.variational.philox import philox_randn
    n = 1001
    for offset in list(range(8)) + [4 * 2**32 - 3, 10**12 + 1]:
        out = torch.full((n,), float("nan"), dtype=torch.float32)
        _randn_by_definition_kernel[(triton.cdiv(n, 256),)](out, n, seed, offset, BLOCK=256)
        torch.testing.assert_close(philox_randn(seed, n, offset=offset), out, rtol=1e-6, atol=1e-6)


_LOGVAR = 20.0


def _fused_eps(numel, seed, eps_offset=0, requires_grad=False):
    """The eps the fused kernel draws, read off z: with C = 1, mu = 0 and logvar = 20 the precision
    exp(-20) ~ 2e-9 vanishes next to the prior's 1 in fp32, so var_f = 1, mu_f = 0 and z = eps exactly. Also the
    gradient of sum(z) w.r.t. logvar, which holds the backward's regenerated eps (times a constant)."""
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    mu = torch.zeros(1, 1, numel)
    lv = torch.full((1, 1, numel), _LOGVAR, requires_grad=requires_grad)
    z = fused_variational_fusion(mu, lv, seed=seed, sample=True, eps_offset=eps_offset)[0].reshape(-1)
    if not requires_grad:
        return z
    z.sum().backward()
    return z.detach(), lv.grad.reshape(-1)


def test_fused_eps_is_philox_randn_at_every_offset_and_the_backward_regenerates_it(nan_poison):
    """The kernel's eps against the reference's at eps_offset 0..7 (aligned and the three misaligned builds)
    and past a block boundary; the backward's d z / d logvar = 0.5 sqrt(var_f) eps carries the same eps."""
    from cmath_mer.kernels.variational.philox import philox_randn
    seed = int.from_bytes(os.urandom(6), "little")
    n = 1031                                                     # > one 1024 block, not a multiple of 4
    for offset in range(8):
        z, dlv = _fused_eps(n, seed, offset, requires_grad=True)
        ref = philox_randn(seed, n, offset=offset)
        torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-6, msg=f"seed {seed} offset {offset}")
        # d sum(z) / d logvar = w (0.5 sqrt(var_f) eps) with w = p var_f = exp(-20) (mu_f - mu = 0): a fixed scale
        scale = 0.5 * math.exp(-_LOGVAR)
        torch.testing.assert_close(dlv / scale, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed} offset {offset}")


def test_fused_eps_are_standard_normal():
    """~1e5 eps from fresh seeds: mean, standard deviation and the Kolmogorov-Smirnov distance to N(0, 1),
    over all of them and over each of the four Philox words (lanes m % 4), and no correlation between
    neighbouring lanes (the two normals of one Box-Muller pair share a radius). Bounds at about 5 sigma."""
    draws, seeds = [], []
    for _ in range(4):
        seed = int.from_bytes(os.urandom(6), "little")
        offset = int.from_bytes(os.urandom(2), "little")
        seeds.append((seed, offset))
        draws.append(_fused_eps(25_000, seed, offset).double())
    x = torch.cat(draws)
    where = f"seeds/offsets {seeds}"

    def ks(v):
        v, _ = torch.sort(v)
        n = v.numel()
        cdf = 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))
        k = torch.arange(1, n + 1, dtype=torch.float64)
        return max((k / n - cdf).max().item(), (cdf - (k - 1) / n).max().item())

    for name, v in [("all", x)] + [(f"word {w}", torch.cat([d[(w - o) % 4::4] for d, (_, o) in zip(draws, seeds)]))
                                   for w in range(4)]:
        n = v.numel()
        assert abs(v.mean().item()) < 5 / math.sqrt(n), f"{name}: mean {v.mean().item():.4f}; {where}"
        assert abs(v.std().item() - 1.0) < 5 * math.sqrt(0.5 / n), f"{name}: std {v.std().item():.4f}; {where}"
        # P(sqrt(n) D > 2.4) ~ 2e-5 (Kolmogorov distribution)
        assert ks(v) < 2.4 / math.sqrt(n), f"{name}: KS distance {ks(v):.4f}; {where}"
    for d in draws:
        r = torch.corrcoef(torch.stack([d[:-1], d[1:]]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(d.numel()), f"neighbour correlation {r:.4f}; {where}"


def test_public_dispatch_uses_the_kernel(monkeypatch):
    import cmath_mer.kernels as K
    import cmath_mer.kernels.variational.fused as fused
    calls = []
    real = fused.fused_variational_fusion

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(fused, "fused_variational_fusion", spy)
    mu, logvar = _inputs(2, 9, 5, torch.float32, seed=2)
    out = K.variational_fusion(mu, logvar, seed=4, sample=True, backend="triton")
    assert calls == [1]
    ref = K.naive_variational_fusion(mu, logvar, seed=4, sample=True)
    for name, a, b in zip(NAMES, out, ref):
        assert_rel_close(name, a, b, 1e-5)
    K.variational_fusion(mu, logvar, seed=4, sample=True, backend="torch")
    assert calls == [1]


def test_bad_inputs_are_rejected():
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    mu, logvar = _inputs(4, 3, 2, torch.float32, seed=0)
    with pytest.raises(ValueError):
        fused_variational_fusion(mu, logvar, seed=0, sample=False)          # C = 4 > 3
    with pytest.raises(ValueError):
        fused_variational_fusion(mu[:2], logvar[:3], seed=0, sample=False)  # shape mismatch


class _ConfigsInSequence:
    """Stands in for triton.autotune on the CPU: every launch first runs each config in `blocks` on the same
    buffers (as the autotuner's benchmark does), the last one being the winner it then reports."""

    def __init__(self, kernel, blocks):
        self.kernel, self.blocks, self.best_config = kernel, blocks, None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            for block in self.blocks:
                self.kernel[grid](*args, **{**kwargs, "BLOCK": block, "num_warps": 4})
            self.best_config = triton.Config({"BLOCK": self.blocks[-1]}, num_warps=4)
        return run


@pytest.mark.parametrize("blocks", [(512, 1024), (1024, 512), (512, 1024, 512, 1024)])
def test_kl_partials_do_not_depend_on_configs_run_before(monkeypatch, blocks, nan_poison):
    """A GPU-only fault: the autotuner benchmarks BLOCK=512 and 1024 on the same partial buffers; the result
    must be the reference's whatever ran before (before the fix: kl 1.5x too large when 1024 won)."""
    import cmath_mer.kernels.variational.fused as fused
    from cmath_mer.kernels import naive_variational_fusion
    monkeypatch.setattr(fused, "_fwd_launch", _ConfigsInSequence(fused._vf_fwd_kernel, blocks))
    mu, logvar = _inputs(3, 130, 33, torch.float32, seed=21)                # N = 4290: 9 vs 5 programs
    got = fused.fused_variational_fusion(mu, logvar, seed=1, sample=True)
    ref = naive_variational_fusion(mu, logvar, seed=1, sample=True)
    for name, a, b in zip(NAMES, got, ref):
        assert_rel_close(name, a, b, 1e-5)


def test_backward_refuses_double_backward():
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    mu, logvar = (x.requires_grad_() for x in _inputs(2, 5, 3, torch.float32, seed=1))
    z = fused_variational_fusion(mu, logvar, seed=0, sample=True)[0]
    (g,) = torch.autograd.grad(z.pow(2).sum(), mu, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate"):
        g.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seed_as_a_device_tensor_equals_the_int_and_is_read_at_run_time(backend):
    """A one-element int64 seed tensor draws what the int draws, and writing a new value into the same
    tensor changes the draw (a CUDA-graph replay reads the seed from memory, not from the launch)."""
    if backend == "triton":
        pytest.importorskip("triton")
    seed = int(torch.randint(0, 2**31 - 1, ()))
    mu, logvar = _inputs(2, 37, 9, torch.float32, seed % 1000)
    buf = torch.tensor([seed], dtype=torch.int64)
    by_int = variational_fusion(mu, logvar, seed=seed, sample=True, backend=backend)
    by_tensor = variational_fusion(mu, logvar, seed=buf, sample=True, backend=backend)
    for a, b in zip(by_int, by_tensor):
        assert torch.equal(a, b)
    buf.fill_(seed + 1)
    again = variational_fusion(mu, logvar, seed=buf, sample=True, backend=backend)
    assert not torch.equal(again[0], by_int[0])
    assert torch.equal(again[0], variational_fusion(mu, logvar, seed=seed + 1, sample=True, backend=backend)[0])
    with pytest.raises(ValueError, match="int64"):
        variational_fusion(mu, logvar, seed=torch.tensor([1.0]), sample=True, backend=backend)


def test_eps_offset_places_a_part_in_the_whole_batch_on_both_paths(nan_poison):
    """A rank's (or a micro-batch's) rows draw eps by their index in the step's whole batch, so the
    parts, each with its eps_offset, give the whole batch's z and gradients; Triton and reference agree."""
    from cmath_mer.kernels import naive_variational_fusion
    from cmath_mer.kernels.variational.fused import fused_variational_fusion
    torch.manual_seed(3)
    C, T, Z, cut = 2, 37, 12, 16
    mu, logvar = torch.randn(C, T, Z), torch.randn(C, T, Z)
    for fn in (fused_variational_fusion, naive_variational_fusion):
        whole = fn(mu, logvar, seed=5, sample=True)[0]
        parts = [fn(mu[:, a:b].contiguous(), logvar[:, a:b].contiguous(), seed=5, sample=True, eps_offset=a * Z)[0]
                 for a, b in ((0, cut), (cut, T))]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)
        lv = logvar[:, cut:].clone().requires_grad_()      # d z / d logvar holds eps
        fn(mu[:, cut:].contiguous(), lv, seed=5, sample=True, eps_offset=cut * Z)[0].sum().backward()
        lv_all = logvar.clone().requires_grad_()
        fn(mu, lv_all, seed=5, sample=True)[0].sum().backward()
        torch.testing.assert_close(lv.grad, lv_all.grad[:, cut:], rtol=1e-6, atol=1e-6)
    a = fused_variational_fusion(mu, logvar, seed=5, sample=True, eps_offset=1000)[0]
    b = naive_variational_fusion(mu, logvar, seed=5, sample=True, eps_offset=1000)[0]
    assert_rel_close("offset z", a, b, 1e-5)


@pytest.mark.parametrize("blocks", [(1024,), (512,), (64,), (512, 1024), (1024, 64, 512)])
def test_eps_do_not_depend_on_the_config_or_on_configs_run_before(monkeypatch, blocks, nan_poison):
    """The element -> Philox word mapping is a property of the element, not of BLOCK: every config (the
    autotuner's two and a small one), run alone or in sequence on the same buffers as the autotuner's
    benchmark does, draws the reference's eps forward and backward, aligned or not (eps_offset 0..7)."""
    import cmath_mer.kernels.variational.fused as fused
    from cmath_mer.kernels.variational.philox import philox_randn
    monkeypatch.setattr(fused, "_fwd_launch", _ConfigsInSequence(fused._vf_fwd_kernel, blocks))
    monkeypatch.setattr(fused, "_bwd_launch", _ConfigsInSequence(fused._vf_bwd_kernel, blocks))
    monkeypatch.setattr(fused, "_MIN_BLOCK", min(blocks))          # the KL partials of a BLOCK below the configs'
    seed = int.from_bytes(os.urandom(6), "little")
    n = 1031
    for offset in range(8):
        z, dlv = _fused_eps(n, seed, offset, requires_grad=True)
        ref = philox_randn(seed, n, offset=offset)
        torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-6, msg=f"seed {seed} offset {offset}")
        torch.testing.assert_close(dlv / (0.5 * math.exp(-_LOGVAR)), ref, rtol=1e-5, atol=1e-5,
                                   msg=f"seed {seed} offset {offset}")


def test_a_seed_on_another_device_of_the_same_type_is_refused(monkeypatch):
    """The seed's whole device (type and index) must be the inputs': a seed on cuda:0 with inputs on cuda:1
    would have the kernel read another device's pointer. Devices compared without a GPU."""
    from cmath_mer.kernels.utils import same_device, seed_tensor
    i = int(torch.randint(0, 4, ()))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: i)      # "cuda" without an index: the current one
    assert not same_device(torch.device("cuda", i), torch.device("cuda", i + 1))
    assert same_device(torch.device("cuda", i), torch.device("cuda", i)) and same_device("cuda", f"cuda:{i}")
    assert not same_device("cuda", f"cuda:{i + 1}") and not same_device("cpu", f"cuda:{i}")
    assert same_device(torch.device("cpu"), "cpu")
    with pytest.raises(ValueError, match=r"seed is on meta but the inputs are on cpu"):
        seed_tensor(torch.zeros(1, dtype=torch.int64, device="meta"), torch.device("cpu"))
