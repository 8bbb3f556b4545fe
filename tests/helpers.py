"""Shared test utilities: relative-norm error, ragged batch layouts, triton availability."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from cmath_mer.kernels.cu_seqlens import cu_seqlens_from  # noqa: F401  (re-exported for the tests)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (a zero reference compares the absolute norm)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"




def reconstruction_inputs(T, M, K, dtype, seed):
    """h (T, K), weight (M, K) scaled by 1/sqrt(K), bias (M,), target (T, M): seeded, drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, K, generator=g, dtype=torch.float64)
    w = torch.randn(M, K, generator=g, dtype=torch.float64) / K ** 0.5
    b = torch.randn(M, generator=g, dtype=torch.float64)
    target = torch.randn(T, M, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (h, w, b, target)]


def write_csv(path: Path, header, rows) -> Path:
    """A UTF-8 CSV of a header and rows, as a user's transcript table would be."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def train_interrupted_after_epoch_1(data, config, tcfg, out):
    """Train into `out`, stop it by an exception right after epoch 1 is logged, then --resume it to the end;
    returns the resumed run's metrics (to compare with an uninterrupted run's)."""
    import pytest

    from cmath_mer.training.train import train

    class Interrupt(Exception):
        pass

    def stop_after_first(line):
        if line.startswith("epoch   1/"):
            raise Interrupt
    with pytest.raises(Interrupt):
        train(data, config, tcfg, out, progress=False, log=stop_after_first)
    return train(data, config, tcfg, out, resume=True, progress=False, log=lambda *_: None)


def assert_compiled_step_equals_eager(model, batch, seed: int, **compile_kwargs) -> None:
    """torch.compile(model, fullgraph=True, backend="aot_eager", **compile_kwargs) (a graph break raises) gives
    the eager model's loss (1e-5) and every parameter gradient (1e-4) on `batch`, drawing `seed`."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", **compile_kwargs)
    out = compiled(batch, seed=seed)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    eager = model(batch, seed=seed)
    eager.loss.backward()
    assert_rel_close("loss", out.loss.detach(), eager.loss.detach(), 1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_rel_close(f"grad {n}", grads[n], p.grad, 1e-4)
