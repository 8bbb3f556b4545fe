"""What every case builder shares: dtypes, the forward or forward + backward call to time, a model batch and
a training step whose optimizer state exists before the memory baseline is taken."""
from __future__ import annotations

import torch

from cmath_mer.kernels.cu_seqlens import cu_seqlens_from


class Unavailable(RuntimeError):
    """The backend cannot run this case on this machine (recorded as the row's reason)."""


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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
    from cmath_mer.data.dataset import Batch
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(T, cfg.input_dims[m], generator=g).to(dev) for m in cfg.modalities}
    speakers = torch.randint(0, cfg.num_speakers, (T,), generator=g).to(dev)
    labels = torch.randint(0, cfg.num_classes, (T,), generator=g).to(dev)
    return Batch(feats, speakers, labels, cu_seqlens_from(lengths, device=dev), max_seqlen=max(lengths))


def training_step(model, cfg, batch, dev, forward=None):
    """The call for one training step (forward + backward + AdamW) of `model` on `batch`. One tiny step runs
    first, so AdamW's state exists before the memory baseline is taken."""
    from cmath_mer.training.engine import make_optimizer
    forward = model if forward is None else forward
    opt = make_optimizer(model, 1e-4, 0.01)                  # train.py's AdamW (the fused one)
    model(model_batch(cfg, [8, 8], dev, seed=1), seed=0).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    def call():
        out = forward(batch, seed=0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss
    return call
