"""Benchmark smoke tests: tiny shapes from the same registry as `cmath-mer bench`, run with pytest-benchmark.

They check that every case builds, runs and yields finite numbers, never how fast (CI machines vary).
The full suite: `cmath-mer bench --out DIR [--quick] [--device cpu|cuda]` (see benchmarks/README.md).
"""
import os

os.environ.setdefault("CMATH_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(autouse=True)
def _threads():
    """The suite's thread setting (env CMATH_BENCH_THREADS, default every core), restored afterwards."""
    from cmath_mer.bench import cpu_threads
    prev = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def bench_call(benchmark):
    """bench_call(call) times `call` with pytest-benchmark (one warm-up round, three timed rounds) and
    returns its last result."""
    def run(call, rounds=3):
        return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    return run
