"""Triton's `tl.randn(seed, offset)` written in PyTorch, so the reference and the kernel draw the same eps.

Philox-4x32-10 on the counter (offset_lo, offset_hi, 0, 0) with key (seed_lo, seed_hi), then the first
two words through `uint_to_uniform_float` and Box-Muller, exactly as triton/language/random.py does.
uint32 arithmetic is emulated in int64 (products are split so they never overflow 63 bits).
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # (a * b) >> 32 and (a * b) & 0xffffffff for uint32 a, b held in int64, without 64-bit overflow.
    p_lo = a * (b & 0xFFFF)                      # < 2**48
    p_hi = a * (b >> 16)                         # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)         # < 2**49
    return (mid >> 32) + (p_hi >> 16), mid & _MASK32


def philox_randint(seed: int | torch.Tensor, offset: torch.Tensor, n_rounds: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """First two uint32 words (as int64) of Philox for each int64 offset, as tl.randint4x gives them. seed: an
    int, or a one-element int64 tensor (read on the device: no host synchronisation)."""
    offset = offset.to(torch.int64)
    c0, c1 = offset & _MASK32, (offset >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1


def _uniform(x: torch.Tensor) -> torch.Tensor:
    x = torch.where(x >= 2**31, x - 2**32, x)    # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)            # ~x
    return x.to(torch.float32) * 4.6566127342e-10


# Offsets drawn at a time. The rounds keep ~15 int64 temporaries per offset alive at once (~30x the fp32
# result), so drawing a whole (T, Z) eps at once held ~30 (T, Z) fp32 tensors' worth of memory (counted at
# T = 4,096, Z = 256: at 262,144 utterances ~7.5 GiB, much of a long step's peak then). Each eps[i] depends
# only on (seed, offset + i), so chunks give the very same numbers.
CHUNK = 1 << 20


def philox_randn(seed: int | torch.Tensor, numel: int, device: torch.device | str = "cpu",
                 offset: int = 0) -> torch.Tensor:
    """eps[i] = tl.randn(seed, offset + i) for i in [0, numel), float32. seed: an int, or a one-element int64
    tensor (read on its device: no host synchronisation)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64).reshape(())
    else:
        seed = int(seed)
    out = torch.empty(numel, device=device, dtype=torch.float32)
    for a in range(0, numel, CHUNK):                       # CHUNK offsets at a time (see CHUNK)
        b = min(numel, a + CHUNK)
        i1, i2 = philox_randint(seed, torch.arange(offset + a, offset + b, device=device, dtype=torch.int64))
        u1 = torch.clamp(_uniform(i1), min=1.0e-7)
        theta = 6.283185307179586 * _uniform(i2)
        torch.mul(torch.sqrt(-2.0 * torch.log(u1)), torch.cos(theta), out=out[a:b])
    return out
