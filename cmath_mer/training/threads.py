"""How many CPU threads a command uses: chosen by the project, not left to the OpenMP default.

PyTorch's default is one thread per core of the machine. On a machine that runs anything else, those threads
wait on each other (a step's parallel regions finish at the pace of their slowest thread), and a run is
several times slower than with one thread. The policy, in order:

1. `--threads N` (the command line is the most explicit choice);
2. OMP_NUM_THREADS, else MKL_NUM_THREADS, when the user set one (torchrun sets OMP_NUM_THREADS=1 for
   several processes per machine);
3. the CPUs this process may run on (os.sched_getaffinity: a container's or taskset's limit, not the
   machine's core count), shared among the processes training together on this machine (torchrun's
   LOCAL_WORLD_SIZE), less the cores that other work keeps busy (the 1-minute load average), at least one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from cmath_mer.errors import UsageError

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str                       # what decided it, for the data line and the run's record

    def as_dict(self) -> dict:
        return {"threads": self.threads, "why": self.why}


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):          # not on Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable tasks), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def processes_per_machine(env=os.environ) -> int:
    """Processes training together on this machine: torchrun's LOCAL_WORLD_SIZE (else WORLD_SIZE), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = env.get(name)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise UsageError(f"{name}={value!r}: expected a whole number of processes") from None
    return 1


def _env_threads(name: str, value: str) -> int:
    # OpenMP allows a list per nesting level ("4,2"): the first is the outer level's, the one torch uses
    first = value.split(",")[0].strip()
    try:
        threads = int(first)
    except ValueError:
        threads = 0
    if threads < 1:
        raise UsageError(f"{name}={value!r}: expected a whole number of threads >= 1 (or unset it, and the "
                         f"project chooses)")
    return threads


def choose_threads(requested: int | None = None, *, env=os.environ, cpus: int | None = None,
                   load: float | None = None, processes: int | None = None) -> ThreadChoice:
    """The thread count of this process (module docstring). cpus, load and processes default to this
    machine's; tests give them."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads {requested}: must be at least 1")
        return ThreadChoice(requested, "--threads")
    for name in ENV_VARS:
        if env.get(name, "").strip():
            return ThreadChoice(_env_threads(name, env[name]), name)
    cpus = usable_cpus() if cpus is None else cpus
    processes = processes_per_machine(env) if processes is None else processes
    share = max(1, cpus // processes)
    why = f"{cpus} usable CPUs" + (f" / {processes} processes" if processes > 1 else "")
    if load is None and cpus > 1:
        load = load_average()
    if load is not None and cpus > 1:
        # cores other work keeps busy; a process being started adds next to nothing to the 1-minute average
        share = min(share, max(1, int(cpus - load + 0.5)))
        why += f", load average {load:.1f}"
    return ThreadChoice(share, why)


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, help="CPU threads of this process (default: the CPUs it may use, "
                        "fewer when the machine is loaded or shared by torchrun's processes; OMP_NUM_THREADS "
                        "or MKL_NUM_THREADS, when set, decide instead)")


def data_line_note(run_info: dict | None) -> str:
    """', N CPU threads (why)' for a run's data line: what torch uses now, and why when the CLI chose it."""
    import torch
    why = ((run_info or {}).get("threads") or {}).get("why")
    return f", {torch.get_num_threads()} CPU threads" + (f" ({why})" if why else "")


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """Choose and set torch's intra-op thread count (call before heavy work; imports torch)."""
    choice = choose_threads(requested)                 # a bad value is refused before torch is imported
    import torch
    torch.set_num_threads(choice.threads)
    return choice
