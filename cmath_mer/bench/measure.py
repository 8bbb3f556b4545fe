"""Timing and peak memory of one call, and `run_case`: build one case and measure it in this process.

* time: median, p20, p80. CPU: wall clock after a warm-up call (a case whose first call already takes
  longer than `long_call_s` is timed by that one call, which is then flagged). CUDA, every row alike: a
  warm-up call, then `triton.testing.do_bench`.
* peak memory: CUDA: torch.cuda.max_memory_allocated over one call after the warm-up call (autotuning done),
  minus what was allocated before it.
  CPU: the case runs alone in a fresh process; its peak RSS (VmHWM) is reset through /proc/self/clear_refs
  after setup, and peak = VmHWM after the calls minus the resident set size measured after setup (a tiny
  version of the case has run, so code pages and lazy start-up are resident; inputs, model and optimizer
  state allocated; the training case takes one tiny step first so AdamW's state exists). It counts
  everything the call touches (tensors, kernel workspaces, allocator slack), like the memory a user would
  see. If setup itself peaked higher than the call, the number is an upper bound and the row says so.
"""
from __future__ import annotations

import gc
import os
import resource
import sys
import time

import torch

from cmath_mer.bench.build import build_case
from cmath_mer.bench.calls import Unavailable
from cmath_mer.bench.cases import COMPILED_BACKENDS
from cmath_mer.bench.machine import cpu_threads


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0). ru_maxrss cannot be
    reset and, after fork + exec, starts at the *parent's* peak, so it is only the fallback."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm() is not None
    except OSError:
        return False


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes(hwm: bool) -> int:
    return (_vm_hwm() or 0) if hwm else _maxrss_bytes()


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _quantiles(times: list[float]) -> dict:
    t = torch.tensor(sorted(times), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return dict(median_s=q[0], p20_s=q[1], p80_s=q[2], min_s=float(t[0]))


def measure(call, device: str, *, reps: int = 10, budget_s: float = 10.0, long_call_s: float = 5.0,
            first_call_is_sample: bool = True) -> dict:
    """Time `call` and measure its peak memory. Returns the timing/memory part of a row."""
    if device == "cuda":
        return _measure_cuda(call, reps, budget_s)
    res: dict = {}
    gc.collect()
    base = _rss_bytes()
    hwm = _reset_peak_rss()                                  # VmHWM := current RSS, when the kernel allows
    before = _peak_rss_bytes(hwm)
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    res["first_call_s"] = first
    times = []
    if first_call_is_sample and first >= long_call_s:
        times = [first]
        res["single_call"] = True                            # too long to repeat: the first call is the sample
    else:
        start = time.perf_counter()
        while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    after = _peak_rss_bytes(hwm)
    res.update(_quantiles(times), reps=len(times), timer="wall clock (perf_counter), warm-up call first")
    res["peak_mem_bytes"] = max(0, after - base)
    res["mem_method"] = ("peak RSS (VmHWM, reset after setup via /proc/self/clear_refs) - RSS after setup"
                         if hwm else "ru_maxrss after the calls - RSS after setup (fresh process)")
    if after <= before:
        res["mem_upper_bound"] = True                        # setup peaked higher than the call did
    res["rss_after_setup_bytes"] = base
    return res


def _measure_cuda(call, reps: int, budget_s: float) -> dict:
    """One method for every row, whatever the first call costs: a warm-up call (autotuning, compile caches, a
    CUDA graph's capture), then the peak memory of one more call (so the autotuner's trial buffers are not
    counted), then triton.testing.do_bench for the time (CUDA events over repeated calls, the L2 cache flushed
    between them; a call longer than the budget still gets at least one timed repetition). `reps` is only
    the CPU's; do_bench sizes its own repetitions to the budget."""
    import triton.testing
    res: dict = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    res["first_call_s"] = time.perf_counter() - t0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    res["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
    res["mem_method"] = "cuda max_memory_allocated over one call after a warm-up call - allocated before it"
    q = triton.testing.do_bench(call, warmup=25, rep=max(100, int(budget_s * 100)), quantiles=[0.5, 0.2, 0.8])
    res.update(median_s=q[0] / 1e3, p20_s=q[1] / 1e3, p80_s=q[2] / 1e3, reps="do_bench",
               timer="triton.testing.do_bench after a warm-up call")
    return res


def run_case(case: dict, *, quick: bool = True, warm_tiny: bool = True) -> dict:
    """Build and measure one case in this process. Returns the row (case fields + results)."""
    row = dict(case)
    dev = case["device"]
    compiled = case["backend"] in COMPILED_BACKENDS
    if dev == "cpu":
        torch.set_num_threads(cpu_threads())
    row["threads"] = torch.get_num_threads()
    try:
        if dev == "cpu" and warm_tiny:
            # Run a tiny version of the case first: libtorch's code pages, oneDNN/OpenMP start-up and lazy
            # module state then sit in the RSS *before* the baseline is taken, so the peak counts the
            # call's data, not the ~300 MiB of code a first call pages in. (A compiled backend warms
            # with the eager reference: its compile below runs before the baseline too.)
            tiny_call, _ = build_case(dict(case, N=min(case["N"], 16), min_utterances=32,
                                           backend="torch" if compiled else case["backend"]))
            tiny_call()
            del tiny_call
        call, info = build_case(case)
    except Unavailable as err:
        row.update(status="unavailable", reason=str(err))
        return row
    row.update(info)
    try:
        if compiled:                                         # compile outside the clock and the memory
            t0 = time.perf_counter()
            call()
            # plus what the build compiled already (engine_step compiles in its warm-up step)
            row["compile_s"] = row.get("build_compile_s", 0.0) + time.perf_counter() - t0
        res = measure(call, dev, reps=5 if quick else 10, budget_s=3.0 if quick else 10.0,
                      long_call_s=3.0 if quick else 10.0)
    except Exception as err:                                 # noqa: BLE001 - recorded in the row
        row.update(status="error", reason=f"{type(err).__name__}: {str(err).strip()[:400]}")
        return row
    row.update(res, status="ok")
    med = row["median_s"]
    row["utterances_per_s"] = row["utterances"] / med if med > 0 else None
    if row.get("flops"):
        row["gflops_per_s"] = row["flops"] / med / 1e9
    if row.get("bytes"):
        row["gbytes_per_s"] = row["bytes"] / med / 1e9
    return row
