"""CMA-Transformer (CMATH.md step 3): asymmetric fusion around one central modality c.

Each of L pre-LN blocks:
    h_c += SelfAttention(LN(h_c))                                   intra-modal context (S = 1 source)
    h_c += CrossAttention(LN(h_c); keys/values of ALL auxiliaries)  one softmax over every auxiliary's keys
    h_c += FFN(LN(h_c))
Auxiliary representations are read, never updated (asymmetric). F_c = LN(h_c) is the fine-grained view.
Attention stays within each conversation (cu_seqlens), optionally within |i - j| <= window.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cmath_mer.kernels import multi_source_attention


class MultiSourceAttention(nn.Module):
    """Queries from one stream, keys/values from S source streams (each with its own projection)."""

    def __init__(self, d_model: int, n_heads: int, n_sources: int, dropout: float,
                 window: int | None, backend: str | None):
        super().__init__()
        self.n_heads, self.window, self.backend = n_heads, window, backend
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.ModuleList(nn.Linear(d_model, 2 * d_model) for _ in range(n_sources))
        self.o = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, sources: list[torch.Tensor], cu_seqlens: torch.Tensor,
                max_seqlen: int | None = None) -> torch.Tensor:
        # x: (T, d); sources: S tensors (T, d) -> (T, d). max_seqlen: the batch's host bound on the lengths
        q = rearrange(self.q(x), "t (h e) -> t h e", h=self.n_heads)                      # (T, H, D)
        # each source's k and v are views of its own (T, 2d) projection, handed over as lists: no stack, the
        # Triton op reads them in place (strides (2d, D, 1))
        kv = [rearrange(proj(s), "t (two h e) -> two t h e", two=2, h=self.n_heads)       # (2, T, H, D) views
              for proj, s in zip(self.kv, sources)]
        k, v = [x[0] for x in kv], [x[1] for x in kv]                                     # S x (T, H, D) each
        o = multi_source_attention(q, k, v, cu_seqlens, window=self.window, max_seqlen=max_seqlen,
                                   backend=self.backend)
        return self.drop(self.o(rearrange(o, "t h e -> t (h e)")))


class CMABlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_aux: int, ffn_mult: int, dropout: float,
                 window: int | None, backend: str | None):
        super().__init__()
        self.ln_self = nn.LayerNorm(d_model)
        self.self_attn = MultiSourceAttention(d_model, n_heads, 1, dropout, window, backend)
        self.n_aux = n_aux
        if n_aux:
            self.ln_query = nn.LayerNorm(d_model)
            self.ln_aux = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_aux))
            self.cross_attn = MultiSourceAttention(d_model, n_heads, n_aux, dropout, window, backend)
        self.ln_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                 nn.Linear(ffn_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, h: torch.Tensor, aux: list[torch.Tensor], cu_seqlens: torch.Tensor,
                recompute: bool = False, max_seqlen: int | None = None) -> torch.Tensor:
        # h: (T, d) central stream; aux: n_aux tensors (T, d), not updated. recompute: each of the three
        # residual branches keeps only its input and redoes the rest in the backward (see CMATransformer)
        run = _recomputed if recompute else (lambda fn, *args: fn(*args))
        h = h + run(self._self_branch, h, cu_seqlens, max_seqlen)
        if self.n_aux:
            h = h + run(self._cross_branch, h, aux, cu_seqlens, max_seqlen)
        return h + run(self._ffn_branch, h)

    def _self_branch(self, h, cu_seqlens, max_seqlen=None):
        x = self.ln_self(h)
        return self.self_attn(x, [x], cu_seqlens, max_seqlen)

    def _cross_branch(self, h, aux, cu_seqlens, max_seqlen=None):
        return self.cross_attn(self.ln_query(h), [ln(a) for ln, a in zip(self.ln_aux, aux)], cu_seqlens, max_seqlen)

    def _ffn_branch(self, h):
        return self.ffn(self.ln_ffn(h))


# Attention kernels whose outputs a recomputed block keeps: recomputing them would cost O(N^2) again,
# while everything else in a block (projections, norms, FFN) is linear in N and cheap to redo. The aten SDPA
# ops (the torch backend in eager mode) and the cmath_mer attention custom ops (the Triton backend, and the
# torch backend under torch.compile), named so that a CPU-only install need not import the Triton module.
_KEEP_IN_RECOMPUTE = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
}
_KEEP_CUSTOM_OPS = {"cmath_mer::multi_source_attention_triton", "cmath_mer::multi_source_attention_ref",
                    "cmath_mer::multi_source_attention_ref_cpu"}


def _keep_attention(ctx, op, *args, **kwargs):
    keep = op in _KEEP_IN_RECOMPUTE or (isinstance(op, torch._ops.OpOverload) and op.name() in _KEEP_CUSTOM_OPS)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_all_but_attention():
    return create_selective_checkpoint_contexts(_keep_attention)


def _recomputed(fn, *args):
    """fn(*args), keeping only its inputs (and whole-conversation attention outputs) for the backward."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_recompute_all_but_attention)


class CMATransformer(nn.Module):
    """L CMA blocks centred on one modality; returns F_c = LN(h_c), (T, d)."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, n_aux: int, ffn_mult: int,
                 dropout: float, window: int | None, backend: str | None, recompute_from: int | None = None):
        super().__init__()
        self.recompute_from, self.window = recompute_from, window
        self.blocks = nn.ModuleList(CMABlock(d_model, n_heads, n_aux, ffn_mult, dropout, window, backend)
                                    for _ in range(n_layers))
        self.ln_out = nn.LayerNorm(d_model)

    def forward(self, h_central: torch.Tensor, aux: list[torch.Tensor], cu_seqlens: torch.Tensor,
                max_seqlen: int | None = None) -> torch.Tensor:
        # Long batches keep only each residual branch's input and its whole-conversation attention output,
        # and recompute the rest of the branch in the backward: a block keeps ~4 (T, d) tensors instead of
        # ~36, and the backward rebuilds one branch at a time (at most ~16 (T, d) tensors, the cross branch).
        # With a window everything in the transformer is linear in T, so the whole transformer is recomputed
        # in the backward as well (keeping only its input); the residual branches inside it are recomputed
        # one at a time during that second pass.
        recompute = (self.recompute_from is not None and self.training and torch.is_grad_enabled()
                     and h_central.shape[0] >= self.recompute_from)
        if recompute and self.window is not None:
            return checkpoint(self._layers, h_central, aux, cu_seqlens, True, max_seqlen, use_reentrant=False)
        return self._layers(h_central, aux, cu_seqlens, recompute, max_seqlen)

    def _layers(self, h: torch.Tensor, aux: list[torch.Tensor], cu_seqlens: torch.Tensor, recompute: bool,
                max_seqlen: int | None = None):
        for block in self.blocks:
            h = block(h, aux, cu_seqlens, recompute, max_seqlen)
        return self.ln_out(h)
