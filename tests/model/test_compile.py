"""torch.compile of the torch backend: the ops it sees and the compiled step.

Under torch.compile the attention reference on the CPU is `attention_ref_cpu_op` (SDPA's CPU flash kernels per
run of equal-length conversations, the log-sum-exp kept for the backward instead of a recomputed forward), the
reconstruction and variational references are traced as plain PyTorch, and the variational eps is the opaque
`philox_randn` op.
The op tests are fast; the inductor ones compile the whole model (about a minute each on a CPU): `-m slow`."""
from __future__ import annotations

import pytest
import torch

import cmath_mer.kernels as K
from cmath_mer.kernels import reference_ops
from cmath_mer.kernels.variational.philox import philox_randn, philox_randn_op
from cmath_mer.model.cmath import CMATH
from cmath_mer.training.precision import Precision
from cmath_mer.training.step import compile_model

from helpers import assert_compiled_step_equals_eager, assert_rel_close, cu_seqlens_from, random_batch, small_config


def _sources(lengths, S, H=2, D=16, dtype=torch.float32, seed=0):
    """q (T, H, D) and S strided views (T, H, D) each of k and v (of S leaf projections (T, 2, H, D)), as the
    model hands them over."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, H, D, generator=g, dtype=dtype).requires_grad_()
    proj = [torch.randn(T, 2, H, D, generator=g, dtype=dtype).requires_grad_() for _ in range(S)]
    return q, proj, [p[:, 0] for p in proj], [p[:, 1] for p in proj], cu_seqlens_from(list(lengths))


@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("lengths", [(3, 1, 6, 17), (40,), (1, 1)])
def test_attention_cpu_op_forward_and_gradients_equal_the_reference(S, lengths):
    """The lse-keeping op gives the reference's output and every gradient (the same SDPA kernels), on ragged
    conversations including one-utterance ones, without recomputing the forward."""
    q, proj, k, v, cu = _sources(lengths, S, seed=S)
    o, lse = reference_ops.attention_ref_cpu_op(q, k, v, cu, 0.3)
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, [q, *proj], do)
    want_o = K.reference_multi_source_attention(q, k, v, cu, scale=0.3)
    want = torch.autograd.grad(want_o, [q, *proj], do)
    assert_rel_close("o", o, want_o, 1e-6)
    for name, a, b in zip(["dq"] + [f"dproj{s}" for s in range(S)], got, want):
        assert_rel_close(name, a, b, 1e-5)


def test_attention_cpu_op_matches_the_float64_definition_on_runs_of_equal_lengths():
    """Runs of equal-length conversations (one batched flash call each) and empty conversations, forward and
    every gradient, in float64 (whose log-sum-exp the flash kernel keeps in float64) against the explicit
    masked softmax."""
    from cmath_mer.kernels.attention.naive import naive_multi_source_attention
    lengths = sorted(int(n) for n in torch.randint(0, 6, (int(torch.randint(6, 30, ())),)))
    lengths[-1] = max(lengths[-1], 1)
    S = int(torch.randint(1, 4, ()))
    q, proj, k, v, cu = _sources(lengths, S, dtype=torch.float64, seed=int(torch.randint(0, 999, ())))
    o, lse = reference_ops.attention_ref_cpu_op(q, k, v, cu, 0.3)
    assert lse.dtype == torch.float64
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, [q, *proj], do)
    want_o = naive_multi_source_attention(q, torch.stack(k), torch.stack(v), cu, scale=0.3)
    want = torch.autograd.grad(want_o, [q, *proj], do)
    for name, a, b in zip(["o", "dq"] + [f"dproj{s}" for s in range(S)], [o, *got], [want_o, *want]):
        assert_rel_close(name, a, b, 1e-12)


def test_attention_cpu_op_under_bf16_autocast_returns_the_region_dtype():
    q, proj, k, v, cu = _sources((5, 9), 2, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = reference_ops.attention_ref_cpu_op(q, k, v, cu, 0.25)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want = K.reference_multi_source_attention(q, k, v, cu, scale=0.25)
    assert_rel_close("o bf16", o.float(), want, 2e-2)
    o.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in (q, *proj))


@pytest.mark.parametrize("offset", [0, 1, 3, 6])
def test_philox_op_draws_the_reference_eps(offset):
    seed = torch.tensor([123456789], dtype=torch.int64)
    torch.testing.assert_close(philox_randn_op(seed, 37, offset), philox_randn(seed, 37, "cpu", offset),
                               rtol=0, atol=0)


def test_new_ops_pass_opcheck():
    q, proj, k, v, cu = _sources((3, 1, 6), 2)
    torch.library.opcheck(reference_ops.attention_ref_cpu_op, (q, k, v, cu, 0.3))
    q, proj, k, v, cu = _sources((7,), 1)
    torch.library.opcheck(reference_ops.attention_ref_cpu_op, (q, k, v, cu, 0.25))
    torch.library.opcheck(philox_randn_op, (torch.tensor([7], dtype=torch.int64), 21, 2))


def test_compiled_torch_backend_traces_fullgraph_and_matches_eager():
    """The torch backend under compile (aot_eager: the graph inductor gets): no graph break, the eager loss and
    gradients, with the variational eps sampled (the same Philox stream) and a window-free attention."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = CMATH(small_config(backend="torch")).train()
    batch = random_batch([4, 9, 1, 12], seed=2)
    assert_compiled_step_equals_eager(model, batch, seed=11, dynamic=True)


def _step_grads(forward, model, batch, seed, precision="fp32"):
    model.zero_grad(set_to_none=True)
    with Precision(precision, "cpu").autocast():
        out = forward(batch, seed=seed)
    out.loss.float().backward()
    return out.loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compile_model_matches_eager_and_does_not_recompile_across_batch_sizes():
    """compile_model (inductor): on fresh random batches of different sizes and conversation counts, and
    new seeds every step, the eager loss and gradients (fp32; bf16 autocast within bf16 tolerance), with one
    compiled graph for all of them (no recompile; a one-conversation batch, cu_seqlens of size 2, gets one more
    graph: dynamo specializes sizes 0 and 1, so a 1-long cu_seqlens[:-1] is its own case). Dropout stays on:
    with inductor's fallback_random the compiled step draws eager's dropout masks from torch's generator."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(5)
    model = CMATH(small_config(backend="torch", dropout=0.1)).train()
    compiled = compile_model(model)
    batches = [([8, 8], 1), ([4, 9, 1, 12], 2), ([3, 30], 3), ([2, 5, 7, 3, 11, 6], 4)]
    for i, (lengths, seed) in enumerate(batches):
        batch = random_batch(lengths, seed=10 + i)
        torch.manual_seed(100 + i)
        loss_c, grads_c = _step_grads(compiled, model, batch, seed)
        torch.manual_seed(100 + i)
        loss_e, grads_e = _step_grads(model, model, batch, seed)
        assert_rel_close(f"loss {lengths}", loss_c, loss_e, 1e-5)
        for n in grads_e:
            assert_rel_close(f"grad {n} {lengths}", grads_c[n], grads_e[n], 1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])
    batch = random_batch([6, 13, 2], seed=20)
    torch.manual_seed(7)
    loss_c, _ = _step_grads(compiled, model, batch, 5, "bf16")
    torch.manual_seed(7)
    loss_e, _ = _step_grads(model, model, batch, 5, "bf16")
    assert_rel_close("loss bf16", loss_c, loss_e, 3e-2)


@pytest.mark.slow          # minutes of compiling; the fullgraph trace of the model stays in the default run
def test_long_batches_with_recompute_compile_fullgraph_and_match_eager():
    """A batch of at least recompute_from utterances (checkpointed blocks; the fusion in pieces is skipped under
    compile, its backward calls autograd.grad, which dynamo cannot trace) compiles with no graph break and
    gives the eager loss and gradients (main failed here: the 4,096-utterance compiled step never ran)."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    model = CMATH(small_config(backend="torch", recompute_from=16)).train()
    batch = random_batch([20, 5], seed=1)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    loss_c, grads_c = _step_grads(compiled, model, batch, 1)
    loss_e, grads_e = _step_grads(model, model, batch, 1)
    assert_rel_close("loss", loss_c, loss_e, 1e-5)
    for n in grads_e:
        assert_rel_close(f"grad {n}", grads_c[n], grads_e[n], 1e-4)
