"""Reference multi-source varlen attention: the CPU path and the Triton kernels' reference, in linear memory
(naive.py is the short dense definition both are tested against).

A query of conversation b attends, in one softmax, to the keys of conversation b in every one of the
S sources (S * N_b keys), or only to those with |pos(query) - pos(key)| <= window.

Memory stays linear in the conversation length, and with a window so does time:
* whole conversations (no window, or a window that reaches across every conversation) go through
  `scaled_dot_product_attention` once per run of neighbouring conversations of equal length, as one SDPA
  batch (batches hold conversations in order of length); its CPU and CUDA flash kernels keep only the
  log-sum-exp for the backward, so no N_b x N_b score matrix is ever built;
* with a window, `banded_attention` works on the packed rows directly: query block i of `block` rows sees
  only key blocks i - r .. i + r (r = ceil(window / block)), a band of (2r + 1) * block keys per source,
  masked down to the keys of its own conversation within the window. The blocks are taken a chunk at a
  time in one autograd.Function that keeps only (o, log-sum-exp) for the backward and adds each chunk's
  dk, dv into one preallocated buffer, so a conversation of T utterances costs O(T * window) time and
  O(T) memory, forward and backward, for any T.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from cmath_mer.kernels.cu_seqlens import equal_length_runs, key_range

CHUNK_SCORES = 1 << 22   # score elements per chunk of query blocks (16 MiB in fp32): bounds the working set


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: (c, n, H, D); k, v: (S, c, n, H, D) -> (c, n, H, D): c conversations of n utterances, each query
    # attending in one softmax to the S*n keys of its own conversation.
    S, c, n, H, D = k.shape
    qh = q.transpose(1, 2)                                                # (c, H, n, D)
    kh = k.permute(1, 3, 0, 2, 4).reshape(c, H, S * n, D)                 # (c, H, S*n, D)
    vh = v.permute(1, 3, 0, 2, 4).reshape(c, H, S * n, D)
    o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return o.transpose(1, 2)                                              # (c, n, H, D)


def as_sources(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """k or v in either form of the op -> a list of S tensors (T, H, D). An (S, T, H, D) tensor is unbound
    into views (no copy); a list or tuple (e.g. views of each source's own kv projection) is taken as is."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"k, v: expected an (S, T, H, D) tensor or S tensors (T, H, D), got {tuple(x.shape)}")
        return list(x.unbind(0))
    return list(x)


def reference_multi_source_attention(q: torch.Tensor, k: torch.Tensor | Sequence[torch.Tensor],
                                 v: torch.Tensor | Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *,
                                 window: int | None = None, scale: float | None = None,
                                 max_seqlen: int | None = None) -> torch.Tensor:
    """q: (T, H, D); k, v: (S, T, H, D), or S tensors (T, H, D) each (any strides); cu_seqlens: (B+1,) int32.
    Returns (T, H, D). max_seqlen (the Triton backward's bound on the conversation lengths) changes nothing
    here; a conversation longer than it is the caller's error, raised here since the bounds are read anyway."""
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        # the list form: the reference stacks it (a copy, linear in T; the Triton kernels read in place)
        k, v = torch.stack(as_sources(k)), torch.stack(as_sources(v))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    longest = max(lengths, default=0)
    if max_seqlen is not None and longest > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is not a bound: a conversation has {longest} utterances")
    if window is not None and window < longest - 1:
        return banded_attention(q, k, v, cu_seqlens, window, scale)
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to T = {q.shape[0]} (the rows of q), got {bounds[0]} .. "
                         f"{bounds[-1]}")
    # split, not a slice per conversation: a slice's backward writes a zero-filled gradient of the whole
    # tensor, B of them per call (4x the time of the attention itself at 128 conversations of ~12 utterances)
    runs = equal_length_runs(lengths)
    rows = [n * c for n, c in runs]
    out = [_attend(qr.unflatten(0, (c, n)), kr.unflatten(1, (c, n)), vr.unflatten(1, (c, n)), scale).flatten(0, 1)
           for (n, c), qr, kr, vr in zip(runs, q.split(rows), k.split(rows, 1), v.split(rows, 1)) if n]
    if not out:
        return q.new_zeros(q.shape)
    return torch.cat(out, dim=0)


# ----------------------------------------------------------------------------------- windowed attention


def query_block(window: int) -> int:
    """Query rows per block for a window: about half the window (a band of (2r+1) blocks then holds
    about 2.5 windows of keys, close to the 2 * window + 1 that count), at least 16, at most 128."""
    return max(16, min(128, (window + 1) // 2))


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     window: int, scale: float) -> torch.Tensor:
    """Windowed multi-source attention in O(T * window) time and O(T) memory (see the module docstring)."""
    lo, hi = key_range(cu_seqlens.to(q.device), q.shape[0], window)
    return _BandedAttention.apply(q, k, v, lo, hi, window, scale)[0]


def _rows(x: torch.Tensor, start: int, stop: int, dim: int) -> torch.Tensor:
    """x's rows start..stop-1 along dim, zeros where they fall outside x (a view when they all lie inside)."""
    n = x.shape[dim]
    if 0 <= start and stop <= n:
        return x.narrow(dim, start, stop - start)
    pad_shape = list(x.shape)
    pad_shape[dim] = stop - start
    out = x.new_zeros(pad_shape)
    a, b = max(start, 0), min(stop, n)
    if b > a:
        out.narrow(dim, a - start, b - a).copy_(x.narrow(dim, a, b - a))
    return out


class _Chunk:
    """Query blocks c0 .. c0+n-1 (rows c0*Bq .. (c0+n)*Bq - 1) and the band of keys they see.

    Every tensor is laid out for one batched matmul per (block, head): queries (n*H, Bq, D), band keys
    and values (n*H, S*(2r+1)*Bq, D) with key slot (s, w, b) of query block i = row (i - r + w)*Bq + b of
    source s. The buffers are allocated once per call and reused by every chunk (allocating them per chunk
    makes glibc hand the pages back to the OS and fault them in again, which cost more than the maths)."""

    def __init__(self, T, S, H, D, block, r, chunk, dtype, device):
        self.T, self.S, self.H, self.D, self.block, self.r = T, S, H, D, block, r
        keys = S * (2 * r + 1) * block
        self.q = torch.empty(chunk * H, block, D, dtype=dtype, device=device)
        self.k = torch.empty(chunk * H, keys, D, dtype=dtype, device=device)
        self.v = torch.empty(chunk * H, keys, D, dtype=dtype, device=device)
        self.s = torch.empty(chunk * H, block, keys, dtype=dtype, device=device)

    def load(self, q, k, v, lo, hi, c0, n):
        """Gather the chunk's queries and key/value bands into the buffers; return the band mask
        (n, Bq, 2r+1, Bq): True where the key is in the query's conversation and window."""
        block, r, S, H, D = self.block, self.r, self.S, self.H, self.D
        self.n, self.rows = n, (c0 * block, (c0 + n) * block)
        self.keys = ((c0 - r) * block, (c0 + n + r) * block)
        self.q[:n * H].view(n, H, block, D).copy_(_rows(q, *self.rows, 0).view(n, block, H, D).transpose(1, 2))
        for src, buf in ((k, self.k), (v, self.v)):
            band = _rows(src, *self.keys, 1).view(S, n + 2 * r, block, H, D).unfold(1, 2 * r + 1, 1)
            # band: (S, n, Bq, H, D, 2r+1), a view; buffer: (n, H, S, 2r+1, Bq, D)
            buf[:n * H].view(n, H, S, 2 * r + 1, block, D).copy_(band.permute(1, 3, 0, 5, 2, 4))
        i = torch.arange(c0, c0 + n, device=q.device)[:, None, None]
        j = (i - r + torch.arange(2 * r + 1, device=q.device)[None, :, None]) * block \
            + torch.arange(block, device=q.device)[None, None, :]        # (n, 2r+1, Bq) key rows
        lo_q = lo[self.rows[0]:self.rows[1]].view(n, block, 1, 1)
        hi_q = hi[self.rows[0]:self.rows[1]].view(n, block, 1, 1)
        return (j[:, None] < lo_q) | (j[:, None] > hi_q)                 # (n, Bq, 2r+1, Bq): masked out

    def scores(self, masked_out, scale):
        """S = scale * Q K^T over the band, -inf outside the conversation and the window (in self.s)."""
        n, H, block, S, r = self.n, self.H, self.block, self.S, self.r
        s = torch.bmm(self.q[:n * H], self.k[:n * H].transpose(1, 2), out=self.s[:n * H]).mul_(scale)
        s.view(n, H, block, S, 2 * r + 1, block).masked_fill_(masked_out[:, None, :, None], float("-inf"))
        return s                                                           # (n*H, Bq, S*(2r+1)*Bq)

    def per_row(self, x):
        """(n*H, Bq, D) -> rows of the chunk that lie inside T, (rows, H, D)."""
        n, H, block = self.n, self.H, self.block
        a, b = self.rows[0], min(self.rows[1], self.T)
        return x.view(n, H, block, -1).transpose(1, 2).reshape(n * block, H, -1)[:b - a]

    def to_blocks(self, x, out):
        """The chunk's rows of x (T, H, D), zero past T, into out (n*H, Bq, D)."""
        n, H, block = self.n, self.H, self.block
        return out[:n * H].view(n, H, block, -1).copy_(_rows(x, *self.rows, 0).view(n, block, H, -1)
                                                        .transpose(1, 2)).view(n * H, block, -1)

    def add_band_grad(self, band_grad, grad, folded):
        """Add a band gradient (n*H, S*(2r+1)*Bq, D) into grad (S, T, H, D): slot w of query block i
        belongs to key block i - r + w, so the 2r+1 slots are folded over the chunk's key blocks first."""
        n, H, S, D, block, r = self.n, self.H, self.S, self.D, self.block, self.r
        g = band_grad.view(n, H, S, 2 * r + 1, block, D)
        folded = folded[:, :n + 2 * r].zero_()                            # (S, n+2r, Bq, H, D)
        for w in range(2 * r + 1):
            folded[:, w:w + n].add_(g[:, :, :, w].permute(2, 0, 3, 1, 4))
        ka, kb = self.keys
        lo_row, hi_row = max(ka, 0), min(kb, self.T)
        grad[:, lo_row:hi_row].add_(folded.reshape(S, (n + 2 * r) * block, H, D)[:, lo_row - ka:hi_row - ka])


def _band_geometry(T: int, H: int, S: int, window: int) -> tuple[int, int, int, int]:
    """(query block, key blocks each side, number of blocks, blocks per chunk) of a banded call."""
    block = query_block(window)
    r = math.ceil(window / block)
    blocks = math.ceil(T / block)
    chunk = min(blocks, max(1, CHUNK_SCORES // (H * block * S * (2 * r + 1) * block)))
    return block, r, blocks, chunk


class _BandedAttention(torch.autograd.Function):
    """Flash-style banded attention in plain PyTorch: the forward saves (o, lse); the backward recomputes
    each chunk's probabilities and adds its dk, dv into one buffer (no per-block full-size gradients).

        P = softmax(S),  O = P V,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
        dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO
    """

    # forward and setup_context apart (not forward(ctx, ...)): functorch transforms, which the custom op's
    # backward uses (kernels/reference_ops.py), accept only this form. The outputs after the first are what
    # the backward needs; they are not differentiable.
    @staticmethod
    def forward(q, k, v, lo, hi, window, scale):
        T, H, D = q.shape
        S = k.shape[0]
        dtype = torch.promote_types(q.dtype, torch.float32)
        block, r, blocks, chunk = _band_geometry(T, H, S, window)
        # the rows that pad the last block attend to themselves (a zero key) and are cut from every result
        pad = torch.arange(T, blocks * block, device=q.device)
        lo, hi = torch.cat([lo, pad]), torch.cat([hi, pad])
        o = torch.empty(T, H, D, dtype=dtype, device=q.device)
        lse = torch.empty(T, H, 1, dtype=dtype, device=q.device)
        c = _Chunk(T, S, H, D, block, r, chunk, dtype, q.device)
        out = torch.empty(chunk * H, block, D, dtype=dtype, device=q.device)
        with torch.no_grad():
            for c0 in range(0, blocks, chunk):
                n = min(chunk, blocks - c0)
                s = c.scores(c.load(q, k, v, lo, hi, c0, n), scale)       # (n*H, Bq, keys)
                m = s.amax(-1, keepdim=True)                              # finite: every row sees itself
                p = s.sub_(m).exp_()
                total = p.sum(-1, keepdim=True)
                p.div_(total)
                a, b = c.rows[0], min(c.rows[1], T)
                o[a:b].copy_(c.per_row(torch.bmm(p, c.v[:n * H], out=out[:n * H])))
                lse[a:b].copy_(c.per_row(m + total.log()))
        out = o.to(q.dtype)
        # the fp32 accumulator is returned only when it is not the output itself (fp16 inputs)
        return out, (o if out is not o else None), lse, lo, hi

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, window, scale = inputs
        out, o, lse, lo, hi = output
        if o is None:
            o = out
        else:
            ctx.mark_non_differentiable(o)
        ctx.mark_non_differentiable(lse, lo, hi)
        block, r, _, chunk = _band_geometry(q.shape[0], q.shape[1], k.shape[0], window)
        ctx.save_for_backward(q, k, v, lo, hi, o, lse)
        ctx.geometry = (window, scale, block, r, chunk)

    @staticmethod
    def backward(ctx, do, *_):
        q, k, v, lo, hi, o, lse = ctx.saved_tensors
        window, scale, block, r, chunk = ctx.geometry
        T, H, D = q.shape
        S = k.shape[0]
        dtype = o.dtype
        do = do.to(dtype)
        delta = (do * o).sum(-1, keepdim=True)                            # (T, H, 1): rowsum(dO * O)
        dq = torch.empty(T, H, D, dtype=dtype, device=q.device)
        dk = torch.zeros(S, T, H, D, dtype=dtype, device=q.device)
        dv = torch.zeros(S, T, H, D, dtype=dtype, device=q.device)
        blocks = math.ceil(T / block)
        c = _Chunk(T, S, H, D, block, r, chunk, dtype, q.device)
        dp_buf = torch.empty_like(c.s)
        do_buf = torch.empty(chunk * H, block, D, dtype=dtype, device=q.device)
        row_buf = torch.empty(chunk * H, block, 1, dtype=dtype, device=q.device)
        out = torch.empty(chunk * H, block, D, dtype=dtype, device=q.device)
        folded = torch.empty(S, chunk + 2 * r, block, H, D, dtype=dtype, device=q.device)
        for c0 in range(0, blocks, chunk):
            n = min(chunk, blocks - c0)
            s = c.scores(c.load(q, k, v, lo, hi, c0, n), scale)
            p = s.sub_(c.to_blocks(lse, row_buf)).exp_()                 # P, recomputed from the lse
            doc = c.to_blocks(do, do_buf)                                 # (n*H, Bq, D)
            dp = torch.bmm(doc, c.v[:n * H].transpose(1, 2), out=dp_buf[:n * H])
            ds = dp.sub_(c.to_blocks(delta, row_buf)).mul_(p).mul_(scale)
            a, b = c.rows[0], min(c.rows[1], T)
            dq[a:b].copy_(c.per_row(torch.bmm(ds, c.k[:n * H], out=out[:n * H])))
            # the band buffers are free once used: they take the band gradients
            dk_band = torch.bmm(ds.transpose(1, 2), c.q[:n * H], out=c.k[:n * H])
            dv_band = torch.bmm(p.transpose(1, 2), doc, out=c.v[:n * H])
            c.add_band_grad(dk_band, dk, folded)
            c.add_band_grad(dv_band, dv, folded)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
