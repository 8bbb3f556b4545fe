"""One command for a GPU: parity on CUDA, cold autotune, determinism, a CUDA-graph step, a profile, the step's speed
targets (step speedups, GPU idle gaps; docs/KERNELS.md), the demo on both backends, the benchmark. Every stage runs
in its own process with its own time limit and writes DIR/<stage>.json (and .log), so one failing stage costs
nothing of the others; summary.md is written last.

    python -m cmath_mer.gpucheck --out benchmarks/results/<date>-<card>     # on the GPU machine
    python -m cmath_mer.gpucheck --dry-run                                   # the plan (CI checks it)
    TRITON_INTERPRET=1 python -m cmath_mer.gpucheck --device cpu --out D     # the same code on the CPU, tiny

It reads nothing from the network and uses whatever torch and triton the machine carries.
"""
from __future__ import annotations

from cmath_mer.bench.gpucheck.common import digest, rel_err
from cmath_mer.bench.gpucheck.driver import STAGE_NAMES, STAGES, main
from cmath_mer.bench.gpucheck.graphs import stage_cuda_graph, stage_graph_train
from cmath_mer.bench.gpucheck.parity import (
    MODES,
    parity_cases,
    run_parity_case,
    sized,
    stage_autotune_cold,
    stage_determinism,
    stage_parity,
)
from cmath_mer.bench.gpucheck.runs import bench_cases, stage_bench, stage_env, stage_profile, stage_train_demo
from cmath_mer.bench.gpucheck.targets import idle_gaps, merge_intervals, speedup_verdicts, stage_targets

__all__ = ["STAGES", "STAGE_NAMES", "MODES", "main", "parity_cases", "sized", "run_parity_case", "digest",
           "rel_err", "bench_cases", "idle_gaps", "merge_intervals", "speedup_verdicts", "stage_autotune_cold",
           "stage_bench", "stage_cuda_graph", "stage_determinism", "stage_env", "stage_graph_train", "stage_parity",
           "stage_profile", "stage_targets", "stage_train_demo"]
