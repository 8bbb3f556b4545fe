"""Smoke benchmarks of the whole CMATH step (training and inference) over tiny batches, and of the
`cmath-mer bench` pipeline end to end (subprocess per case, JSON, Markdown, plots) on a few tiny cases."""
import json
import math

import pytest
import torch

from cmath_mer import bench as B


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,mode", [("train_step", "train"), ("inference", "infer")])
def test_model_step_runs_and_is_finite(bench_call, device, op, mode, backend):
    case = dict(B.make_case(op, backend, 12, mode=mode, batch="ragged", device=device), min_utterances=48)
    try:
        call, info = B.build_case(case)
    except B.Unavailable as err:
        pytest.skip(str(err))
    out = bench_call(call, rounds=1)
    assert torch.isfinite(out.detach().float()).all()
    assert info["utterances"] >= 48


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_engine_step_case_runs_and_is_finite(bench_call, device, dtype):
    case = dict(B.make_case("engine_step", "torch", 12, mode="train", batch="ragged", dtype=dtype, device=device),
                min_utterances=48)
    call, info = B.build_case(case)
    out = bench_call(call, rounds=1)
    assert torch.isfinite(out.detach().float()).all() and float(out) > 0
    assert info["utterances"] >= 48


def test_bench_pipeline_writes_json_table_and_plots(tmp_path, device):
    cases = [dict(B.make_case("attention", b, N, S=2, device=device), min_utterances=64)
             for b in ("torch", "sdpa_flash", "sdpa_efficient") for N in (16, 32) if b == "torch" or N == 16]
    cases += [dict(B.make_case("train_step", "torch", 8, mode="train", batch="one", device=device))]
    results = B.run_benchmarks(tmp_path, quick=True, device=device, cases=cases, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["device_name"]
    assert len(data["rows"]) == len(cases)
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} >= {"torch"}
    for r in ok:
        for k in ("median_s", "p20_s", "p80_s", "utterances_per_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["peak_mem_bytes"] >= 0
    assert all(r.get("reason") for r in data["rows"] if r["status"] != "ok")   # never silently dropped
    assert any("speedup_vs_torch" in r for r in ok if r["backend"] != "torch" and r["op"] == "attention") or \
        len({r["backend"] for r in ok}) == 1
    md = (tmp_path / "results.md").read_text()
    assert "multi_source_attention" in md and data["machine"]["device_name"] in md
    assert (tmp_path / "attention_fwdbwd_fp32.png").stat().st_size > 0
    assert results["rows"] == data["rows"] or len(results["rows"]) == len(data["rows"])


@pytest.mark.slow
def test_compiled_engine_step_compiles_in_its_build_and_not_again(device):
    """The compiled engine_step compiles in its build, on the case's own batch: the timed calls after it run
    the same graph (a small warm-up batch gave a graph guarded to 5..16 utterances and a second compile)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    N = int(torch.randint(20, 40, ()))
    call, info = B.build_case(B.make_case("engine_step", "torch_compile", N, mode="train", batch="one",
                                          dtype="fp32", device=device))
    built = counters["stats"]["unique_graphs"]
    assert built >= 1 and info["build_compile_s"] > 0
    for _ in range(2):
        assert torch.isfinite(call()).all()
    assert counters["stats"]["unique_graphs"] == built, dict(counters["stats"])
