"""The attention baselines of the benchmark (cmath_mer/bench/baselines.py) compute the definition that
multi_source_attention computes: flex_attention with our document-and-window mask over the S sources' keys,
and the FlashAttention varlen layout (each conversation's keys of every source gathered together), against
the float64 dense definition on fresh random ragged batches.

flex_attention has no backward on a CPU (torch 2.13 raises NotImplementedError), so its gradients are checked
on CUDA only; the varlen layout's gradients (the gather and its scatter) are checked on the CPU with a dense
per-sequence stand-in for FlashAttention, and with FlashAttention itself on CUDA."""
from __future__ import annotations

import os
import secrets

import pytest
import torch
import torch.nn.functional as F

from cmath_mer.bench import baselines
from cmath_mer.kernels.attention.naive import naive_multi_source_attention

from helpers import assert_rel_close, grads, make_inputs

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (with TRITON_INTERPRET unset)")


def fresh_lengths(seed: int, count: int = 4, longest: int = 70) -> list[int]:
    """Short ragged conversations, one of length 1; the total is rarely a multiple of flex's 128-row block,
    so key blocks straddle the boundary between two sources."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, longest + 1, (count - 1,), generator=g).tolist()
    at = int(torch.randint(0, count, (), generator=g))
    return lengths[:at] + [1] + lengths[at:]


def dense_grads(q, k, v, do, cu, window):
    """The definition's output and gradients, in float64 on the CPU."""
    q, k, v, do, cu = (x.cpu() for x in (q, k, v, do, cu))
    return grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window),
                 q.double(), k.double(), v.double(),
                 do.double())


@pytest.mark.parametrize("S,window", [(2, None), (3, 2)])
def test_flex_with_the_document_window_mask_matches_the_definition(S, window):
    seed = secrets.randbelow(2**31)
    lengths = fresh_lengths(seed)
    q, k, v, _, cu = make_inputs(lengths, S, 2, 16, torch.float32, seed)
    out = baselines.flex_multi_source_attention(q, k, v, baselines.document_window_mask(cu, S, window=window))
    assert_rel_close(f"flex out (seed {seed}, lengths {lengths})", out,
                     naive_multi_source_attention(q, k, v, cu, window=window),
                     1e-4)


@needs_cuda
@pytest.mark.parametrize("S,window", [(2, None), (3, 2)])
def test_flex_gradients_match_the_definition_on_cuda(S, window):
    seed = secrets.randbelow(2**31)
    lengths = fresh_lengths(seed)
    q, k, v, do, cu = (x.cuda() for x in make_inputs(lengths, S, 2, 16, torch.float32, seed))
    mask = baselines.document_window_mask(cu, S, window=window)
    got = grads(lambda q, k, v: baselines.flex_multi_source_attention(q, k, v, mask), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, dense_grads(q, k, v, do, cu, window)):
        assert_rel_close(f"flex {name} (seed {seed}, lengths {lengths})", a.cpu(), b, 1e-4)


def test_conversation_major_keys_put_each_conversations_sources_together():
    lengths, S = [3, 1, 4], 2
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    T = sum(lengths)
    want = []
    for b, n in enumerate(lengths):
        for s in range(S):
            want += [s * T + int(cu[b]) + i for i in range(n)]
    assert baselines.conversation_major_keys(cu, S).tolist() == want


def dense_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
    """A stand-in for FlashAttention varlen: per sequence, softmax attention of its queries over its keys."""
    out, bq, bk = [], cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                           v[k0:k1].transpose(0, 1), scale=scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out, 0)


@pytest.mark.parametrize("S", [1, 3])
def test_varlen_layout_matches_the_definition_forward_and_gradients(S):
    seed = secrets.randbelow(2**31)
    lengths = fresh_lengths(seed)
    q, k, v, do, cu = make_inputs(lengths, S, 2, 16, torch.float32, seed)
    got = grads(lambda q, k, v: baselines.varlen_multi_source_attention(q, k, v, cu, max(lengths),
                                                                        attend=dense_varlen), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, dense_grads(q, k, v, do, cu, None)):
        assert_rel_close(f"varlen layout {name} (seed {seed}, lengths {lengths})", a, b, 1e-4)


@needs_cuda
@pytest.mark.parametrize("S", [1, 2])
def test_flash_varlen_matches_the_definition_on_cuda(S):
    if baselines.varlen_attn_function() is None:
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    seed = secrets.randbelow(2**31)
    lengths = fresh_lengths(seed)
    q, k, v, do, cu = (x.cuda() for x in make_inputs(lengths, S, 2, 32, torch.bfloat16, seed))
    got = grads(lambda q, k, v: baselines.varlen_multi_source_attention(q, k, v, cu, max(lengths)), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, dense_grads(q, k, v, do, cu, None)):
        assert_rel_close(f"varlen {name} (seed {seed}, lengths {lengths})", a.cpu(), b, 2e-2)
