"""Multi-source varlen attention: the Triton kernel (under TRITON_INTERPRET) and the PyTorch reference against
an explicit float64 masked softmax, forward and every gradient, on fresh random ragged batches."""
from __future__ import annotations

import pytest
import torch

from cmath_mer.kernels import multi_source_attention
from cmath_mer.kernels.attention import blocks, reference
from cmath_mer.kernels.attention.naive import naive_multi_source_attention, naive_scores
from cmath_mer.kernels.attention.reference import reference_multi_source_attention
from cmath_mer.kernels.cu_seqlens import equal_length_runs

from helpers import TOL, assert_rel_close, cu_seqlens_from, grads, make_inputs, needs_triton, rel_err

try:                      # for @triton.jit test kernels, which see module globals (not the `fused` fixture)
    from cmath_mer.kernels.attention import fused as fused_kernels
except ImportError:
    fused_kernels = None

DEFAULT = "default"                     # the interpreter's own (large) blocks, 64 x 64
SMALL = {"fwd": (16, 16), "dq": (16, 16), "dkv": (16, 16)}
MIXED = {"fwd": (32, 16), "dq": (16, 32), "dkv": (32, 16)}   # (query block, key block) differ per kernel


@pytest.fixture
def fused(nan_poison):
    """The kernel module, with every torch.empty / empty_like NaN-poisoned during the test (conftest) so an
    output element the kernels never write fails the finite check."""
    pytest.importorskip("triton")
    from cmath_mer.kernels.attention import fused as mod
    return mod


def use_blocks(monkeypatch, mod, blocks):
    if blocks != DEFAULT:
        monkeypatch.setattr(mod, "block_sizes", lambda head_dim, itemsize=2: blocks)


# lengths cover 1, odd, block multiples and block + 1 for the blocks of each case
CASES = [
    # lengths,           S, H,   D, window, dtype,         blocks
    ([1, 7, 64, 65],     2, 2,  32, None, torch.float32, DEFAULT),
    ([1, 7, 64, 65],     2, 2,  32, 3,    torch.float32, DEFAULT),
    ([65, 2],            1, 1, 128, None, torch.float32, DEFAULT),
    ([3, 64, 1],         3, 1,  16, 1,    torch.float16, DEFAULT),
    ([1, 16, 17, 33],    3, 1,  16, 1,    torch.float32, SMALL),
    ([16, 17, 5],        1, 2,  64, None, torch.float16, SMALL),
    ([1, 33, 48],        2, 1,  64, 3,    torch.float16, SMALL),
    ([31, 32, 33, 1],    2, 2,  32, 3,    torch.float32, MIXED),
    ([40, 9],            2, 1,  32, 20,   torch.float32, MIXED),   # window reaching past block edges
    ([17, 23],           2, 1,  48, 0,    torch.float32, SMALL),   # window 0 (self only), D not a power of 2
    # conversations several blocks long: runs of interior (unmasked) blocks between edge blocks
    ([100, 37, 64],      2, 1,  16, None, torch.float32, SMALL),   # every full block interior
    ([150, 9, 96],       2, 1,  16, 40,   torch.float32, SMALL),   # interior band, masked band edges
    ([130, 70],          2, 2,  32, 25,   torch.float16, MIXED),   # interior runs, query and key blocks differ
    ([200],              3, 1,  16, 17,   torch.float32, SMALL),   # narrowest window with interior blocks
]


@needs_triton
@pytest.mark.parametrize("lengths,S,H,D,window,dtype,blocks", CASES,
                         ids=[f"n{'-'.join(map(str, c[0]))}_S{c[1]}_H{c[2]}_D{c[3]}_w{c[4]}_"
                              f"{str(c[5])[6:]}_{'default' if c[6] == DEFAULT else 'b' + str(c[6]['fwd'][0])}"
                              for c in CASES])
def test_fused_matches_float64_and_reference_forward_and_gradients(fused, monkeypatch, lengths, S, H, D, window,
                                                                   dtype, blocks):
    use_blocks(monkeypatch, fused, blocks)
    q, k, v, do, cu = make_inputs(lengths, S, H, D, dtype, seed=hash((tuple(lengths), S, D, window)) % 2**31)
    got = grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do.double())
    ref = grads(lambda q, k, v: reference_multi_source_attention(q.double(), k.double(), v.double(), cu, window=window),
                q, k, v, do.double())
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), got, dense, ref):
        assert a.dtype == dtype
        assert_rel_close(f"{name} vs float64 dense", a, b, TOL[dtype])
        assert_rel_close(f"{name} vs reference", a, c, TOL[dtype])


@needs_triton
@pytest.mark.parametrize("window", [None, 40])
def test_single_masked_walk_matches_float64(fused, monkeypatch, window):
    """The kernels without the interior/edge split (fused.split_blocks False: fp32 on a GPU) walk every block
    masked; same contract, forward and every gradient against float64."""
    use_blocks(monkeypatch, fused, SMALL)
    monkeypatch.setattr(fused, "split_blocks", lambda itemsize: False)
    lengths = [int(n) for n in torch.randint(1, 120, (3,))]
    q, k, v, do, cu = make_inputs(lengths, 2, 1, 16, torch.float32, seed=int(torch.randint(0, 999, ())))
    got = grads(lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    dense = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do.double())
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, dense):
        assert_rel_close(f"{name} vs float64 dense", a, b, TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("window,lengths,fast", [(1, [2, 1], False), (None, [3, 1, 2], True)])
def test_fused_gradcheck_float64(fused, monkeypatch, window, lengths, fast):
    # a tiny head dim (padded to the 16-wide tile inside the kernel) keeps the numerical Jacobian cheap
    # under the interpreter; the full Jacobian on the smallest case, a random projection on a larger one
    use_blocks(monkeypatch, fused, SMALL)
    q, k, v, _, cu = make_inputs(lengths, 2, 1, 2, torch.float64, seed=7 + len(lengths))
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused.fused_multi_source_attention(q, k, v, cu, window=window), inputs, atol=1e-6,
        fast_mode=fast)


@needs_triton
def test_fused_backward_accepts_stride0_grad_and_is_deterministic(fused, monkeypatch):
    use_blocks(monkeypatch, fused, SMALL)
    q, k, v, _, cu = make_inputs([5, 17], 2, 2, 16, torch.float32, seed=11)
    kv = torch.stack([k, v]).requires_grad_()                 # k, v as views of one tensor
    runs = []
    for _ in range(2):
        qq = q.clone().requires_grad_()
        kv.grad = None
        fused.fused_multi_source_attention(qq, kv[0], kv[1], cu, window=2, scale=0.3).sum().backward()
        runs.append((qq.grad.clone(), kv.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    qd, kvd = q.double().requires_grad_(), kv.detach().double().requires_grad_()
    naive_multi_source_attention(qd, kvd[0], kvd[1], cu, window=2, scale=0.3).sum().backward()
    assert_rel_close("dq", runs[0][0], qd.grad, TOL[torch.float32])
    assert_rel_close("dk,dv", runs[0][1], kvd.grad, TOL[torch.float32])


def dense_lse2(q, k, cu_seqlens, window=None, scale=None):
    """Float64 log-sum-exp of each query's scaled scores in log2 units, (H, T) like the kernel's lse."""
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    return torch.cat([scores.logsumexp(-1) / ln2 for _, _, scores in naive_scores(q, k, cu_seqlens, window, scale)],
                     1)                                                                   # (H, n) each


@needs_triton
@pytest.mark.parametrize("window", [None, 2])
def test_saved_lse_is_head_major_log2_sum_exp(fused, monkeypatch, window):
    """The op's saved statistic is (H, T), row h holding head h's log2-sum-exp2 of every query's scores."""
    use_blocks(monkeypatch, fused, SMALL)
    lengths = [int(n) for n in torch.randint(1, 40, (3,))]
    q, k, v, _, cu = make_inputs(lengths, 2, 3, 16, torch.float32, seed=int(torch.randint(0, 999, ())))
    o, lse = fused.attention_op(q, list(k), list(v), cu, -1 if window is None else window, 16 ** -0.5)
    assert lse.shape == (3, sum(lengths)) and lse.is_contiguous()
    assert_rel_close("lse", lse, dense_lse2(q, k, cu, window=window), TOL[torch.float32])


@needs_triton
def test_interior_run_is_exactly_the_blocks_that_need_no_mask(fused):
    """_split(lo, hi, first_ok, last_ok, BLK) -> (a, b): the blocks j0 = lo + i BLK < hi with all rows in
    [first_ok, last_ok] are exactly a <= j0 < b, on random bounds (the kernels' contract: hi >= lo >= 0,
    last_ok <= hi - 1)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(args, out, BLK: tl.constexpr):
        i = tl.program_id(0)
        a, b = fused_kernels._split(tl.load(args + 4 * i), tl.load(args + 4 * i + 1), tl.load(args + 4 * i + 2),
                            tl.load(args + 4 * i + 3), BLK)
        tl.store(out + 2 * i, a)
        tl.store(out + 2 * i + 1, b)

    blk = 16
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    lo = torch.randint(0, 40, (200,), generator=g)
    hi = lo + torch.randint(0, 120, (200,), generator=g)
    first_ok = lo + torch.randint(-30, 120, (200,), generator=g)
    last_ok = torch.minimum(hi - 1, lo + torch.randint(-30, 120, (200,), generator=g))
    args = torch.stack([lo, hi, first_ok, last_ok], 1).to(torch.int32).contiguous()
    out = torch.empty(200, 2, dtype=torch.int32)
    split_kernel[(200,)](args, out, BLK=blk)
    for (lo, h, f, e), (a, b) in zip(args.tolist(), out.tolist()):
        starts = list(range(lo, h, blk))
        interior = [j for j in starts if j >= f and j + blk - 1 <= e]
        assert lo <= a <= b and (a - lo) % blk == 0 and (b - lo) % blk == 0
        assert [j for j in starts if a <= j < b] == interior, (lo, h, f, e, a, b)


@needs_triton
def test_nan_poison_fixture_is_live(fused):
    assert torch.isnan(torch.empty(4)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3))).all()


@needs_triton
def test_block_table_lists_each_block_of_each_conversation(fused):
    """Conversation b's blocks start at row cu[b] // block + b; other rows are padding (-1, 0)."""
    table = blocks.prepare_block_indices(cu_seqlens_from([1, 16, 17, 0, 33]), 16, 67)
    assert blocks.block_table_rows(67, 5, 16) == 10           # sized on the host: cdiv(T, 16) + B
    pad = (-1, 0)
    assert [tuple(r) for r in table.tolist()] == [(0, 0), (1, 0), pad, (2, 0), (2, 1), pad, (4, 0), (4, 1),
                                                  (4, 2), pad]
    assert table.dtype == torch.int32


@needs_triton
@pytest.mark.parametrize("block", [16, 64])
def test_block_table_holds_every_block_once_for_random_lengths(fused, block):
    B = int(torch.randint(1, 300, ()))                        # several table programs at block 16
    lengths = [int(n) for n in torch.randint(0, 3 * block, (B,))]
    T = sum(lengths)
    table = blocks.prepare_block_indices(cu_seqlens_from(lengths), block, T)
    assert table.shape == (blocks.block_table_rows(T, B, block), 2)
    real = [tuple(r) for r in table.tolist() if r[0] >= 0]
    assert real == [(b, m) for b, n in enumerate(lengths) for m in range(-(-n // block))]
    assert all(tuple(r) == (-1, 0) for r in table.tolist() if r[0] < 0)


@needs_triton
def test_public_op_dispatches_to_triton(monkeypatch):
    pytest.importorskip("triton")
    from cmath_mer.kernels.attention import fused as mod
    calls = []
    real = mod.fused_multi_source_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "fused_multi_source_attention", spy)
    q, k, v, _, cu = make_inputs([3, 4], 2, 1, 16, torch.float32, seed=3)
    out = multi_source_attention(q, k, v, cu, window=1, scale=0.5, backend="triton")
    assert calls == [{"window": 1, "scale": 0.5, "max_seqlen": None}]
    assert_rel_close("o", out, naive_multi_source_attention(q, k, v, cu, window=1, scale=0.5), TOL[torch.float32])
    multi_source_attention(q, k, v, cu, window=1, scale=0.5, backend="torch")
    assert len(calls) == 1


@pytest.mark.parametrize("window", [None, 0, 1, 3, 50])
@pytest.mark.parametrize("query_block", [4, 256])
def test_reference_matches_float64_dense(monkeypatch, window, query_block):
    monkeypatch.setattr(reference, "query_block", lambda window: query_block)   # the banded window path
    lengths = [1, 6, 13, 9]
    q, k, v, do, cu = make_inputs(lengths, 2, 2, 8, torch.float64, seed=17 + (window or 0) + query_block)
    got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    want = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < 1e-12, name


def test_reference_float32_matches_float64_dense():
    q, k, v, do, cu = make_inputs([5, 1, 12], 3, 2, 16, torch.float32, seed=23)
    for window in (None, 2):
        got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu, window=window), q, k, v, do)
        want = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu, window=window), q, k, v, do.double())
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert_rel_close(name, a, b, TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("max_seqlen", [None, 128])
def test_lengths_rewritten_in_place_without_a_new_version_are_read_as_they_are(fused, max_seqlen):
    """The capture recipe's replay with other lengths: cu_seqlens rewritten in place where no version counter
    sees it (`.data`, as a static input between replays). Every call reads the lengths it is given: o, dq, dk, dv
    match the reference for [100, 28], then for [28, 100] written into the same tensor (the multi-kernel
    backward's block tables, and the one-pass backward)."""
    cu = cu_seqlens_from([100, 28])
    version = cu._version
    for lengths in ([100, 28], [28, 100]):
        cu.data.copy_(cu_seqlens_from(lengths))
        q, k, v, do, _ = make_inputs(lengths, 2, 2, 16, torch.float32, seed=int(torch.randint(0, 999, ())))
        got = grads(fused.fused_multi_source_attention, q, k, v, do, cu_seqlens=cu, max_seqlen=max_seqlen)
        ref = grads(reference_multi_source_attention, q, k, v, do, cu_seqlens=cu_seqlens_from(lengths))
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
            assert_rel_close(f"{lengths} {name}", a, b, TOL[torch.float32])
    assert cu._version == version                             # the rewrite was invisible to version checks


def _autograd_nodes(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_reference_backward_splits_each_input_once_not_per_conversation():
    """Whole conversations: q, k, v are split once per call. A slice per conversation would give B backward
    nodes that each write a zero-filled gradient of the whole tensor (O(B * T) per call: 4x the attention's own
    time at 128 conversations of ~12 utterances on a 2-core CPU)."""
    B = int(torch.randint(5, 40, ()))
    lengths = [int(n) for n in torch.randint(0, 9, (B,))]
    lengths[0] = max(lengths[0], 1)
    q, k, v, do, cu = make_inputs(lengths, 2, 2, 8, torch.float32, seed=int(torch.randint(0, 999, ())))
    o = reference_multi_source_attention(*(x.clone().requires_grad_() for x in (q, k, v)), cu)
    nodes = _autograd_nodes(o)
    assert not [n for n in nodes if n.startswith(("SliceBackward", "SelectBackward"))], nodes
    assert sum(n.startswith("SplitWithSizesBackward") for n in nodes) == 3       # q, k, v: once each
    got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu), q, k, v, do)
    want = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu), q, k, v, do.double())
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert_rel_close(name, a, b, TOL[torch.float32])


@pytest.mark.parametrize("cut", ["start", "end"])
def test_reference_refuses_cu_seqlens_that_do_not_cover_the_rows(cut):
    q, k, v, do, cu = make_inputs([3, 4], 1, 1, 8, torch.float32, seed=5)
    bad = cu.clone()
    if cut == "start":
        bad[0] = 1
    else:
        bad[-1] -= 1
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to T = 7"):
        reference_multi_source_attention(q, k, v, bad)


def test_equal_length_runs_group_consecutive_conversations_of_one_length():
    lengths = [int(n) for n in torch.randint(0, 4, (int(torch.randint(1, 30, ())),))]
    runs = equal_length_runs(lengths)
    assert [n for n, c in runs for _ in range(c)] == lengths                 # in order, nothing lost
    assert all(a[0] != b[0] for a, b in zip(runs, runs[1:]))                 # maximal: neighbours differ
    assert equal_length_runs([]) == []


def test_reference_attends_each_run_of_equal_lengths_in_one_sdpa_call(monkeypatch):
    """A batch in order of length (as the loader builds them) attends with one SDPA call per run of equal
    lengths, not one per conversation; unsorted batches, empty conversations and every source still match the
    float64 definition."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for order in ("sorted", "shuffled"):
        lengths = [int(n) for n in torch.randint(0, 7, (int(torch.randint(8, 40, ())),))]
        lengths = sorted(lengths) if order == "sorted" else lengths
        lengths[-1] = max(lengths[-1], 1)
        S = int(torch.randint(1, 4, ()))
        q, k, v, do, cu = make_inputs(lengths, S, 2, 8, torch.float64, seed=int(torch.randint(0, 999, ())))
        calls.clear()
        got = grads(lambda q, k, v: reference_multi_source_attention(q, k, v, cu), q, k, v, do)
        runs = [(n, c) for n, c in equal_length_runs(lengths) if n]
        assert calls == [c for n, c in runs], (order, lengths)              # one batched call per run
        want = grads(lambda q, k, v: naive_multi_source_attention(q, k, v, cu), q, k, v, do)
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert rel_err(a, b) < 1e-12, (order, name)
