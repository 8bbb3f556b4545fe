"""The autograd side of a reconstruction-loss op whose forward also produces the gradients (the Liger-Kernel
fused-linear-loss idea): both implementations (the Triton kernels in fused.py, the cuBLAS row chunks in
chunked.py) are custom ops of one signature,

    op(h, weight, bias, target, want_dh, want_dw) -> (loss, dh_raw (T, K) or (0,), dW (M, K) or (0,), db (M,) or (0,))

in the accumulation dtype (fp32; fp64 for fp64 inputs), with dh_raw = (2 / M) r W: the 1/T and grad_output are
applied in the backward, so that an fp16 loss scale is not defeated by underflow. This module registers, for
such an op, the fake impl (shapes for torch.compile), the autograd formula and the autocast rule.
"""
from __future__ import annotations

import torch

from ..utils import once_differentiable, register_autocast_to_region_dtype


def _fake(h, weight, bias, target, want_dh, want_dw):
    acc_t = torch.float64 if h.dtype == torch.float64 else torch.float32
    T, K = h.shape
    M = weight.shape[0]
    return (h.new_empty((), dtype=acc_t), h.new_empty((T, K) if want_dh else (0,), dtype=acc_t),
            h.new_empty((M, K) if want_dw else (0,), dtype=acc_t), h.new_empty((M,) if want_dw else (0,),
                                                                               dtype=acc_t))


def _setup_context(ctx, inputs, output):
    h, weight, bias, target, want_dh, want_dw = inputs
    _, dh_raw, dw, db = output
    ctx.mark_non_differentiable(dh_raw, dw, db)
    ctx.save_for_backward(dh_raw, dw, db)
    ctx.T = h.shape[0]
    ctx.want = (want_dh, want_dw)
    ctx.dtypes = (h.dtype, weight.dtype, bias.dtype)


# The gradients are computed in the forward from the inputs' values; they are not functions of the inputs in
# autograd's eyes, so a double backward would silently be zero: refuse it.
@once_differentiable
def _backward(ctx, grad_loss, _gdh, _gdw, _gdb):
    dh_raw, dw, db = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if (need_h and not ctx.want[0]) or ((need_w or need_b) and not ctx.want[1]):
        raise RuntimeError("reconstruction_loss: a gradient was asked for that the forward did not compute "
                           "(requires_grad changed after the call?)")
    g = grad_loss.reshape(()).to(dh_raw.dtype)
    dh = (dh_raw * (g / ctx.T)).to(ctx.dtypes[0]) if need_h else None
    dW = (dw * g).to(ctx.dtypes[1]) if need_w else None
    dB = (db * g).to(ctx.dtypes[2]) if need_b else None
    return dh, dW, dB, None, None, None


def register_grads_in_forward(op) -> None:
    """Fake impl, autograd and autocast (inputs cast to the region's dtype, loss in fp32) for `op`."""
    op.register_fake(_fake)
    op.register_autograd(_backward, setup_context=_setup_context)
    register_autocast_to_region_dtype(op._qualname, cast=(0, 1, 2, 3))
