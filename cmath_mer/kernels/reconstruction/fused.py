"""Fused reconstruction loss in Triton: the decoder's last projection, squared error and mean, with the
(T, M) reconstruction never written to memory, forward or backward (KERNELS.md section 2).

    loss = sum((h @ W^T + b - target)^2) / (T M)      h: (T, K), W: (M, K), b: (M,), target: (T, M)
    r    = h @ W^T + b - target                       (only ever a BLOCK_T x BLOCK_M tile on chip)
    dh   = (2 / (T M)) r W,   dW = (2 / (T M)) r^T h,   db = (2 / (T M)) sum_t r

Design (the Liger-Kernel fused-linear-cross-entropy idea: gradients are produced during the forward):
- `_rows_kernel`, one program per (row block of BLOCK_T rows, K chunk of BLOCK_K): loops over all M in
  tiles of BLOCK_M; per tile proj = h_blk @ W_tile^T (tl.dot, fp32 accumulation), r = proj + b - target on
  chip, sum(r^2) accumulated in registers, and dh_blk += r @ W_tile. It writes one fp32 loss partial per
  program and the finished dh rows (scaled by 2/M; the 1/T and grad_output are applied in backward so that a
  loss scale is not defeated by fp16 underflow). The row block's h stays on chip for the whole M loop when
  K <= BLOCK_K (SINGLE_K); the W tiles are re-read by every row block but total M*K, so they live in L2.
- `_cols_kernel`, one program per (M tile, K chunk, T split): loops over the row blocks of its split,
  recomputes the projection tile and r, and accumulates dW_tile += r^T @ h_blk and db_tile += sum_t r in
  registers. Each program writes its partial dW/db once into an fp32 (S, M, K) / (S, M) buffer that the host
  sums over S: deterministic, no atomics. S is chosen so that m_tiles * S fills the GPU; the partial buffer
  is S*M*K*4 bytes (e.g. 22 x 1582 x 256 x 4 = 36 MB at T = 64k), small beside the target.
Why two kernels: dh needs a reduction over M and dW a reduction over T. One pass that holds dh on chip must
keep per-row-block partials of the whole (M, K) dW in memory (8K/BLOCK_T bytes of fp32 read-modify-write
per target element: 16x the fp16 target bytes at K = 256, BLOCK_T = 64), and the converse loop order does
the same with dh. Two passes read the target twice instead, and write nothing of size T x M.

Byte floor (what any single pass must move): read target T*M*e, h T*K*e, W M*K*e, b M*e; write dh T*K*e,
dW M*K*e, db M*e. This design moves ~2*T*M*e + 2*T*K*e (target and h read by both kernels) + dh write
+ 2*S*M*K*4 (partials) + L2-resident W re-reads. FLOP floor 6*T*M*K (three GEMMs); this design does 8*T*M*K
for K <= 128 (the projection is computed twice) and 10*T*M*K for 128 < K <= 256 (the cols kernel works in
K chunks of 128 and recomputes the projection per chunk: its 256-wide dW accumulator spills on sm_80).
At K = 256 the op does 6K/e = 768 flop per target byte (fp16), above the H100 ridge (~300 flop/byte), so
it is tensor-core bound, not bandwidth bound: the 80%-of-bandwidth target can only hold for small K
(K <~ 64); at K = 256 the meaningful ceiling is tensor-core throughput. Not yet measured on a GPU.
GPU path: K % 16 == 0 and fp16/bf16/fp32 (the AOT-compiled specs); other K and float64 fall back to the
reference on CUDA. Under the interpreter every K and float64 run through the kernels (gradcheck).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import pinned, reconstruction_loss
from ..fallbacks import note_fallback, reference_reason
from ..utils import check_same_device, divisible_by_16, dot_precision, input_guard, jit_function, patch_old_interpreter
from .grads_in_forward import register_grads_in_forward

patch_old_interpreter()   # triton 3.6's interpreter with NumPy >= 2.4 (utils.py)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_T, BLOCK_M, num_warps, num_stages) per kernel, dtype and K chunking: the configs that compiled
# without a spill for sm_90 and sm_80, M divisible by 16 or not, in an ahead-of-time sweep (bf16 as fp16).
# The interpreter can run one config only (KERNELS.md).
def _rows_configs(dtype: torch.dtype, block_k: int, single_k: bool) -> list[tuple]:
    if dtype == torch.float32:
        if not single_k:
            return [(64, 32, 8, 3)]
        return [(32, 32, 4, 2)] if block_k == 256 else [(64, 32, 8, 3), (32, 32, 4, 2)]
    return [(64, 32, 8, 3), (32, 32, 4, 2)] if single_k else [(64, 32, 8, 2), (32, 32, 4, 2)]


def _cols_configs(dtype: torch.dtype, block_k: int, single_k: bool) -> list[tuple]:
    if dtype == torch.float32:
        if not single_k:
            return [(64, 32, 8, 2)]
        return [(32, 32, 4, 2)] if block_k == 128 else [(64, 32, 8, 3), (32, 32, 4, 2)]
    return [(64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2)]


_INTERPRET_CONFIG = (64, 64, 4, 1)
_MIN_BLOCK_T = 32                  # smallest BLOCK_T of any config above (sizes the loss partials)
_SPLIT_ROWS_GRANULE = 256          # rows per T split are a multiple of every BLOCK_T
# K chunk widths. The rows kernel keeps the whole (BLOCK_T, K) dh accumulator on chip up to K = 256; the
# cols kernel holds a (BLOCK_M, BLOCK_K) dW accumulator and spills at 256 on sm_80, so it uses chunks of
# 128 (for K in (128, 256] it recomputes the projection once per chunk: 5 GEMM passes instead of 4).
_ROWS_BLOCK_K = (64, 128, 256)
_COLS_BLOCK_K = (64, 128)


_LOOP_BLOCK_K = 128                # chunk width when K exceeds every single-chunk choice


def _block_k(K: int, choices) -> int:
    """The smallest choice >= K (one chunk, SINGLE_K), else _LOOP_BLOCK_K (the kernels loop over K)."""
    for bk in choices:
        if K <= bk:
            return bk
    return _LOOP_BLOCK_K


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit(do_not_specialize=["T"])
def _rows_kernel(H, W, B, TGT, DH, LOSS, T, M, K, dh_scale,
                 BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 SINGLE_K: tl.constexpr, COMPUTE_DH: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    # One row block x one K chunk; loops over every M tile. See the module docstring for the byte floor.
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    offs_k = tl.arange(0, BLOCK_K)
    kd = pid_k * BLOCK_K + offs_k                      # this program's dh columns
    kd_ok = kd < K
    if SINGLE_K:                                       # h block stays on chip for the whole M loop
        h_res = tl.load(H + rows[:, None] * K + kd[None, :], mask=row_ok[:, None] & kd_ok[None, :], other=0.0)
    sq_acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=ACC)
    dh_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        w_d = tl.load(W + cols[:, None] * K + kd[None, :], mask=col_ok[:, None] & kd_ok[None, :], other=0.0)
        if SINGLE_K:
            proj = tl.dot(h_res, tl.trans(w_d), out_dtype=ACC, input_precision=DOT_PREC)
        else:
            proj = tl.zeros([BLOCK_T, BLOCK_M], dtype=ACC)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                kk_ok = kk < K
                hk = tl.load(H + rows[:, None] * K + kk[None, :], mask=row_ok[:, None] & kk_ok[None, :], other=0.0)
                wk = tl.load(W + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & kk_ok[None, :], other=0.0)
                proj = tl.dot(hk, tl.trans(wk), proj, out_dtype=ACC, input_precision=DOT_PREC)
        bias = tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)
        ok = row_ok[:, None] & col_ok[None, :]
        tgt = tl.load(TGT + rows[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        r = tl.where(ok, proj + bias[None, :] - tgt, 0.0)
        sq_acc += r * r
        if COMPUTE_DH:
            dh_acc = tl.dot(r.to(w_d.dtype), w_d, dh_acc, out_dtype=ACC, input_precision=DOT_PREC)
    tl.store(LOSS + pid_t * tl.num_programs(1) + pid_k, tl.sum(tl.sum(sq_acc, axis=1), axis=0))
    if COMPUTE_DH:
        tl.store(DH + rows[:, None] * K + kd[None, :], (dh_acc * dh_scale).to(DH.dtype.element_ty),
                 mask=row_ok[:, None] & kd_ok[None, :])


@triton.jit(do_not_specialize=["T", "rows_per_split"])
def _cols_kernel(H, W, B, TGT, DWP, DBP, T, M, K, rows_per_split, scale,
                 BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 SINGLE_K: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    # One M tile x one K chunk x one T split; loops over the split's row blocks. Writes fp32 partials.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    offs_k = tl.arange(0, BLOCK_K)
    kd = pid_k * BLOCK_K + offs_k                      # this program's dW columns
    kd_ok = kd < K
    w_d = tl.load(W + cols[:, None] * K + kd[None, :], mask=col_ok[:, None] & kd_ok[None, :], other=0.0)
    bias = tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    db_acc = tl.zeros([BLOCK_M], dtype=ACC)
    first_row = pid_s.to(tl.int64) * rows_per_split    # rows_per_split is a multiple of BLOCK_T
    for i in range(0, rows_per_split // BLOCK_T):
        rows = first_row + i * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        h_d = tl.load(H + rows[:, None] * K + kd[None, :], mask=row_ok[:, None] & kd_ok[None, :], other=0.0)
        if SINGLE_K:
            proj = tl.dot(h_d, tl.trans(w_d), out_dtype=ACC, input_precision=DOT_PREC)
        else:
            proj = tl.zeros([BLOCK_T, BLOCK_M], dtype=ACC)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                kk_ok = kk < K
                hk = tl.load(H + rows[:, None] * K + kk[None, :], mask=row_ok[:, None] & kk_ok[None, :], other=0.0)
                wk = tl.load(W + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & kk_ok[None, :], other=0.0)
                proj = tl.dot(hk, tl.trans(wk), proj, out_dtype=ACC, input_precision=DOT_PREC)
        ok = row_ok[:, None] & col_ok[None, :]
        tgt = tl.load(TGT + rows[:, None] * M + cols[None, :], mask=ok, other=0.0).to(ACC)
        r = tl.where(ok, proj + bias[None, :] - tgt, 0.0)
        db_acc += tl.sum(r, axis=0)
        dw_acc = tl.dot(tl.trans(r.to(h_d.dtype)), h_d, dw_acc, out_dtype=ACC, input_precision=DOT_PREC)
    part = pid_s.to(tl.int64) * M
    tl.store(DWP + (part + cols[:, None]) * K + kd[None, :], dw_acc * scale, mask=col_ok[:, None] & kd_ok[None, :])
    if pid_k == 0:
        tl.store(DBP + part + cols, db_acc * scale, mask=col_ok)


def _configs(table):
    return [triton.Config({"BLOCK_T": bt, "BLOCK_M": bm}, num_warps=w, num_stages=s) for bt, bm, w, s in table]


@functools.lru_cache(maxsize=None)
def _launcher(kind: str, dtype: torch.dtype, block_k: int, single_k: bool):
    """The jit function under the interpreter; on a GPU an autotuner over that variant's configs."""
    kernel = _rows_kernel if kind == "rows" else _cols_kernel
    if _INTERPRET:
        return kernel
    table = (_rows_configs if kind == "rows" else _cols_configs)(dtype, block_k, single_k)  # pragma: no cover
    return pinned.autotune(_configs(table), key=["M", "K"])(kernel)  # pragma: no cover


def _interpret_meta() -> dict:
    bt, bm, w, s = _INTERPRET_CONFIG
    return {"BLOCK_T": bt, "BLOCK_M": bm, "num_warps": w, "num_stages": s} if _INTERPRET else {}


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(T: int, M: int, k_chunks: int, device: torch.device) -> tuple[int, int]:
    """(S, rows per split): enough (M tile, K chunk, split) programs to fill the GPU, few partials."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    m_tiles = triton.cdiv(M, 64)
    want = max(1, triton.cdiv(4 * sms, m_tiles * k_chunks))
    granules = triton.cdiv(T, _SPLIT_ROWS_GRANULE)
    splits = max(1, min(want, granules))
    rows_per_split = triton.cdiv(granules, splits) * _SPLIT_ROWS_GRANULE
    return triton.cdiv(T, rows_per_split), rows_per_split


@input_guard
def _forward(h, weight, bias, target, want_dh: bool, want_dw: bool):
    """Returns (loss 0-dim, dh_raw = 2/M r W or None, dW or None, db or None), all in the accumulation dtype
    (fp32; fp64 for fp64 inputs). dh_raw is kept in fp32, not h.dtype: in fp16 its small elements would
    round to subnormals or zero before the loss scale (grad_output) is applied in the backward."""
    T, K = h.shape
    M = weight.shape[0]
    BLOCK_K = _block_k(K, _ROWS_BLOCK_K)
    k_chunks = triton.cdiv(K, BLOCK_K)
    acc = _acc_dtype(h.dtype)
    acc_t = torch.float64 if h.dtype == torch.float64 else torch.float32
    prec = dot_precision(h.dtype)
    meta = _interpret_meta()
    loss_part = torch.empty((triton.cdiv(T, _MIN_BLOCK_T), k_chunks), device=h.device, dtype=acc_t)
    dh = torch.empty((T, K), device=h.device, dtype=acc_t) if want_dh else loss_part  # dummy pointer if unused
    grid = lambda META: (triton.cdiv(T, META["BLOCK_T"]), k_chunks)  # noqa: E731
    rows_launch = _launcher("rows", h.dtype, BLOCK_K, k_chunks == 1)
    rows_launch[grid](h, weight, bias, target, dh, loss_part, T, M, K, 2.0 / M,
                      BLOCK_K=BLOCK_K, SINGLE_K=k_chunks == 1, COMPUTE_DH=want_dh, ACC=acc, DOT_PREC=prec, **meta)
    best = getattr(rows_launch, "best_config", None)    # the autotuner's benchmark runs wrote other partials
    n_row_blocks = triton.cdiv(T, best.kwargs["BLOCK_T"] if best is not None else meta["BLOCK_T"])
    loss = loss_part[:n_row_blocks, 0].sum() / (T * M)
    dw = db = None
    if want_dw:
        BLOCK_K = _block_k(K, _COLS_BLOCK_K)
        k_chunks = triton.cdiv(K, BLOCK_K)
        S, rows_per_split = _num_splits(T, M, k_chunks, h.device)
        dw_part = torch.empty((S, M, K), device=h.device, dtype=acc_t)
        db_part = torch.empty((S, M), device=h.device, dtype=acc_t)

        def grid2(META):
            return (triton.cdiv(M, META["BLOCK_M"]), k_chunks, S)

        cols_launch = _launcher("cols", h.dtype, BLOCK_K, k_chunks == 1)
        cols_launch[grid2](h, weight, bias, target, dw_part, db_part, T, M, K, rows_per_split, 2.0 / (T * M),
                           BLOCK_K=BLOCK_K, SINGLE_K=k_chunks == 1, ACC=acc, DOT_PREC=prec, **meta)
        dw, db = dw_part.sum(0), db_part.sum(0)
    return loss, (dh if want_dh else None), dw, db


# ---------------------------------------------------------------------------------------------------------
# The op: one custom op (opaque to torch.compile, with a fake impl) that returns the loss and, as requested,
# the gradient pieces the forward produces; autograd scales them by grad_output in the backward.
@torch.library.custom_op("cmath_mer::reconstruction_loss_triton", mutates_args=())
def reconstruction_loss_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                           want_dh: bool, want_dw: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, dh_raw (T, K) or (0,), dW (M, K) or (0,), db (M,) or (0,)), in fp32 (fp64 for fp64)."""
    h, weight, bias, target = (x.contiguous() for x in (h, weight, bias, target))
    loss, dh, dw, db = _forward(h, weight, bias, target, want_dh, want_dw)
    def or_empty(x):  # every output its own tensor (custom ops may not return aliases)
        return x if x is not None else loss.new_empty((0,))
    return loss, or_empty(dh), or_empty(dw), or_empty(db)


register_grads_in_forward(reconstruction_loss_op)


def _check(h, weight, bias, target):
    if h.dim() != 2 or weight.dim() != 2 or bias.dim() != 1 or target.dim() != 2:
        raise ValueError("expected h (T, K), weight (M, K), bias (M,), target (T, M)")
    T, K = h.shape
    M = weight.shape[0]
    if weight.shape[1] != K or bias.shape[0] != M or tuple(target.shape) != (T, M):
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}, target {tuple(target.shape)}")
    if T == 0:
        raise ValueError("reconstruction loss of an empty batch (T = 0) is undefined")
    check_same_device(h=h, weight=weight, bias=bias, target=target)


def fused_reconstruction_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              target: torch.Tensor) -> torch.Tensor:
    """h: (T, K); weight: (M, K); bias: (M,); target: (T, M) -> sum((h W^T + b - target)^2) / (T M).

    Outside autocast all four share one dtype and so does the loss. In an autocast region they are cast to the
    region's dtype (fp16/bf16): GEMMs in that dtype, accumulation in fp32, loss returned in fp32.
    """
    _check(h, weight, bias, target)
    autocast = torch.is_autocast_enabled(h.device.type)
    if not (h.dtype == weight.dtype == bias.dtype == target.dtype) and not autocast:
        raise TypeError(f"h, weight, bias and target must share one dtype (got {h.dtype}, {weight.dtype}, "
                        f"{bias.dtype}, {target.dtype}); mixed dtypes are accepted in an autocast region")
    # outside the compiled specs (K % 16, float64), or fp32 without TF32 allowed (no spill-free exact-fp32 dot)
    reason = reference_reason(h.dtype if not autocast else torch.get_autocast_dtype("cuda"), h.device,
                              k_dim=h.shape[1])
    if reason is not None:
        note_fallback("reconstruction_loss", reason)
        return reconstruction_loss(h, weight, bias, target, backend="torch")
    grad = torch.is_grad_enabled()
    want_dh = grad and h.requires_grad
    want_dw = grad and (weight.requires_grad or bias.requires_grad)
    loss = reconstruction_loss_op(h, weight, bias, target, want_dh, want_dw)[0]
    return loss if autocast else loss.to(h.dtype)


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m cmath_mer.kernels.aot)

_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """A GPU launch with fp32 inputs happens only when TF32 is allowed (utils.gpu_dots_ok): one precision."""
    return ("tf32",)


def aot_specs() -> list[dict]:
    """Every (config x dtype x fp32 dot precision x constexpr flag x M divisibility) the two kernels launch with
    on a GPU.

    Each dict also carries "attrs": the divisibility the JIT sees at launch (tensor pointers from torch are
    16-byte aligned; K % 16 == 0 is required on the GPU path; M may or may not be a multiple of 16, so
    both are listed). Without attrs the loads compile unvectorised and the register counts are not the
    ones the JIT produces; pass them as ASTSource(fn, signature, constexprs, attrs).
    """
    specs = []
    rows_fn, cols_fn = jit_function(_rows_kernel), jit_function(_cols_kernel)
    rows_k = [(bk, True) for bk in _ROWS_BLOCK_K] + [(_LOOP_BLOCK_K, False)]
    cols_k = [(bk, True) for bk in _COLS_BLOCK_K] + [(_LOOP_BLOCK_K, False)]
    for (dtype, ty), prec in [(d, p) for d in _TL_NAMES.items() for p in _precisions(d[0])]:
        ptag = ""
        for m_div in (True, False):
            mtag = "m16" if m_div else "modd"
            extra = ["K", "M"] if m_div else ["K"]
            for block_k, single_k in rows_k:
                for bt, bm, w, s in _rows_configs(dtype, block_k, single_k):
                    for compute_dh in (True, False):
                        specs.append({
                            "name": f"recon_rows_{ty}{ptag}_{mtag}_t{bt}_m{bm}_k{block_k}{'' if single_k else 'loop'}"
                                    f"_{'dh' if compute_dh else 'nodh'}_w{w}_s{s}",
                            "fn": rows_fn,
                            "signature": {"H": f"*{ty}", "W": f"*{ty}", "B": f"*{ty}", "TGT": f"*{ty}",
                                          "DH": "*fp32", "LOSS": "*fp32", "T": "i32", "M": "i32", "K": "i32",
                                          "dh_scale": "fp32", "BLOCK_T": "constexpr", "BLOCK_M": "constexpr",
                                          "BLOCK_K": "constexpr", "SINGLE_K": "constexpr",
                                          "COMPUTE_DH": "constexpr", "ACC": "constexpr",
                                          "DOT_PREC": "constexpr"},
                            "constexprs": {"BLOCK_T": bt, "BLOCK_M": bm, "BLOCK_K": block_k, "SINGLE_K": single_k,
                                           "COMPUTE_DH": compute_dh, "ACC": tl.float32, "DOT_PREC": prec},
                            "attrs": divisible_by_16(["H", "W", "B", "TGT", "DH", "LOSS"] + extra),
                            "num_warps": w, "num_stages": s})
            for block_k, single_k in cols_k:
                for bt, bm, w, s in _cols_configs(dtype, block_k, single_k):
                    specs.append({
                        "name": f"recon_cols_{ty}{ptag}_{mtag}_t{bt}_m{bm}_k{block_k}{'' if single_k else 'loop'}"
                                f"_w{w}_s{s}",
                        "fn": cols_fn,
                        "signature": {"H": f"*{ty}", "W": f"*{ty}", "B": f"*{ty}", "TGT": f"*{ty}",
                                      "DWP": "*fp32", "DBP": "*fp32", "T": "i32", "M": "i32", "K": "i32",
                                      "rows_per_split": "i32", "scale": "fp32", "BLOCK_T": "constexpr",
                                      "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "SINGLE_K": "constexpr",
                                      "ACC": "constexpr", "DOT_PREC": "constexpr"},
                        "constexprs": {"BLOCK_T": bt, "BLOCK_M": bm, "BLOCK_K": block_k, "SINGLE_K": single_k,
                                       "ACC": tl.float32, "DOT_PREC": prec},
                        "attrs": divisible_by_16(["H", "W", "B", "TGT", "DWP", "DBP"] + extra),
                        "num_warps": w, "num_stages": s})
    return specs
