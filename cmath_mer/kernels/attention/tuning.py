"""Tiles and launch configs of the attention kernels (fused.py): block sizes per head dim and element size,
the one-pass backward's tile, the autotuner's configs and the pruning that keeps the AOT report at 0 spills.
Host code only; docs/KERNELS.md explains the choices."""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HEAD_DIMS = (16, 32, 64, 128)


def block_sizes(head_dim: int, itemsize: int = 2) -> dict[str, tuple[int, int]]:
    """(query block, key block) per kernel for a head dim and an input element size in bytes. Chosen with
    the AOT report (python -m cmath_mer.kernels.aot): fp32 inputs hold twice the bytes per tile in registers
    and shared memory, so their blocks shrink. Tests monkeypatch this to exercise block boundaries."""
    if INTERPRET:  # few, large numpy ops per program: the interpreter's cost is per op, not per element
        return {"fwd": (64, 64), "dq": (64, 64), "dkv": (64, 64)}
    if itemsize <= 2:
        if head_dim <= 64:
            return {"fwd": (128, 64), "dq": (64, 64), "dkv": (64, 64)}
        return {"fwd": (64, 64), "dq": (64, 64), "dkv": (32, 64)}
    if head_dim <= 16:   # a (128, 64) forward tile spilled at 4 warps on sm_90 once k, v became strided
        return {"fwd": (64, 64), "dq": (64, 64), "dkv": (64, 64)}
    if head_dim <= 32:
        return {"fwd": (64, 64), "dq": (64, 64), "dkv": (32, 32)}
    return {"fwd": (64, 32), "dq": (32, 64), "dkv": (32, 32)}


def split_blocks(itemsize: int) -> bool:
    """Whether the kernels walk interior (unmasked) and edge (masked) blocks in separate loops (see _split).
    On a GPU only for 2-byte inputs: fp32 tiles hold twice the bytes, and the second loop made the fp32
    kernels spill (32-228 B on 11 sm_80/sm_90 configs, AOT report) where one masked loop did not; fp32 runs
    only with TF32 allowed, the 16-bit dtypes are the training path. Under the interpreter always, so the
    parity tests cover the split for every dtype; tests monkeypatch this to cover the single loop."""
    return INTERPRET or itemsize <= 2


def onepass_max_rows(head_dim: int, itemsize: int = 2) -> int:
    """The longest conversation (rows, a power of two) the one-pass backward takes for a head dim and input
    element size; 0: none. Chosen with the AOT report: the program holds q, o, do, k, v (BL, D) tiles, the
    (BL, BL) fp32 score tile and three (BL, D) fp32 accumulators, so the rows shrink as D grows. Tests
    monkeypatch this."""
    if INTERPRET:
        return 64
    if itemsize <= 2:
        return 64 if head_dim <= 32 else 32      # BL = 128 spilled at D = 16, 32 (24-2568 B); 64 at D = 64 (60 B)
    return 32                                    # fp32 (TF32 only): BL = 64 sat at 234-255 registers


def onepass_block(max_seqlen: int, head_dim: int, itemsize: int = 2) -> int:
    """Tile rows BL of the one-pass backward for conversations of at most max_seqlen rows: the power of two
    >= max_seqlen (at least 16, tl.dot's minimum), or 0 (the multi-kernel backward) when max_seqlen is unknown
    (< 0) or longer than onepass_max_rows."""
    if max_seqlen < 0:
        return 0
    rows = max(16, triton.next_power_of_2(max(int(max_seqlen), 1)))
    return rows if rows <= onepass_max_rows(head_dim, itemsize) else 0


def onepass_warps(BL: int, BD: int, itemsize: int) -> int:
    """num_warps of the one-pass kernel (one config, no autotuning: nothing to time on a first call, and one
    order of operations per shape). From the AOT report: 4 warps for the small tiles, 8 from (32, 32) 16-bit
    or (16, 32) fp32 tiles up, where 4 warps took 30-70 more registers (or spilled: fp32, D = 128)."""
    return 4 if BL * BD * itemsize <= 32 * 32 * 2 else 8


def _configs(gpu_configs: list[tuple[int, int]]) -> list[triton.Config]:
    # autotune with several configs fails under the interpreter ("0 active drivers"): one config there.
    # maxnreg=255: left alone, ptxas sometimes caps these kernels at 80 or 128 registers and spills
    # (seen in the sm_80 AOT report); the cap lets it use the register file, one or two CTAs per SM.
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s, maxnreg=255) for w, s in gpu_configs]


FWD_CONFIGS = _configs([(4, 2), (4, 3), (8, 2), (8, 3)])
BWD_CONFIGS = _configs([(4, 2), (4, 3), (8, 2)])
PRE_CONFIGS = _configs([(4, 1)])
AUTOTUNE_KEY = ["D", "BD", "BM", "BN", "HAS_WINDOW", "ACC", "SPLIT"]


# 4 warps only while the kernel's resident tiles are small; larger tiles spill on sm_80 with 4 warps
# (AOT report). Measured in fp16-tile elements: rows x head-dim block x bytes / 2.
_FOUR_WARP_TILE = {"fwd": 64 * 64, "dq": 32 * 64, "dkv": 64 * 64}


def config_allowed(kernel: str, num_warps: int, BM: int, BN: int, BD: int, itemsize: int,
                   num_stages: int = 2) -> bool:
    rows = BN if kernel == "dkv" else BM
    if kernel == "fwd" and itemsize == 4 and BD >= 128 and num_stages > 2:
        return False            # fp32 D=128 forward spills on sm_90 with 3 stages (AOT report, strided k/v)
    if kernel == "dkv" and num_warps < 8 and BN * BD > 64 * 32:
        # two fp32 (BN, BD) accumulators (dk, dv) beside the k, v tiles: at 64 x 64 (fp16/bf16, D=64) the
        # kernel sat at sm_80's 255-register cap with 0 spills, and the second (interior) loop spills 24-32 B
        return False
    return num_warps >= 8 or rows * BD * itemsize // 2 <= _FOUR_WARP_TILE[kernel]


def pruner(kernel: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        itemsize = args["q"].element_size()
        kept = [c for c in configs if config_allowed(kernel, c.num_warps, args["BM"], args["BN"], args["BD"],
                                                     itemsize, c.num_stages)]
        return kept or configs
    return {"early_config_prune": prune}


def block_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))
