"""`build_case`: the inputs of a case and the call to time, for every op of the registry."""
from __future__ import annotations

import time

import torch

from cmath_mer.bench import long
from cmath_mer.bench.attention import build_attention
from cmath_mer.bench.calls import Unavailable, dtype_of, elem_size, fwdbwd, maybe_compile, model_batch, training_step
from cmath_mer.bench.cases import LONG_OPS, REC_K, REC_M, VAR_C, VAR_Z, case_lengths
from cmath_mer.kernels import reconstruction_loss, variational_fusion
from cmath_mer.kernels.reconstruction.chunked import chunked_reconstruction_loss
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset
from cmath_mer.training.step import compile_model


def build_case(case: dict):
    """Inputs for `case` and the call to time. Returns (fn, info); info holds utterances, flops, bytes."""
    dev = torch.device(case["device"])
    if case["backend"].startswith("triton") and dev.type != "cuda":
        raise Unavailable("triton is benchmarked on CUDA only (the CPU interpreter measures nothing)")
    op = case["op"]
    if op == "attention":
        return build_attention(case, dev)
    if op == "reconstruction":
        return _build_reconstruction(case, dev)
    if op == "variational":
        return _build_variational(case, dev)
    if op in ("train_step", "inference"):
        return _build_model(case, dev)
    if op == "engine_step":
        return _build_engine_step(case, dev)
    if op in LONG_OPS:
        return long.build(case, dev)
    raise ValueError(f"unknown op {op!r}")


def _build_reconstruction(case, dev):
    T, mode, backend, dt = case["N"], case["mode"], case["backend"], dtype_of(case["dtype"])
    grad = mode != "fwd"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, REC_K, generator=g).to(dt).to(dev).requires_grad_(grad)
    w = (torch.randn(REC_M, REC_K, generator=g) * REC_K ** -0.5).to(dt).to(dev).requires_grad_(grad)
    b = torch.zeros(REC_M).to(dt).to(dev).requires_grad_(grad)
    x = torch.randn(T, REC_M, generator=g).to(dt).to(dev)
    if backend == "chunked":                         # row chunks on cuBLAS (kernels/reconstruction/chunked.py)
        fn = chunked_reconstruction_loss
    elif backend == "triton":                        # the Triton kernels (auto runs the chunks on CUDA)
        from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss as fn  # needs Triton
    else:
        impl = "triton" if backend == "triton" else "torch"
        fn = maybe_compile(lambda h, w, b, x: reconstruction_loss(h, w, b, x, backend=impl), backend)
    e = elem_size(case["dtype"])
    flops = 2 * T * REC_K * REC_M * (3 if grad else 1)
    nbytes = e * (T * REC_K + T * REC_M + REC_M * REC_K)
    if grad:
        nbytes += e * (2 * T * REC_K + T * REC_M + 2 * REC_M * REC_K)
    info = dict(utterances=T, conversations=1, flops=flops, bytes=nbytes)
    return fwdbwd(lambda: fn(h, w, b, x), (h, w, b), mode), info


def _build_variational(case, dev):
    T, mode, backend, dt = case["N"], case["mode"], case["backend"], dtype_of(case["dtype"])
    grad = mode != "fwd"
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(VAR_C, T, VAR_Z, generator=g).to(dt).to(dev).requires_grad_(grad)
    logvar = torch.randn(VAR_C, T, VAR_Z, generator=g).to(dt).to(dev).requires_grad_(grad)
    impl = "triton" if backend == "triton" else "torch"

    def op(mu, logvar):
        z, mu_f, logvar_f, kl_p, kl_c = variational_fusion(mu, logvar, seed=0, sample=True, backend=impl)
        return z.float().sum() + kl_p + kl_c                 # every output reaches the backward
    fn = maybe_compile(op, backend)
    e = elem_size(case["dtype"])
    nbytes = e * T * VAR_Z * (2 * VAR_C + 3)
    if grad:
        nbytes += e * T * VAR_Z * (4 * VAR_C + 3)
    info = dict(utterances=T, conversations=1, flops=0, bytes=nbytes)
    return fwdbwd(lambda: fn(mu, logvar), (mu, logvar), mode), info


def _build_model(case, dev):
    backend = case["backend"]
    cfg = preset("iemocap", backend="triton" if backend == "triton" else "torch")
    torch.manual_seed(0)
    model = CMATH(cfg).to(dev)
    lengths = case_lengths(case)
    batch = model_batch(cfg, lengths, dev)
    info = dict(utterances=sum(lengths), conversations=len(lengths), flops=0, bytes=0,
                recompute_from=cfg.recompute_from)
    fwd = maybe_compile(model, backend)
    if case["op"] == "inference":
        model.eval()

        def call():
            with torch.no_grad():
                return fwd(batch, seed=0, with_loss=False).logits
        return call, info
    model.train()
    return training_step(model, cfg, batch, dev, forward=fwd), info


def _build_engine_step(case, dev):
    """One optimizer step of train.py's engine on a fixed batch: `torch`/`triton` = the ops' backend,
    `*_compile` = compile_model, `triton_graphs` = `train --cuda-graphs` (the step replayed from a
    CUDA graph; its first call captures); dtype = the autocast precision (weights stay fp32)."""
    backend = case["backend"]
    cfg = preset("iemocap", backend="triton" if backend.startswith("triton") else "torch")
    torch.manual_seed(0)
    model = CMATH(cfg).to(dev).train()
    lengths = case_lengths(case)
    batch = model_batch(cfg, lengths, dev)
    info = dict(utterances=sum(lengths), conversations=len(lengths), flops=0, bytes=0,
                recompute_from=cfg.recompute_from)
    forward = compile_model(model) if backend.endswith("_compile") else model
    compiled = backend.endswith("_compile")
    # a compiled step compiles in its warm-up step, on the case's own batch: inductor guards a graph by ranges of
    # the sizes it was built for (one built at 16 utterances held for 5..16 only), so a small warm-up batch
    # would cost a second compile at the first timed call
    t0 = time.perf_counter()
    call = training_step(model, cfg, batch, dev, forward=forward, precision=case["dtype"],
                         cuda_graphs=backend.endswith("_graphs"), warm_batch=batch if compiled else None)
    if compiled:
        info["build_compile_s"] = time.perf_counter() - t0
    return call, info
