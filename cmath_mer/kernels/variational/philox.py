"""The variational eps in PyTorch, so the reference and the Triton kernel draw the same numbers.

The mapping (KERNELS.md section 3): element m of the whole batch's flattened (T, Z) latent (m = eps_offset + n)
takes word m % 4 of Triton's `tl.randn4x(seed, m // 4)`. Each Philox-4x32-10 call on the counter
(c_lo, c_hi, 0, 0) with key (seed_lo, seed_hi) gives four uint32 words; `uint_to_uniform_float` turns them
into four uniforms u1..u4 and two Box-Muller transforms into (n1, n2) = r12 (cos, sin)(2 pi u2) and
(n3, n4) = r34 (cos, sin)(2 pi u4), exactly as triton/language/random.py does. The mapping depends on m only,
never on a kernel's block size or the offset a part of a batch starts at, so a rank's share of a step (or a
micro-batch) draws the numbers of those elements of the whole batch.
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


def philox_randint4x(seed: int | torch.Tensor, counter: torch.Tensor, n_rounds: int = 10
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four uint32 words (as int64) of Philox for each int64 counter, as tl.randint4x gives them. seed: an
    int, or a one-element int64 tensor (read on the device: no host synchronisation)."""
    counter = counter.to(torch.int64)
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    x = torch.where(x >= 2**31, x - 2**32, x)    # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)            # ~x
    return x.to(torch.float32) * 4.6566127342e-10


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # tl.pair_uniform_to_normal
    r = torch.sqrt(-2.0 * torch.log(torch.clamp(u1, min=1.0e-7)))
    theta = 6.283185307179586 * u2
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_randn4x(seed: int | torch.Tensor, counter: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tl.randn4x(seed, counter): four float32 normals per int64 counter."""
    u1, u2, u3, u4 = (_uniform(w) for w in philox_randint4x(seed, counter))
    return _box_muller(u1, u2) + _box_muller(u3, u4)


# Elements drawn at a time. The rounds keep several int64 temporaries per counter alive at once, so drawing
# a whole (T, Z) eps at once held many (T, Z) fp32 tensors' worth of memory (~30 with one counter per
# element, before the randn4x mapping; counted at T = 4,096, Z = 256: ~7.5 GiB at 262,144 utterances, much
# of a long step's peak then). Each eps[m] depends only on (seed, m), so chunks give the very same numbers.
CHUNK = 1 << 20


def philox_randn(seed: int | torch.Tensor, numel: int, device: torch.device | str = "cpu",
                 offset: int = 0) -> torch.Tensor:
    """eps[i] for i in [0, numel), float32: element m = offset + i is word m % 4 of tl.randn4x(seed, m // 4)
    (module docstring). seed: an int, or a one-element int64 tensor (read on its device: no host
    synchronisation). offset need not be a multiple of 4: the counters start at floor(offset / 4)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64).reshape(())
    else:
        seed = int(seed)
    if torch.compiler.is_compiling():
        # an opaque op under torch.compile: inductor inlines the ten rounds into one expression whose size
        # explodes (it did not finish lowering in minutes), and a loop over a symbolic numel would make dynamo
        # guard on (and recompile for) the number of chunks
        if not isinstance(seed, torch.Tensor):
            seed = torch.full((), seed, dtype=torch.int64, device=device)
        return philox_randn_op(seed, numel, offset)
    out = torch.empty(numel, device=device, dtype=torch.float32)
    for a in range(0, numel, CHUNK):                       # CHUNK elements at a time (see CHUNK)
        b = min(numel, a + CHUNK)
        out[a:b] = _randn_range(seed, offset + a, b - a, device)
    return out


def _randn_range(seed, offset: int, numel: int, device) -> torch.Tensor:
    """eps of the elements offset .. offset + numel - 1 (numel > 0), float32."""
    first, last = offset // 4, (offset + numel - 1) // 4
    words = philox_randn4x(seed, torch.arange(first, last + 1, device=device, dtype=torch.int64))
    flat = torch.stack(words, dim=1).reshape(-1)             # (counter, word) row-major: index m - 4 * first
    start = offset - 4 * first
    return flat[start:start + numel]


@torch.library.custom_op("cmath_mer::philox_randn", mutates_args=())
def philox_randn_op(seed: torch.Tensor, numel: int, offset: int) -> torch.Tensor:
    """philox_randn as an op (torch.compile sees it as one opaque call); seed: a one-element int64 tensor."""
    return philox_randn(seed, numel, seed.device, offset)


@philox_randn_op.register_fake
def _(seed, numel, offset):
    return seed.new_empty((numel,), dtype=torch.float32)
