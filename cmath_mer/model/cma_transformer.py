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

from cmath_mer.kernels import multi_source_attention, reference_ops
from cmath_mer.kernels.backend import resolve_backend


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
        q, k, v = self.heads(self.project(x, sources))
        o = multi_source_attention(q, k, v, cu_seqlens, window=self.window, max_seqlen=max_seqlen,
                                   backend=self.backend)
        return self.output(o)

    def project(self, x: torch.Tensor, sources: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(q (T, d), kv_s (T, 2d) per source): the projections, whole tensors."""
        return (self.q(x), *[proj(s) for proj, s in zip(self.kv, sources)])

    def heads(self, projected) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """q (T, H, D) and S-long lists k, v (T, H, D): views of the projections. Each source's k and v are views of
        its own (T, 2d) projection, handed over as lists: no stack, the Triton op reads them in place (strides
        (2d, D, 1))."""
        q = rearrange(projected[0], "t (h e) -> t h e", h=self.n_heads)
        kv = [rearrange(x, "t (two h e) -> two t h e", two=2, h=self.n_heads) for x in projected[1:]]
        return q, [x[0] for x in kv], [x[1] for x in kv]

    def output(self, o: torch.Tensor) -> torch.Tensor:
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
                recompute: bool | str = False, max_seqlen: int | None = None) -> torch.Tensor:
        # h: (T, d) central stream; aux: n_aux tensors (T, d), not updated. recompute: each of the three
        # residual branches keeps only its input (and its attention output) and redoes the rest in the
        # backward (see CMATransformer): "split" (or True) in pieces around the attention call, "selective"
        # through a selective checkpoint policy (traceable by torch.compile)
        if recompute == "selective":
            h = h + _recomputed(self._self_branch, h, cu_seqlens, max_seqlen)
            if self.n_aux:
                h = h + _recomputed(self._cross_branch, h, aux, cu_seqlens, max_seqlen)
            return h + _recomputed(self._ffn_branch, h)
        if recompute:
            h = h + _split_attention_branch(self.self_attn, self._self_projections, [h], [self.ln_self],
                                            cu_seqlens, max_seqlen)
            if self.n_aux:
                h = h + _split_attention_branch(self.cross_attn, self._cross_projections, [h, *aux],
                                                [self.ln_query, *self.ln_aux], cu_seqlens, max_seqlen)
            return h + checkpoint(self._ffn_branch, h, use_reentrant=False)
        h = h + self._self_branch(h, cu_seqlens, max_seqlen)
        if self.n_aux:
            h = h + self._cross_branch(h, aux, cu_seqlens, max_seqlen)
        return h + self._ffn_branch(h)

    def _self_branch(self, h, cu_seqlens, max_seqlen=None):
        x = self.ln_self(h)
        return self.self_attn(x, [x], cu_seqlens, max_seqlen)

    def _cross_branch(self, h, aux, cu_seqlens, max_seqlen=None):
        return self.cross_attn(self.ln_query(h), [ln(a) for ln, a in zip(self.ln_aux, aux)], cu_seqlens, max_seqlen)

    def _self_projections(self, h):
        x = self.ln_self(h)
        return self.self_attn.project(x, [x])

    def _cross_projections(self, h, *aux):
        return self.cross_attn.project(self.ln_query(h), [ln(a) for ln, a in zip(self.ln_aux, aux)])

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


class _Recomputation:
    """The inputs of one attention call (the branch's norms and q/kv projections) kept as nothing for the
    backward: what the attention op saves of them is packed as (projection, offset, shape, stride) and, when
    its backward unpacks it, rebuilt from one recomputation of the projections from the branch's inputs.
    _Projections' backward takes its gradients from that same recomputation, graph and all: the projections
    run twice per step, as under a checkpoint, and no dispatch mode sees the ops (the selective checkpoint
    policy's TorchDispatchMode was the largest host cost of a long step's GPU profile)."""

    def __init__(self, fn, inputs: list[torch.Tensor]):
        self.fn, self.inputs = fn, inputs
        dev = inputs[0].device.type
        self.autocast = dict(device_type=dev, enabled=torch.is_autocast_enabled(dev),
                             dtype=torch.get_autocast_dtype(dev))
        self.storages: list[int] = []            # the projections' storages in the forward
        self.recomputed = None

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.storages:             # the attention's output, log-sum-exp, offsets: kept
            return t
        return self.storages.index(ptr), t.storage_offset(), tuple(t.shape), t.stride()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        i, offset, shape, stride = packed
        return self.recompute()[1][i].detach().as_strided(shape, stride, offset)

    def recompute(self):
        if self.recomputed is None:
            inputs = [x.detach().requires_grad_(x.requires_grad) for x in self.inputs]
            with torch.enable_grad(), torch.autocast(**self.autocast):
                self.recomputed = inputs, self.fn(*inputs)
        return self.recomputed


class _Projections(torch.autograd.Function):
    """The projections of a _Recomputation, computed without a graph; their gradients from its recomputation."""

    @staticmethod
    def forward(ctx, state: _Recomputation, n_inputs: int, *tensors):
        ctx.state, ctx.n_inputs = state, n_inputs
        ctx.save_for_backward(*tensors[n_inputs:])           # the parameters: the inputs are in state
        with torch.no_grad():
            outs = state.fn(*tensors[:n_inputs])
        state.storages = [o.untyped_storage().data_ptr() for o in outs]
        return outs

    @staticmethod
    def backward(ctx, *grads):
        params = ctx.saved_tensors
        inputs, outs = ctx.state.recompute()
        ctx.state.recomputed = None
        wanted = [x for x in (*inputs, *params) if x.requires_grad]
        used = [(o, g) for o, g in zip(outs, grads) if g is not None]
        got = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used], allow_unused=True))
        return None, None, *[next(got) if x.requires_grad else None for x in (*inputs, *params)]


def _attention_keeping_inputs(attn: MultiSourceAttention, q, k, v, cu_seqlens, max_seqlen):
    """attn's attention call through an op whose autograd saves its q, k, v themselves (the torch backend's
    eager reference saves copies of k and v, which the packing would not recognise and would keep)."""
    if resolve_backend(attn.backend, q.device) == "torch":
        scale = q.shape[-1] ** -0.5
        if q.device.type == "cpu":           # SDPA's CPU flash kernels, the log-sum-exp kept
            return reference_ops.attention_ref_cpu_op(q, k, v, cu_seqlens, scale)[0]
        return reference_ops.attention_ref_op(q, k, v, cu_seqlens, -1, scale)
    return multi_source_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen, backend=attn.backend)


def _split_attention_branch(attn: MultiSourceAttention, projections, inputs: list[torch.Tensor],
                            norms: list[nn.Module], cu_seqlens, max_seqlen):
    """An attention branch (no window) keeping for the backward only its inputs and the attention's output: the
    projections recomputed (_Recomputation), the output projection and dropout checkpointed."""
    state = _Recomputation(projections, inputs)
    params = [p for m in (*norms, attn.q, *attn.kv) for p in m.parameters()]
    projected = _Projections.apply(state, len(inputs), *inputs, *params)
    q, k, v = attn.heads(projected)
    with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
        o = _attention_keeping_inputs(attn, q, k, v, cu_seqlens, max_seqlen)
    return checkpoint(attn.output, o, use_reentrant=False)


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
            return checkpoint(self._layers, h_central, aux, cu_seqlens, "selective", max_seqlen, use_reentrant=False)
        if recompute:            # the split branches' saved-tensor hooks and autograd.Function: eager mode only
            recompute = "selective" if torch.compiler.is_compiling() else "split"
        return self._layers(h_central, aux, cu_seqlens, recompute, max_seqlen)

    def _layers(self, h: torch.Tensor, aux: list[torch.Tensor], cu_seqlens: torch.Tensor, recompute: bool | str,
                max_seqlen: int | None = None):
        for block in self.blocks:
            h = block(h, aux, cu_seqlens, recompute, max_seqlen)
        return self.ln_out(h)
