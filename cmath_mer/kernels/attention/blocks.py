"""The attention kernels' block table: which (conversation, block) each program of the query-block grid owns.

    prepare_block_indices(cu_seqlens, block, T) -> (block_table_rows(T, B, block), 2) int32

Built from cu_seqlens on the device at every call, by one small kernel (`_block_table_kernel`): no host
synchronisation, and nothing cached. A table cached per cu_seqlens tensor goes stale whenever the lengths
change in place without a new version (`cu.data.copy_(new)`, a CUDA graph's static input rewritten before a
replay, or a capture that bakes in a table built during warm-up); a table built from the values the call reads
cannot. One launch replaces the dozen small PyTorch ops (cumsum, searchsorted, gathers) the table took before.

Layout: conversation b's blocks are rows start(b) .. start(b) + cdiv(n_b, block) - 1, with
start(b) = cu_seqlens[b] // block + b; every other row is padding (-1, 0). The rows of b fit before
start(b + 1), since cdiv(y - x, block) <= y // block - x // block + 1, and the last conversation's end before
cdiv(T, block) + B, the host-known row count. start is strictly increasing, so row i belongs to the last b
with start(b) <= i (found by a binary search per row) and is real when its block starts inside b.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import divisible_by_16

TABLE_ROWS_PER_PROGRAM = 1024


def block_table_rows(T: int, B: int, block: int) -> int:
    """Rows of the block table: an upper bound of sum_b ceil(n_b / block) over B conversations of T rows in
    all (each conversation adds at most one partial block), known on the host without reading cu_seqlens."""
    return triton.cdiv(T, block) + B


@triton.jit(do_not_specialize=["B", "ROWS", "STEPS"])
def _block_table_kernel(cu_seqlens, table, B, ROWS, STEPS, BLK: tl.constexpr, BR: tl.constexpr):
    """Rows r of the table (module docstring): its conversation is the last b with cu[b] // BLK + b <= r,
    searched in STEPS = bit_length(B) halvings of [0, B - 1] (extra halvings leave the answer in place)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    lo = tl.zeros([BR], dtype=tl.int32)
    hi = lo + (B - 1)
    for _ in range(STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_seqlens + mid) // BLK + mid <= rows
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    bos = tl.load(cu_seqlens + lo)
    blk = rows - (bos // BLK + lo)
    real = blk * BLK < tl.load(cu_seqlens + lo + 1) - bos
    m = rows < ROWS
    tl.store(table + rows * 2, tl.where(real, lo, -1), mask=m)
    tl.store(table + rows * 2 + 1, tl.where(real, blk, 0), mask=m)


def prepare_block_indices(cu_seqlens: torch.Tensor, block: int, T: int) -> torch.Tensor:
    """(block_table_rows(T, B, block), 2) int32 table of (conversation, block within the conversation), the
    layout of the module docstring, from the current values of cu_seqlens ((B+1,) int32, first 0, last T,
    non-decreasing: the op's contract)."""
    B = cu_seqlens.numel() - 1
    rows = block_table_rows(T, B, block)
    table = torch.empty((rows, 2), dtype=torch.int32, device=cu_seqlens.device)
    _block_table_kernel[(triton.cdiv(rows, TABLE_ROWS_PER_PROGRAM),)](
        cu_seqlens, table, B, rows, B.bit_length(), BLK=block, BR=TABLE_ROWS_PER_PROGRAM, num_warps=4)
    return table


def aot_specs(blocks=(16, 32, 64, 128)) -> list[dict]:
    """The table kernel for every block size the attention launchers use (python -m cmath_mer.kernels.aot)."""
    return [{"name": f"attn_block_table[BLK={blk}]", "fn": _block_table_kernel,
             "attrs": divisible_by_16(("cu_seqlens", "table")),
             "signature": {"cu_seqlens": "*i32", "table": "*i32", "B": "i32", "ROWS": "i32", "STEPS": "i32",
                           "BLK": "constexpr", "BR": "constexpr"},
             "constexprs": {"BLK": blk, "BR": TABLE_ROWS_PER_PROGRAM},
             "num_warps": 4, "num_stages": 1} for blk in blocks]
