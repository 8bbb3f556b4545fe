"""Reference reconstruction loss: the decoder's last projection, squared error and mean, in PyTorch.

This one does write the (T, M) reconstruction; the Triton kernel beside it never does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_reconstruction_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              target: torch.Tensor) -> torch.Tensor:
    """h: (T, K); weight: (M, K); bias: (M,); target: (T, M) -> scalar sum(err**2) / (T * M)."""
    x_hat = torch.addmm(bias, h, weight.t())                              # (T, M)
    return F.mse_loss(x_hat, target, reduction="sum") / target.numel()    # no (T, M) temporaries beyond x_hat
