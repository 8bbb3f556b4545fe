"""train.py's whole step in several modes, interleaved step by step in one process: ratios that a noisy
machine cannot bias (on a 2-core VM the same step measured 878 ms in a `cmath-mer bench` sweep and 779 ms
here minutes later).

    PYTHONPATH=. python tools/eager_vs_compiled.py fp32 mix16x100 100 10                 # DTYPE BATCH N ROUNDS
    PYTHONPATH=. python tools/eager_vs_compiled.py fp32 mix16x100 100 8 compiled,static  # [MODES]

Modes: eager; compiled (compile_model: dynamic shapes, what `train --compile` runs); static
(dynamic=False, the variational seed passed as a tensor: as an int it is a constant of a static graph and every
step would recompile). Every mode starts from the same initialisation; its first step (the compile) is not
timed. Prints each mode's median step, the speedup of each over the first mode, then every timed step."""
import statistics
import sys
import time

import torch

from cmath_mer import bench as B
from cmath_mer.bench.calls import model_batch
from cmath_mer.bench.cases import case_lengths
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset
from cmath_mer.training.meter import StepMeter
from cmath_mer.training.precision import Precision
from cmath_mer.training.step import Stepper, compile_model, make_optimizer


class TensorSeed(torch.nn.Module):
    """Calls `compiled` with the seed as a tensor (Stepper passes an int)."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    def forward(self, batch, seed, **kw):
        return self.compiled(batch, seed=torch.tensor(seed, dtype=torch.int64), **kw)


def forward_of(model, mode: str):
    if mode == "eager":
        return model
    if mode == "compiled":
        return compile_model(model)
    if mode == "static":
        return TensorSeed(torch.compile(model, fullgraph=True, dynamic=False, options={"fallback_random": True}))
    raise SystemExit(f"unknown mode {mode!r}: eager, compiled or static")


def main(dtype: str, batch_kind: str, N: int, rounds: int, modes: list[str], device: str = "cpu") -> None:
    if device == "cpu":
        torch.set_num_threads(B.cpu_threads())
    cfg = preset("iemocap", backend="torch")
    lengths = case_lengths(B.make_case("engine_step", "torch", N, mode="train", batch=batch_kind, D=32,
                                       dtype=dtype, device=device))
    batch = model_batch(cfg, lengths, device)
    steps = {}
    for mode in modes:
        torch.manual_seed(0)
        model = CMATH(cfg).to(device).train()
        steps[mode] = Stepper(model, forward_of(model, mode), make_optimizer(model, 1e-4, 0.01),
                                     Precision(dtype, device), 1.0, StepMeter(device))
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
    first = modes[0]
    print(dtype, batch_kind, N, sum(lengths), {m: round(v, 1) for m, v in med.items()},
          f"speedup over {first}", {m: round(med[first] / v, 3) for m, v in med.items() if m != first},
          {m: [round(x * 1e3) for x in v] for m, v in times.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 8,
         sys.argv[5].split(",") if len(sys.argv) > 5 else ["eager", "compiled"])
