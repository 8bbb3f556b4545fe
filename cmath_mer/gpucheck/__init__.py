"""`python -m cmath_mer.gpucheck`: the command that runs the GPU check (cmath_mer.bench.gpucheck)."""
