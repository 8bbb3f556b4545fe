"""The three hot ops of CMATH (docs/KERNELS.md), each a PyTorch reference beside a Triton kernel.

    multi_source_attention(q, k, v, cu_seqlens, *, window=None, scale=None, max_seqlen=None) -> (T, H, D)
        (k, v: (S, T, H, D) tensors, or lists of S tensors (T, H, D) read in place; max_seqlen: a host bound
        on the conversation lengths, for the one-pass Triton backward)
    reconstruction_loss(h, weight, bias, target)                                  -> scalar
    variational_fusion(mu, logvar, *, seed, sample, detach_teacher=True, eps_offset=0) -> 5-tuple
        (seed: an int, or a one-element int64 tensor on the inputs' device, read there: CUDA graphs)

`backend` (keyword, default None = env var CMATH_BACKEND, default 'auto') picks the implementation;
see backend.py. The Triton modules are imported only when used, so a CPU-only install needs no triton.

Every path is a torch.library custom op where it matters (reference_ops.py, */fused.py): the Triton forward
and backward always. On the torch backend under torch.compile, the attention reference is an opaque op with a
fake impl (its per-conversation loop reads cu_seqlens on the host, which would break the graph); on the CPU
without a window it keeps SDPA's log-sum-exp for the backward, elsewhere its backward recomputes. The
reconstruction and variational references are traced as plain PyTorch, so inductor fuses them with the rest
of the step (the variational eps stays one opaque op: inductor cannot lower Philox's ten rounds in reasonable
time). In eager mode the references run as plain PyTorch. Autocast and the fp32/TF32 rules: docs/KERNELS.md,
"Precision policy".
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import reference_ops
from .attention.naive import naive_multi_source_attention
from .attention.reference import as_sources, reference_multi_source_attention
from .backend import reconstruction_impl, resolve_backend
from .reconstruction.chunked import chunked_reconstruction_loss
from .reconstruction.naive import naive_reconstruction_loss
from .utils import seed_tensor
from .variational.naive import naive_variational_fusion

__all__ = ["multi_source_attention", "reconstruction_loss", "variational_fusion", "resolve_backend",
           "naive_multi_source_attention", "reference_multi_source_attention", "naive_reconstruction_loss",
           "naive_variational_fusion"]


def multi_source_attention(q: torch.Tensor, k: torch.Tensor | Sequence[torch.Tensor],
                           v: torch.Tensor | Sequence[torch.Tensor], cu_seqlens: torch.Tensor,
                           *, window: int | None = None, scale: float | None = None,
                           max_seqlen: int | None = None, backend: str | None = None) -> torch.Tensor:
    """q: (T, H, D); k, v: (S, T, H, D), or S tensors (T, H, D) each (any strides; the Triton kernels read them
    in place when they share one stride set with the last dim contiguous); cu_seqlens: (B+1,) int32
    -> (T, H, D). max_seqlen: None or a host int >= every conversation's length, known to the caller (the
    batch builder) without reading cu_seqlens; the Triton backward runs in one pass when it fits one tile.
    The reference ignores it but for a check where it reads the bounds anyway (eager mode)."""
    if resolve_backend(backend, q.device) == "triton":
        from .attention.fused import fused_multi_source_attention
        return fused_multi_source_attention(q, k, v, cu_seqlens, window=window, scale=scale, max_seqlen=max_seqlen)
    if torch.compiler.is_compiling():
        if window is None and q.device.type == "cpu":           # SDPA's CPU flash kernels, lse kept: no recompute
            return reference_ops.attention_ref_cpu_op(q, as_sources(k), as_sources(v), cu_seqlens,
                                                      float(q.shape[-1] ** -0.5 if scale is None else scale))[0]
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0 or None, got {window}")
        return reference_ops.attention_ref_op(q, as_sources(k), as_sources(v), cu_seqlens,
                                              -1 if window is None else int(window),
                                              float(q.shape[-1] ** -0.5 if scale is None else scale))
    return reference_multi_source_attention(q, k, v, cu_seqlens, window=window, scale=scale, max_seqlen=max_seqlen)


def reconstruction_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                        *, backend: str | None = None) -> torch.Tensor:
    """h: (T, K); weight: (M, K); bias: (M,); target: (T, M) -> sum((h W^T + b - target)^2) / (T M)."""
    if resolve_backend(backend, h.device) == "triton":
        if reconstruction_impl(h.device) == "chunked":
            return chunked_reconstruction_loss(h, weight, bias, target)
        from .reconstruction.fused import fused_reconstruction_loss
        return fused_reconstruction_loss(h, weight, bias, target)
    return naive_reconstruction_loss(h, weight, bias, target)


def variational_fusion(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | torch.Tensor, sample: bool,
                       detach_teacher: bool = True, eps_offset: int = 0, backend: str | None = None):
    """mu, logvar: (C, T, Z) -> (z, mu_f, logvar_f, kl_prior, kl_consistency). eps[t, j] is word m % 4 of
    tl.randn4x(seed, m // 4), m = eps_offset + t * Z + j (variational/philox.py): eps_offset places this batch
    in a larger one. seed: an int, or a one-element int64 tensor on the inputs' device, read there (a CUDA
    graph replays with a new one)."""
    if resolve_backend(backend, mu.device) == "triton":
        from .variational.fused import fused_variational_fusion
        return fused_variational_fusion(mu, logvar, seed=seed, sample=sample, detach_teacher=detach_teacher,
                                        eps_offset=eps_offset)
    if isinstance(seed, torch.Tensor) or torch.compiler.is_compiling():
        # checked like the ops check it; traced, an int seed becomes a tensor (a symbolic int, not a constant
        # that would recompile every step), and the eps an opaque op (variational/philox.py)
        seed = seed_tensor(seed, mu.device)
    return naive_variational_fusion(mu, logvar, seed=seed, sample=sample, detach_teacher=detach_teacher,
                                    eps_offset=eps_offset)
