"""Reconstruction loss in row chunks on cuBLAS (the Liger-Kernel fused-linear-loss design), beside the Triton
kernels of fused.py: same op signature (grads_in_forward.py), same results, no Triton.

    for each chunk of rows:  r = addmm(target_c, h_c, W^T, beta=-1) + b   (chunk, M): the only large temporary
                             loss += sum(r^2);  dh_c = (2/M) r W;  dW += (2/(T M)) r^T h_c;  db += (2/(T M)) sum r

Why: on one H100 (bf16, 32,768 x 256 -> 1,582) cuBLAS addmm + MSE took 0.80 ms against 1.95 ms
for the Triton kernels: at K = 256 the op is a GEMM problem (6K/e = 768 flop per target byte, above the
H100's ridge), and cuBLAS's GEMMs beat ours. This keeps cuBLAS for the three GEMMs and bounds the memory
to (chunk, M) instead of the reference's (T, M) reconstruction, its gradient and MSE's temporaries.
Precision: the three GEMMs run in the inputs' dtype (cuBLAS accumulates in fp32), the residual, the loss and
the sums over chunks in fp32, as the reference does under autocast (its backward GEMMs are bf16 there too).
The triton backend's `auto` runs it on CUDA (backend.reconstruction_impl); CMATH_RECONSTRUCTION=kernel|chunked
picks one; the benchmark measures both.
"""
from __future__ import annotations

import torch

from ..utils import check_same_device
from .grads_in_forward import register_grads_in_forward

CHUNK_BYTES = 64 * 2**20          # fp32 bytes of one (chunk, M) residual: a few of these are live at once


def chunk_rows(T: int, M: int) -> int:
    """Rows per chunk: a (chunk, M) fp32 residual of about CHUNK_BYTES, at least 64 rows, at most T."""
    return max(1, min(T, max(64, CHUNK_BYTES // (4 * M))))


@torch.library.custom_op("cmath_mer::reconstruction_loss_chunked", mutates_args=())
def chunked_reconstruction_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                              want_dh: bool, want_dw: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = h.shape
    M = weight.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    loss = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty((T, K) if want_dh else (0,), dtype=acc, device=h.device)
    dw = torch.zeros((M, K) if want_dw else (0,), dtype=acc, device=h.device)
    db = torch.zeros((M,) if want_dw else (0,), dtype=acc, device=h.device)
    rows = chunk_rows(T, M)
    for r0 in range(0, T, rows):
        h_c = h[r0:r0 + rows]                                       # (c, K)
        # the target folded into the GEMM (beta = -1): h_c W^T - target_c in one cuBLAS call, no separate pass
        r = torch.addmm(target[r0:r0 + rows], h_c, weight.t(), beta=-1).to(acc)     # (c, M)
        r += bias                                                   # residual, in place, fp32
        loss += torch.dot(r.view(-1), r.view(-1))
        r_g = r.to(h.dtype)                                         # the gradient GEMMs in the inputs' dtype
        if want_dh:
            dh[r0:r0 + rows] = torch.mm(r_g, weight)                # (c, K), scaled below
        if want_dw:
            dw += torch.mm(r_g.t(), h_c)                            # (M, K) += r^T h_c, summed in fp32
            db += r.sum(0)
    if want_dh:
        dh.mul_(2.0 / M)
    if want_dw:
        dw.mul_(2.0 / (T * M))
        db.mul_(2.0 / (T * M))
    return loss / (T * M), dh, dw, db


register_grads_in_forward(chunked_reconstruction_op)


def chunked_reconstruction_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                target: torch.Tensor) -> torch.Tensor:
    """h: (T, K); weight: (M, K); bias: (M,); target: (T, M) -> sum((h W^T + b - target)^2) / (T M)."""
    if h.dim() != 2 or weight.dim() != 2 or bias.dim() != 1 or target.dim() != 2 or \
            weight.shape[1] != h.shape[1] or bias.shape[0] != weight.shape[0] or \
            tuple(target.shape) != (h.shape[0], weight.shape[0]):
        raise ValueError(f"expected h (T, K), weight (M, K), bias (M,), target (T, M); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(target.shape)}")
    if h.shape[0] == 0:
        raise ValueError("reconstruction loss of an empty batch (T = 0) is undefined")
    check_same_device(h=h, weight=weight, bias=bias, target=target)
    autocast = torch.is_autocast_enabled(h.device.type)
    if not (h.dtype == weight.dtype == bias.dtype == target.dtype) and not autocast:
        raise TypeError(f"h, weight, bias and target must share one dtype (got {h.dtype}, {weight.dtype}, "
                        f"{bias.dtype}, {target.dtype}); mixed dtypes are accepted in an autocast region")
    grad = torch.is_grad_enabled()
    want_dh = grad and h.requires_grad
    want_dw = grad and (weight.requires_grad or bias.requires_grad)
    loss = chunked_reconstruction_op(h, weight, bias, target, want_dh, want_dw)[0]
    return loss if autocast else loss.to(h.dtype)
