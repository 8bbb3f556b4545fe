"""The one-pass attention backward: with a host bound max_seqlen that fits one tile, one kernel and one
program per (conversation, head) computes dq, dk and dv. Under TRITON_INTERPRET: every gradient against the
float64 definition and against the multi-kernel backward, on odd and ragged lengths (empty conversations too),
windows on and off, S = 1..3, fp32 and fp16 (the interpreter's bf16 arithmetic is wrong: bf16 is compiled by the
AOT report and checked on a GPU); which kernels launch for which bound; bitwise equal runs; a broken bound."""
from __future__ import annotations

import pytest
import torch

from cmath_mer.kernels import multi_source_attention
from cmath_mer.kernels.attention.naive import naive_multi_source_attention

from helpers import TOL, assert_rel_close, grads, make_inputs, needs_triton

pytestmark = needs_triton

BACKWARD_KERNELS = ("_attn_bwd_onepass_kernel", "_attn_bwd_preprocess", "_attn_bwd_dq_kernel", "_attn_bwd_dkv_kernel")


@pytest.fixture
def launches(fused, monkeypatch):
    """The backward kernels launched, in order: (name, grid, BL or None)."""
    seen = []

    class Spy:
        def __init__(self, name, real):
            self.name, self.real = name, real

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, tuple(grid), kwargs.get("BL")))
                return self.real[grid](*args, **kwargs)
            return launch

    for name in BACKWARD_KERNELS:
        monkeypatch.setattr(fused, name, Spy(name, getattr(fused, name)))
    return seen


@pytest.fixture
def fused(nan_poison):
    pytest.importorskip("triton")
    from cmath_mer.kernels.attention import fused as mod
    return mod


def names(seen):
    return [name for name, _, _ in seen]


CASES = [
    # lengths,            S, H,  D, window, dtype
    ([1, 2, 7, 31],       1, 2, 16, None, torch.float32),
    ([64, 1, 33],         2, 1, 16, 3,    torch.float32),    # a conversation as long as the tile (64)
    ([2, 7, 31, 17],      3, 2, 16, 0,    torch.float16),
    ([5, 64, 1],          2, 1, 32, None, torch.float16),
    ([0, 7, 0, 1],        2, 2, 16, 2,    torch.float32),    # empty conversations: programs with nothing to do
    ([9, 16],             2, 1, 24, 1,    torch.float32),    # D not a power of two (a 32-wide tile)
    ([31],                3, 1, 16, 40,   torch.float32),    # a window wider than the conversation
]


@pytest.mark.parametrize("lengths,S,H,D,window,dtype", CASES,
                         ids=[f"n{'-'.join(map(str, c[0]))}_S{c[1]}_D{c[3]}_w{c[4]}_{str(c[5])[6:]}" for c in CASES])
def test_onepass_matches_float64_and_the_multi_kernel_backward(fused, launches, lengths, S, H, D, window, dtype):
    q, k, v, do, cu = make_inputs(lengths, S, H, D, dtype, seed=hash((tuple(lengths), S, D, window)) % 2**31)
    bound = max(lengths)
    one = grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=window, max_seqlen=bound),
                q, k, v, do)
    assert names(launches) == ["_attn_bwd_onepass_kernel"]
    (_, grid, BL), = launches
    assert grid == (len(lengths), H) and BL == max(16, 1 << (bound - 1).bit_length())
    launches.clear()
    multi = grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    assert names(launches) == ["_attn_bwd_preprocess", "_attn_bwd_dq_kernel", "_attn_bwd_dkv_kernel"]
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do.double())
    assert torch.equal(one[0], multi[0])                                   # the forward does not use the bound
    for name, a, b, c in zip(("dq", "dk", "dv"), one[1:], multi[1:], dense[1:]):
        assert a.dtype == dtype
        assert_rel_close(f"{name} vs float64", a, c, TOL[dtype])
        assert_rel_close(f"{name} vs multi-kernel", a, b, TOL[dtype])


@pytest.mark.parametrize("bound,expected", [(None, None), (65, None), (1000, None), (1, 16), (16, 16), (17, 32),
                                            (64, 64)])
def test_the_bound_picks_the_kernels_and_the_tile(fused, launches, bound, expected):
    """No bound, or one longer than the largest tile (64 under the interpreter): the multi-kernel backward. A
    bound that fits: the one-pass kernel with the power-of-two tile >= bound (at least 16), grid (B, H)."""
    lengths = [1, 5, 3]
    q, k, v, do, cu = make_inputs(lengths, 2, 3, 16, torch.float32, seed=5)
    got = grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=1, max_seqlen=bound),
                q, k, v, do)
    if expected is None:
        assert names(launches) == ["_attn_bwd_preprocess", "_attn_bwd_dq_kernel", "_attn_bwd_dkv_kernel"]
    else:
        assert launches == [("_attn_bwd_onepass_kernel", (3, 3), expected)]
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=1), q, k, v, do.double())
    for name, a, c in zip(("o", "dq", "dk", "dv"), got, dense):
        assert_rel_close(name, a, c, TOL[torch.float32])


def test_tile_limit_per_head_dim_and_dtype(fused, monkeypatch):
    from cmath_mer.kernels.attention import tuning
    monkeypatch.setattr(tuning, "INTERPRET", False)             # the GPU's limits (from the AOT report)
    assert fused.onepass_block(64, 32, 2) == 64 and fused.onepass_block(65, 32, 2) == 0
    assert fused.onepass_block(33, 64, 2) == 0 and fused.onepass_block(32, 128, 2) == 32
    assert fused.onepass_block(32, 16, 4) == 32 and fused.onepass_block(33, 16, 4) == 0
    assert fused.onepass_block(-1, 32, 2) == 0 and fused.onepass_block(0, 32, 2) == 16


def test_onepass_is_bitwise_deterministic(fused):
    q, k, v, do, cu = make_inputs([3, 40, 1, 17], 2, 2, 16, torch.float32, seed=int(torch.randint(0, 999, ())))
    runs = [grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=4, max_seqlen=40),
                  q, k, v, do) for _ in range(2)]
    for name, a, b in zip(("o", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("S", [1, 3])
def test_onepass_list_form_equals_tensor_form(fused, S):
    """The model's form (k, v as strided views of each source's (T, 2, H, D) projection, read in place) and the
    (S, T, H, D) tensor form give bitwise the same gradients."""
    from test_attention_sources import list_form, projections, tensor_form
    q, proj, do, cu = projections([1, 6, 17, 9], S, 2, 16, torch.float32, seed=S)
    got = list_form(q, proj, do, cu, window=2, max_seqlen=17, backend="triton")
    same = tensor_form(q, proj, do, cu, window=2, max_seqlen=17, backend="triton")
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, same):
        assert torch.equal(a, b), name


def test_onepass_gradcheck_float64(fused):
    q, k, v, _, cu = make_inputs([3, 1, 2], 2, 1, 2, torch.float64, seed=9)
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=1, max_seqlen=3), inputs, atol=1e-6)


def test_a_broken_bound_gives_nan_gradients_in_that_conversation_only(fused):
    """max_seqlen is the caller's promise; the Triton backward never reads cu_seqlens on the host to check it.
    A conversation longer than the tile gets NaN in its own dq, dk, dv rows (every head, every source), never
    wrong numbers; the other conversations are exact. The reference, which reads the bounds anyway, raises."""
    lengths = [5, 20, 3]                          # max_seqlen 8 -> a 16-row tile; the 20-row conversation breaks it
    q, k, v, do, cu = make_inputs(lengths, 2, 2, 16, torch.float32, seed=2)
    got = grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, max_seqlen=8), q, k, v, do)
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu), q, k, v, do.double())
    broken = torch.zeros(sum(lengths), dtype=torch.bool)
    broken[5:25] = True
    for name, a, c in zip(("dq", "dk", "dv"), got[1:], dense[1:]):
        rows = a if name == "dq" else a.transpose(0, 1)                          # (T, ...)
        assert torch.isnan(rows[broken]).all(), name
        assert_rel_close(name, rows[~broken], (c if name == "dq" else c.transpose(0, 1))[~broken], TOL[torch.float32])
    with pytest.raises(ValueError, match="max_seqlen 8 is not a bound"):
        multi_source_attention(q, k, v, cu, max_seqlen=8, backend="torch")


def test_public_op_passes_the_bound(fused, launches):
    q, k, v, do, cu = make_inputs([3, 4], 2, 1, 16, torch.float32, seed=3)
    grads(lambda q, k, v: multi_source_attention(q, k, v, cu, max_seqlen=4, backend="triton"), q, k, v, do)
    assert names(launches) == ["_attn_bwd_onepass_kernel"]
    ref = grads(lambda q, k, v: multi_source_attention(q, k, v, cu, max_seqlen=4, backend="torch"), q, k, v, do)
    got = grads(lambda q, k, v: multi_source_attention(q, k, v, cu, backend="torch"), q, k, v, do)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)                              # the reference ignores a true bound
    with pytest.raises(ValueError, match="max_seqlen"):
        fused.fused_multi_source_attention(q, k, v, cu, max_seqlen=-2)


def test_compiled_caller_follows_a_changing_bound(fused, launches):
    """Under torch.compile the bound reaches the op as an input, not a constant baked into the first graph: a
    later batch with a longer conversation gets its own bound's tile (no NaN from a stale one), the gradients
    equal the eager op's, and one graph serves both bounds."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()

    @torch.compile(fullgraph=True, dynamic=True)
    def attend(q, k, v, cu, bound):
        return multi_source_attention(q, k, v, cu, window=2, max_seqlen=bound, backend="triton")

    for i, lengths in enumerate(([5, 10], [50, 7], [3, 12])):
        q, k, v, do, cu = make_inputs(lengths, 2, 1, 16, torch.float32, seed=100 + i + torch.randint(1000, ()).item())
        launches.clear()
        got = grads(lambda q, k, v: attend(q, k, v, cu, max(lengths)), q, k, v, do)
        tile = max(16, 1 << (max(lengths) - 1).bit_length())
        assert [(n, bl) for n, _, bl in launches] == [("_attn_bwd_onepass_kernel", tile)]
        want = grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=2), q, k, v, do)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert torch.isfinite(a).all(), name
            assert_rel_close(name, a, b, TOL[torch.float32])
    assert counters["stats"]["unique_graphs"] == 1
