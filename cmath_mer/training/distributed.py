"""Several processes, one training run: torchrun's environment, the process group, and the few collectives
train.py needs. Without torchrun every function here is what one process would do (a no-op, or its own
value), so the single-process run is the distributed one with world_size 1.

torchrun starts each process with RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address) in its
environment; nothing else is passed. The backend is NCCL when the run trains on CUDA (each process on
cuda:LOCAL_RANK), Gloo on the CPU.

Faults before training (a rank that cannot read the data, a run folder rank 0 refuses) must stop every rank:
a rank that raised alone would leave the others waiting in their next collective. `agree` and `on_main` pass
an error on to every rank, which raises it with the failing rank named.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as dist

from cmath_mer.errors import ConfigError

BACKENDS = ("auto", "nccl", "gloo")


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


_CONTEXT = Context()


def context() -> Context:
    """This process's place in the run (rank 0 of 1 without torchrun)."""
    return _CONTEXT


def torchrun_environment() -> Context | None:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; None when this process was not started by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        env = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except ValueError:
        raise ConfigError(f"torchrun environment: RANK={os.environ['RANK']!r}, WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']!r}: not integers") from None
    if not 0 <= env.rank < env.world_size:
        raise ConfigError(f"torchrun environment: RANK={env.rank} outside WORLD_SIZE={env.world_size}")
    return env


def setup(device: str, backend: str = "auto") -> str:
    """Join the process group when started by torchrun (several processes); return the device this process
    trains on: cuda:LOCAL_RANK for `cuda`, the CPU as it is. One process: nothing to join, `device` as given.
    backend: auto (NCCL on CUDA, Gloo on the CPU), nccl or gloo (--dist-backend)."""
    global _CONTEXT
    if backend not in BACKENDS:
        raise ConfigError(f"--dist-backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    env = torchrun_environment()
    dev = torch.device(device)
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError(f"--dist-backend nccl needs CUDA devices, and this run trains on {device}; use "
                          f"--dist-backend gloo (the default on the CPU)")
    if env is None or env.world_size == 1:
        return device
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(f"--device {device}: under torchrun each process trains on cuda:LOCAL_RANK; "
                              f"pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the cards")
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s); start at most that many processes per machine (--nproc-per-node)")
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if backend == "nccl" else None)
    _CONTEXT = env
    return str(dev)


def teardown() -> None:
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = Context()


def local_device(device: str) -> str:
    """The device this rank trains on for a run's device: cuda:LOCAL_RANK for `cuda` under torchrun."""
    ctx = context()
    if ctx.active and torch.device(device).type == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


# -------------------------------------------------------------------------------------------- collectives

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (asynchronous on CUDA: no host sync)."""
    if context().active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather(obj) -> list:
    """obj of every rank, in rank order (pickled: for small host objects such as evaluation outputs)."""
    if not context().active:
        return [obj]
    out = [None] * context().world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's obj on every rank (tensors in it should be on the CPU: they arrive where they were)."""
    if not context().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _where() -> str:
    ctx = context()
    return f"rank {ctx.rank} (host {socket.gethostname()})"


def _error_record(err: BaseException) -> dict:
    return {"type": type(err), "message": str(err), "usage": getattr(err, "usage", None), "where": _where()}


def _raise(record: dict, own: BaseException | None):
    if own is not None:
        raise own
    cls, message = record["type"], f"{record['where']}: {record['message']}"
    try:
        err = cls(message, usage=record["usage"]) if record["usage"] is not None else cls(message)
    except Exception:                         # an error class with another constructor: keep the message
        err = RuntimeError(message)
    raise err


def agree(fn, *args, **kwargs):
    """Run fn on every rank; if it raised on any rank, raise on every rank (the failing one its own error,
    the others the same kind of error naming the failing rank and host), so that all stop together."""
    own, result = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:
        own = err
    if not context().active:
        if own is not None:
            raise own
        return result
    records = all_gather(None if own is None else _error_record(own))
    failed = next((r for r in records if r is not None), None)
    if failed is not None:
        _raise(failed, own)
    return result


def on_main(fn, *args, **kwargs):
    """Run fn on rank 0 alone (run-folder checks, reading a checkpoint: the folder may exist on rank 0's
    machine only); every rank gets its result, or raises its error."""
    if not context().active:
        return fn(*args, **kwargs)
    own, result = None, None
    if context().main:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            own = err
    record, result = broadcast((None if own is None else _error_record(own), result if own is None else None))
    if record is not None:
        _raise(record, own)
    return result


def same_everywhere(value, what: str) -> None:
    """Refuse (ConfigError) a run whose ranks hold different `value`s (e.g. the data's fingerprint)."""
    if not context().active:
        return
    values = all_gather(value)
    if any(v != values[0] for v in values):
        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise ConfigError(f"{what} differ between ranks: rank {differ[0]} has {values[differ[0]]!r}, rank 0 has "
                          f"{values[0]!r}; every process must read the same {what}")
