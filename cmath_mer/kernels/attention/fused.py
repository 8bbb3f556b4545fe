"""Triton multi-source varlen attention, forward and backward (docs/KERNELS.md, section 1).

    fused_multi_source_attention(q, k, v, cu_seqlens, *, window=None, scale=None, max_seqlen=None) -> (T, H, D)

Same contract as `reference.reference_multi_source_attention`: q (T, H, D); k, v (S, T, H, D) or lists of S tensors
(T, H, D), 1 <= S <= MAX_SOURCES = 4; a query of conversation b attends in one softmax to the keys of
conversation b in all S sources, or only to keys with |pos(query) - pos(key)| <= window (positions inside
the conversation).

Kernels (flash attention 2, exp2 space, log-sum-exp saved in log2 units; lse and delta are (H, T),
head-major, so a query block's BM statistics are one contiguous load or store, not a stride-H gather):
  _attn_fwd_kernel      grid (query blocks, H)            -> o, lse
  _attn_bwd_preprocess  grid (row blocks of T, H)          -> delta = rowsum(o * do)
  _attn_bwd_dq_kernel   grid (query blocks, H)             -> dq   (loops over sources x key blocks)
  _attn_bwd_dkv_kernel  grid (key blocks, H, S)            -> dk, dv (loops over query blocks)
  _attn_bwd_onepass_kernel grid (conversations, H)         -> dq, dk, dv in one pass, instead of the three
                        above when the caller's host bound max_seqlen fits one tile (onepass_block)
Every program owns its outputs: no atomics, so the backward is deterministic.

How the work is laid out (the (conversation, block) table, skipped and interior blocks) and the cost
model / roofline on an H100: docs/KERNELS.md, section 1, "Inside the Triton kernels".
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from cmath_mer.kernels.cu_seqlens import check_cu_seqlens

from .. import pinned
from ..fallbacks import note_fallback, reference_reason
from ..utils import (
    check_same_device,
    divisible_by_16,
    dot_precision,
    input_guard,
    jit_function,
    once_differentiable,
    patch_old_interpreter,
    register_autocast_to_region_dtype,
)
from .blocks import aot_specs as block_table_aot_specs
from .blocks import prepare_block_indices
from .reference import as_sources
from .tuning import (
    AUTOTUNE_KEY,
    BWD_CONFIGS,
    FWD_CONFIGS,
    HEAD_DIMS,
    PRE_CONFIGS,
    block_dim,
    block_sizes,
    config_allowed,
    onepass_block,
    onepass_max_rows,
    onepass_warps,
    pruner,
    split_blocks,
)

patch_old_interpreter()   # triton 3.6's interpreter with NumPy >= 2.4 (utils.py)

LOG2E = 1.4426950408889634
_HEURISTICS = {
    "HAS_WINDOW": lambda a: a["W"] >= 0,
    "ACC": lambda a: tl.float64 if a["q"].dtype == torch.float64 else tl.float32,
    "SPLIT": lambda a: split_blocks(a["q"].element_size()),
}


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _block_of(block_indices, cu_seqlens, i_blk):
    """(conversation, block in it, first packed row, length) of program i_blk. The grid is an upper bound
    on the number of blocks (no host sync to size it): a padding row (conversation -1) gets length 0, so
    its program loads nothing, loops over nothing and stores nothing."""
    i_n = tl.load(block_indices + i_blk * 2).to(tl.int64)
    i_m = tl.load(block_indices + i_blk * 2 + 1).to(tl.int32)
    real = i_n >= 0
    i_n = tl.maximum(i_n, 0)
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    return i_n, i_m, bos, tl.where(real, eos - bos, 0)


# Addressing: the S <= MAX_SOURCES sources arrive as separate base pointers k0..k3, v0..v3 (unused slots
# repeat source 0 and are never read), each read in place through one set of strides (sk_t, sk_h; the last
# dim contiguous), so they may be views of each source's own kv projection; q, o, lse, do, dq are
# contiguous, and dk, dv one contiguous (S, T, H, D) buffer, row t head h of source s at
# ((s * T + t) * H + h) * D. Each tile gets one int64 scalar base pointer (its first row) plus a
# loop-invariant int32 offset tile r * stride + d, which keeps the 2-D pointer tensors out of 64-bit registers.
MAX_SOURCES = 4


@triton.jit
def _source(i_s, p0, p1, p2, p3):
    """Base pointer of source i_s (runtime, < 4): a chain of scalar selects, once per source and program. The
    pointers' 16-byte alignment stays known through the selects: the sm_90 PTX has the same 16-byte loads
    (cp.async.cg, ld.global.v4) as the kernels had with one (S, T, H, D) pointer. S stays a runtime argument:
    one compiled kernel serves every S (no more AOT configs)."""
    return tl.where(i_s == 3, p3, tl.where(i_s == 2, p2, tl.where(i_s == 1, p1, p0)))


# Interior and edge blocks (FlashAttention-2's split of the causal loop into unmasked blocks and the masked
# diagonal). A program walks the blocks of the other side (keys for fwd and dq, queries for dkv) from lo to hi
# in steps of the block; a block is INTERIOR when every pair of its tile and the program's tile is a real
# pair (both rows inside the conversation, and |i - j| <= W with a window), so its loads take no row mask and
# its scores no mask arithmetic (no `dist` tile, no where, and in the forward no all-masked-row guard).
# Because the condition is monotone in the block's first row, the interior blocks form one run [a, b) and
# each walk is two loops: the edge blocks [lo, a) then [b, hi) in one masked loop that jumps over the run
# (three loops, edge-interior-edge, spilled on sm_80: AOT report), then the interior run [a, b). Edge blocks
# keep the full mask: the window's band edges, a conversation's last partial block, and every block when
# the window is narrower than the tiles (then a = b and the walk is the masked loop it always was). The
# order of the blocks changes the rounding of the sums only; each program's order is fixed (deterministic).
@triton.jit
def _split(lo, hi, first_ok, last_ok, BLK: tl.constexpr):
    """(a, b): the blocks j0 = lo + i * BLK (j0 < hi) whose rows j0 .. j0 + BLK - 1 all lie in [first_ok,
    last_ok] are those with a <= j0 < b (lo <= a <= b; a run, possibly empty). Requires hi >= lo >= 0 and
    last_ok <= hi - 1; only non-negative values are divided (integer division rounds toward zero on the GPU)."""
    n = tl.cdiv(hi - lo, BLK)                                         # blocks in the walk
    i_a = tl.minimum(tl.cdiv(tl.maximum(first_ok - lo, 0), BLK), n)   # first block starting at >= first_ok
    i_b = tl.minimum(tl.maximum(tl.maximum(last_ok + 1 - lo, 0) // BLK, i_a), n)   # blocks ending <= last_ok
    return lo + i_a * BLK, lo + i_b * BLK


@triton.jit
def _query_block_keys(q0, N, W, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      SPLIT: tl.constexpr):
    """(lo, hi, j_a, j_b) for the query block of rows q0 .. q0 + BM - 1 of a conversation of N: the keys
    [lo, hi) it sees and their interior run [j_a, j_b) (blocks of BN keys that need no mask; empty, j_a = j_b =
    hi, without SPLIT: one masked walk). Query rows past N (a partial last block) are zero rows whose output is
    never stored, so only the real rows q0 .. min(q0 + BM, N) - 1 decide what is interior."""
    if HAS_WINDOW:
        lo = tl.maximum(0, q0 - W)
        hi = tl.minimum(N, q0 + BM + W)
    else:
        lo = 0
        hi = N
    if SPLIT:
        if HAS_WINDOW:
            j_a, j_b = _split(lo, hi, tl.minimum(q0 + BM, N) - 1 - W, tl.minimum(N - 1, q0 + W), BN)
        else:
            j_a = 0
            j_b = (N // BN) * BN                                         # every full key block
    else:
        j_a = hi
        j_b = hi
    return lo, hi, j_a, j_b


@triton.jit
def _key_block(k_src, v_src, tile_k, m_d, bos, head_k, sk_t, j, skip_at, skip, hi, BN: tl.constexpr,
               MASKED: tl.constexpr):
    """Key and value block j of one source for the forward and dq walks -> b_k, b_v (BN, BD), pos_k, m_k (BN,).
    MASKED: an edge block, read at j + skip once j >= skip_at (the jump over the interior run), rows >= hi
    read as 0; else an interior block, every row real (pos_k and m_k then go unused)."""
    j0 = j
    if MASKED:
        j0 = tl.where(j >= skip_at, j + skip, j)
    base_k = (bos + j0).to(tl.int64) * sk_t + head_k
    pos_k = j0 + tl.arange(0, BN)
    m_k = pos_k < hi
    if MASKED:
        b_k = tl.load(k_src + base_k + tile_k, mask=m_k[:, None] & m_d[None, :], other=0.)
        b_v = tl.load(v_src + base_k + tile_k, mask=m_k[:, None] & m_d[None, :], other=0.)
    else:
        b_k = tl.load(k_src + base_k + tile_k, mask=m_d[None, :], other=0.)
        b_v = tl.load(v_src + base_k + tile_k, mask=m_d[None, :], other=0.)
    return b_k, b_v, pos_k, m_k


@triton.jit
def _fwd_blocks(b_q, b_m, b_l, b_acc, k_src, v_src, tile_k, m_d, bos, head_k, sk_t, pos_q, j_start, j_end,
                skip_at, skip, hi, W, qk_scale, BN: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over the key blocks j = j_start, j_start + BN, ... < j_end of one source: b_q (BM, BD),
    running max b_m and sum b_l (BM,) in log2 units, b_acc (BM, BD). MASKED: edge blocks (keys >= hi and
    pairs outside the window get p = 0), and block j is read at j + skip once j >= skip_at (the jump over
    the interior run); else interior blocks (every pair real: no mask)."""
    for j in range(j_start, j_end, BN):
        b_k, b_v, pos_k, m_k = _key_block(k_src, v_src, tile_k, m_d, bos, head_k, sk_t, j, skip_at, skip, hi,
                                          BN, MASKED)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC).to(ACC) * qk_scale     # (BM, BN)
        if MASKED:
            valid = m_k[None, :]
            if HAS_WINDOW:
                dist = pos_q[:, None] - pos_k[None, :]
                valid = valid & (dist <= W) & (dist >= -W)
            b_s = tl.where(valid, b_s, float("-inf"))
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            b_pivot = tl.where(b_m_new == float("-inf"), 0., b_m_new)   # finite: all-masked row -> p = 0
        else:
            b_pivot = tl.maximum(b_m, tl.max(b_s, 1))                   # finite: every score is real
            b_m_new = b_pivot
        b_p = tl.exp2(b_s - b_pivot[:, None])
        b_alpha = tl.exp2(b_m - b_pivot)                                # 0 while b_m is still -inf
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC).to(ACC)
        b_m = b_m_new
    return b_m, b_l, b_acc


@triton.heuristics(_HEURISTICS)
@pinned.autotune(configs=FWD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=pruner("fwd"))
@triton.jit(do_not_specialize=["T", "S", "W"])
def _attn_fwd_kernel(q, k0, k1, k2, k3, v0, v1, v2, v3, o, lse, cu_seqlens, block_indices, scale, T, S, W,
                     sk_t, sk_h,
                     H, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    i_blk = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_n, i_m, bos, N = _block_of(block_indices, cu_seqlens, i_blk)

    q0 = i_m * BM
    pos_q = q0 + tl.arange(0, BM)                                        # positions in the conversation
    offs_d = tl.arange(0, BD)
    m_q = pos_q < N
    m_d = offs_d < D
    tile_q = tl.arange(0, BM)[:, None] * (H * D) + offs_d[None, :]
    tile_k = tl.arange(0, BN)[:, None] * sk_t + offs_d[None, :]
    row_q0 = (bos + q0).to(tl.int64) * H + i_h                           # packed (t, h) row of q / o
    stat_q0 = i_h * T + bos + q0                                         # lse (H, T): the block's BM rows, contiguous
    b_q = tl.load(q + row_q0 * D + tile_q, mask=m_q[:, None] & m_d[None, :], other=0.)
    qk_scale = scale * 1.4426950408889634                                 # scores in log2 units

    lo, hi, j_a, j_b = _query_block_keys(q0, N, W, BM, BN, HAS_WINDOW, SPLIT)
    head_k = i_h * sk_h

    b_m = tl.full([BM], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BM], dtype=ACC)
    b_acc = tl.zeros([BM, BD], dtype=ACC)
    for i_s in range(S):
        k_src = _source(i_s, k0, k1, k2, k3)                             # the source's own tensor, in place
        v_src = _source(i_s, v0, v1, v2, v3)
        b_m, b_l, b_acc = _fwd_blocks(b_q, b_m, b_l, b_acc, k_src, v_src, tile_k, m_d, bos, head_k, sk_t, pos_q,
                                      lo, hi - (j_b - j_a), j_a, j_b - j_a, hi, W, qk_scale, BN, True, HAS_WINDOW,
                                      ACC, DOT_PREC)
        if SPLIT:
            b_m, b_l, b_acc = _fwd_blocks(b_q, b_m, b_l, b_acc, k_src, v_src, tile_k, m_d, bos, head_k, sk_t,
                                          pos_q, j_a, j_b, 0, 0, hi, W, qk_scale, BN, False, HAS_WINDOW, ACC, DOT_PREC)

    b_empty = b_l == 0.
    b_o = b_acc / tl.where(b_empty, 1., b_l)[:, None]
    b_lse = tl.where(b_empty, 0., b_m + tl.log2(tl.where(b_empty, 1., b_l)))
    tl.store(o + row_q0 * D + tile_q, b_o.to(o.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    tl.store(lse + stat_q0 + tl.arange(0, BM), b_lse.to(lse.dtype.element_ty), mask=m_q)


@pinned.autotune(configs=PRE_CONFIGS, key=["D", "BD", "BR"])
@triton.jit(do_not_specialize=["T"])
def _attn_bwd_preprocess(o, do, delta, T, H, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """delta[h, t] = sum_d o[t, h, d] * do[t, h, d]: grid (row blocks of T, H), so each program stores BR
    contiguous elements of the (H, T) delta (head-major, like lse)."""
    t0 = tl.program_id(0).to(tl.int64) * BR
    i_h = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BR)
    offs_d = tl.arange(0, BD)
    m_t = t0 + rows < T
    mask = m_t[:, None] & (offs_d < D)[None, :]
    tile = rows[:, None] * (H * D) + offs_d[None, :]                     # rows t0.. of head i_h in (T, H, D)
    base = (t0 * H + i_h) * D
    b_o = tl.load(o + base + tile, mask=mask, other=0.).to(delta.dtype.element_ty)
    b_do = tl.load(do + base + tile, mask=mask, other=0.).to(delta.dtype.element_ty)
    tl.store(delta + i_h * T + t0 + rows, tl.sum(b_o * b_do, 1), mask=m_t)



@triton.jit
def _dq_blocks(b_dq, b_q, b_do, b_lse, b_delta, k_src, v_src, tile_k, m_q, m_d, bos, head_k, sk_t, pos_q,
               j_start, j_end, skip_at, skip, hi, W, qk_scale, BN: tl.constexpr, MASKED: tl.constexpr,
               HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """b_dq (BM, BD) += dS K over the key blocks j = j_start, ... < j_end of one source (unscaled). MASKED:
    edge blocks, jumping as in _fwd_blocks; else interior (no mask: a padding query row has q = do = lse =
    delta = 0, so p = 1 and dS = 0 there, and its dq row is never stored)."""
    for j in range(j_start, j_end, BN):
        b_k, b_v, pos_k, m_k = _key_block(k_src, v_src, tile_k, m_d, bos, head_k, sk_t, j, skip_at, skip, hi,
                                          BN, MASKED)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC).to(ACC) * qk_scale     # (BM, BN)
        if MASKED:
            valid = m_q[:, None] & m_k[None, :]
            if HAS_WINDOW:
                dist = pos_q[:, None] - pos_k[None, :]
                valid = valid & (dist <= W) & (dist >= -W)
            b_p = tl.where(valid, tl.exp2(b_s - b_lse[:, None]), 0.)
        else:
            b_p = tl.exp2(b_s - b_lse[:, None])
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC).to(ACC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC).to(ACC)
    return b_dq


@triton.heuristics(_HEURISTICS)
@pinned.autotune(configs=BWD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=pruner("dq"))
@triton.jit(do_not_specialize=["T", "S", "W"])
def _attn_bwd_dq_kernel(q, k0, k1, k2, k3, v0, v1, v2, v3, do, lse, delta, dq, cu_seqlens, block_indices,
                        scale, T, S, W, sk_t, sk_h,
                        H, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    i_blk = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_n, i_m, bos, N = _block_of(block_indices, cu_seqlens, i_blk)

    q0 = i_m * BM
    pos_q = q0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_q = pos_q < N
    m_d = offs_d < D
    m_qd = m_q[:, None] & m_d[None, :]
    tile_q = tl.arange(0, BM)[:, None] * (H * D) + offs_d[None, :]
    tile_k = tl.arange(0, BN)[:, None] * sk_t + offs_d[None, :]
    row_q0 = (bos + q0).to(tl.int64) * H + i_h
    stat_q0 = i_h * T + bos + q0                                         # lse, delta (H, T): contiguous
    b_q = tl.load(q + row_q0 * D + tile_q, mask=m_qd, other=0.)
    b_do = tl.load(do + row_q0 * D + tile_q, mask=m_qd, other=0.)
    b_lse = tl.load(lse + stat_q0 + tl.arange(0, BM), mask=m_q, other=0.).to(ACC)
    b_delta = tl.load(delta + stat_q0 + tl.arange(0, BM), mask=m_q, other=0.).to(ACC)
    qk_scale = scale * 1.4426950408889634

    lo, hi, j_a, j_b = _query_block_keys(q0, N, W, BM, BN, HAS_WINDOW, SPLIT)      # as in the forward
    head_k = i_h * sk_h

    b_dq = tl.zeros([BM, BD], dtype=ACC)
    for i_s in range(S):
        k_src = _source(i_s, k0, k1, k2, k3)
        v_src = _source(i_s, v0, v1, v2, v3)
        b_dq = _dq_blocks(b_dq, b_q, b_do, b_lse, b_delta, k_src, v_src, tile_k, m_q, m_d, bos, head_k, sk_t, pos_q,
                          lo, hi - (j_b - j_a), j_a, j_b - j_a, hi, W, qk_scale, BN, True, HAS_WINDOW, ACC, DOT_PREC)
        if SPLIT:
            b_dq = _dq_blocks(b_dq, b_q, b_do, b_lse, b_delta, k_src, v_src, tile_k, m_q, m_d, bos, head_k, sk_t,
                              pos_q, j_a, j_b, 0, 0, hi, W, qk_scale, BN, False, HAS_WINDOW, ACC, DOT_PREC)
    b_dq = b_dq * scale
    tl.store(dq + row_q0 * D + tile_q, b_dq.to(dq.dtype.element_ty), mask=m_qd)


@triton.jit
def _dkv_blocks(b_dk, b_dv, b_k, b_v, q, do, lse, delta, tile_q, m_k, m_d, bos, i_h, T, H, pos_k, i_start, i_end,
                skip_at, skip, hi, W, qk_scale, D: tl.constexpr, BM: tl.constexpr, MASKED: tl.constexpr,
                HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """b_dv (BN, BD) += P^T dO and b_dk += dS^T Q (unscaled) over the query blocks i = i_start, ... < i_end.
    MASKED: edge blocks (queries >= hi and pairs outside the window get p = 0), jumping as in _fwd_blocks;
    else interior (no mask)."""
    for i in range(i_start, i_end, BM):
        i0 = i
        if MASKED:                                                   # the edge walk jumps the interior run
            i0 = tl.where(i >= skip_at, i + skip, i)
        row_q0 = (bos + i0).to(tl.int64) * H + i_h
        stat_q0 = i_h * T + bos + i0                                     # lse, delta (H, T): contiguous
        if MASKED:
            pos_q = i0 + tl.arange(0, BM)
            m_q = pos_q < hi
            m_qd = m_q[:, None] & m_d[None, :]
            b_q = tl.load(q + row_q0 * D + tile_q, mask=m_qd, other=0.)
            b_do = tl.load(do + row_q0 * D + tile_q, mask=m_qd, other=0.)
            b_lse = tl.load(lse + stat_q0 + tl.arange(0, BM), mask=m_q, other=0.).to(ACC)
            b_delta = tl.load(delta + stat_q0 + tl.arange(0, BM), mask=m_q, other=0.).to(ACC)
        else:
            b_q = tl.load(q + row_q0 * D + tile_q, mask=m_d[None, :], other=0.)
            b_do = tl.load(do + row_q0 * D + tile_q, mask=m_d[None, :], other=0.)
            b_lse = tl.load(lse + stat_q0 + tl.arange(0, BM)).to(ACC)
            b_delta = tl.load(delta + stat_q0 + tl.arange(0, BM)).to(ACC)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC).to(ACC) * qk_scale   # (BN, BM): scores^T
        if MASKED:
            valid = m_k[:, None] & m_q[None, :]
            if HAS_WINDOW:
                dist = pos_q[None, :] - pos_k[:, None]
                valid = valid & (dist <= W) & (dist >= -W)
            b_pt = tl.where(valid, tl.exp2(b_st - b_lse[None, :]), 0.)
        else:
            b_pt = tl.exp2(b_st - b_lse[None, :])
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PREC).to(ACC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC).to(ACC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PREC).to(ACC)
    return b_dk, b_dv


@triton.heuristics(_HEURISTICS)
@pinned.autotune(configs=BWD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=pruner("dkv"))
@triton.jit(do_not_specialize=["T", "S", "W"])
def _attn_bwd_dkv_kernel(q, k0, k1, k2, k3, v0, v1, v2, v3, do, lse, delta, dk, dv, cu_seqlens,
                         block_indices, scale, T, S, W, sk_t, sk_h,
                         H, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    # BN keys of source i_s per program; loops over query blocks of BM rows of the same conversation.
    i_blk = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_n, i_j, bos, N = _block_of(block_indices, cu_seqlens, i_blk)

    key0 = i_j * BN                                          # first key of the block (k0 is a pointer)
    pos_k = key0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    m_k = pos_k < N
    m_d = offs_d < D
    m_kd = m_k[:, None] & m_d[None, :]
    tile_q = tl.arange(0, BM)[:, None] * (H * D) + offs_d[None, :]
    tile_k = tl.arange(0, BN)[:, None] * (H * D) + offs_d[None, :]                 # dk, dv: contiguous
    row_k = (bos + key0).to(tl.int64)
    base_k = ((i_s * T.to(tl.int64) + row_k) * H + i_h) * D
    k = _source(i_s, k0, k1, k2, k3)                                               # source i_s, in place
    v = _source(i_s, v0, v1, v2, v3)
    src_k = row_k * sk_t + i_h * sk_h                                              # k, v: strided
    b_k = tl.load(k + src_k + tl.arange(0, BN)[:, None] * sk_t + offs_d[None, :], mask=m_kd, other=0.)
    b_v = tl.load(v + src_k + tl.arange(0, BN)[:, None] * sk_t + offs_d[None, :], mask=m_kd, other=0.)
    qk_scale = scale * 1.4426950408889634

    # Query range and its interior run. A partial key block (key0 + BN > N) has no interior: its padding key
    # rows are zero, so their p = exp2(-lse) is unbounded (their dk, dv rows are never stored, but an edge
    # block keeps them at p = 0 rather than reason about inf * 0 in rows nobody reads).
    full_k = key0 + BN <= N
    if HAS_WINDOW:
        lo = tl.maximum(0, key0 - W)
        hi = tl.minimum(N, key0 + BN + W)
    else:
        lo = 0
        hi = N
    if SPLIT:
        if HAS_WINDOW:
            i_a, i_b = _split(lo, hi, key0 + BN - 1 - W, tl.where(full_k, tl.minimum(N - 1, key0 + W), lo - 1), BM)
        else:
            i_a = 0
            i_b = tl.where(full_k, (N // BM) * BM, 0)                    # every full query block
    else:
        i_a = hi                                                         # one masked walk over [lo, hi)
        i_b = hi
    b_dk = tl.zeros([BN, BD], dtype=ACC)
    b_dv = tl.zeros([BN, BD], dtype=ACC)
    b_dk, b_dv = _dkv_blocks(b_dk, b_dv, b_k, b_v, q, do, lse, delta, tile_q, m_k, m_d, bos, i_h, T, H, pos_k,
                             lo, hi - (i_b - i_a), i_a, i_b - i_a, hi, W, qk_scale, D, BM, True, HAS_WINDOW, ACC,
                             DOT_PREC)
    if SPLIT:
        b_dk, b_dv = _dkv_blocks(b_dk, b_dv, b_k, b_v, q, do, lse, delta, tile_q, m_k, m_d, bos, i_h, T, H, pos_k,
                                 i_a, i_b, 0, 0, hi, W, qk_scale, D, BM, False, HAS_WINDOW, ACC, DOT_PREC)
    b_dk = b_dk * scale
    tl.store(dk + base_k + tile_k, b_dk.to(dk.dtype.element_ty), mask=m_kd)
    tl.store(dv + base_k + tile_k, b_dv.to(dv.dtype.element_ty), mask=m_kd)


# One pass: conversations no longer than one block. A program per (conversation, head) holds the
# conversation's q, o, do, lse and, one source at a time, its k and v for that head in one BL-row tile each,
# computes P and dS once and writes dq, dk, dv: no delta preprocess, no second kernel, no atomics (every
# output row has one owner), one fixed order of operations (deterministic). It is chosen on the host from a
# bound the caller passes (max_seqlen, a host int: see attention_backward), never from cu_seqlens.
@triton.jit
def _poison_rows(ptr, base, n, rows_stride, tile, m_d, BL: tl.constexpr, BD: tl.constexpr):
    """NaN into rows 0 .. n-1 (row r at ptr + base + r * rows_stride + d) of one head: the cold path of a
    conversation longer than the tile (a broken max_seqlen contract), so its gradients cannot pass for real."""
    nan = tl.full([BL, BD], float("nan"), dtype=tl.float32)
    for r0 in range(0, n, BL):
        m_r = r0 + tl.arange(0, BL) < n
        tl.store(ptr + base + tile, nan.to(ptr.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
        base += BL * rows_stride                                         # int64: the row offset of r0 + BL


@triton.heuristics({"HAS_WINDOW": _HEURISTICS["HAS_WINDOW"], "ACC": _HEURISTICS["ACC"]})
@triton.jit(do_not_specialize=["T", "S", "W"])
def _attn_bwd_onepass_kernel(q, k0, k1, k2, k3, v0, v1, v2, v3, o, do, lse, dq, dk, dv, cu_seqlens, scale, T, S, W,
                             sk_t, sk_h,
                             H, D: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """grid (B, H): conversation i_n, head i_h, N <= BL rows. Scores are computed keys x queries (BL, BL), as
    in the dk/dv kernel, so P^T and dS^T feed dv = P^T dO and dk = dS^T Q directly and only dq = dS K needs
    the transpose. delta = rowsum(o * do) is computed here from the o and do tiles (fp32, as the preprocess)."""
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    N = tl.load(cu_seqlens + i_n + 1).to(tl.int32) - bos

    rows = tl.arange(0, BL)
    offs_d = tl.arange(0, BD)
    m_r = rows < N
    m_d = offs_d < D
    m_rd = m_r[:, None] & m_d[None, :]
    tile = rows[:, None] * (H * D) + offs_d[None, :]                      # q, o, do, dq, dk, dv rows
    tile_k = rows[:, None] * sk_t + offs_d[None, :]                       # k, v: strided, in place
    row0 = bos.to(tl.int64) * H + i_h                                     # packed (t, h) row of the first query
    src0 = bos.to(tl.int64) * sk_t + i_h * sk_h
    if N > BL:                                 # max_seqlen was not a bound: NaN gradients, never wrong numbers
        _poison_rows(dq, row0 * D, N, H * D, tile, m_d, BL, BD)
        for i_s in range(S):
            base = ((i_s * T.to(tl.int64) + bos) * H + i_h) * D
            _poison_rows(dk, base, N, H * D, tile, m_d, BL, BD)
            _poison_rows(dv, base, N, H * D, tile, m_d, BL, BD)
    else:
        b_q = tl.load(q + row0 * D + tile, mask=m_rd, other=0.)
        b_do = tl.load(do + row0 * D + tile, mask=m_rd, other=0.)
        b_o = tl.load(o + row0 * D + tile, mask=m_rd, other=0.)
        b_delta = tl.sum(b_o.to(ACC) * b_do.to(ACC), 1)                                    # (BL,) queries
        b_lse = tl.load(lse + i_h * T + bos + rows, mask=m_r, other=0.).to(ACC)
        qk_scale = scale * 1.4426950408889634
        valid = m_r[:, None] & m_r[None, :]                                                # (keys, queries)
        if HAS_WINDOW:
            dist = rows[None, :] - rows[:, None]
            valid = valid & (dist <= W) & (dist >= -W)
        b_dq = tl.zeros([BL, BD], dtype=ACC)
        for i_s in range(S):
            k_src = _source(i_s, k0, k1, k2, k3)
            v_src = _source(i_s, v0, v1, v2, v3)
            b_k = tl.load(k_src + src0 + tile_k, mask=m_rd, other=0.)
            b_v = tl.load(v_src + src0 + tile_k, mask=m_rd, other=0.)
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC).to(ACC) * qk_scale      # scores^T
            b_pt = tl.where(valid, tl.exp2(b_st - b_lse[None, :]), 0.)
            b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PREC).to(ACC)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC).to(ACC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PREC).to(ACC) * scale
            b_dq += tl.dot(tl.trans(b_dst).to(b_k.dtype), b_k, input_precision=DOT_PREC).to(ACC)
            base = ((i_s * T.to(tl.int64) + bos) * H + i_h) * D                           # dk, dv (S, T, H, D)
            tl.store(dk + base + tile, b_dk.to(dk.dtype.element_ty), mask=m_rd)
            tl.store(dv + base + tile, b_dv.to(dv.dtype.element_ty), mask=m_rd)
        tl.store(dq + row0 * D + tile, (b_dq * scale).to(dq.dtype.element_ty), mask=m_rd)


# ----------------------------------------------------------------------------------------------------------
# launchers. k and v are lists of S tensors (T, H, D) (reference.as_sources turns an (S, T, H, D) tensor into
# such a list of views), read in place.
# ----------------------------------------------------------------------------------------------------------
def _check(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or len(k) != len(v) or any(x.shape != q.shape for x in (*k, *v)):
        raise ValueError(f"expected q (T, H, D) and k, v as (S, T, H, D) tensors or S tensors (T, H, D) each; got "
                         f"q {tuple(q.shape)}, k {[tuple(x.shape) for x in k]}, v {[tuple(x.shape) for x in v]}")
    if not 1 <= len(k) <= MAX_SOURCES:
        raise ValueError(f"{len(k)} key/value sources: the Triton kernels take 1 to {MAX_SOURCES} (one pointer "
                         "argument per source); use backend='torch' for more")
    if q.shape[-1] > max(HEAD_DIMS):
        raise ValueError(f"head dim {q.shape[-1]} > {max(HEAD_DIMS)}: the kernel keeps a (block, head dim) "
                         "tile per operand on chip and supports head dims up to 128")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a (B+1,) tensor")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    check_same_device(q=q, cu_seqlens=cu_seqlens, **{f"k{i}": x for i, x in enumerate(k)},
                      **{f"v{i}": x for i, x in enumerate(v)})


def _layout(q, k, v):
    """q contiguous (a projection's output already is: no copy). The sources are read in place through one
    set of strides, as the views of S projections of one width are (the last dim contiguous). If their
    strides differ, or the last dim is not contiguous, every source is copied once (contiguous): one stride
    set keeps the kernels' offset tiles, and so their registers, as few as with contiguous inputs (AOT
    report)."""
    q = q.contiguous()
    if k[0].stride(-1) != 1 or any(x.stride() != k[0].stride() for x in (*k, *v)):
        k, v = [x.contiguous() for x in k], [x.contiguous() for x in v]
    return q, k, v


def _source_args(k: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
    """Kernel arguments k0..k3, v0..v3, then the shared strides (t, h). Unused slots repeat source 0: a
    valid pointer the kernels never read (they loop over the first S)."""
    pad = MAX_SOURCES - len(k)
    return [*k, *[k[0]] * pad, *v, *[v[0]] * pad, k[0].stride(0), k[0].stride(1)]


def _window(window: int, T: int) -> int:
    """Kernel window: -1 for none. A window >= T - 1 restricts nothing (no conversation is longer than T), so
    it becomes 'none'; this also keeps q0 + BM + W inside int32 for any window (e.g. a 2**31 - 1 sentinel)."""
    return -1 if window < 0 or window >= T - 1 else window


@input_guard
def attention_forward(q, k, v, cu_seqlens, window: int, scale: float):
    """q (T, H, D) contiguous; k, v lists of S tensors (T, H, D) sharing one stride set -> (o, lse); lse (H, T)
    (head-major: a query block's statistics are contiguous) in log2 units, fp32 (fp64 for fp64 inputs).
    window < 0 means none."""
    T, H, D = q.shape
    S = len(k)
    BM, BN = block_sizes(D, q.element_size())["fwd"]
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=stat_dtype, device=q.device)
    if T > 0:
        table = prepare_block_indices(cu_seqlens, BM, T)
        *ptrs, st_t, st_h = _source_args(k, v)
        _attn_fwd_kernel[(table.shape[0], H)](q, *ptrs, o, lse, cu_seqlens, table, scale, T, S, _window(window, T),
                                              st_t, st_h, H=H, D=D, BD=block_dim(D), BM=BM, BN=BN,
                                              DOT_PREC=dot_precision(q.dtype))
    return o, lse


@input_guard
def attention_backward(q, k, v, o, lse, do, cu_seqlens, window: int, scale: float, max_seqlen: int = -1):
    """-> dq (T, H, D) and dk, dv (S, T, H, D): one buffer each, source s's gradient is its slice s.
    max_seqlen: a host bound on every conversation's length (-1: unknown). When it fits one tile
    (onepass_block) one kernel computes dq, dk and dv, one program per (conversation, head); otherwise the
    delta preprocess, the dq kernel and the dk/dv kernel run. The bound is the caller's: cu_seqlens is never
    read here. A conversation longer than the bound gets NaN gradients (its own rows, every source)."""
    T, H, D = q.shape
    S = len(k)
    BD = block_dim(D)
    blocks = block_sizes(D, q.element_size())
    window = _window(window, T)
    prec = dot_precision(q.dtype)
    dq = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((S, T, H, D), dtype=k[0].dtype, device=q.device)
    dv = torch.empty((S, T, H, D), dtype=v[0].dtype, device=q.device)
    if T == 0:
        return dq, dk, dv
    BL = onepass_block(max_seqlen, D, q.element_size())
    if BL:
        *ptrs, st_t, st_h = _source_args(k, v)
        _attn_bwd_onepass_kernel[(cu_seqlens.numel() - 1, H)](
            q, *ptrs, o, do, lse, dq, dk, dv, cu_seqlens, scale, T, S, window, st_t, st_h, H=H, D=D, BD=BD, BL=BL,
            DOT_PREC=prec, num_warps=onepass_warps(BL, BD, q.element_size()), num_stages=1, maxnreg=255)
        return dq, dk, dv
    delta = torch.empty((H, T), dtype=lse.dtype, device=q.device)                 # like lse
    BR = 64
    _attn_bwd_preprocess[(triton.cdiv(T, BR), H)](o, do, delta, T, H, D=D, BD=BD, BR=BR)
    *ptrs, st_t, st_h = _source_args(k, v)
    BM, BN = blocks["dq"]
    table = prepare_block_indices(cu_seqlens, BM, T)
    _attn_bwd_dq_kernel[(table.shape[0], H)](q, *ptrs, do, lse, delta, dq, cu_seqlens, table, scale,
                                             T, S, window, st_t, st_h, H=H, D=D, BD=BD, BM=BM, BN=BN,
                                             DOT_PREC=prec)
    BM, BN = blocks["dkv"]
    if BN != blocks["dq"][0]:                           # the dq table serves dk/dv when the block sizes agree
        table = prepare_block_indices(cu_seqlens, BN, T)
    _attn_bwd_dkv_kernel[(table.shape[0], H, S)](q, *ptrs, do, lse, delta, dk, dv, cu_seqlens, table,
                                                 scale, T, S, window, st_t, st_h, H=H, D=D, BD=BD,
                                                 BM=BM, BN=BN, DOT_PREC=prec)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# the op: forward and backward as PyTorch custom ops (opaque to torch.compile, fake impls for shapes),
# autograd over them, and the autocast rule (docs/KERNELS.md, precision policy). k and v are `Tensor[]`:
# S tensors (T, H, D), read in place when they share one stride set with the last dim contiguous (_layout).
# ----------------------------------------------------------------------------------------------------------
def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("cmath_mer::multi_source_attention_triton", mutates_args=())
def attention_op(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], cu_seqlens: torch.Tensor,
                 window: int, scale: float, max_seqlen: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o (T, H, D), lse (H, T) in log2 units). window < 0: none. q, k, v are read in place (strides).
    max_seqlen (-1: unknown) is a host bound on the conversation lengths, used by the backward only."""
    _check(q, k, v, cu_seqlens)
    if cu_seqlens.device.type == "cpu":      # a host read costs nothing here; CUDA batches are checked when built
        check_cu_seqlens(cu_seqlens, q.shape[0])
    q, k, v = _layout(q, k, v)
    return attention_forward(q, k, v, cu_seqlens.to(torch.int32), window, scale)


@attention_op.register_fake
def _(q, k, v, cu_seqlens, window, scale, max_seqlen=-1):
    T, H, D = q.shape
    return q.new_empty((T, H, D)), q.new_empty((H, T), dtype=_stat_dtype(q.dtype))


@torch.library.custom_op("cmath_mer::multi_source_attention_triton_backward", mutates_args=())
def attention_backward_op(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], o: torch.Tensor,
                          lse: torch.Tensor, do: torch.Tensor, cu_seqlens: torch.Tensor, window: int, scale: float,
                          max_seqlen: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq (T, H, D), dk (S, T, H, D), dv (S, T, H, D). max_seqlen: see attention_backward."""
    q, k, v = _layout(q, k, v)
    return attention_backward(q, k, v, o.contiguous(), lse.contiguous(), do.contiguous(),
                              cu_seqlens.to(torch.int32), window, scale, max_seqlen)


@attention_backward_op.register_fake
def _(q, k, v, o, lse, do, cu_seqlens, window, scale, max_seqlen=-1):
    return q.new_empty(q.shape), k[0].new_empty((len(k), *q.shape)), v[0].new_empty((len(v), *q.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, window, scale, *rest = inputs                 # max_seqlen: in rest, or its default
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, o, lse, cu_seqlens, *k, *v)
    ctx.S, ctx.window, ctx.scale, ctx.max_seqlen = len(k), window, scale, (*rest, -1)[0]


@once_differentiable
def _autograd_backward(ctx, do, _dlse):
    q, o, lse, cu_seqlens, *kv = ctx.saved_tensors
    k, v = kv[:ctx.S], kv[ctx.S:]
    dq, dk, dv = attention_backward_op(q, k, v, o, lse, do, cu_seqlens, ctx.window, ctx.scale, ctx.max_seqlen)
    # one None per other argument as the op was called: a trailing argument equal to its default (max_seqlen
    # -1) is left out of the call's structure (needs_input_grad has it), though setup_context sees it
    return (dq, list(dk.unbind(0)), list(dv.unbind(0)),                           # source s: slice s, no copy
            *[None] * (len(ctx.needs_input_grad) - 3))


attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)
register_autocast_to_region_dtype("cmath_mer::multi_source_attention_triton", cast=(0, 1, 2))


def fused_multi_source_attention(q: torch.Tensor, k: torch.Tensor | Sequence[torch.Tensor],
                                 v: torch.Tensor | Sequence[torch.Tensor], cu_seqlens: torch.Tensor,
                                 *, window: int | None = None, scale: float | None = None,
                                 max_seqlen: int | None = None) -> torch.Tensor:
    """q: (T, H, D); k, v: (S, T, H, D) each, or S tensors (T, H, D) each (e.g. views of each source's kv
    projection: read in place when they share one stride set with the last dim contiguous, see _layout);
    1 <= S <= MAX_SOURCES; cu_seqlens: (B+1,) int32. Returns (T, H, D).

    max_seqlen: None, or a host int >= every conversation's length (the caller's bound, as FlashAttention's
    varlen max_seqlen; never read from cu_seqlens). When it fits one tile the backward runs in one pass
    (attention_backward); a conversation longer than the bound gets NaN gradients.

    Outside autocast q, k, v share one dtype. In an autocast region they are cast to the region's dtype
    (fp16/bf16); scores, softmax statistics and accumulators are fp32 either way. On a GPU, fp32 inputs run
    here only when TF32 is allowed (utils.tf32_allowed); otherwise the fp32-exact
    PyTorch reference runs (see fallbacks.reference_reason)."""
    k, v = as_sources(k), as_sources(v)
    _check(q, k, v, cu_seqlens)
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    if max_seqlen is not None and max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0 or None, got {max_seqlen}")
    autocast = torch.is_autocast_enabled(q.device.type)
    dtypes = {x.dtype for x in (q, *k, *v)}
    if len(dtypes) > 1 and not autocast:
        raise ValueError(f"q, k, v dtypes differ: {sorted(map(str, dtypes))} (mixed dtypes are accepted in an "
                         "autocast region)")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    run_dtype = torch.get_autocast_dtype(q.device.type) if autocast else q.dtype
    reason = reference_reason(run_dtype, q.device)
    if reason is not None:                         # fp32 without TF32 allowed, float64: the exact reference
        note_fallback("multi_source_attention", reason)
        from .. import multi_source_attention
        return multi_source_attention(q, k, v, cu_seqlens, window=window, scale=scale, max_seqlen=max_seqlen,
                                      backend="torch")
    window = -1 if window is None else int(window)
    return attention_op(q, k, v, cu_seqlens, window, float(scale), -1 if max_seqlen is None else max_seqlen)[0]


# ----------------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (python -m cmath_mer.kernels.aot)
# ----------------------------------------------------------------------------------------------------------
_STRIDE_ARGS = ("sk_t", "sk_h")
_SOURCE_PTRS = tuple(f"{x}{i}" for x in "kv" for i in range(MAX_SOURCES))     # k0..k3, v0..v3


def aot_specs() -> list[dict]:
    """Every (kernel, config) the launchers above can run on a GPU: each autotune config that survives the
    pruning, each dtype fp16/bf16/fp32, each head dim 16..128, window on/off."""
    tl_dtype = {"fp16": ("*fp16", 2), "bf16": ("*bf16", 2), "fp32": ("*fp32", 4)}
    specs = []
    for dname, (ptr, itemsize) in tl_dtype.items():
        for D in HEAD_DIMS:
            BD = block_dim(D)
            blocks = block_sizes(D, itemsize)
            for cfg in _attn_bwd_preprocess.configs:
                specs.append({"name": f"attn_bwd_preprocess[{dname},D={D}]", "fn": jit_function(_attn_bwd_preprocess),
                              "signature": {"o": ptr, "do": ptr, "delta": "*fp32", "T": "i32", "H": "i32",
                                            "D": "constexpr", "BD": "constexpr", "BR": "constexpr"},
                              "constexprs": {"D": D, "BD": BD, "BR": 64},
                              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "maxnreg": cfg.maxnreg})
            for has_window in (False, True):
                common = {"cu_seqlens": "*i32", "block_indices": "*i32", "scale": "fp32", "T": "i32",
                          "S": "i32", "W": "i32", **{st: "i32" for st in _STRIDE_ARGS}, "H": "i32",
                          "D": "constexpr", "BD": "constexpr", "BM": "constexpr", "BN": "constexpr",
                          "HAS_WINDOW": "constexpr", "ACC": "constexpr", "SPLIT": "constexpr",
                          "DOT_PREC": "constexpr"}
                qkv = {"q": ptr, **{name: ptr for name in _SOURCE_PTRS}}
                kernels = [
                    ("attn_fwd", _attn_fwd_kernel, "fwd", {**qkv, "o": ptr, "lse": "*fp32"}),
                    ("attn_bwd_dq", _attn_bwd_dq_kernel, "dq",
                     {**qkv, "do": ptr, "lse": "*fp32", "delta": "*fp32", "dq": ptr}),
                    ("attn_bwd_dkv", _attn_bwd_dkv_kernel, "dkv",
                     {**qkv, "do": ptr, "lse": "*fp32", "delta": "*fp32", "dk": ptr, "dv": ptr}),
                ]
                for name, kernel, which, ptrs in kernels:
                    BM, BN = blocks[which]
                    for cfg in kernel.fn.configs:                 # heuristics -> autotuner -> jit
                        if not config_allowed(which, cfg.num_warps, BM, BN, BD, itemsize, cfg.num_stages):
                            continue
                        specs.append({
                            # the JIT specialises the k/v strides (multiples of 16 for D = 16..128 and
                            # the kv views) and the pointers as divisible by 16
                            "attrs": divisible_by_16((*ptrs, "cu_seqlens", "block_indices", *_STRIDE_ARGS)),
                            "name": f"{name}[{dname},D={D},window={'on' if has_window else 'off'},"
                                    f"BM={BM},BN={BN}]",
                            "fn": jit_function(kernel),
                            "signature": {**ptrs, **common},
                            "constexprs": {"D": D, "BD": BD, "BM": BM, "BN": BN,
                                           "HAS_WINDOW": has_window, "ACC": tl.float32,
                                           "SPLIT": split_blocks(itemsize),
                                           # a GPU launch with fp32 inputs happens only when TF32 is allowed
                                           "DOT_PREC": "tf32"},
                            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                            "maxnreg": cfg.maxnreg})
            specs += onepass_aot_specs(dname, ptr, itemsize, D)
    return specs + block_table_aot_specs()


def onepass_aot_specs(dname: str, ptr: str, itemsize: int, D: int, warps: int | None = None) -> list[dict]:
    """The one-pass backward as attention_backward launches it: every tile BL (16 .. onepass_max_rows) for
    the head dim and element size, window on/off, its one config (onepass_warps, 1 stage, maxnreg 255).
    warps: another num_warps (to compare configs in the report)."""
    BD = block_dim(D)
    ptrs = {"q": ptr, **{name: ptr for name in _SOURCE_PTRS}, "o": ptr, "do": ptr, "lse": "*fp32",
            "dq": ptr, "dk": ptr, "dv": ptr}
    specs = []
    BL = 16
    while BL <= onepass_max_rows(D, itemsize):
        for has_window in (False, True):
            specs.append({
                "attrs": divisible_by_16((*ptrs, "cu_seqlens", *_STRIDE_ARGS)),
                "name": f"attn_bwd_onepass[{dname},D={D},window={'on' if has_window else 'off'},BL={BL}]",
                "fn": jit_function(_attn_bwd_onepass_kernel),
                "signature": {**ptrs, "cu_seqlens": "*i32", "scale": "fp32", "T": "i32", "S": "i32", "W": "i32",
                              **{st: "i32" for st in _STRIDE_ARGS}, "H": "i32", "D": "constexpr",
                              "BD": "constexpr", "BL": "constexpr", "HAS_WINDOW": "constexpr", "ACC": "constexpr",
                              "DOT_PREC": "constexpr"},
                "constexprs": {"D": D, "BD": BD, "BL": BL, "HAS_WINDOW": has_window, "ACC": tl.float32,
                               "DOT_PREC": "tf32"},
                "num_warps": warps or onepass_warps(BL, BD, itemsize), "num_stages": 1, "maxnreg": 255})
        BL *= 2
    return specs


__all__ = ["fused_multi_source_attention", "attention_op", "attention_backward_op", "prepare_block_indices",
           "block_sizes", "aot_specs"]
