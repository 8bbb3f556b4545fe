"""Shared test utilities: relative-norm error, ragged batch layouts, triton availability."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cmath_mer.cli import main
from cmath_mer.data import Batch
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.config import CMATHConfig

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


# --------------------------------------------------------------- model inputs (small configs, random batches)

DIMS = {"text": 24, "audio": 17, "visual": 9}


def small_config(modalities=("text", "audio", "visual"), **kw) -> CMATHConfig:
    base = dict(num_classes=4, class_names=("a", "b", "c", "d"), num_speakers=3, d_model=32, n_heads=4,
                n_layers=2, d_hidden=24, dropout=0.0)
    return CMATHConfig(modalities=modalities, input_dims={m: DIMS[m] for m in modalities}, **{**base, **kw})


def random_batch(lengths, modalities=("text", "audio", "visual"), seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    labels = torch.randint(0, 4, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.2] = -100
    return Batch({m: torch.randn(T, DIMS[m], generator=g) for m in modalities},
                 torch.randint(0, 3, (T,), generator=g), labels, cu_seqlens_from(lengths))


# ---------------------------------------------------------- attention: the float64 definition and its inputs

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.float64: 1e-10}


def make_inputs(lengths, S, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k = torch.randn(S, T, H, D, generator=g).to(dtype)
    v = torch.randn(S, T, H, D, generator=g).to(dtype)
    do = torch.randn(T, H, D, generator=g).to(dtype)
    return q, k, v, do, cu_seqlens_from(lengths)


def grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


# --------------------------------------------------------------------------- CUDA graphs without a GPU

class StandInGraphs:
    """eager(fn) runs fn; capture(fn) runs nothing (as a capture executes nothing) and returns a graph whose
    replay runs fn again."""

    def __init__(self):
        self.captures = 0

    def eager(self, fn):
        fn()

    def capture(self, fn):
        self.captures += 1
        return type("Replay", (), {"replay": staticmethod(fn)})()


# ------------------------------------------------------------------------------------- command-line errors

def refused(capsys, argv, code, *words) -> str:
    """`cmath-mer argv` exits with `code` and one line on stderr (no traceback) holding every one of `words`."""
    assert main(argv) == code, capsys.readouterr()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# --------------------------------------------------------------- featurize: a small table and a fake encoder

HEADER = ["conversation_id", "utterance_id", "speaker", "text", "label", "split"]
ROWS = [  # conversation b first; a's rows out of order; d is unlabelled
    ["b", 0, "Cy", "I am so angry.", "anger", "test"],
    ["a", 1, "Ann", "Hello there!", "joy", "train"],
    ["a", 0, "Bob", "Hi.", "neutral", "train"],
    ["b", 2, "Cy", "No!", "anger", "test"],
    ["b", 1, "Ann", "Calm down.", "neutral", "test"],
    ["a", 2, "Ann", "Hi.", "", "train"],
]


class FakeModel:
    """Stands in for a SentenceTransformer: a vector from the text's hash; counts what it encodes."""

    def __init__(self):
        self.encoded: list[str] = []

    def encode(self, texts, batch_size, convert_to_tensor, show_progress_bar):
        self.encoded += texts
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], dtype=np.uint8) for t in texts]
        return torch.tensor(np.stack(rows), dtype=torch.float32) / 255


def fake_encoder():
    """A TextEncoder around FakeModel (8-d vectors)."""
    from cmath_mer.featurize.text import TextEncoder
    return TextEncoder(FakeModel(), {"kind": "fake", "name": "fake", "fingerprint": "0" * 16, "dim": 8})
