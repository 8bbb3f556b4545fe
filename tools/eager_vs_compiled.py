"""train.py's whole step, eager and torch.compile'd, interleaved step by step in one process: a ratio that a
noisy machine cannot bias (two sittings of `cmath-mer bench` an hour apart differed by up to 9% on a 2-core VM).

    PYTHONPATH=. python tools/eager_vs_compiled.py fp32 mix16x100 100 10      # DTYPE BATCH N ROUNDS

Both steppers start from the same initialisation; the first step of each (the compile) is not timed.
Prints the median step of each and compiled/eager speedup, then every timed step."""
import statistics
import sys
import time

import torch

from cmath_mer import benchmark as B
from cmath_mer import engine
from cmath_mer.benchmark.calls import model_batch
from cmath_mer.benchmark.cases import case_lengths
from cmath_mer.config import preset
from cmath_mer.model import CMATH


def main(dtype: str, batch_kind: str, N: int, rounds: int, device: str = "cpu") -> None:
    if device == "cpu":
        torch.set_num_threads(B.cpu_threads())
    cfg = preset("iemocap", backend="torch")
    lengths = case_lengths(B.make_case("engine_step", "torch", N, mode="train", batch=batch_kind, D=32,
                                       dtype=dtype, device=device))
    batch = model_batch(cfg, lengths, device)
    steps = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = CMATH(cfg).to(device).train()
        forward = engine.compile_model(model) if mode == "compiled" else model
        steps[mode] = engine.Stepper(model, forward, engine.make_optimizer(model, 1e-4, 0.01),
                                     engine.Precision(dtype, device), 1.0, engine.StepMeter(device))
        t0 = time.perf_counter()
        steps[mode]([batch], 0, 0)
        print(f"{mode}: first step {time.perf_counter() - t0:.1f} s", flush=True)
    times = {m: [] for m in steps}
    for r in range(1, rounds + 1):
        for mode, step in steps.items():
            t0 = time.perf_counter()
            step([batch], 0, r)
            if device == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    print(dtype, batch_kind, N, sum(lengths), {m: round(v, 1) for m, v in med.items()},
          "compiled/eager speedup", round(med["eager"] / med["compiled"], 3),
          {m: [round(x * 1e3) for x in v] for m, v in times.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 8)
