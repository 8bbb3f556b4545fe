"""Benchmark suite: time, throughput and peak memory of the three ops and of the whole CMATH step.

    run_benchmarks(out_dir, quick=False, device="cpu")   # what `cmath-mer bench` calls
    python -m cmath_mer.benchmark --out DIR [--quick] [--device cpu|cuda]

One *case* is a plain dict (op, backend, mode, batch, N, D, ...). `sweep(quick, device)` lists the cases
(the registry); `run_case(case)` builds the inputs, times the call and measures its peak memory;
`run_benchmarks` runs every case in a fresh subprocess (so one case's memory, allocator state or
crash never touches another), then writes DIR/results.json, DIR/results.md and DIR/*.png.
The pytest-benchmark smoke tests in benchmarks/ call the same `build_case` over tiny shapes.

What is measured (shared/design/KERNELS.md, "Speed targets"):
* ops: multi_source_attention (S = 1 and 2 sources), reconstruction_loss, variational_fusion, forward
  and forward + backward, per backend: `torch` (the eager reference), `torch_compile` (the reference
  under torch.compile), `sdpa_flash` / `sdpa_efficient` / `sdpa_math` (attention only: torch's
  scaled_dot_product_attention on conversations padded to the longest one, with a key padding mask when
  the batch is ragged; inputs are padded before the clock starts, so SDPA is timed as a bare kernel) and
  `triton` (CUDA only: the interpreter on a CPU measures nothing meaningful).
* model: one CMATH training step (forward + backward + AdamW step) and inference (eval forward without
  the loss), iemocap preset dimensions, on one conversation of N utterances or a ragged mix.
* batches: `equal` = max(1, 2048 // N) conversations of exactly N utterances; `ragged` = conversation
  lengths drawn uniformly from [N/8, N] (the first one is N) until at least max(2048, 2N) utterances;
  `mix16x100` = 16 conversations of 80..120 utterances (an IEMOCAP-like training batch).
* time: median, p20, p80. CPU: wall clock after a warm-up call (a case whose first call already takes
  longer than `long_call_s` is timed by that one call, which is then flagged). CUDA: CUDA events around
  each call after warm-up (`triton.testing.do_bench` for calls under 100 ms).
* peak memory: CUDA: torch.cuda.max_memory_allocated after reset, minus what was allocated before the call.
  CPU: the case runs alone in a fresh process; its peak RSS (VmHWM) is reset through /proc/self/clear_refs
  after setup, and peak = VmHWM after the calls minus the resident set size measured after setup (a tiny version of the case has run, so code pages and lazy start-up are
  resident; inputs, model and optimizer state allocated; the training case takes one tiny step first so
  AdamW's state exists). It counts everything the call touches (tensors, kernel
  workspaces, allocator slack), like the memory a user would see. If setup itself peaked higher than
  the call, the number is an upper bound and the row says so.
* work: FLOP and byte counts from the real (unpadded, in-conversation) pairs only, so padding shows up as
  lost throughput. GFLOP/s and GB/s are reported beside the device's measured ceilings (a large matmul
  and a large copy, measured in the same run).
A case that would exceed the per-case time or memory budget (extrapolated from the previous length of
the same series) is skipped with the reason recorded; a case that fails records the error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import bench_long
from .packing import cu_seqlens_from

ATTN_BACKENDS = ("torch", "torch_compile", "sdpa_flash", "sdpa_efficient", "sdpa_math", "triton")
OP_BACKENDS = ("torch", "torch_compile", "triton")
H_HEADS = 8                     # attention heads in the op benchmarks (the iemocap model: 8 x 32)
REC_K, REC_M = 256, 1582        # reconstruction: d_hidden -> the audio width of the iemocap preset
VAR_C, VAR_Z = 3, 256           # variational fusion: 3 central modalities, latent width 256

# --------------------------------------------------------------------------------------------- batches


def conversation_lengths(batch: str, N: int, seed: int = 0, min_utterances: int = 2048) -> list[int]:
    """The conversation lengths of a benchmark batch (deterministic in batch, N, seed)."""
    if batch == "equal":
        return [N] * max(1, min_utterances // N)
    if batch == "ragged":
        rng = random.Random(seed * 1_000_003 + N)
        lengths, total, lo = [N], N, max(1, N // 8)
        while total < max(min_utterances, 2 * N):
            n = rng.randint(lo, N)
            lengths.append(n)
            total += n
        return lengths
    if batch == "mix16x100":
        rng = random.Random(seed)
        return [rng.randint(80, 120) for _ in range(16)]
    if batch == "one":
        return [N]
    raise ValueError(f"unknown batch kind {batch!r}")


def _lengths(case: dict) -> list[int]:
    return conversation_lengths(case["batch"], case["N"], min_utterances=case.get("min_utterances", 2048))


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _elem(name: str) -> int:
    return 4 if name == "fp32" else 2


# ------------------------------------------------------------------------------------------- registry


def _case(op, backend, N, *, mode="fwdbwd", batch="equal", D=32, S=1, dtype="fp32", device="cpu"):
    return dict(op=op, backend=backend, N=N, mode=mode, batch=batch, D=D, S=S, dtype=dtype, device=device)


def series_key(case: dict) -> tuple:
    """Cases that differ only in N form one series (one line in a plot)."""
    return tuple((k, case[k]) for k in ("op", "backend", "mode", "batch", "D", "S", "dtype", "device"))


def sweep(quick: bool, device: str, long: bool = False) -> list[dict]:
    """The registry: every case of a run, in the order they run (N ascending within a series).
    long: the long-conversation cases of bench_long.py instead (windowed attention and training step,
    65,536 to 1,048,576 utterances)."""
    if long:
        return bench_long.long_cases(device, _case)
    cuda = device == "cuda"
    cases: list[dict] = []
    dtypes = ("fp32", "bf16") if cuda else ("fp32",)
    op_backends = ("torch", "torch_compile", "triton") if cuda else ("torch", "torch_compile")
    attn_backends = (("torch", "torch_compile", "sdpa_flash", "sdpa_efficient", "sdpa_math", "triton") if cuda
                     else ("torch", "torch_compile", "sdpa_flash", "sdpa_efficient", "sdpa_math"))
    if quick:
        attn_N = {"equal": (256, 2048, 8192), "ragged": (256, 2048)}
        compile_N = (2048,)
        Ds, modes = (32,), ("fwdbwd",)
        lin_N = (1024, 8192, 32768)
        var_N = (1024, 8192, 32768)
        math_max_N = 2048          # SDPA math materialises N x S*N scores: 6-12 GiB at 8,192 on a CPU
    else:
        attn_N = {"equal": (128, 512, 2048, 8192, 32768, 65536, 131072),
                  "ragged": (128, 512, 2048, 8192, 32768, 65536)}
        compile_N = None
        Ds, modes = (32, 64), ("fwd", "fwdbwd")
        lin_N = (1024, 4096, 16384, 65536, 262144)
        var_N = (1024, 4096, 16384, 65536, 262144, 1048576)
        math_max_N = None
    for dtype in dtypes:
        for mode in modes:
            for S in (1, 2):
                for D in Ds:
                    for batch, Ns in attn_N.items():
                        for backend in attn_backends:
                            for N in Ns:
                                if backend == "torch_compile" and compile_N is not None and \
                                        (N not in compile_N or batch != "equal"):
                                    continue
                                if backend == "sdpa_math" and math_max_N is not None and N > math_max_N:
                                    continue
                                cases.append(_case("attention", backend, N, mode=mode, batch=batch, D=D, S=S,
                                                   dtype=dtype, device=device))
            for backend in op_backends:
                for N in lin_N:
                    cases.append(_case("reconstruction", backend, N, mode=mode, batch="one", dtype=dtype,
                                       device=device))
                for N in var_N:
                    if quick and backend == "torch_compile" and not cuda:
                        continue           # inductor on CPU did not finish compiling this op in 13 minutes
                    cases.append(_case("variational", backend, N, mode=mode, batch="one", dtype=dtype,
                                       device=device))
    model_backends = ("torch", "torch_compile", "triton") if cuda else ("torch", "torch_compile")
    if quick:
        train = [("mix16x100", 100, b) for b in model_backends if cuda or b == "torch"]
        train += [("one", N, "torch") for N in (2048, 4096, 8192, 10000)]
        if cuda:
            train += [("one", N, "triton") for N in (2048, 8192, 10000, 65536)]
        infer = [("mix16x100", 100, "torch"), ("one", 10000, "torch")]
        if cuda:
            infer += [("mix16x100", 100, "triton"), ("one", 10000, "triton")]
    else:
        train = [("mix16x100", 100, b) for b in model_backends]
        train += [("one", N, b) for b in model_backends for N in (128, 512, 2048, 4096, 8192, 10000, 16384,
                                                                   32768, 65536)]
        train += [("ragged", N, b) for b in model_backends for N in (512, 2048, 8192)]
        infer = [("mix16x100", 100, b) for b in model_backends]
        infer += [("one", N, b) for b in model_backends for N in (2048, 8192, 32768, 65536)]
    for batch, N, backend in train:
        cases.append(_case("train_step", backend, N, mode="train", batch=batch, D=32, device=device))
    for batch, N, backend in infer:
        cases.append(_case("inference", backend, N, mode="infer", batch=batch, D=32, device=device))
    # the whole training step as train.py runs it (engine.Stepper: autocast, loss scaling where fp16, clip,
    # AdamW, device-side meters), eager and compiled, fp32 and bf16 (issue 10); triton on CUDA
    step_backends = ("torch", "torch_compile", "triton", "triton_compile") if cuda else ("torch", "torch_compile")
    for batch, N in (("mix16x100", 100), ("one", 4096)):
        for backend in step_backends:
            for dtype in ("fp32", "bf16"):
                cases.append(_case("engine_step", backend, N, mode="train", batch=batch, D=32, dtype=dtype,
                                   device=device))
    return cases


# ------------------------------------------------------------------------------------- building cases


class Unavailable(RuntimeError):
    """The backend cannot run this case on this machine (recorded as the row's reason)."""


def build_case(case: dict):
    """Inputs for `case` and the call to time. Returns (fn, info); info holds utterances, flops, bytes."""
    dev = torch.device(case["device"])
    if case["backend"].startswith("triton") and dev.type != "cuda":
        raise Unavailable("triton is benchmarked on CUDA only (the CPU interpreter measures nothing)")
    op = case["op"]
    if op == "attention":
        return _build_attention(case, dev)
    if op == "reconstruction":
        return _build_reconstruction(case, dev)
    if op == "variational":
        return _build_variational(case, dev)
    if op in ("train_step", "inference"):
        return _build_model(case, dev)
    if op == "engine_step":
        return _build_engine_step(case, dev)
    if op in bench_long.LONG_OPS:
        return bench_long.build(case, dev, sys.modules[__name__])
    raise ValueError(f"unknown op {op!r}")


def _maybe_compile(fn, backend):
    if backend != "torch_compile":
        return fn
    return torch.compile(fn)


def _fwdbwd(forward, leaves, mode, grad_out=None):
    """forward() -> tensor; returns the callable for mode 'fwd' (no grad graph) or 'fwdbwd'."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return forward()
        return call

    def call():
        for t in leaves:
            t.grad = None
        out = forward()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(grad_out)
        return out
    return call


def _build_attention(case, dev):
    from .kernels import multi_source_attention
    S, D, H, N, mode, backend = case["S"], case["D"], H_HEADS, case["N"], case["mode"], case["backend"]
    dt = _dtype(case["dtype"])
    lengths = _lengths(case)
    T = sum(lengths)
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = mode != "fwd"
    pairs = S * sum(n * n for n in lengths)
    flops = 4 * H * D * pairs * (3.5 if grad else 1.0)       # QK^T and PV; backward = 2.5x forward
    e = _elem(case["dtype"])
    thd = T * H * D * e
    nbytes = thd * (2 + 2 * S) + (thd * (4 + 4 * S) if grad else 0)
    info = dict(utterances=T, conversations=len(lengths), pairs=pairs, flops=flops, bytes=nbytes)

    if backend.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kind = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_math": SDPBackend.MATH}[backend]
        B, L = len(lengths), max(lengths)
        info["padded_pairs"] = S * B * L * L
        q = torch.zeros(B, H, L, D, dtype=dt)
        k = torch.zeros(B, H, S * L, D, dtype=dt)
        v = torch.zeros(B, H, S * L, D, dtype=dt)
        mask = None
        if len(set(lengths)) > 1:                            # key padding mask, broadcast over queries
            mask = torch.zeros(B, 1, 1, S * L, dtype=torch.bool)
        for b, n in enumerate(lengths):
            q[b, :, :n] = torch.randn(H, n, D, generator=g).to(dt)
            for s in range(S):
                k[b, :, s * L:s * L + n] = torch.randn(H, n, D, generator=g).to(dt)
                v[b, :, s * L:s * L + n] = torch.randn(H, n, D, generator=g).to(dt)
                if mask is not None:
                    mask[b, :, :, s * L:s * L + n] = True
        q, k, v = (t.to(dev).requires_grad_(grad) for t in (q, k, v))
        mask = mask.to(dev) if mask is not None else None
        do = torch.randn(q.shape, generator=g).to(dt).to(dev) if grad else None

        def forward():
            with sdpa_kernel([kind]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        call = _fwdbwd(forward, (q, k, v), mode, do)
        try:                                                 # "No available kernel" -> Unavailable
            call()
        except RuntimeError as err:
            raise Unavailable(f"{backend}: {str(err).strip().splitlines()[0][:300]}") from None
        return call, info

    cu = cu_seqlens_from(lengths, device=dev)
    q = torch.randn(T, H, D, generator=g).to(dt).to(dev).requires_grad_(grad)
    k = torch.randn(S, T, H, D, generator=g).to(dt).to(dev).requires_grad_(grad)
    v = torch.randn(S, T, H, D, generator=g).to(dt).to(dev).requires_grad_(grad)
    do = torch.randn(T, H, D, generator=g).to(dt).to(dev) if grad else None
    impl = "triton" if backend == "triton" else "torch"
    fn = _maybe_compile(lambda q, k, v, cu: multi_source_attention(q, k, v, cu, backend=impl), backend)
    return _fwdbwd(lambda: fn(q, k, v, cu), (q, k, v), mode, do), info


def _build_reconstruction(case, dev):
    from .kernels import reconstruction_loss
    T, mode, backend, dt = case["N"], case["mode"], case["backend"], _dtype(case["dtype"])
    grad = mode != "fwd"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, REC_K, generator=g).to(dt).to(dev).requires_grad_(grad)
    w = (torch.randn(REC_M, REC_K, generator=g) * REC_K ** -0.5).to(dt).to(dev).requires_grad_(grad)
    b = torch.zeros(REC_M).to(dt).to(dev).requires_grad_(grad)
    x = torch.randn(T, REC_M, generator=g).to(dt).to(dev)
    impl = "triton" if backend == "triton" else "torch"
    fn = _maybe_compile(lambda h, w, b, x: reconstruction_loss(h, w, b, x, backend=impl), backend)
    e = _elem(case["dtype"])
    flops = 2 * T * REC_K * REC_M * (3 if grad else 1)
    nbytes = e * (T * REC_K + T * REC_M + REC_M * REC_K)
    if grad:
        nbytes += e * (2 * T * REC_K + T * REC_M + 2 * REC_M * REC_K)
    info = dict(utterances=T, conversations=1, flops=flops, bytes=nbytes)
    return _fwdbwd(lambda: fn(h, w, b, x), (h, w, b), mode), info


def _build_variational(case, dev):
    from .kernels import variational_fusion
    T, mode, backend, dt = case["N"], case["mode"], case["backend"], _dtype(case["dtype"])
    grad = mode != "fwd"
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(VAR_C, T, VAR_Z, generator=g).to(dt).to(dev).requires_grad_(grad)
    logvar = torch.randn(VAR_C, T, VAR_Z, generator=g).to(dt).to(dev).requires_grad_(grad)
    impl = "triton" if backend == "triton" else "torch"

    def op(mu, logvar):
        z, mu_f, logvar_f, kl_p, kl_c = variational_fusion(mu, logvar, seed=0, sample=True, backend=impl)
        return z.float().sum() + kl_p + kl_c                 # every output reaches the backward
    fn = _maybe_compile(op, backend)
    e = _elem(case["dtype"])
    nbytes = e * T * VAR_Z * (2 * VAR_C + 3)
    if grad:
        nbytes += e * T * VAR_Z * (4 * VAR_C + 3)
    info = dict(utterances=T, conversations=1, flops=0, bytes=nbytes)
    return _fwdbwd(lambda: fn(mu, logvar), (mu, logvar), mode), info


def _model_batch(cfg, lengths, dev, seed=0):
    from .data.dataset import Batch
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(T, cfg.input_dims[m], generator=g).to(dev) for m in cfg.modalities}
    speakers = torch.randint(0, cfg.num_speakers, (T,), generator=g).to(dev)
    labels = torch.randint(0, cfg.num_classes, (T,), generator=g).to(dev)
    return Batch(feats, speakers, labels, cu_seqlens_from(lengths, device=dev))


def _build_model(case, dev):
    from .config import preset
    from .model import CMATH
    backend = case["backend"]
    impl = "triton" if backend == "triton" else "torch"
    cfg = preset("iemocap", backend=impl)
    torch.manual_seed(0)
    model = CMATH(cfg).to(dev)
    lengths = _lengths(case)
    batch = _model_batch(cfg, lengths, dev)
    info = dict(utterances=sum(lengths), conversations=len(lengths), flops=0, bytes=0,
                recompute_from=cfg.recompute_from)
    fwd = _maybe_compile(model, backend)
    if case["op"] == "inference":
        model.eval()

        def call():
            with torch.no_grad():
                return fwd(batch, seed=0, with_loss=False).logits
        return call, info
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tiny = _model_batch(cfg, [8, 8], dev, seed=1)             # one tiny step: AdamW state exists before
    model(tiny, seed=0).loss.backward()                       # the memory baseline is taken
    opt.step()
    opt.zero_grad(set_to_none=True)

    def call():
        out = fwd(batch, seed=0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss
    return call, info


def _build_engine_step(case, dev):
    """One optimizer step of train.py's engine on a fixed batch: `torch`/`triton` = the ops' backend,
    `*_compile` = engine.compile_model; dtype = the autocast precision (weights stay fp32)."""
    from . import engine
    from .config import preset
    from .model import CMATH
    backend = case["backend"]
    cfg = preset("iemocap", backend="triton" if backend.startswith("triton") else "torch")
    torch.manual_seed(0)
    model = CMATH(cfg).to(dev).train()
    lengths = _lengths(case)
    batch = _model_batch(cfg, lengths, dev)
    info = dict(utterances=sum(lengths), conversations=len(lengths), flops=0, bytes=0,
                recompute_from=cfg.recompute_from)
    forward = engine.compile_model(model) if backend.endswith("_compile") else model
    meter = engine.StepMeter(dev)
    step = engine.Stepper(model, forward, engine.make_optimizer(model, 1e-4, 0.01, case["dtype"]),
                          engine.Precision(case["dtype"], dev), 1.0, meter)
    step([_model_batch(cfg, [8, 8], dev, seed=1)], 0, 0)    # AdamW state exists before the memory baseline
    counter = [1]

    def call():
        step([batch], 0, counter[0])                          # a new variational seed each step, as in training
        counter[0] += 1
        return meter.sums[engine.StepMeter.LOSS]
    return call, info


# --------------------------------------------------------------------------------- timing and memory


def cpu_threads() -> int:
    """Intra-op threads on the CPU: env CMATH_BENCH_THREADS, default every core. On a machine shared with
    other busy processes, 1 thread is often faster and far steadier than oversubscribed OpenMP threads."""
    env = os.environ.get("CMATH_BENCH_THREADS")
    return max(1, int(env)) if env else (os.cpu_count() or 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0). ru_maxrss cannot be
    reset and, after fork + exec, starts at the *parent's* peak, so it is only the fallback."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm() is not None
    except OSError:
        return False


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes(hwm: bool) -> int:
    return (_vm_hwm() or 0) if hwm else _maxrss_bytes()


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _quantiles(times: list[float]) -> dict:
    t = torch.tensor(sorted(times), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return dict(median_s=q[0], p20_s=q[1], p80_s=q[2], min_s=float(t[0]))


def measure(call, device: str, *, reps: int = 10, budget_s: float = 10.0, long_call_s: float = 5.0,
            first_call_is_sample: bool = True) -> dict:
    """Time `call` and measure its peak memory. Returns the timing/memory part of a row."""
    res: dict = {}
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        res["mem_method"] = "cuda max_memory_allocated - allocated before the call"
        res["first_call_s"] = first
        if first < 0.1:
            import triton.testing
            q = triton.testing.do_bench(call, warmup=25, rep=max(100, int(budget_s * 100)),
                                        quantiles=[0.5, 0.2, 0.8])
            res.update(median_s=q[0] / 1e3, p20_s=q[1] / 1e3, p80_s=q[2] / 1e3, reps="do_bench",
                       timer="triton.testing.do_bench")
            return res
        times = []
        call()                                               # warm-up (compile caches, autotune)
        start = time.perf_counter()
        while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        res.update(_quantiles(times), reps=len(times), timer="cuda events")
        return res

    gc.collect()
    base = _rss_bytes()
    hwm = _reset_peak_rss()                                  # VmHWM := current RSS, when the kernel allows
    before = _peak_rss_bytes(hwm)
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    res["first_call_s"] = first
    times = []
    if first_call_is_sample and first >= long_call_s:
        times = [first]
        res["single_call"] = True                            # too long to repeat: the first call is the sample
    else:
        start = time.perf_counter()
        while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    after = _peak_rss_bytes(hwm)
    res.update(_quantiles(times), reps=len(times), timer="wall clock (perf_counter), warm-up call first")
    res["peak_mem_bytes"] = max(0, after - base)
    res["mem_method"] = ("peak RSS (VmHWM, reset after setup via /proc/self/clear_refs) - RSS after setup"
                         if hwm else "ru_maxrss after the calls - RSS after setup (fresh process)")
    if after <= before:
        res["mem_upper_bound"] = True                        # setup peaked higher than the call did
    res["rss_after_setup_bytes"] = base
    return res


def run_case(case: dict, *, quick: bool = True, warm_tiny: bool = True) -> dict:
    """Build and measure one case in this process. Returns the row (case fields + results)."""
    row = dict(case)
    dev = case["device"]
    if dev == "cpu":
        torch.set_num_threads(cpu_threads())
    row["threads"] = torch.get_num_threads()
    try:
        if dev == "cpu" and warm_tiny:
            # Run a tiny version of the case first: libtorch's code pages, oneDNN/OpenMP start-up and lazy
            # module state then sit in the RSS *before* the baseline is taken, so the peak counts the
            # call's data, not the ~300 MiB of code a first call pages in.
            tiny_call, _ = build_case(dict(case, N=min(case["N"], 16), min_utterances=32,
                                           backend="torch" if case["backend"] == "torch_compile"
                                           else case["backend"]))
            tiny_call()
            del tiny_call
        call, info = build_case(case)
    except Unavailable as err:
        row.update(status="unavailable", reason=str(err))
        return row
    row.update(info)
    compiled = case["backend"] == "torch_compile"
    try:
        if compiled:                                         # compile outside the clock and the memory
            t0 = time.perf_counter()
            call()
            row["compile_s"] = time.perf_counter() - t0
        res = measure(call, dev, reps=5 if quick else 10, budget_s=3.0 if quick else 10.0,
                      long_call_s=3.0 if quick else 10.0)
    except Exception as err:                                 # noqa: BLE001 - recorded in the row
        row.update(status="error", reason=f"{type(err).__name__}: {str(err).strip()[:400]}")
        return row
    row.update(res, status="ok")
    med = row["median_s"]
    row["utterances_per_s"] = row["utterances"] / med if med > 0 else None
    if row.get("flops"):
        row["gflops_per_s"] = row["flops"] / med / 1e9
    if row.get("bytes"):
        row["gbytes_per_s"] = row["bytes"] / med / 1e9
    return row


# ------------------------------------------------------------------------------------ machine ceilings


def machine_info(device: str) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=_cpu_model(), cpu_cores=os.cpu_count(),
                torch_threads=cpu_threads() if device == "cpu" else torch.get_num_threads())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
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


def measure_ceilings(device: str, quick: bool) -> dict:
    """Achievable matmul FLOP/s and copy bandwidth of this device, measured now."""
    out = {}
    if device == "cuda":
        import triton.testing
        n = 8192
        for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("fp32_tf32", torch.float32, True),
                               ("fp32_ieee", torch.float32, False)):
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device="cuda", dtype=dt)
            ms = triton.testing.do_bench(lambda: a @ a, warmup=50, rep=300)
            torch.backends.cuda.matmul.allow_tf32 = prev
            out[f"matmul_tflops_{name}"] = 2 * n ** 3 / ms / 1e9
            del a
        x = torch.empty(2**28, device="cuda", dtype=torch.float32)      # 1 GiB
        y = torch.empty_like(x)
        ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
        out["copy_gbytes_per_s"] = 2 * x.numel() * 4 / ms / 1e6
        del x, y
        torch.cuda.empty_cache()
        return out
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


# ------------------------------------------------------------------------------ orchestration (sweep)


def _run_in_subprocess(case: dict, quick: bool, timeout_s: float) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "cmath_mer.benchmark", "--worker"] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, input=json.dumps(case), capture_output=True, text=True, timeout=timeout_s,
                           env=env)
    except subprocess.TimeoutExpired:
        return dict(case, status="skipped", reason=f"exceeded the per-case time budget: killed after "
                                                   f"{timeout_s:.0f} s (the hard limit, 2.5 x budget + 60 s, "
                                                   "covers setup and compile)", wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            row = json.loads(line)
            row["wall_s"] = wall
            return row
    tail = (p.stderr or p.stdout or "").strip().splitlines()[-3:]
    why = "killed by the OS (out of memory?)" if p.returncode in (-9, 137) else " | ".join(tail)[:400]
    return dict(case, status="error", reason=f"worker exited {p.returncode}: {why}", wall_s=wall)


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def _growth(case: dict) -> tuple[float, float]:
    """(time exponent, memory exponent) in N for extrapolating the next case of a series."""
    op = case["op"]
    if op in ("attention", "train_step", "inference", "engine_step"):
        return 2.0, (2.0 if case["backend"] == "sdpa_math" else 1.0)
    return 1.0, 1.0


def _predicted_skip(case: dict, last: dict | None, time_budget: float, mem_budget: float) -> str | None:
    if case["op"] == "attention" and case["backend"] == "sdpa_math":
        lengths = _lengths(case)
        scores = len(lengths) * H_HEADS * max(lengths) * case["S"] * max(lengths) * _elem(case["dtype"])
        need = scores * (3 if case["mode"] != "fwd" else 1)
        if need > mem_budget:
            return (f"predicted memory {need / 2**30:.1f} GiB (the math backend materialises the "
                    f"{len(lengths)}x{H_HEADS}x{max(lengths)}x{case['S'] * max(lengths)} score matrix) "
                    f"> budget {mem_budget / 2**30:.1f} GiB")
    if not last or last.get("status") != "ok":
        if last and last.get("status") in ("skipped",) and "budget" in last.get("reason", ""):
            return f"a shorter length of this series already exceeded its budget (N={last['N']})"
        return None
    ratio = case["N"] / last["N"]
    pt, pm = _growth(case)
    calls = 1 + (1 if case["backend"].endswith("_compile") else 0)
    t_pred = last.get("first_call_s", last["median_s"]) * ratio ** pt * calls
    if t_pred > time_budget:
        return (f"predicted {t_pred:.0f} s (extrapolated from {last['median_s']:.3g} s at N={last['N']}) "
                f"> per-case time budget {time_budget:.0f} s")
    m_pred = last.get("peak_mem_bytes", 0) * ratio ** pm
    if m_pred > mem_budget:
        return (f"predicted peak memory {m_pred / 2**30:.1f} GiB > budget {mem_budget / 2**30:.1f} GiB")
    return None


def run_benchmarks(out_dir, quick: bool = False, device: str = "cpu", *, cases: list[dict] | None = None,
                   time_budget_s: float | None = None, progress: bool = True, append: bool = False,
                   note: str | None = None) -> dict:
    """Run the sweep; write out_dir/results.json, results.md and the PNG plots. Returns the results dict.
    append: keep the rows of an earlier out_dir/results.json (a long sweep run in several sittings); a case
    run again replaces its old row, and each sitting's time and load average are listed under `sittings`."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cmath-mer bench: --device cuda but torch sees no CUDA device")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = sweep(quick, device) if cases is None else cases
    time_budget = time_budget_s or (300.0 if quick else 600.0)
    t_start = time.perf_counter()
    results = dict(
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=device, quick=quick, machine=machine_info(device),
        ceilings=measure_ceilings(device, quick),
        settings=dict(per_case_time_budget_s=time_budget, attention_heads=H_HEADS,
                      reconstruction_K_M=[REC_K, REC_M], variational_C_Z=[VAR_C, VAR_Z],
                      model="iemocap preset (d_model 256, 8 heads, 2 CMA layers, 3 modalities)"),
        rows=[],
    )
    if note:
        results["note"] = note
    if append and (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
        again = {_case_id(c) for c in cases}
        results["rows"] = [r for r in earlier["rows"] if _case_id(r) not in again]
        results.setdefault("note", earlier.get("note"))
        results["sittings"] = earlier.get("sittings", [dict(timestamp=earlier["timestamp"],
                                                            machine=earlier["machine"])])
    last: dict[tuple, dict] = {}
    probes: dict[tuple, str | None] = {}
    for i, case in enumerate(cases):
        key = series_key(case)
        mem_budget = 0.6 * _available_bytes(device)
        why = _predicted_skip(case, last.get(key), time_budget, mem_budget)
        probe = _probe_unavailable(case, probes)
        if probe:
            row = dict(case, status="unavailable", reason=probe)
        elif why:
            row = dict(case, status="skipped", reason=why)
        else:
            # a hard timeout a bit above the budget: setup and (for compile) the compile count too
            row = _run_in_subprocess(case, quick, timeout_s=time_budget * 2.5 + 60)
        last[key] = row
        results["rows"].append(row)
        if progress:
            print(_progress_line(i, len(cases), row), flush=True)
        _write_json(results, out / "results.json")               # partial results survive an interrupt
    results["total_s"] = time.perf_counter() - t_start
    try:
        with open("/proc/loadavg") as f:
            results["machine"]["loadavg_at_end"] = f.read().split()[:3]
    except OSError:
        pass
    if "sittings" in results:
        results["sittings"].append(dict(timestamp=results["timestamp"], machine=results["machine"],
                                        cases=len(cases), total_s=results["total_s"]))
    write_report(results, out)
    if progress:
        print(f"wrote {out}/results.json, results.md and plots in {results['total_s']:.0f} s")
    return results


def _case_id(case: dict) -> tuple:
    return series_key(case) + (case["N"],)


def _probe_unavailable(case: dict, probes: dict) -> str | None:
    """Whether the backend can run at all here (a tiny in-process call, once per backend and batch kind),
    so that an unavailable SDPA kernel or Triton on a CPU costs no subprocess."""
    if case["backend"] == "triton" and case["device"] != "cuda":
        return "triton is benchmarked on CUDA only (the CPU interpreter measures nothing)"
    if case["op"] != "attention" or not case["backend"].startswith("sdpa"):
        return None
    key = (case["backend"], case["batch"] == "equal", case["mode"], case["dtype"], case["device"])
    if key not in probes:
        tiny = dict(case, N=16, min_utterances=64)
        try:
            build_case(tiny)
            probes[key] = None
        except Unavailable as err:
            probes[key] = str(err)
        except Exception:                                    # noqa: BLE001 - let the real case report it
            probes[key] = None
    return probes[key]


def write_report(results: dict, out) -> None:
    """Ratios, ceiling fractions and summary into the results; results.json, results.md and the plots."""
    out = Path(out)
    _add_ratios(results["rows"])
    bench_long.add_doubling_ratios(results["rows"], series_key)
    _add_ceiling_fractions(results)
    results["summary"] = {**summarize(results), **bench_long.summarize(results["rows"])}
    _write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown_report(results))
    plot_results(results, out)
    bench_long.plot(results, out)


def _add_ceiling_fractions(results: dict) -> None:
    """pct_of_peak_flops / pct_of_peak_bw: achieved GFLOP/s and GB/s against the ceilings measured in the
    same run (matmul of the row's dtype; on CUDA fp32 rows are held against the TF32 matmul, the precision
    Triton's fp32 dots use by default)."""
    c = results.get("ceilings", {})
    for r in results["rows"]:
        if r.get("status") != "ok":
            continue
        if r["device"] == "cuda":
            peak = c.get("matmul_tflops_bf16") if r["dtype"] in ("bf16", "fp16") else c.get("matmul_tflops_fp32_tf32")
        else:
            peak = c.get("matmul_tflops_fp32")
        if r.get("gflops_per_s") and peak:
            r["pct_of_peak_flops"] = 100 * r["gflops_per_s"] / (peak * 1e3)
        if r.get("gbytes_per_s") and c.get("copy_gbytes_per_s"):
            r["pct_of_peak_bw"] = 100 * r["gbytes_per_s"] / c["copy_gbytes_per_s"]


def _write_json(results, path):
    Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")


def _progress_line(i, n, row) -> str:
    head = (f"[{i + 1}/{n}] {row['op']:<14} {row['backend']:<14} {row['mode']:<6} {row['batch']:<9} "
            f"N={row['N']:<6} D={row['D']} S={row['S']} {row['dtype']}")
    if row.get("status") == "ok":
        return (f"{head}  median {row['median_s'] * 1e3:10.2f} ms  {row['utterances_per_s']:12.0f} utt/s  "
                f"peak {row.get('peak_mem_bytes', 0) / 2**20:8.1f} MiB")
    return f"{head}  {row.get('status')}: {row.get('reason')}"


def _add_ratios(rows: list[dict]) -> None:
    """speedup_vs_torch = median(torch eager) / median(this backend), same shape, same run."""
    ref = {}
    for r in rows:
        if r.get("status") == "ok" and r["backend"] == "torch":
            ref[_shape_key(r)] = r
    for r in rows:
        t = ref.get(_shape_key(r))
        if r.get("status") == "ok" and t:
            r["speedup_vs_torch"] = t["median_s"] / r["median_s"]
            if t.get("peak_mem_bytes") and r.get("peak_mem_bytes") is not None:
                r["mem_vs_torch"] = r["peak_mem_bytes"] / t["peak_mem_bytes"]
    # the whole step: against the eager fp32 reference step of the same batch (the baseline)
    eager32 = {(r["batch"], r["N"]): r for r in rows if r.get("status") == "ok" and r["op"] == "engine_step"
               and r["backend"] == "torch" and r["dtype"] == "fp32"}
    for r in rows:
        t = eager32.get((r["batch"], r["N"])) if r["op"] == "engine_step" else None
        if r.get("status") == "ok" and t:
            r["speedup_vs_eager_fp32"] = t["median_s"] / r["median_s"]


def _shape_key(r) -> tuple:
    return tuple(r[k] for k in ("op", "mode", "batch", "N", "D", "S", "dtype", "device"))


def summarize(results: dict) -> dict:
    """The numbers the README quotes."""
    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    s: dict = {}

    def find(**kw):
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)
    for b in ("torch", "torch_compile", "triton"):
        r = find(op="train_step", backend=b, batch="mix16x100")
        if r:
            s[f"train_step_{b}_16x100_utt_per_s"] = r["utterances_per_s"]
        for N in (2048, 4096, 8192, 10000, 65536):
            r = find(op="train_step", backend=b, batch="one", N=N)
            if r:
                s[f"train_step_{b}_N{N}_utt_per_s"] = r["utterances_per_s"]
                s[f"train_step_{b}_N{N}_peak_mib"] = r["peak_mem_bytes"] / 2**20
        r = find(op="inference", backend=b, batch="mix16x100")
        if r:
            s[f"inference_{b}_16x100_utt_per_s"] = r["utterances_per_s"]
        r = find(op="inference", backend=b, batch="one", N=10000)
        if r:
            s[f"inference_{b}_N10000_utt_per_s"] = r["utterances_per_s"]
    for r in rows:
        if r["op"] == "engine_step":
            shape = "16x100" if r["batch"] == "mix16x100" else f"N{r['N']}"
            s[f"engine_step_{r['backend']}_{r['dtype']}_{shape}_utt_per_s"] = r["utterances_per_s"]
    a, c = find(op="train_step", backend="torch", batch="one", N=2048), \
        find(op="train_step", backend="torch", batch="one", N=8192)
    if a and c and a.get("peak_mem_bytes"):
        s["train_step_torch_peak_mem_ratio_8192_over_2048"] = c["peak_mem_bytes"] / a["peak_mem_bytes"]
    a, c = find(op="attention", backend="torch", batch="equal", N=2048, S=1, mode="fwdbwd"), \
        find(op="attention", backend="torch", batch="equal", N=8192, S=1, mode="fwdbwd")
    if a and c and a.get("peak_mem_bytes"):
        s["attention_torch_S1_peak_mem_ratio_8192_over_2048"] = c["peak_mem_bytes"] / a["peak_mem_bytes"]
    for r in rows:
        if r["op"] == "attention" and r["backend"].startswith("sdpa") and r.get("speedup_vs_torch"):
            s[f"attention_{r['mode']}_{r['batch']}_S{r['S']}_D{r['D']}_N{r['N']}_{r['dtype']}_torch_speedup_over_"
              f"{r['backend']}"] = 1.0 / r["speedup_vs_torch"]
    return s


# ------------------------------------------------------------------------------------ report and plots


def _fmt_time(s):
    if s is None:
        return ""
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_mib(b):
    return "" if b is None else f"{b / 2**20:,.1f}"


def _group_key(r) -> tuple:
    return (r["op"], r["mode"], r["batch"], r["D"], r["S"], r["dtype"])


def _group_title(op, mode, batch, D, S, dtype) -> str:
    if op == "attention":
        return f"multi_source_attention S={S} D={D} H={H_HEADS}, {mode}, {batch} batch, {dtype}"
    if op == "reconstruction":
        return f"reconstruction_loss K={REC_K} M={REC_M}, {mode}, {dtype}"
    if op == "variational":
        return f"variational_fusion C={VAR_C} Z={VAR_Z}, {mode}, {dtype}"
    if op == "train_step":
        return f"CMATH training step (fwd + bwd + AdamW), iemocap preset, {batch} batch"
    if op == "engine_step":
        return f"train.py's whole step (engine.Stepper: autocast, clip, AdamW, meters), iemocap preset, {batch} batch, {dtype}"
    if op == "attention_window":
        return f"multi_source_attention S={S} D={D} H={H_HEADS}, window {bench_long.WINDOW}, {mode}, one conversation, {dtype}"
    if op == "train_window":
        return f"CMATH training step, iemocap preset, window {bench_long.WINDOW}, one conversation"
    if op == "train_window_text":
        return f"CMATH training step, iemocap preset text-only, window {bench_long.WINDOW}, one conversation"
    return f"CMATH inference (eval forward), iemocap preset, {batch} batch"


def markdown_report(results: dict) -> str:
    m = results["machine"]
    lines = [f"# cmath-mer benchmark — {results['device']}: {m['device_name']}", "",
             f"{results['timestamp']} · {'quick' if results['quick'] else 'full'} sweep · "
             f"{m.get('cpu_cores')} CPU cores, {m.get('torch_threads')} torch threads · python {m['python']} · torch {m['torch']} · "
             f"triton {m.get('triton')}" + (f" · CUDA {m['cuda']}" if m.get("cuda") else "") +
             f" · load average at start {' '.join(m.get('loadavg_at_start', []))}, "
             f"at end {' '.join(m.get('loadavg_at_end', []))} · total {results.get('total_s', 0):.0f} s", ""]
    if results.get("note"):
        lines += [f"**Note.** {results['note']}", ""]
    for i, run in enumerate(results.get("sittings", [])):
        rm = run["machine"]
        lines.append(f"- sitting {i + 1}: {run['timestamp']}, load average at start "
                     f"{' '.join(rm.get('loadavg_at_start', []))}, at end {' '.join(rm.get('loadavg_at_end', []))}"
                     + (f", {run['cases']} cases in {run['total_s']:.0f} s" if run.get("total_s") else ""))
    if results.get("sittings"):
        lines.append("")
    c = results["ceilings"]
    lines += ["Measured ceilings: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                                for k, v in c.items()), ""]
    lines += ["Time: median (p20–p80) per call; utt/s = utterances in the batch / median; peak = peak memory "
              "of the call above what setup allocated (MiB); ×torch = torch-eager median / this median "
              "(>1 is faster), measured in this run. GFLOP/s and GB/s count real (unpadded, in-conversation) "
              "pairs only; (%) = share of this device's ceiling measured in this run. `1×` marks a case timed by "
              "a single call.", ""]
    if results.get("summary"):
        lines += ["## Summary", ""]
        lines += [f"- {k}: {v:,.4g}" for k, v in results["summary"].items()]
        lines.append("")
    groups: dict[tuple, list] = {}
    for r in results["rows"]:
        groups.setdefault(_group_key(r), []).append(r)
    for key, rows in groups.items():
        lines += [f"## {_group_title(*key)}", "",
                  "| N | utterances | backend | median | p20–p80 | utt/s | peak MiB | ×torch | GFLOP/s | GB/s | note |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: (r["N"], ATTN_BACKENDS.index(r["backend"])
                                             if r["backend"] in ATTN_BACKENDS else 9)):
            if r.get("status") != "ok":
                lines.append(f"| {r['N']} | {r.get('utterances', '')} | {r['backend']} | | | | | | | | "
                             f"{r.get('status')}: {str(r.get('reason', '')).replace('|', '/')[:160]} |")
                continue
            note = []
            if r.get("single_call"):
                note.append("1×")
            if r.get("mem_upper_bound"):
                note.append("peak ≤ (setup peaked higher)")
            if r.get("compile_s") is not None:
                note.append(f"compile {r['compile_s']:.1f} s")
            if r.get("time_ratio_per_doubling"):
                note.append(f"time x{r['time_ratio_per_doubling']:.2f} per doubling of N")
            if r.get("op") in bench_long.LONG_OPS and r.get("rss_after_setup_bytes") is not None:
                note.append(f"process peak {(r['peak_mem_bytes'] + r['rss_after_setup_bytes']) / 2**30:.2f} GiB")
            cells = [str(r["N"]), str(r["utterances"]), r["backend"], _fmt_time(r["median_s"]),
                     f"{_fmt_time(r['p20_s'])}–{_fmt_time(r['p80_s'])}", f"{r['utterances_per_s']:,.0f}",
                     _fmt_mib(r.get("peak_mem_bytes")),
                     f"{r['speedup_vs_torch']:.2f}" if r.get("speedup_vs_torch") else "",
                     f"{r['gflops_per_s']:.1f} ({r.get('pct_of_peak_flops', 0):.0f}%)" if r.get("gflops_per_s") else "",
                     f"{r['gbytes_per_s']:.1f} ({r.get('pct_of_peak_bw', 0):.0f}%)" if r.get("gbytes_per_s") else "",
                     ", ".join(note)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, out: Path) -> list[Path]:
    """One PNG per (op, mode, dtype): time and peak memory against N, one line per backend/batch/D/S."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs: dict[tuple, list] = {}
    for r in results["rows"]:
        if r.get("status") == "ok":
            figs.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    written = []
    dev = results["machine"]["device_name"]
    for (op, mode, dtype), rows in figs.items():
        lines: dict[tuple, list] = {}
        for r in rows:
            lines.setdefault((r["backend"], r["batch"], r["D"], r["S"]), []).append(r)
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for (backend, batch, D, S), rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r["N"])
            label = backend + (f" S={S}" if op == "attention" else "") + \
                (f" D={D}" if op == "attention" and results["quick"] is False else "") + f" ({batch})"
            style = "--" if batch == "ragged" else "-"
            xs = [r["N"] for r in rs]
            ax_t.plot(xs, [r["median_s"] * 1e3 for r in rs], style, marker="o", ms=3, label=label)
            mem = [(r["N"], r["peak_mem_bytes"] / 2**20) for r in rs if r.get("peak_mem_bytes")]
            if mem:
                ax_m.plot(*zip(*mem), style, marker="o", ms=3, label=label)
        for ax, yl in ((ax_t, "median time per call (ms)"), (ax_m, "peak memory of the call (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("conversation length N (utterances)")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.suptitle(f"{op} {mode} {dtype} — {results['device']}: {dev}", fontsize=10)
        fig.tight_layout()
        path = out / f"{op}_{mode}_{dtype}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------ entry point


def _worker(quick: bool) -> None:
    case = json.loads(sys.stdin.read())
    row = run_case(case, quick=quick)
    sys.stdout.write("\n" + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmath_mer.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out")
    p.add_argument("--only", help="run only these ops and/or backends (comma-separated, e.g. "
                   "attention_window,torch)")
    p.add_argument("--long", action="store_true", help="the long-conversation cases (bench_long.py): windowed "
                   "attention and training step at 65,536 to 1,048,576 utterances")
    p.add_argument("--note", help="a line for the report, e.g. what else the machine was running")
    p.add_argument("--append", action="store_true", help="keep the rows of an earlier DIR/results.json")
    p.add_argument("--max-n", type=int, help="run only cases with N at most this")
    p.add_argument("--min-n", type=int, help="run only cases with N at least this")
    p.add_argument("--time-budget", type=float, help="per-case time budget in seconds (default 600; 3600 "
                   "with --long)")
    p.add_argument("--report", action="store_true", help="only re-render DIR/results.md and plots from "
                   "DIR/results.json")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.quick)
        return 0
    if args.report:
        write_report(json.loads((Path(args.out) / "results.json").read_text()), args.out)
        return 0
    if not args.out:
        p.error("--out is required")
    cases = sweep(args.quick, args.device, long=args.long)
    if args.only:                                # ops and/or backends: a case matches every kind named
        names = set(args.only.split(","))
        ops, backends = names & {c["op"] for c in cases}, names & {c["backend"] for c in cases}
        cases = [c for c in cases if (not ops or c["op"] in ops) and (not backends or c["backend"] in backends)]
    if args.max_n:
        cases = [c for c in cases if c["N"] <= args.max_n]
    if args.min_n:
        cases = [c for c in cases if c["N"] >= args.min_n]
    budget = args.time_budget or (3600.0 if args.long else None)
    run_benchmarks(args.out, quick=args.quick, device=args.device, cases=cases, time_budget_s=budget,
                   append=args.append, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
