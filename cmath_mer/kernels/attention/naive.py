"""Reference multi-source varlen attention: the readable definition and the CPU path.

A query of conversation b attends, in one softmax, to the keys of conversation b in every one of the
S sources (S * N_b keys), or only to those with |pos(query) - pos(key)| <= window.

Memory stays linear in the conversation length: each conversation goes through
`scaled_dot_product_attention` (its CPU and CUDA flash kernels keep only the log-sum-exp for the
backward), and with a window the queries are taken in blocks that see only the keys within reach,
so no N_b x N_b score matrix is ever built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW_QUERY_BLOCK = 256  # queries per block when a window restricts the keys


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    # q: (n, H, D); k, v: (S, m, H, D) -> (n, H, D); the S sources are one softmax over S*m keys.
    S, m, H, D = k.shape
    qh = q.transpose(0, 1).unsqueeze(0)                                   # (1, H, n, D)
    kh = k.permute(2, 0, 1, 3).reshape(1, H, S * m, D)                    # (1, H, S*m, D)
    vh = v.permute(2, 0, 1, 3).reshape(1, H, S * m, D)
    if mask is not None:
        mask = mask.repeat(1, S)                                          # (n, S*m)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.squeeze(0).transpose(0, 1)                                   # (n, H, D)


def naive_multi_source_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 cu_seqlens: torch.Tensor, *, window: int | None = None,
                                 scale: float | None = None) -> torch.Tensor:
    """q: (T, H, D); k, v: (S, T, H, D); cu_seqlens: (B+1,) int32. Returns (T, H, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if window is None or window >= n - 1:
            out.append(_attend(q[start:end], k[:, start:end], v[:, start:end], scale))
            continue
        for i0 in range(0, n, WINDOW_QUERY_BLOCK):
            i1 = min(n, i0 + WINDOW_QUERY_BLOCK)
            j0, j1 = max(0, i0 - window), min(n, i1 + window)
            qi = torch.arange(i0, i1, device=q.device)[:, None]
            kj = torch.arange(j0, j1, device=q.device)[None, :]
            mask = (qi - kj).abs() <= window                              # (i1-i0, j1-j0)
            out.append(_attend(q[start + i0:start + i1], k[:, start + j0:start + j1],
                               v[:, start + j0:start + j1], scale, mask))
    if not out:
        return q.new_zeros(q.shape)
    return torch.cat(out, dim=0)
