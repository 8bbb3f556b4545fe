"""The benchmark's CUDA timing, checked on the CPU with a stand-in for torch.cuda and do_bench: one method for
every row (a warm-up call, then do_bench), whatever the first call costs, and the peak memory of a call after
the warm-up (the autotuner's trial buffers are not counted)."""
from __future__ import annotations

import importlib
import random
import time
import types

import pytest
import torch

M = importlib.import_module("cmath_mer.bench.measure")    # the module (the package exports its function `measure`)

triton_testing = pytest.importorskip("triton.testing")


@pytest.mark.parametrize("first_call_s", [0.0, 0.15])
def test_every_cuda_row_is_timed_by_do_bench_after_a_warm_up_call(monkeypatch, first_call_s):
    events = []
    allocated = {"now": 0, "peak": 0}
    autotune_bytes, call_bytes = random.randint(10_000, 20_000), random.randint(100, 900)

    def call():
        first = not any(e == "call" for e in events)
        events.append("call")
        if first:                              # the first call autotunes: large trial buffers, slow
            time.sleep(first_call_s)
            allocated["peak"] = max(allocated["peak"], allocated["now"] + autotune_bytes)
        allocated["peak"] = max(allocated["peak"], allocated["now"] + call_bytes)

    def reset():
        events.append("reset")
        allocated["peak"] = allocated["now"]

    fake_cuda = types.SimpleNamespace(
        synchronize=lambda *a: None, empty_cache=lambda: None, reset_peak_memory_stats=reset,
        memory_allocated=lambda *a: allocated["now"], max_memory_allocated=lambda *a: allocated["peak"])

    def do_bench(fn, warmup, rep, quantiles):
        events.append("do_bench")
        fn()
        return [1.0, 0.5, 1.5]

    monkeypatch.setattr(torch, "cuda", fake_cuda)
    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    res = M._measure_cuda(call, reps=5, budget_s=1.0)
    assert events[:3] == ["call", "reset", "call"] and events[3] == "do_bench"
    assert res["timer"].startswith("triton.testing.do_bench") and res["median_s"] == pytest.approx(1e-3)
    assert res["peak_mem_bytes"] == call_bytes          # the warm-up's autotune buffers are not counted
    assert res["first_call_s"] >= first_call_s
