"""Training throughput of 1 process against N processes (torchrun): the 16 x ~100 workload (iemocap preset:
d = 256, 8 heads, 2 layers, text/audio/visual of widths 1024/1582/342; steps of about 1,600 utterances, i.e.
16 conversations of 90-110 utterances), fp32, the torch reference path, `train` as users run it.

    OMP_NUM_THREADS=1 python benchmarks/ddp_scaling.py OUT.json                      # 1 process
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/ddp_scaling.py OUT.json

Writes (rank 0) the utterances/s of each epoch (training time only, as metrics.json has it), the CPU seconds
each process spent in `train` (evaluation included: on a machine shared with other jobs the wall-clock
speed-up depends on the cores the others leave free, the CPU time of the same work does not), the load
average before and after, and the machine. Epoch 1 includes the warm-up; the result is the mean of the rest.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

import torch

from cmath_mer.data import make_synthetic
from cmath_mer.training import distributed
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.prepare import build_config
from cmath_mer.training.train import train

CONVERSATIONS, STEP, EPOCHS = 72, 1600, 6


def main(out: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed.setup("cpu")
    ctx = distributed.context()
    load_before = os.getloadavg()
    data = make_synthetic("iemocap", conversations=CONVERSATIONS, min_length=90, max_length=110, seed=0,
                          split_fractions=(0.9, 0.1, 0.0))
    config = build_config(data, "iemocap")
    tcfg = TrainConfig(epochs=EPOCHS, batch_utterances=STEP, baseline=False, device="cpu", seed=0)
    folder = tempfile.mkdtemp(prefix="ddp-scaling-") if ctx.main else None
    folder = distributed.broadcast(folder)
    t0, cpu0 = time.perf_counter(), time.process_time()
    metrics = train(data, config, tcfg, folder, progress=False, log=print if ctx.main else (lambda *_: None))
    cpu = distributed.all_gather(time.process_time() - cpu0)      # CPU seconds of each process in train()
    per_epoch = [row["utterances_per_second"] for row in metrics["history"]]
    if ctx.main:
        result = {"processes": ctx.world_size, "threads_per_process": torch.get_num_threads(),
                  "utterances_per_second_per_epoch": per_epoch,
                  "utterances_per_second": sum(per_epoch[1:]) / len(per_epoch[1:]),
                  "wall_seconds": time.perf_counter() - t0, "cpu_seconds_per_process": cpu,
                  "cpu_seconds": sum(cpu), "load_average_before": load_before,
                  "load_average_after": os.getloadavg(), "cpu": _cpu(), "cores": os.cpu_count(),
                  "torch": torch.__version__, "python": platform.python_version(),
                  "workload": f"{CONVERSATIONS} conversations of 90-110 utterances (90% train), steps of about "
                              f"{STEP} utterances, iemocap preset, fp32, torch reference path"}
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result))
    distributed.teardown()


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main(sys.argv[1])
