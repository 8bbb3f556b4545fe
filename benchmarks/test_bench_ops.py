"""Smoke benchmarks of the three ops over tiny shapes: every backend of the registry builds, runs and
gives finite results. Timings are recorded by pytest-benchmark, never asserted."""
import math

import pytest
import torch

from cmath_mer import bench as B


def _params(backend, batch, S):
    slow = [pytest.mark.slow] if backend == "torch_compile" else []   # compiling costs tens of seconds
    return pytest.param(backend, batch, S, marks=slow)


ATTENTION = [_params(backend, batch, S) for backend in B.ATTN_BACKENDS for batch in ("equal", "ragged")
             for S in (1, 2)]
OPS = [pytest.param(b, marks=[pytest.mark.slow] if b == "torch_compile" else []) for b in B.OP_BACKENDS]


def _case(device, op, backend, N, **kw):
    return dict(B.make_case(op, backend, N, device=device, **kw), min_utterances=64)


def _skip_unavailable(case):
    try:
        return B.build_case(case)
    except B.Unavailable as err:
        pytest.skip(str(err))


def _finite(x):
    return bool(torch.isfinite(x.detach().float()).all())


@pytest.mark.parametrize("backend,batch,S", ATTENTION)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_attention_case_runs_and_is_finite(bench_call, device, backend, batch, S, mode):
    if backend == "torch_compile" and (batch != "equal" or S != 1 or mode != "fwdbwd"):
        pytest.skip("torch.compile: one smoke shape is enough (compiling costs seconds)")
    if backend == "flex" and (batch != "ragged" or S != 2):
        pytest.skip("flex_attention: one smoke shape per mode is enough (compiling costs seconds; "
                    "tests/bench/test_attention_baselines.py checks it against the definition)")
    case = _case(device, "attention", backend, 16, batch=batch, S=S, mode=mode)
    call, info = _skip_unavailable(case)
    out = bench_call(call)
    assert _finite(out)
    assert info["utterances"] >= 16 and info["pairs"] > 0 and info["flops"] > 0


@pytest.mark.parametrize("op", ["reconstruction", "variational"])
@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_op_case_runs_and_is_finite(bench_call, device, op, backend, mode):
    if backend == "torch_compile" and mode == "fwd":
        pytest.skip("torch.compile: one smoke shape per op is enough")
    call, info = _skip_unavailable(_case(device, op, backend, 64, batch="one", mode=mode))
    out = bench_call(call)
    assert _finite(out)
    assert info["bytes"] > 0


def test_measure_gives_finite_quantiles_and_memory(device):
    call, _ = B.build_case(_case(device, "reconstruction", "torch", 64, batch="one"))
    res = B.measure(call, device, reps=3, budget_s=1.0)
    assert 0 < res["p20_s"] <= res["median_s"] <= res["p80_s"] and math.isfinite(res["median_s"])
    assert res["peak_mem_bytes"] >= 0


def test_registry_lists_every_op_and_lengths_are_deterministic():
    for quick in (True, False):
        cases = B.sweep(quick, "cpu")
        assert {c["op"] for c in cases} == {"attention", "reconstruction", "variational", "train_step", "inference",
                                            "engine_step"}
        assert not any(c["backend"] == "triton" for c in cases)          # triton only on CUDA
    quick = B.sweep(True, "cpu")
    trains = {(c["batch"], c["N"]) for c in quick if c["op"] == "train_step"}
    assert {("mix16x100", 100), ("one", 2048), ("one", 4096), ("one", 8192), ("one", 10000)} <= trains
    assert B.conversation_lengths("ragged", 512) == B.conversation_lengths("ragged", 512)
    lengths = B.conversation_lengths("ragged", 512)
    assert max(lengths) == 512 and min(lengths) >= 64 and sum(lengths) >= 2048
    assert any(c["backend"] == "triton" for c in B.sweep(True, "cuda"))
    steps = {(c["backend"], c["dtype"], c["batch"], c["N"]) for c in quick if c["op"] == "engine_step"}
    assert {(b, d, batch, N) for b in ("torch", "torch_compile") for d in ("fp32", "bf16")
            for batch, N in (("mix16x100", 100), ("one", 4096))} == steps
    cuda_steps = {(c["backend"], c["dtype"], c["batch"], c["N"]) for c in B.sweep(True, "cuda")
                  if c["op"] == "engine_step"}
    assert {(b, d, batch, N) for b in ("torch", "torch_compile", "triton", "triton_compile", "triton_graphs")
            for d in ("fp32", "bf16") for batch, N in (("mix16x100", 100), ("one", 4096))} == cuda_steps


def test_every_compiling_or_capturing_backend_builds_outside_the_clock():
    """A backend whose first call compiles (`*_compile`, flex) or captures a CUDA graph (`*_graphs`) is run
    once before measure() and its time recorded as compile_s; one missing from COMPILED_BACKENDS would have
    its compile inside the first timed call and no compile_s."""
    from cmath_mer.bench.cases import COMPILED_BACKENDS
    backends = {c["backend"] for quick in (True, False) for dev in ("cpu", "cuda") for c in B.sweep(quick, dev)}
    building = {b for b in backends if b.endswith(("_compile", "_graphs")) or b == "flex"}
    assert building and building <= set(COMPILED_BACKENDS)


def test_attention_baselines_are_planned_and_a_cpu_row_says_why_it_cannot_run():
    from cmath_mer.bench.run import _probe_unavailable
    cpu, cuda = B.sweep(True, "cpu"), B.sweep(True, "cuda")
    shapes = {(batch, S) for batch in ("equal", "ragged", "meld", "iemocap") for S in (1, 2)}
    for backend in ("flex", "varlen"):
        assert {(c["batch"], c["S"]) for c in cuda if c["backend"] == backend and c["mode"] == "fwdbwd"} == shapes
    # a CPU has no flex backward: its forward rows run beside the reference's forward rows of the same shapes
    flex_fwd = {(c["batch"], c["S"], c["N"]) for c in cpu if c["backend"] == "flex" and c["mode"] == "fwd"}
    torch_fwd = {(c["batch"], c["S"], c["N"]) for c in cpu if c["backend"] == "torch" and c["op"] == "attention"
                 and c["mode"] == "fwd"}
    assert flex_fwd and flex_fwd == torch_fwd
    varlen = next(c for c in cpu if c["backend"] == "varlen")
    assert "CUDA only" in _probe_unavailable(varlen, {})
    flex_bwd = next(c for c in cpu if c["backend"] == "flex" and c["mode"] == "fwdbwd")
    assert "no backward on CPU" in _probe_unavailable(flex_bwd, {})


def test_flex_row_compiles_outside_the_clock_and_records_its_block_mask(device):
    mode = "fwd" if device == "cpu" else "fwdbwd"
    row = B.run_case(_case(device, "attention", "flex", 16, batch="ragged", S=2, mode=mode), quick=True)
    assert row["status"] == "ok", row.get("reason")
    assert row["compile_s"] > 0 and row["block_mask_s"] > 0
    assert math.isfinite(row["median_s"]) and row["utterances_per_s"] > 0


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_chunked_reconstruction_case_runs_and_is_finite(bench_call, device, mode):
    case = _case(device, "reconstruction", "chunked", 64, batch="one", mode=mode)
    assert any(c["op"] == "reconstruction" and c["backend"] == "chunked" for c in B.sweep(True, device))
    call, info = _skip_unavailable(case)
    out = bench_call(call)
    assert _finite(out) and info["bytes"] > 0
