"""The training step, one body for every way it runs: eager (train's default off CUDA graphs, torch.compile,
gradient accumulation, DDP) or captured once per batch shape in a CUDA graph and replayed (GraphedStepper).
train, the benchmark's whole-step rows and the GPU check all build their step with make_stepper.

A step: autocast forward over its micro-batches, (scaled) backward accumulating gradients, unscale, clip,
AdamW, scaler update; the loss and gradient norm go to the device-side meter. No host read of any device
tensor (meter.py says where the host reads them).
"""
from __future__ import annotations

import contextlib
import time

import torch

from cmath_mer.training import distributed
from cmath_mer.training.graphs import (
    CudaGraphs,
    SharedFeatures,
    batch_shape,
    fill,
    make_capturable,
    padded_shape,
    static_copy,
)
from cmath_mer.training.meter import StepMeter, in_step
from cmath_mer.training.precision import Precision


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float):
    """AdamW, the fused implementation on every device: one kernel for all parameters. On CUDA the
    multi-tensor default was 17% of a training step's GPU time (an H100 profile); on a 2-core
    CPU (iemocap preset, 11.7 M parameters in 219 tensors) the fused step took 5.8 ms against 17.8 ms.
    Under fp16 the GradScaler hands the fused step its inf flag, so a step is skipped on the device instead
    of the scaler reading the flag on the host."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def step_seed(seed: int, step: int) -> int:
    """Seed of the variational eps: new for every optimizer step, a function of (seed, step) alone, so a
    resumed run draws the same numbers. The parts of a step (micro-batches, ranks) share the step's seed
    and draw by their rows' index in the step's whole batch (Stepper), so however a step is split it draws
    the eps of the whole batch."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


class Stepper:
    """One optimizer step over its micro-batches (eager).

    The step's batch may be split in parts: micro-batches here, and in a distributed run (`forward` a
    DistributedDataParallel) one share per rank. The loss normalisers (label weight, utterances) are summed
    over the micro-batches and all-reduced over the ranks, and each part's loss is its share of the whole
    batch's mean (CMATH.forward(totals=...)); DDP averages the ranks' gradients, so each rank's loss is
    multiplied by the world size. The update is then the one of one process on the whole batch, whatever
    the split (tests/training/test_distributed.py), and the variational eps too: each part draws by the index
    of its rows in the whole batch (first_row: the step's utterances on lower ranks)."""

    def __init__(self, model, forward, optimizer, precision: Precision, grad_clip: float, meter: StepMeter):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.precision, self.grad_clip, self.meter = precision, grad_clip, meter
        self.first_step_seconds: float | None = None    # the first step's wall time (compile time with --compile)
        self.world_size = distributed.context().world_size
        self.ddp = isinstance(forward, torch.nn.parallel.DistributedDataParallel)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def body(self, micro: list, seed, first_row: int = 0, set_to_none: bool = True) -> None:
        """The step's device work (what a CUDA graph captures): seed an int or a device tensor."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        scaler = self.precision.scaler
        totals = torch.stack([self.model.loss_totals(b) for b in micro]).sum(0)
        distributed.all_reduce_sum(totals)                 # the whole step's normalisers, on the device
        row = first_row
        for m, batch in enumerate(micro):
            # DDP all-reduces the gradients in the backward of the last micro-batch only
            sync = not self.ddp or m == len(micro) - 1
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                with self.precision.autocast():
                    out = self.forward(batch, seed=seed, row_offset=row, totals=totals)
                loss = out.loss.float()                     # this part's share of the step's loss
                self.meter.add_loss(loss, batch.real_utterances, totals[1])
                scaler.scale(loss * self.world_size if self.world_size > 1 else loss).backward()
            row += batch.num_utterances
        scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.meter.add_norm(norm)

    def run(self, micro: list, seed: int, step: int, first_row: int) -> None:
        self.body(micro, step_seed(seed, step), first_row)

    def __call__(self, micro: list, seed: int, step: int, first_row: int = 0) -> int:
        t0 = time.perf_counter() if self.first_step_seconds is None else None
        with in_step():
            self.run(micro, seed, step, first_row)
            self.meter.note_step(step + 1)
        if t0 is not None:                    # once per run: the first step's time, compiling included
            device = next(self.model.parameters()).device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.first_step_seconds = time.perf_counter() - t0
        return sum(b.num_utterances for b in micro)


class GraphedStepper(Stepper):
    """Stepper.body captured in a CUDA graph once per batch shape, then replayed (graphs.py says how and why).
    Same call signature as Stepper; one micro-batch, one process, no torch.compile, no fp16 (its scaler reads
    its inf flag on the host): train.resolve_cuda_graphs refuses the rest. With `pad` (the default) a batch
    replays in its padded shape class (graphs.padded_size), with the loss and gradients of the batch itself.
    At most MAX_GRAPHS shapes are captured (each holds its static batch and a graph's host and device state);
    a step of any further shape runs the same body eagerly, unpadded."""

    MAX_GRAPHS = 64

    def __init__(self, model, optimizer, precision: Precision, grad_clip: float, meter: StepMeter, graphs=None,
                 pad: bool = True):
        super().__init__(model, model, optimizer, precision, grad_clip, meter)
        self.pad = pad
        device = next(model.parameters()).device
        self.graphs_api = graphs if graphs is not None else CudaGraphs(device)
        make_capturable(optimizer, device)
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)   # written before every step
        self.graphs: dict[tuple, tuple[object, object]] = {}
        self.shared = SharedFeatures()
        self.captured = self.replayed = self.uncaptured = 0
        self.capture_seconds = 0.0                 # host time of the first (eager) step and capture of each shape

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)                  # in place: the captured AdamW kernels read this tensor

    def _body(self, batch) -> None:
        # the gradients keep their addresses across replays
        self.body([batch], self.seed, 0, set_to_none=False)

    def run(self, micro: list, seed: int, step: int, first_row: int) -> None:
        if len(micro) != 1:
            raise ValueError("--cuda-graphs takes one micro-batch per step (no --accumulate)")
        if first_row != 0:
            raise ValueError("--cuda-graphs runs in one process (the step's batch starts at row 0)")
        (batch,) = micro
        self.seed.fill_(step_seed(seed, step))
        shape = padded_shape(batch) if self.pad else batch_shape(batch)
        entry = self.graphs.get(shape)
        if entry is None and len(self.graphs) >= self.MAX_GRAPHS:
            self._body(batch)
            self.uncaptured += 1
        elif entry is None:
            t0 = time.perf_counter()
            static = static_copy(batch, self.shared, self.pad)
            self.graphs_api.eager(lambda: self._body(static))       # this step's update, on the static batch
            self.graphs[shape] = (self.graphs_api.capture(lambda: self._body(static)), static)
            self.captured += 1
            self.capture_seconds += time.perf_counter() - t0
        else:
            graph, static = entry
            fill(static, batch)
            graph.replay()
            self.replayed += 1


def make_stepper(model, optimizer, precision: Precision, grad_clip: float, meter: StepMeter, *, forward=None,
                 cuda_graphs: bool = False, graphs=None, pad: bool = True) -> Stepper:
    """The step train runs: replayed from CUDA graphs (`graphs`: the CUDA graph API, or a stand-in in tests)
    or eager through `forward` (the model, its torch.compile, or its DDP wrapper). pad: graphed steps replay
    batches padded to shape classes (GraphedStepper)."""
    if cuda_graphs:
        return GraphedStepper(model, optimizer, precision, grad_clip, meter, graphs, pad)
    return Stepper(model, model if forward is None else forward, optimizer, precision, grad_clip, meter)


def compile_model(model: torch.nn.Module):
    """torch.compile of the model's forward: fullgraph, dynamic shapes over the number of utterances (one
    graph for every batch size, instead of one per bucket; static shapes, the seed a tensor, ran no faster
    and compile once per shape: docs/RESULTS.md), and inductor's `fallback_random`: dropout draws from
    torch's generator with aten's vectorised bernoulli, as in eager mode (inductor's own per-element Philox on
    the CPU cost about twice as much: 70 ms of a 1.5 s step at one thread), so the compiled step also draws
    eager's dropout masks."""
    return torch.compile(model, fullgraph=True, dynamic=True, options={"fallback_random": True})
