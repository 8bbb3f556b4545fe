"""The attention a user would pick instead of ours, on our layout: q (T, H, D); k, v (S, T, H, D); cu_seqlens.

The definition (kernels.multi_source_attention): each query of conversation b attends to the keys of all S
sources of conversation b, those within `window` positions of it when a window is given.

* `flex_multi_source_attention`: torch.nn.attention.flex_attention over the S sources' keys laid end to
  end (k.reshape(S * T, H, D), a view: no copy) with a document-and-window `mask_mod`. The BlockMask is
  built once per batch (`document_window_mask`), as our kernel builds its block tables once per batch.
* `varlen_multi_source_attention`: FlashAttention varlen (torch.nn.attention.varlen.varlen_attn, CUDA,
  fp16/bf16), which needs each conversation's keys contiguous: for S > 1 the keys are gathered into
  conversation-major order (a copy, and its backward a scatter) inside the call.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from cmath_mer.kernels.cu_seqlens import positions


@functools.cache
def _compiled(fn):
    """torch.compile(fn) with static shapes: a new batch shape recompiles. (With automatic dynamic shapes,
    inductor's CPU flex_attention template generated C++ that does not compile (`cur_kvSplitSize8` not
    declared, torch 2.13) on the second shape of a process.)"""
    return torch.compile(fn, dynamic=False)


def flex_attention_compiled():
    """torch.compile(flex_attention): without compile flex_attention materialises every score."""
    return _compiled(flex_attention)


def document_window_mask(cu_seqlens: torch.Tensor, S: int, *, window: int | None = None, compile: bool = True):
    """The flex_attention BlockMask of the definition over T queries and S * T keys (source s's keys at
    s * T .. s * T + T - 1). compile: build it with torch.compile(create_block_mask), which never holds the
    T x S*T mask (the eager builder does: 1.6 GB at T = 8,192, S = 2)."""
    T = int(cu_seqlens[-1])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=T)
    pos = positions(cu_seqlens, T)
    doc_k, pos_k = doc.repeat(S), pos.repeat(S)

    def same_conversation(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc_k[kv_idx]

    def same_conversation_within_window(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc_k[kv_idx]) & ((pos[q_idx] - pos_k[kv_idx]).abs() <= window)

    mask_mod = same_conversation if window is None else same_conversation_within_window
    build = _compiled(create_block_mask) if compile else create_block_mask
    return build(mask_mod, None, None, T, S * T, device=cu_seqlens.device)


def flex_multi_source_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, *,
                                scale: float | None = None, attend=None) -> torch.Tensor:
    """(T, H, D) output of the definition through flex_attention; block_mask from `document_window_mask`.
    attend: the flex_attention to call (default: the compiled one)."""
    attend = flex_attention_compiled() if attend is None else attend
    S, T, H, D = k.shape
    qh = q.transpose(0, 1).unsqueeze(0)                                 # (1, H, T, D), views
    kh = k.reshape(S * T, H, D).transpose(0, 1).unsqueeze(0)            # (1, H, S*T, D)
    vh = v.reshape(S * T, H, D).transpose(0, 1).unsqueeze(0)
    return attend(qh, kh, vh, block_mask=block_mask, scale=scale).squeeze(0).transpose(0, 1)


def varlen_attn_function():
    """torch's FlashAttention varlen function, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return getattr(torch.nn.attention, "varlen_attn", None)
    return varlen_attn


def conversation_major_keys(cu_seqlens: torch.Tensor, S: int) -> torch.Tensor:
    """(S * T,) int64 row order into k.reshape(S * T, H, D) that puts each conversation's S * n_b keys
    together, source-major within it (the order of the definition's concatenation)."""
    T = int(cu_seqlens[-1])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = cu_seqlens[:-1].long()
    conv = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths * S,
                                   output_size=S * T)
    within = torch.arange(S * T, device=cu_seqlens.device) - torch.repeat_interleave(S * starts, lengths * S,
                                                                                    output_size=S * T)
    n = lengths[conv]
    source, pos = within // n, within % n
    return source * T + starts[conv] + pos


def varlen_multi_source_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                  max_len: int, *, key_order: torch.Tensor | None = None,
                                  scale: float | None = None, attend=None) -> torch.Tensor:
    """(T, H, D) output of the definition (no window) through FlashAttention varlen. key_order: from
    `conversation_major_keys`, computed once per batch; the gather itself runs in the call.
    attend: the varlen function (default: torch's)."""
    attend = varlen_attn_function() if attend is None else attend
    S, T, H, D = k.shape
    if S == 1:
        kc, vc = k[0], v[0]
    else:
        order = conversation_major_keys(cu_seqlens, S) if key_order is None else key_order
        kc = k.reshape(S * T, H, D).index_select(0, order)
        vc = v.reshape(S * T, H, D).index_select(0, order)
    cu = cu_seqlens.to(torch.int32)
    options = {} if scale is None else {"scale": scale}         # torch 2.9-2.10's varlen_attn has no scale
    return attend(q, kc, vc, cu, cu * S, max_len, S * max_len, **options)
