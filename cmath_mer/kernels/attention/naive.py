"""Multi-source varlen attention, the definition: for each conversation, an explicit masked softmax over the
S * N_b keys of its S sources, evaluated in float64. Short and slow (an N_b x S*N_b score matrix per head):
the oracle that reference.py (the CPU path, linear memory) and fused.py (the Triton kernels) are tested
against. Same arguments as the op; the result is float64."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


def naive_scores(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, window: int | None = None,
                 scale: float | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Per conversation: (s0, s1, its float64 scaled scores (H, n, S*n) over the S sources' keys, source-major,
    -inf outside the window)."""
    q, k = q.double(), k.double()
    S, T, H, D = k.shape
    scale = D ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        n = s1 - s0
        kb = k[:, s0:s1].permute(2, 0, 1, 3).reshape(H, S * n, D)          # (H, S*n, D), source-major
        scores = torch.einsum("ihd,hjd->hij", q[s0:s1], kb) * scale         # (H, n, S*n)
        pos_q, pos_k = torch.arange(n)[:, None], torch.arange(n).repeat(S)[None, :]
        if window is not None:
            scores = scores.masked_fill((pos_q - pos_k).abs() > window, float("-inf"))
        yield s0, s1, scores


def naive_multi_source_attention(q: torch.Tensor, k: torch.Tensor | Sequence[torch.Tensor],
                                 v: torch.Tensor | Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *,
                                 window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """q: (T, H, D); k, v: (S, T, H, D) or S tensors (T, H, D); cu_seqlens: (B+1,). Returns (T, H, D) float64."""
    if not isinstance(k, torch.Tensor):
        k, v = torch.stack(list(k)), torch.stack(list(v))
    S, T, H, D = v.shape
    out = [q.new_zeros((0, H, D), dtype=torch.float64)]
    for s0, s1, scores in naive_scores(q, k, cu_seqlens, window, scale):
        vb = v[:, s0:s1].double().permute(2, 0, 1, 3).reshape(H, S * (s1 - s0), D)
        out.append(torch.einsum("hij,hjd->ihd", scores.softmax(-1), vb))
    return torch.cat(out, 0)
