"""The PyTorch attention reference registered as custom ops, for torch.compile.

In eager mode the torch backend calls the reference functions directly (autograd through their aten ops:
SDPA's own backward, nothing recomputed). Under torch.compile the attention reference loops over
conversations with `cu_seqlens.tolist()`, a data-dependent host read that would break the graph; as an
opaque op with a fake impl it traces like any aten op. `multi_source_attention_ref` serves windows and any
device: its backward op runs the reference again under torch.func.vjp and takes its gradients. On the CPU
without a window `multi_source_attention_ref_cpu` calls SDPA's CPU flash kernels per conversation and keeps
their log-sum-exp, so its backward recomputes nothing. The reconstruction and variational references need no
op: compile traces them as plain PyTorch (inductor fuses them; as recomputing ops they made the compiled
step slower than eager). The autocast rule is the Triton
ops' (utils.register_autocast_to_region_dtype).

This module imports no triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention.reference import reference_multi_source_attention
from .cu_seqlens import equal_length_runs
from .utils import once_differentiable, register_autocast_to_region_dtype


def _recompute_grads(fn, inputs: list[torch.Tensor], grads: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """Gradients of sum_i <fn(inputs)_i, grads_i> with respect to inputs (zeros where none flows).

    torch.func.vjp, not torch.autograd.grad: inside a custom op's kernel the autograd dispatch keys are
    excluded, so plain autograd would record nothing; functorch's transform brings its own autograd level."""
    outs, vjp_fn = torch.func.vjp(fn, *inputs)
    single = not isinstance(outs, tuple)
    outs = (outs,) if single else outs
    cot = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype).expand_as(o) for o, g in zip(outs, grads))
    got = vjp_fn(cot[0] if single else cot)
    return [g.contiguous() for g in got]


def _window_arg(window: int) -> int | None:
    return None if window < 0 else window


# ----------------------------------------------------------------------------------------------------------
# multi_source_attention
# k and v are `Tensor[]`: S tensors (T, H, D), any strides (the public function unbinds an (S, T, H, D) tensor).
@torch.library.custom_op("cmath_mer::multi_source_attention_ref", mutates_args=())
def attention_ref_op(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], cu_seqlens: torch.Tensor,
                     window: int, scale: float) -> torch.Tensor:
    return reference_multi_source_attention(q, k, v, cu_seqlens, window=_window_arg(window), scale=scale).contiguous()


@attention_ref_op.register_fake
def _(q, k, v, cu_seqlens, window, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("cmath_mer::multi_source_attention_ref_backward", mutates_args=())
def attention_ref_backward_op(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], do: torch.Tensor,
                              cu_seqlens: torch.Tensor, window: int, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq (T, H, D), dk (S, T, H, D), dv (S, T, H, D), as the Triton backward op."""
    S = len(k)

    def fn(q_, *kv):                                      # the sources flat: vjp gives one gradient per tensor
        return reference_multi_source_attention(q_, kv[:S], kv[S:], cu_seqlens, window=_window_arg(window), scale=scale)
    dq, *dkv = _recompute_grads(fn, [q, *k, *v], [do])
    return dq, torch.stack(dkv[:S]), torch.stack(dkv[S:])


@attention_ref_backward_op.register_fake
def _(q, k, v, do, cu_seqlens, window, scale):
    return q.new_empty(q.shape), k[0].new_empty((len(k), *q.shape)), v[0].new_empty((len(v), *q.shape))


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, window, scale = inputs
    ctx.save_for_backward(q, cu_seqlens, *k, *v)
    ctx.S, ctx.window, ctx.scale = len(k), window, scale


@once_differentiable
def _attention_backward(ctx, do):
    q, cu_seqlens, *kv = ctx.saved_tensors
    dq, dk, dv = attention_ref_backward_op(q, kv[:ctx.S], kv[ctx.S:], do, cu_seqlens, ctx.window, ctx.scale)
    return dq, list(dk.unbind(0)), list(dv.unbind(0)), None, None, None


attention_ref_op.register_autograd(_attention_backward, setup_context=_attention_setup)
register_autocast_to_region_dtype("cmath_mer::multi_source_attention_ref", cast=(0, 1, 2))


# ----------------------------------------------------------------------------------------------------------
# multi_source_attention on the CPU without a window: SDPA's CPU flash kernel per run of equal-length
# conversations (one batch of c conversations), as in eager mode, with its log-sum-exp kept for the backward,
# which runs the flash backward on it (nothing recomputed; the recomputing pair above serves windows and other
# devices). lse: (H, T) fp32 (fp64 for fp64 inputs).
def _run_heads(x, a: int, n: int, c: int) -> torch.Tensor:
    """Rows a .. a+c*n-1 of a (T, H, D) tensor as SDPA's (c, H, n, D): c conversations of n utterances."""
    return x[a:a + c * n].unflatten(0, (c, n)).transpose(1, 2)


def _run_sources(xs, a: int, n: int, c: int) -> torch.Tensor:
    """The S sources' rows a .. a+c*n-1 as SDPA's (c, H, S*n, D) keys or values (sources one after the other:
    the reference's one softmax over S*n keys)."""
    heads = [_run_heads(x, a, n, c) for x in xs]
    return heads[0] if len(heads) == 1 else torch.cat(heads, dim=2)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    # SDPA's CPU flash kernels keep the log-sum-exp in their accumulation type
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _runs(cu_seqlens: torch.Tensor):
    """(a, n, c) for each run of c consecutive conversations of n > 0 utterances starting at row a."""
    bounds = cu_seqlens.tolist()
    a = bounds[0]
    for n, c in equal_length_runs([y - x for x, y in zip(bounds[:-1], bounds[1:])]):
        if n:
            yield a, n, c
        a += n * c


@torch.library.custom_op("cmath_mer::multi_source_attention_ref_cpu", mutates_args=())
def attention_ref_cpu_op(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], cu_seqlens: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, D = q.shape
    o = q.new_zeros(T, H, D)
    lse = torch.zeros(H, T, dtype=_lse_dtype(q), device=q.device)
    for a, n, c in _runs(cu_seqlens):
        out, lse_run = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _run_heads(q, a, n, c), _run_sources(k, a, n, c), _run_sources(v, a, n, c), scale=scale)
        o[a:a + c * n] = out.transpose(1, 2).flatten(0, 1)                   # (c, H, n, D) -> (c*n, H, D)
        lse[:, a:a + c * n] = lse_run.transpose(0, 1).flatten(1)                   # (c, H, n) -> (H, c*n)
    return o, lse


@attention_ref_cpu_op.register_fake
def _(q, k, v, cu_seqlens, scale):
    T, H, D = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=_lse_dtype(q))


@torch.library.custom_op("cmath_mer::multi_source_attention_ref_cpu_backward", mutates_args=())
def attention_ref_cpu_backward_op(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], o: torch.Tensor,
                                  lse: torch.Tensor, do: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq (T, H, D), dk (S, T, H, D), dv (S, T, H, D), as the recomputing backward op."""
    S, (T, H, D) = len(k), q.shape
    dq = q.new_zeros(T, H, D)
    dk = k[0].new_zeros(S, T, H, D)
    dv = v[0].new_zeros(S, T, H, D)
    do = do.to(o.dtype)
    for a, n, c in _runs(cu_seqlens):
        b = a + c * n
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _run_heads(do, a, n, c), _run_heads(q, a, n, c), _run_sources(k, a, n, c), _run_sources(v, a, n, c),
            _run_heads(o, a, n, c), lse[:, a:b].unflatten(1, (c, n)).transpose(0, 1), 0.0, False, scale=scale)
        dq[a:b] = gq.transpose(1, 2).flatten(0, 1)                             # (c, H, n, D) -> (c*n, H, D)
        dk[:, a:b] = gk.unflatten(2, (S, n)).permute(2, 0, 3, 1, 4).flatten(1, 2)  # (c, H, S*n, D) -> (S, c*n, H, D)
        dv[:, a:b] = gv.unflatten(2, (S, n)).permute(2, 0, 3, 1, 4).flatten(1, 2)
    return dq, dk, dv


@attention_ref_cpu_backward_op.register_fake
def _(q, k, v, o, lse, do, cu_seqlens, scale):
    return q.new_empty(q.shape), k[0].new_empty((len(k), *q.shape)), v[0].new_empty((len(v), *q.shape))


def _attention_cpu_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, o, lse, cu_seqlens, *k, *v)
    ctx.S, ctx.scale = len(k), scale


@once_differentiable
def _attention_cpu_backward(ctx, do, _dlse):
    q, o, lse, cu_seqlens, *kv = ctx.saved_tensors
    dq, dk, dv = attention_ref_cpu_backward_op(q, kv[:ctx.S], kv[ctx.S:], o, lse, do.contiguous(), cu_seqlens,
                                               ctx.scale)
    return dq, list(dk.unbind(0)), list(dv.unbind(0)), None, None


attention_ref_cpu_op.register_autograd(_attention_cpu_backward, setup_context=_attention_cpu_setup)
register_autocast_to_region_dtype("cmath_mer::multi_source_attention_ref_cpu", cast=(0, 1, 2))
