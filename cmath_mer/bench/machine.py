"""The machine a run measured: versions, CPU or GPU, load average, free memory, and the device's ceilings
(a large matmul and a large copy, measured in the same run)."""
from __future__ import annotations

import os
import platform
import time

import torch

from cmath_mer.data.memory import available_bytes as host_available_bytes
from cmath_mer.kernels.utils import tf32_allowed


def cpu_threads() -> int:
    """Intra-op threads on the CPU: env CMATH_BENCH_THREADS, default every core. On a machine shared with
    other busy processes, 1 thread is often faster and far steadier than oversubscribed OpenMP threads."""
    env = os.environ.get("CMATH_BENCH_THREADS")
    return max(1, int(env)) if env else (os.cpu_count() or 1)


def load_average() -> list[str] | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


def machine_info(device: str) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=_cpu_model(), cpu_cores=os.cpu_count(),
                torch_threads=cpu_threads() if device == "cpu" else torch.get_num_threads())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    load = load_average()
    if load is not None:
        info["loadavg_at_start"] = load
    try:
        with open("/proc/meminfo") as f:
            meminfo = {line.split(":")[0]: int(line.split()[1]) for line in f}
        info["mem_total_gib"] = round(meminfo["MemTotal"] / 2**20, 1)
        if "MemAvailable" in meminfo:      # on a shared machine: what the other jobs left to this run
            info["mem_available_gib_at_start"] = round(meminfo["MemAvailable"] / 2**20, 1)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
        info["device_name"] = p.name
    else:
        info["device_name"] = info["cpu"]
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_bytes(device: str) -> int:
    """Free memory of the CUDA card, or what the host has available (data/memory.py reads it)."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    return host_available_bytes()


def measure_ceilings(device: str, quick: bool) -> dict:
    """Achievable matmul FLOP/s and copy bandwidth of this device, measured now."""
    if device == "cuda":
        return _cuda_ceilings()
    out = {}
    torch.set_num_threads(cpu_threads())
    n = 1024 if quick else 2048
    a = torch.randn(n, n)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    out["matmul_tflops_fp32"] = 2 * n ** 3 / min(times) / 1e12
    x = torch.empty(2**25)                                   # 128 MiB
    x.fill_(1.0)
    y = torch.empty_like(x)
    y.fill_(0.0)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    out["copy_gbytes_per_s"] = 2 * x.numel() * 4 / min(times) / 1e9
    out["note"] = "best of 5: a %dx%d fp32 matmul, a 128 MiB copy (read + write)" % (n, n)
    return out


def _cuda_ceilings() -> dict:
    import triton.testing
    out = {}
    n = 8192
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("fp32_tf32", torch.float32, True),
                           ("fp32_ieee", torch.float32, False)):
        prev = tf32_allowed()                          # the legacy flag's getter raises after the new API
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dt)
        ms = triton.testing.do_bench(lambda a=a: a @ a, warmup=50, rep=300)
        torch.backends.cuda.matmul.allow_tf32 = prev
        out[f"matmul_tflops_{name}"] = 2 * n ** 3 / ms / 1e9
        del a
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)      # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda x=x, y=y: y.copy_(x), warmup=25, rep=200)
    out["copy_gbytes_per_s"] = 2 * x.numel() * 4 / ms / 1e6
    del x, y
    torch.cuda.empty_cache()
    return out
