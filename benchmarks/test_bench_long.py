"""Smoke benchmarks of the long-conversation cases (cmath_mer/bench/long.py) over tiny shapes: each builds,
runs and gives finite results; the report gets its per-doubling ratios and plot. Timings are never asserted."""
import pytest
import torch

from cmath_mer import bench as B
from cmath_mer.bench.cases import WINDOW


@pytest.mark.parametrize("case", [c for c in B.sweep(False, "cpu", long=True) if c["N"] == 65536],
                         ids=lambda c: f"{c['op']}-{c['backend']}")
def test_long_case_runs_and_is_finite(bench_call, case):
    call, info = B.build_case(dict(case, N=96, window=8))
    out = bench_call(call)
    assert torch.isfinite(out.detach().float()).all()
    assert info["utterances"] == 96 and info["window"] == 8


def test_long_sweep_covers_the_issue_lengths_and_cuda_adds_triton():
    cpu, cuda = B.sweep(False, "cpu", long=True), B.sweep(False, "cuda", long=True)
    assert {c["N"] for c in cpu if c["op"] == "attention_window"} == {2**16, 2**17, 2**18, 2**19, 2**20}
    assert max(c["N"] for c in cpu if c["op"] == "train_window") == 2**18
    assert max(c["N"] for c in cpu if c["op"] == "train_window_text") == 2**20
    assert {c["backend"] for c in cuda} == {"torch", "triton"}
    assert all(c["window"] == WINDOW for c in cpu + cuda)


def test_report_gives_ratio_per_doubling_and_plot(tmp_path):
    rows = [dict(B.make_case("attention_window", "torch", N, batch="one", S=2), window=64, status="ok",
                 median_s=t, peak_mem_bytes=m, rss_after_setup_bytes=2**30, utterances=N,
                 utterances_per_s=N / t, p20_s=t, p80_s=t)
            for N, t, m in ((65536, 10.0, 2**28), (131072, 20.0, 2**29), (524288, 90.0, 2**31))]
    res = dict(timestamp="t", device="cpu", quick=False, machine=B.machine_info("cpu"), ceilings={}, rows=rows)
    B.write_report(res, tmp_path)
    assert rows[1]["time_ratio_per_doubling"] == pytest.approx(2.0)
    assert rows[2]["time_ratio_per_doubling"] == pytest.approx(4.5 ** 0.5)   # (90 / 20) over two doublings
    assert res["summary"]["attention_window_torch_N131072_s"] == 20.0
    assert (tmp_path / "long_conversations.png").exists()
    assert "per doubling" in (tmp_path / "results.md").read_text()
