"""The training step's machinery, kept out of train.py: which device and precision, autocast and the fp16
GradScaler, running sums kept on the device (no host sync inside a step), the batch prefetcher (pinned
memory, non_blocking copies, or the whole corpus on the device), gradient accumulation, deterministic mode
and torch.compile.

What a step never does: read a tensor on the host (`.item()`, `.cpu()`, `bool(t)`, `float(t)`). Loss,
gradient norm and the count of non-finite values accumulate in one device tensor; `StepMeter.read` is the
only place they come to the host (a "logging point": every LOG_EVERY optimizer steps and at the end of an
epoch), and that is where a non-finite loss or gradient is caught, naming the epoch and the step range.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

import torch

from cmath_mer.training import distributed
from cmath_mer.model.config import PRECISIONS
from cmath_mer.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOG_EVERY = 25            # optimizer steps between two reads of the device-side meters
PREFETCH_DEPTH = 2        # batches built ahead of the one the model is working on
FP16_INIT_SCALE = 2.0**16  # fp16: the GradScaler's first loss scale (torch's default; tests raise it)


# ---------------------------------------------------------------------------------- device and precision

def resolve_device(name: str | None) -> str:
    """'auto' (or None): cuda when torch sees a CUDA device, else cpu. Anything else is returned as given
    (checked by check_device)."""
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_device(name: str) -> torch.device:
    """A usable torch.device for `name` (auto, cpu, cuda, cuda:N), or ConfigError naming --device."""
    name = resolve_device(name)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only auto, cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: torch sees no CUDA device (a CPU-only torch, or no GPU); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return dev


def bf16_supported(device: str | torch.device) -> bool:
    dev = torch.device(device)
    if dev.type == "cpu":
        return True                       # autocast to bfloat16 runs on any CPU (emulated where not native)
    with torch.cuda.device(dev):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def default_precision(device: str | torch.device) -> str:
    """bf16 on CUDA cards with native bfloat16 (sm_80 and later), fp32 elsewhere (the CPU included)."""
    dev = torch.device(device)
    return "bf16" if dev.type == "cuda" and bf16_supported(dev) else "fp32"


def check_precision(precision: str, device: str | torch.device) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "bf16" and dev.type == "cuda" and not bf16_supported(dev):
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(dev)} has no native bfloat16; use "
                          f"--precision fp16 (loss scaling) or fp32")
    return precision


class Precision:
    """torch.autocast for the forward (weights and optimizer state stay fp32: they are the master copy),
    and for fp16 a GradScaler that scales the loss and skips a step whose gradients hold inf/NaN."""

    def __init__(self, name: str, device: str | torch.device):
        self.name = name
        self.device_type = torch.device(device).type
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(self.device_type, init_scale=FP16_INIT_SCALE, enabled=name == "fp16")

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def state_dict(self) -> dict | None:
        """The scaler's state (scale, growth tracker) for the checkpoint; None when there is no scaler."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float):
    """AdamW, the fused implementation on every device: one kernel for all parameters. On CUDA the
    multi-tensor default was 17% of a training step's GPU time (an H100 profile); on a 2-core
    CPU (iemocap preset, 11.7 M parameters in 219 tensors) the fused step took 5.8 ms against 17.8 ms.
    Under fp16 the GradScaler hands the fused step its inf flag, so a step is skipped on the device instead
    of the scaler reading the flag on the host."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


# ------------------------------------------------------------------------------------ device-side meters

class StepMeter:
    """Sums over the steps since the last read, on the device: loss x utterances, utterances, gradient
    norm, optimizer steps, non-finite losses, non-finite gradient norms (fp16: skipped steps). In a
    distributed run the read sums the first three kinds over the ranks (the gradient norm is the same on
    every rank after the all-reduce), so every rank sees, and stops on, the same numbers."""
    LOSS, UTT, GNORM, STEPS, BAD_LOSS, BAD_GRAD = range(6)
    PER_RANK = [LOSS, UTT, BAD_LOSS]

    def __init__(self, device):
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.first_step = None                # global step (1-based) of the first step since the last read

    def add_loss(self, loss: torch.Tensor, utterances: int, weight: torch.Tensor | None = None) -> None:
        """loss of a batch of `utterances`; weight (default: utterances) multiplies it in the loss sum: a part
        of a step whose loss is its share of the step's mean passes the step's utterance count."""
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        self.sums[self.LOSS] += torch.where(finite, loss * (utterances if weight is None else weight), 0.0)
        self.sums[self.UTT] += utterances
        self.sums[self.BAD_LOSS] += (~finite).to(torch.float64)

    def add_step(self, grad_norm: torch.Tensor, step: int) -> None:
        self.note_step(step)
        self.add_norm(grad_norm)

    def note_step(self, step: int) -> None:
        """Host bookkeeping of a step (kept apart from add_norm: a CUDA graph replays only device work)."""
        if self.first_step is None:
            self.first_step = step

    def add_norm(self, grad_norm: torch.Tensor) -> None:
        norm = grad_norm.detach().to(torch.float64)
        finite = torch.isfinite(norm)
        self.sums[self.GNORM] += torch.where(finite, norm, 0.0)
        self.sums[self.STEPS] += 1
        self.sums[self.BAD_GRAD] += (~finite).to(torch.float64)

    def read(self) -> dict:
        """The logging point: one host read of all sums, then reset."""
        if distributed.context().active:
            self.sums[self.PER_RANK] = distributed.all_reduce_sum(self.sums[self.PER_RANK])
        with logging_point():
            v = self.sums.tolist()
        self.sums.zero_()
        first, self.first_step = self.first_step, None
        return {"loss_sum": v[self.LOSS], "utterances": v[self.UTT], "grad_norm_sum": v[self.GNORM],
                "steps": int(v[self.STEPS]), "bad_loss": int(v[self.BAD_LOSS]), "bad_grad": int(v[self.BAD_GRAD]),
                "first_step": first}


_STATE = threading.local()


@contextlib.contextmanager
def _marked(flag: str):
    prev = getattr(_STATE, flag, False)
    setattr(_STATE, flag, True)
    try:
        yield
    finally:
        setattr(_STATE, flag, prev)


def logging_point():
    """Marks a deliberate host read (tests spy on Tensor.item/.cpu and allow them only here)."""
    return _marked("logging")


def in_step():
    """Marks the training step: between here and its end nothing may read a device tensor on the host."""
    return _marked("step")


def phase() -> str:
    """'logging' inside logging_point(), 'step' inside a training step, else 'other' (for the tests)."""
    if getattr(_STATE, "logging", False):
        return "logging"
    return "step" if getattr(_STATE, "step", False) else "other"


# --------------------------------------------------------------------------------------------- batches

def micro_batches(group: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Split one bucketed batch (conversation indices) into at most `parts` consecutive runs of about equal
    utterance counts; a conversation is never cut, so a batch of fewer conversations gives fewer parts."""
    parts = max(1, min(parts, len(group)))
    if parts == 1:
        return [list(group)]
    total = sum(lengths[i] for i in group)
    out, current, done = [], [], 0
    for pos, i in enumerate(group):
        current.append(i)
        done += lengths[i]
        left_convs, left_parts = len(group) - pos - 1, parts - len(out) - 1
        if left_parts > 0 and (done >= total * (len(out) + 1) / parts or left_convs == left_parts):
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


class DeviceCorpus:
    """The corpus tensors the model reads, on the device (--data-on-device): a batch is an index_select
    on the device, with only the row indices copied from the host (pinned, non_blocking)."""

    def __init__(self, data, modalities: tuple[str, ...], device: torch.device):
        self.device = device
        need = sum(data.features[m].numel() * data.features[m].element_size() for m in modalities)
        need += data.speakers.numel() * 8 + data.labels.numel() * 8
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if need > free // 2:
                raise ConfigError(f"--data-on-device: the corpus needs {need / 2**20:.0f} MiB, and {device} has "
                                  f"{free / 2**20:.0f} MiB free (at most half of it goes to data); train without "
                                  f"--data-on-device")
        self.features = {m: data.features[m].to(device) for m in modalities}
        self.speakers = data.speakers.to(device)
        self.labels = data.labels.to(device)
        self.bounds = data.cu_seqlens.tolist()
        self.ids = data.conversation_ids

    def batch(self, group: list[int]):
        from cmath_mer.data.dataset import Batch
        from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
        b = self.bounds
        rows = torch.cat([torch.arange(b[i], b[i + 1]) for i in group])
        lengths = [b[i + 1] - b[i] for i in group]
        cu = cu_seqlens_from(lengths)
        if self.device.type == "cuda":
            rows, cu = rows.pin_memory(), cu.pin_memory()
        rows = rows.to(self.device, non_blocking=True)
        return Batch({m: x.index_select(0, rows) for m, x in self.features.items()},
                     self.speakers.index_select(0, rows), self.labels.index_select(0, rows),
                     cu.to(self.device, non_blocking=True), [self.ids[i] for i in group], max(lengths, default=0))


class Prefetcher:
    """Batches for the coming steps are gathered by a background thread while the current step runs
    (pinned memory when the device is CUDA), and copied with non_blocking=True. Iterating yields, per
    optimizer step, the list of its micro-batches, already on the device."""

    def __init__(self, data, plan: list[list[list[int]]], modalities, device: torch.device,
                 on_device: DeviceCorpus | None = None, depth: int = PREFETCH_DEPTH):
        self.data, self.plan, self.modalities, self.device = data, plan, modalities, device
        self.on_device = on_device
        self.pin = device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = None

    def __len__(self) -> int:
        return len(self.plan)

    def _host_batch(self, group):
        batch = self.data.batch(group, self.modalities)
        if self.pin:
            batch.features = {m: x.pin_memory() for m, x in batch.features.items()}
            batch.speakers, batch.labels = batch.speakers.pin_memory(), batch.labels.pin_memory()
            batch.cu_seqlens = batch.cu_seqlens.pin_memory()
        return batch

    def _work(self):
        try:
            for step in self.plan:
                item = [self._host_batch(g) for g in step]
                while not self.stop.is_set():
                    try:
                        self.queue.put(("ok", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as err:           # handed to the consumer, raised there
            self.queue.put(("error", err))
            return
        self.queue.put(("done", None))

    def __iter__(self):
        if self.on_device is not None:         # gathering is a device op: no thread needed
            for step in self.plan:
                yield [self.on_device.batch(g) for g in step]
            return
        self.thread = threading.Thread(target=self._work, name="cmath-mer-prefetch", daemon=True)
        self.thread.start()
        try:
            while True:
                kind, item = self.queue.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise item
                yield [b.to(self.device) for b in item]
        finally:
            self.close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    self.thread.join(timeout=0.05)
            self.thread = None


# ----------------------------------------------------------------------------------- deterministic mode

@contextlib.contextmanager
def on_device(device: torch.device):
    """cuda:N is the current CUDA device while training (pin_memory, kernel launches and anything else that
    uses the current device then agree with the model's); nothing on the CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device):
    """torch.use_deterministic_algorithms for the run (restored afterwards), cuDNN without autotuning, and
    the cuBLAS workspace setting that deterministic cuBLAS needs (set before the first cuBLAS call, so in a
    fresh process; an existing setting is kept)."""
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[2], prev[3]


# ------------------------------------------------------------------------------------------- the step

def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """Seed of the variational eps: new for every optimizer step, a function of (seed, step) alone, so a
    resumed run draws the same numbers. The parts of a step (micro-batches, ranks) share the step's seed
    and draw by their rows' index in the step's whole batch (Stepper), so however a step is split it draws
    the eps of the whole batch. (micro > 0 is the seed scheme of runs before that, kept for its callers.)"""
    return (seed * 1_000_003 + step + micro * 1_000_000_007) % (2**31 - 1)


class Stepper:
    """One optimizer step over its micro-batches: autocast forward, (scaled) backward accumulating
    gradients, unscale, clip, step, scaler update; the loss and gradient norm go to the meter. No host
    read of any device tensor.

    The step's batch may be split in parts: micro-batches here, and in a distributed run (`forward` a
    DistributedDataParallel) one share per rank. The loss normalisers (label weight, utterances) are summed
    over the micro-batches and all-reduced over the ranks, and each part's loss is its share of the whole
    batch's mean (CMATH.forward(totals=...)); DDP averages the ranks' gradients, so each rank's loss is
    multiplied by the world size. The update is then the one of one process on the whole batch, whatever
    the split (tests/test_distributed.py), and the variational eps too: each part draws by the index of its
    rows in the whole batch (first_row: the step's utterances on lower ranks)."""

    def __init__(self, model, forward, optimizer, precision: Precision, grad_clip: float, meter: StepMeter):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.precision, self.grad_clip, self.meter = precision, grad_clip, meter
        self.first_step_seconds: float | None = None    # the first step's wall time (compile time with --compile)
        self.world_size = distributed.context().world_size
        self.ddp = isinstance(forward, torch.nn.parallel.DistributedDataParallel)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, micro: list, seed: int, step: int, first_row: int = 0) -> int:
        t0 = time.perf_counter() if self.first_step_seconds is None else None
        with in_step():
            total = sum(b.num_utterances for b in micro)
            self.optimizer.zero_grad(set_to_none=True)
            scaler = self.precision.scaler
            totals = torch.stack([self.model.loss_totals(b) for b in micro]).sum(0)
            distributed.all_reduce_sum(totals)                 # the whole step's normalisers, on the device
            row = first_row
            for m, batch in enumerate(micro):
                # DDP all-reduces the gradients in the backward of the last micro-batch only
                sync = not self.ddp or m == len(micro) - 1
                with contextlib.nullcontext() if sync else self.forward.no_sync():
                    with self.precision.autocast():
                        out = self.forward(batch, seed=step_seed(seed, step), row_offset=row, totals=totals)
                    loss = out.loss.float()                     # this part's share of the step's loss
                    self.meter.add_loss(loss, batch.num_utterances, totals[1])
                    scaler.scale(loss * self.world_size if self.world_size > 1 else loss).backward()
                row += batch.num_utterances
            scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
            self.meter.add_step(norm, step + 1)
        if t0 is not None:                    # once per run: the first step's time, compiling included
            device = next(self.model.parameters()).device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.first_step_seconds = time.perf_counter() - t0
        return total


def compile_model(model: torch.nn.Module):
    """torch.compile of the model's forward: fullgraph, dynamic shapes over the number of utterances (one
    graph for every batch size, instead of one per bucket; static shapes, the seed a tensor, ran no faster
    and compile once per shape: docs/RESULTS.md), and inductor's `fallback_random`: dropout draws from
    torch's generator with aten's vectorised bernoulli, as in eager mode (inductor's own per-element Philox on
    the CPU cost about twice as much: 70 ms of a 1.5 s step at one thread), so the compiled step also draws
    eager's dropout masks."""
    return torch.compile(model, fullgraph=True, dynamic=True, options={"fallback_random": True})
