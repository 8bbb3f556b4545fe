"""What every case builder shares: dtypes, the forward or forward + backward call to time, a model batch and
the training step `train` runs, whose optimizer state exists before the memory baseline is taken."""
from __future__ import annotations

import torch

from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.batch import Batch
from cmath_mer.training.meter import StepMeter
from cmath_mer.training.precision import DTYPES, Precision
from cmath_mer.training.step import make_optimizer, make_stepper


class Unavailable(RuntimeError):
    """The backend cannot run this case on this machine (recorded as the row's reason)."""


def dtype_of(name: str) -> torch.dtype:
    return DTYPES[name]


def elem_size(name: str) -> int:
    return 4 if name == "fp32" else 2


def maybe_compile(fn, backend):
    if backend != "torch_compile":
        return fn
    return torch.compile(fn)


def fwdbwd(forward, leaves, mode, grad_out=None):
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


def model_batch(cfg, lengths, dev, seed=0):
    """A packed batch of random features, speakers and labels for the model `cfg` describes."""
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(T, cfg.input_dims[m], generator=g).to(dev) for m in cfg.modalities}
    speakers = torch.randint(0, cfg.num_speakers, (T,), generator=g).to(dev)
    labels = torch.randint(0, cfg.num_classes, (T,), generator=g).to(dev)
    return Batch(feats, speakers, labels, cu_seqlens_from(lengths, device=dev), max_seqlen=max(lengths))


def training_step(model, cfg, batch, dev, forward=None, precision: str = "fp32", cuda_graphs: bool = False,
                  warm_batch=None):
    """The call for one optimizer step of `model` on `batch`: the step `train` runs (training/step.py: autocast
    in `precision`, backward, clip, AdamW, device-side meters), eager through `forward` or replayed from CUDA
    graphs. One step on `warm_batch` (default: a tiny batch) runs first, so AdamW's state exists before the
    memory baseline is taken (a compiled forward compiles there, on the batch it passes)."""
    meter = StepMeter(dev)
    step = make_stepper(model, make_optimizer(model, 1e-4, 0.01), Precision(precision, dev), 1.0, meter,
                        forward=forward, cuda_graphs=cuda_graphs)
    step([model_batch(cfg, [8, 8], dev, seed=1) if warm_batch is None else warm_batch], 0, 0)
    counter = [1]

    def call():
        step([batch], 0, counter[0])                          # a new variational seed each step, as in training
        counter[0] += 1
        return meter.sums[StepMeter.LOSS]
    return call
