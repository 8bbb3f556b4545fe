"""Fused variational fusion in Triton (KERNELS.md section 3): product of Gaussian experts with a N(0, I)
prior expert, the reparameterised sample, KL to the prior and the latent distillation KL, in one kernel
forward and one kernel backward.

Per element (t, j) of the (T, Z) latent, n = t * Z + j, with the C experts read in place from (C, T, Z):
    p_c = exp(-logvar_c),  P = 1 + sum_c p_c,  logvar_f = -log P,  var_f = 1 / P,  mu_f = sum_c mu_c p_c / P
    z = mu_f + sqrt(var_f) * eps,  eps = word m % 4 of tl.randn4x(seed, m // 4), m = eps_offset + n
    (philox.py: the same numbers in PyTorch; regenerated in the backward, never stored; eps_offset places the
    batch in a larger one: a rank's share of a distributed step draws the numbers one process draws for
    those rows of the whole step, whatever eps_offset % 4)
    kl_prior       = (1/T) sum 0.5 * (-logvar_f + var_f + mu_f^2 - 1)
    kl_consistency = (1/T) sum_c 0.5 * (logvar_c - logvar_f + (var_f + (mu_f - mu_c)^2) p_c - 1)
Backward, with G_mu / G_lv the total gradient reaching mu_f / logvar_f (from z, mu_f, logvar_f, kl_prior
and, unless detach_teacher, kl_consistency), d = mu_f - mu_c, w_c = p_c / P, g_kc = grad_kl_consistency / T:
    dmu_c     = G_mu w_c - g_kc d p_c
    dlogvar_c = w_c (G_mu d + G_lv) + 0.5 g_kc (1 - (var_f + d^2) p_c)
A program's BLOCK elements are a (BLOCK / 4, 4) tile laid on the Philox counters: row i holds the four words
of one counter, so a thread keeps the words it draws (_block: at eps_offset % 4 != 0 the tiles start a few
elements early, a separate build). The C <= 3 experts are unrolled at compile time, one such tile each (C = 3
costs three; no padded fourth). The scalar KLs are per-program fp32 partials summed on the host
(deterministic).

Byte floor, e = element bytes, N = T * Z: forward reads mu and logvar (2 C N e) and writes z, mu_f, logvar_f
(3 N e); backward reads mu, logvar (2 C N e) and the incoming gradients of z, mu_f, logvar_f (up to 3 N e,
skipped when None) and writes dmu, dlogvar (2 C N e). Each kernel is one pass that moves exactly that
(plus one fp32 partial per program; each expert is read once and kept in registers), so it can reach the
bandwidth roofline. Arithmetic per element for the eps (SAMPLE), in every build: a quarter of a
Philox-4x32-10 call (10 rounds of two 32x32->64-bit multiplies, four xors and two adds: ~25 integer ops per
element, was ~100 with one call per element; the sm_90 PTX of the fp32 C = 3 forward has 4 mul.hi.u32 per
element, 16 per thread of 4 at BLOCK 1024 with 8 warps, was 14, 112 per thread of 8 at BLOCK 1024 with 4
warps) and half a Box-Muller transform (one log, sqrt, cos and sin per two elements, was one log, sqrt and
cos per element). Besides: C exp, one log, one reciprocal, one sqrt and a few dozen FMAs per element. Below
the ridge of an H100 for C >= 1 (memory bound) by this count; the speed effect is unmeasured until the GPU
check runs (docs/VERIFICATION.md).
"""
from __future__ import annotations

import itertools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import pinned, variational_fusion
from ..utils import (
    check_same_device,
    divisible_by_16,
    input_guard,
    jit_function,
    once_differentiable,
    patch_old_interpreter,
    register_autocast_to_region_dtype,
    seed_tensor,
)

patch_old_interpreter()   # triton 3.6's interpreter with NumPy >= 2.4 (utils.py)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK, num_warps); one config under the interpreter. Both hold one row of four lanes (one Philox counter)
# per thread. (1024, 4), two rows per thread, spilled 8 bytes in fp16/bf16 with sampling when it was tried
# (inside libdevice's sin/cos Payne-Hanek path, which angles in [0, 2 pi) never take: ptxas keeps the
# register count low and spills in that cold path); (2048, 8) spilled before that (AOT check).
_CONFIGS = [(1024, 8), (512, 4)]
_INTERPRET_CONFIG = (1024, 8)
_MIN_BLOCK = min(c[0] for c in _CONFIGS + [_INTERPRET_CONFIG])
_MAX_C = 3


@triton.jit
def _randn4x_block(SEED, ctr0, BLOCK: tl.constexpr):
    """(BLOCK // 4, 4) float32 normals: [i, w] is word w of tl.randn4x(seed, ctr0 + i), one Philox call and two
    Box-Muller transforms per row of four lanes. The seed is read from memory: a CUDA graph replays with the
    buffer's seed."""
    n1, n2, n3, n4 = tl.randn4x(tl.load(SEED), ctr0 + tl.arange(0, BLOCK // 4))
    # join(join(n1, n3), join(n2, n4)) is (rows, 2, 2) with [i, a, b] = word 2 a + b. A join keeps a row's words
    # in the thread that drew them; when the loads want another layout (the misaligned build) the compiler
    # must move the normals (shared memory), where a select of broadcast rows let triton 3.6 redraw them per
    # lane in the load layout (four Philox calls per row, and spills in sin/cos's cold path).
    return tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (BLOCK // 4, 4))


@triton.jit
def _block(N, eps_ctr, eps_shift, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's elements n as a (BLOCK // 4, 4) tile (int64 for large T * Z), their mask, and the
    Philox counter of its row 0.

    Element n draws word m % 4 of counter m // 4, m = eps_offset + n (philox.py); eps_ctr = eps_offset // 4,
    eps_shift = eps_offset % 4. The tiles are laid on the counters, not on n: row i of program pid holds
    m = 4 (eps_ctr + pid * BLOCK / 4 + i) + w, i.e. n = pid * BLOCK - eps_shift + 4 i + w, so a row is the four
    words of one Philox call, drawn by the one thread that holds the row (_randn4x_block): no word is drawn
    twice or exchanged between threads. ALIGNED (eps_shift == 0, the usual case: Z % 4 == 0) is its own
    build, in which the addresses keep the buffers' 16-byte alignment; otherwise the tiles start eps_shift
    elements early (the first lanes of program 0 are masked, the grid has room for eps_shift more) and the
    loads and stores lose vector alignment, the price of drawing each number once."""
    pid = tl.program_id(0).to(tl.int64)
    lanes = 4 * tl.arange(0, BLOCK // 4)[:, None] + tl.arange(0, 4)[None, :]
    if ALIGNED:
        offs = pid * BLOCK + lanes
        ok = offs < N
    else:
        offs = pid * BLOCK - eps_shift + lanes
        ok = (offs >= 0) & (offs < N)
    return offs, ok, eps_ctr + pid * (BLOCK // 4)


@triton.jit
def _load_expert(MU, LV, c: tl.constexpr, N, offs, ok, ACC: tl.constexpr):
    """Expert c's mean, log-variance and precision p = exp(-logvar) on this block, in ACC. Masked lanes read 0
    (p = 1: finite, and every sum over the block masks them)."""
    a = tl.load(MU + c * N + offs, mask=ok, other=0.0).to(ACC)
    lv = tl.load(LV + c * N + offs, mask=ok, other=0.0).to(ACC)
    return a, lv, tl.exp(-lv)


@triton.jit(do_not_specialize=["N", "eps_ctr", "eps_shift"])
def _vf_fwd_kernel(MU, LV, ZO, MUF, LVF, KLP, KLC, N: tl.int64, SEED, eps_ctr: tl.int64, eps_shift,
                   C: tl.constexpr, SAMPLE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                   ACC: tl.constexpr):
    offs, ok, ctr0 = _block(N, eps_ctr, eps_shift, BLOCK, ALIGNED)
    if SAMPLE:   # drawn first: the Philox and Box-Muller temporaries die before the experts' registers live
        eps = _randn4x_block(SEED, ctr0, BLOCK).to(ACC)    # (fewer registers, AOT report)
    # The C <= 3 experts are unrolled at compile time, one block-shaped tile each (C = 3 costs three, where a
    # (C, BLOCK) tile padded to four). kl_consistency = (1/T) sum 0.5 (lv_c - lv_f - 1 + (var_f + d_c^2) p_c)
    # is regrouped as 0.5 (sum_c lv_c - C (lv_f + 1) + var_f sum_c p_c + sum_c d_c^2 p_c): only mu_c and p_c
    # outlive the first use (kept in registers, not re-read), lv_c is summed on arrival.
    a0, lv0, p0 = _load_expert(MU, LV, 0, N, offs, ok, ACC)
    s_p = p0
    s_ap = a0 * p0
    s_lv = lv0
    if C > 1:
        a1, lv1, p1 = _load_expert(MU, LV, 1, N, offs, ok, ACC)
        s_p += p1
        s_ap += a1 * p1
        s_lv += lv1
    if C > 2:
        a2, lv2, p2 = _load_expert(MU, LV, 2, N, offs, ok, ACC)
        s_p += p2
        s_ap += a2 * p2
        s_lv += lv2
    prec = 1.0 + s_p
    var_f = 1.0 / prec
    mu_f = s_ap * var_f
    lv_f = -tl.log(prec)
    if SAMPLE:
        z = mu_f + tl.sqrt(var_f) * eps
    else:
        z = mu_f
    tl.store(ZO + offs, z.to(ZO.dtype.element_ty), mask=ok)
    tl.store(MUF + offs, mu_f.to(MUF.dtype.element_ty), mask=ok)
    tl.store(LVF + offs, lv_f.to(LVF.dtype.element_ty), mask=ok)
    kl_p = 0.5 * (var_f + mu_f * mu_f - lv_f - 1.0)
    d = mu_f - a0
    s_ddp = d * d * p0
    if C > 1:
        d = mu_f - a1
        s_ddp += d * d * p1
    if C > 2:
        d = mu_f - a2
        s_ddp += d * d * p2
    kl_c = 0.5 * (s_lv - C * (lv_f + 1.0) + var_f * s_p + s_ddp)
    pid = tl.program_id(0)
    tl.store(KLP + pid, tl.sum(tl.sum(tl.where(ok, kl_p, 0.0), axis=1), axis=0))
    tl.store(KLC + pid, tl.sum(tl.sum(tl.where(ok, kl_c, 0.0), axis=1), axis=0))


@triton.jit
def _store_expert_grads(DMU, DLV, c: tl.constexpr, N, offs, ok, a, p, mu_f, var_f, g_mu, g_lv, g_kc):
    #   dmu_c = G_mu w_c - g_kc d p_c,  dlogvar_c = w_c (G_mu d + G_lv) + 0.5 g_kc (1 - (var_f + d^2) p_c)
    d = mu_f - a
    dp = d * p
    w = p * var_f
    d_a = g_mu * w - g_kc * dp
    d_lv = w * (g_mu * d + g_lv) + 0.5 * g_kc * (1.0 - (var_f + d * d) * p)
    tl.store(DMU + c * N + offs, d_a.to(DMU.dtype.element_ty), mask=ok)
    tl.store(DLV + c * N + offs, d_lv.to(DLV.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["N", "eps_ctr", "eps_shift", "T", "has_gz", "has_gmu", "has_glv"])
def _vf_bwd_kernel(MU, LV, GZ, GMU, GLV, GKP, GKC, DMU, DLV, N: tl.int64, SEED, eps_ctr: tl.int64, eps_shift,
                   T, has_gz, has_gmu, has_glv,
                   C: tl.constexpr, SAMPLE: tl.constexpr, DETACH: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs, ok, ctr0 = _block(N, eps_ctr, eps_shift, BLOCK, ALIGNED)
    if SAMPLE:   # the forward's eps, regenerated (first, as in the forward)
        eps = _randn4x_block(SEED, ctr0, BLOCK).to(ACC)
    a0, lv0, p0 = _load_expert(MU, LV, 0, N, offs, ok, ACC)
    s_p = p0
    s_ap = a0 * p0
    if C > 1:
        a1, lv1, p1 = _load_expert(MU, LV, 1, N, offs, ok, ACC)
        s_p += p1
        s_ap += a1 * p1
    if C > 2:
        a2, lv2, p2 = _load_expert(MU, LV, 2, N, offs, ok, ACC)
        s_p += p2
        s_ap += a2 * p2
    prec = 1.0 + s_p
    var_f = 1.0 / prec
    mu_f = s_ap * var_f
    # Gradients of absent outputs are not read: a masked-off load moves no bytes.
    zero = offs * 0                                            # (a block-shaped flag keeps the interpreter happy)
    gz = tl.load(GZ + offs, mask=ok & ((zero + has_gz) != 0), other=0.0).to(ACC)
    g_mu = tl.load(GMU + offs, mask=ok & ((zero + has_gmu) != 0), other=0.0).to(ACC) + gz
    g_lv = tl.load(GLV + offs, mask=ok & ((zero + has_glv) != 0), other=0.0).to(ACC)
    if SAMPLE:
        g_lv += 0.5 * gz * tl.sqrt(var_f) * eps
    g_kp = tl.load(GKP).to(ACC) / T
    g_kc = tl.load(GKC).to(ACC) / T
    g_mu += g_kp * mu_f
    g_lv += 0.5 * g_kp * (var_f - 1.0)
    if not DETACH:
        # The teacher's share of kl_consistency's gradient needs sum_c d_c p_c and sum_c (var_f p_c - 1);
        # with mu_f = sum_c a_c p_c / P and P = 1 + sum_c p_c they are -mu_f and 1 - var_f - C (identities;
        # only the rounding differs), so these need no expert and each expert's tile is used once more, below.
        g_mu -= g_kc * mu_f
        g_lv += 0.5 * g_kc * (1.0 - var_f - C)
    _store_expert_grads(DMU, DLV, 0, N, offs, ok, a0, p0, mu_f, var_f, g_mu, g_lv, g_kc)
    if C > 1:
        _store_expert_grads(DMU, DLV, 1, N, offs, ok, a1, p1, mu_f, var_f, g_mu, g_lv, g_kc)
    if C > 2:
        _store_expert_grads(DMU, DLV, 2, N, offs, ok, a2, p2, mu_f, var_f, g_mu, g_lv, g_kc)


def _configs():
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in _CONFIGS]


if _INTERPRET:
    _fwd_launch, _bwd_launch = _vf_fwd_kernel, _vf_bwd_kernel
else:  # pragma: no cover - GPU only. Keyed on C and dtype (autotuner adds dtypes), not on T.
    _fwd_launch = pinned.autotune(_configs(), key=["C", "SAMPLE", "ALIGNED"])(_vf_fwd_kernel)
    _bwd_launch = pinned.autotune(_configs(), key=["C", "SAMPLE", "DETACH", "ALIGNED"])(_vf_bwd_kernel)


def _meta() -> dict:
    if _INTERPRET:
        b, w = _INTERPRET_CONFIG
        return {"BLOCK": b, "num_warps": w}
    return {}


def _launched_block(launch) -> int:
    """BLOCK of the config the last launch of `launch` ran with: an autotuner's best_config (its benchmark
    runs may have used other configs on the same buffers), else the interpreter's one config."""
    best = getattr(launch, "best_config", None)
    if best is not None:
        return best.kwargs["BLOCK"]
    return _INTERPRET_CONFIG[0]


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _part_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grid(N, eps_shift):
    # the tiles start eps_shift elements before n = 0 (_block), so eps_shift more lanes are covered
    return lambda META: (triton.cdiv(N + eps_shift, META["BLOCK"]),)  # noqa: E731


@input_guard
def _forward(mu, logvar, seed: torch.Tensor, sample: bool, eps_offset: int = 0):
    """-> z, mu_f, logvar_f (T, Z) in mu.dtype; kl_prior, kl_consistency 0-dim in fp32 (fp64 for fp64)."""
    C, T, Z = mu.shape
    N = T * Z
    z = torch.empty((T, Z), device=mu.device, dtype=mu.dtype)
    mu_f = torch.empty_like(z)
    lv_f = torch.empty_like(z)
    part_t = _part_dtype(mu.dtype)
    n_part = max(1, triton.cdiv(N + 3, _MIN_BLOCK))     # programs of the smallest BLOCK at any eps_shift
    klp = torch.empty(n_part, device=mu.device, dtype=part_t)
    klc = torch.empty(n_part, device=mu.device, dtype=part_t)
    if N == 0:
        return z, mu_f, lv_f, klp.new_zeros(()), klp.new_zeros(())
    launch = _fwd_launch
    ctr, shift = divmod(eps_offset, 4)
    launch[_grid(N, shift)](mu, logvar, z, mu_f, lv_f, klp, klc, N, seed, ctr, shift, C=C, SAMPLE=sample,
                            ALIGNED=shift == 0, ACC=_acc(mu.dtype), **_meta())
    # Only the partials of the config that ran last are this call's: an autotuner benchmarks every config
    # on these same buffers first, and a smaller BLOCK writes partials beyond the chosen config's programs.
    n = triton.cdiv(N + shift, _launched_block(launch))
    return z, mu_f, lv_f, klp[:n].sum() / T, klc[:n].sum() / T


@input_guard
def _backward(mu, logvar, gz, gmu, glv, gkp, gkc, seed: torch.Tensor, sample: bool, detach: bool,
              eps_offset: int = 0):
    C, T, Z = mu.shape
    N = T * Z
    dmu = torch.empty_like(mu)
    dlv = torch.empty_like(logvar)
    if N == 0:
        return dmu, dlv
    part_t = _part_dtype(mu.dtype)

    def flat(g):  # incoming (T, Z) gradient: contiguous (may arrive stride-0), or a dummy pointer
        return (g.contiguous(), 1) if g is not None else (mu, 0)

    def scalar(g):
        return g.reshape(1).to(part_t).contiguous() if g is not None else torch.zeros(1, device=mu.device,
                                                                                     dtype=part_t)
    (gz_, hz), (gmu_, hm), (glv_, hl) = flat(gz), flat(gmu), flat(glv)
    ctr, shift = divmod(eps_offset, 4)
    _bwd_launch[_grid(N, shift)](mu, logvar, gz_, gmu_, glv_, scalar(gkp), scalar(gkc), dmu, dlv, N, seed,
                                 ctr, shift, T, hz, hm, hl, C=C, SAMPLE=sample, DETACH=detach,
                                 ALIGNED=shift == 0, ACC=_acc(mu.dtype), **_meta())
    return dmu, dlv


# ---------------------------------------------------------------------------------------------------------
# The op: forward and backward registered as PyTorch custom ops (opaque to torch.compile, with fake impls),
# autograd over them, and the autocast rule (KERNELS.md, precision policy).
_Tensors5 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("cmath_mer::variational_fusion_triton", mutates_args=())
def variational_fusion_op(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor, sample: bool,
                          detach_teacher: bool, eps_offset: int = 0) -> _Tensors5:
    """Triton forward; seed: (1,) int64 on mu's device. detach_teacher does not change the values; it is an
    input for the backward."""
    return _forward(mu.contiguous(), logvar.contiguous(), seed, sample, eps_offset)


@variational_fusion_op.register_fake
def _(mu, logvar, seed, sample, detach_teacher, eps_offset=0):
    C, T, Z = mu.shape
    part_t = _part_dtype(mu.dtype)
    return (mu.new_empty((T, Z)), mu.new_empty((T, Z)), mu.new_empty((T, Z)),
            mu.new_empty((), dtype=part_t), mu.new_empty((), dtype=part_t))


@torch.library.custom_op("cmath_mer::variational_fusion_triton_backward", mutates_args=())
def variational_fusion_backward_op(mu: torch.Tensor, logvar: torch.Tensor, gz: Optional[torch.Tensor],
                                   gmu: Optional[torch.Tensor], glv: Optional[torch.Tensor],
                                   gkp: Optional[torch.Tensor], gkc: Optional[torch.Tensor], seed: torch.Tensor,
                                   sample: bool, detach_teacher: bool, eps_offset: int = 0
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(mu.contiguous(), logvar.contiguous(), gz, gmu, glv, gkp, gkc, seed, sample, detach_teacher,
                     eps_offset)


@variational_fusion_backward_op.register_fake
def _(mu, logvar, gz, gmu, glv, gkp, gkc, seed, sample, detach_teacher, eps_offset=0):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), \
        torch.empty_like(logvar, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    mu, logvar, seed, sample, detach_teacher, eps_offset = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.sample, ctx.detach, ctx.eps_offset = sample, detach_teacher, eps_offset
    ctx.set_materialize_grads(False)


@once_differentiable
def _autograd_backward(ctx, gz, gmu, glv, gkp, gkc):
    mu, logvar, seed = ctx.saved_tensors
    dmu, dlv = variational_fusion_backward_op(mu, logvar, gz, gmu, glv, gkp, gkc, seed, ctx.sample, ctx.detach,
                                              ctx.eps_offset)
    return dmu.to(mu.dtype), dlv.to(logvar.dtype), None, None, None, None


variational_fusion_op.register_autograd(_autograd_backward, setup_context=_setup_context)
register_autocast_to_region_dtype("cmath_mer::variational_fusion_triton", cast=(0, 1))


def check_inputs(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    if mu.dim() != 3 or mu.shape != logvar.shape:
        raise ValueError(f"expected mu and logvar of one shape (C, T, Z), got {tuple(mu.shape)} and "
                         f"{tuple(logvar.shape)}")
    if not 1 <= mu.shape[0] <= _MAX_C:
        raise ValueError(f"C = {mu.shape[0]} experts; the kernel supports 1..{_MAX_C}")
    if mu.shape[1] == 0:
        raise ValueError("variational fusion of an empty batch (T = 0): the means over T are undefined")
    check_same_device(mu=mu, logvar=logvar)


def fused_variational_fusion(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | torch.Tensor, sample: bool,
                             detach_teacher: bool = True, eps_offset: int = 0):
    """mu, logvar: (C, T, Z) -> (z, mu_f, logvar_f, kl_prior, kl_consistency); see naive_variational_fusion.

    Outside autocast mu and logvar share one dtype and every output has it. In an autocast region they are
    cast to the region's dtype (fp16/bf16), the kernel computes in fp32 and the two KL terms come back in fp32.
    """
    check_inputs(mu, logvar)
    autocast = torch.is_autocast_enabled(mu.device.type)
    if mu.dtype != logvar.dtype and not autocast:
        raise TypeError(f"mu and logvar must share one dtype (got {mu.dtype} and {logvar.dtype}); mixed dtypes "
                        "are accepted in an autocast region")
    if mu.is_cuda and mu.dtype == torch.float64:  # outside the compiled specs
        return variational_fusion(mu, logvar, seed=seed, sample=sample, detach_teacher=detach_teacher,
                                  backend="torch", eps_offset=eps_offset)
    z, mu_f, lv_f, klp, klc = variational_fusion_op(mu, logvar, seed_tensor(seed, mu.device), bool(sample),
                                                    bool(detach_teacher), int(eps_offset))
    if not autocast:
        klp, klc = klp.to(z.dtype), klc.to(z.dtype)
    return z, mu_f, lv_f, klp, klc


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m cmath_mer.kernels.aot)

_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs() -> list[dict]:
    """Every (config x dtype x C x SAMPLE [x DETACH] x ALIGNED) the two kernels launch with on a GPU.

    "attrs" carries the pointer divisibility the JIT sees (torch allocations are 16-byte aligned); N,
    eps_ctr and eps_shift are runtime integers (do_not_specialize), so their divisibility is never assumed.
    SEED points at one int64 (a (1,) tensor: 16-byte aligned like any torch allocation, but not assumed).
    ALIGNED=False is the build for an eps_offset that is not a multiple of 4 (_block).
    """
    fwd, bwd = jit_function(_vf_fwd_kernel), jit_function(_vf_bwd_kernel)
    specs = []
    # N is annotated tl.int64 in the kernels: one integer width whatever its value, so the JIT never builds
    # an i32 variant (and the AOT report needs no i32/i64 product). The seed is a pointer to one int64.
    for ty, aligned in itertools.product(_TL_NAMES.values(), (True, False)):
        al = "" if aligned else "_shift"
        for C in range(1, _MAX_C + 1):
            for sample in (True, False):
                for block, warps in _CONFIGS:
                    specs.append({
                        "name": f"vf_fwd_{ty}_c{C}_{'sample' if sample else 'mean'}{al}_b{block}_w{warps}",
                        "fn": fwd,
                        "signature": {"MU": f"*{ty}", "LV": f"*{ty}", "ZO": f"*{ty}", "MUF": f"*{ty}",
                                      "LVF": f"*{ty}", "KLP": "*fp32", "KLC": "*fp32", "N": "i64", "SEED": "*i64",
                                      "eps_ctr": "i64", "eps_shift": "i32", "C": "constexpr",
                                      "SAMPLE": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr",
                                      "ACC": "constexpr"},
                        "constexprs": {"C": C, "SAMPLE": sample, "ALIGNED": aligned, "BLOCK": block,
                                       "ACC": tl.float32},
                        "attrs": divisible_by_16(["MU", "LV", "ZO", "MUF", "LVF", "KLP", "KLC"]),
                        "num_warps": warps, "num_stages": 1})
                    for detach in (True, False):
                        specs.append({
                            "name": f"vf_bwd_{ty}_c{C}_{'sample' if sample else 'mean'}_"
                                    f"{'detach' if detach else 'joint'}{al}_b{block}_w{warps}",
                            "fn": bwd,
                            "signature": {"MU": f"*{ty}", "LV": f"*{ty}", "GZ": f"*{ty}", "GMU": f"*{ty}",
                                          "GLV": f"*{ty}", "GKP": "*fp32", "GKC": "*fp32", "DMU": f"*{ty}",
                                          "DLV": f"*{ty}", "N": "i64", "SEED": "*i64", "eps_ctr": "i64",
                                          "eps_shift": "i32", "T": "i32",
                                          "has_gz": "i32", "has_gmu": "i32", "has_glv": "i32",
                                          "C": "constexpr", "SAMPLE": "constexpr", "DETACH": "constexpr",
                                          "ALIGNED": "constexpr", "BLOCK": "constexpr", "ACC": "constexpr"},
                            "constexprs": {"C": C, "SAMPLE": sample, "DETACH": detach, "ALIGNED": aligned,
                                           "BLOCK": block, "ACC": tl.float32},
                            "attrs": divisible_by_16(["MU", "LV", "GZ", "GMU", "GLV", "DMU", "DLV"]),
                            "num_warps": warps, "num_stages": 1})
    return specs
