"""Modality Reconstruction (CMATH.md step 1): a U-Net of 1-D convolutions along the utterance axis that
compresses each modality to a code z_m and reconstructs it, trained with a Frobenius-norm loss.

    encoder: a1 = GELU(convk(x, d_m -> d_h));  z = convk(a1, d_h -> d)          z: (T, d)
    decoder: b1 = GELU(convk(z, d -> d_h)) + a1   (U-Net skip)
             x_hat = b1 W^T + b  (pointwise d_h -> d_m), never materialised:
    L_rec(m) = ||x - x_hat||_F^2 / (T d_m)  = kernels.reconstruction_loss(b1, W, b, x)

convk has kernel 3 (each code also reads the previous and next utterance: the reading of the paper) or
kernel 1 (`rec_kernel` 1: pointwise, each utterance compressed on its own, so all context comes from the
CMA-Transformer's attention, which `window` controls).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmath_mer.kernels import reconstruction_loss


class PackedConv1d(nn.Module):
    """Conv1d, kernel 3 (or 1), 'same' padding, over packed conversations: taps that would reach into the
    previous or next conversation read zeros, exactly as if each conversation were padded on its own.
    Kernel 1 is a pointwise linear map (W_self only): no utterance reads its neighbours."""

    def __init__(self, d_in: int, d_out: int, kernel: int = 3):
        super().__init__()
        if kernel not in (1, 3):
            raise ValueError(f"PackedConv1d: kernel must be 1 or 3, got {kernel}")
        self.taps = nn.Linear(d_in, kernel * d_out, bias=False)   # kernel 3: [W_prev; W_self; W_next]
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.d_out, self.kernel = d_out, kernel

    def forward(self, x: torch.Tensor, has_prev: torch.Tensor, has_next: torch.Tensor) -> torch.Tensor:
        # x: (T, d_in); has_prev/has_next: (T, 1) -> (T, d_out)
        if self.kernel == 1:
            return self.taps(x) + self.bias
        p_prev, p_self, p_next = self.taps(x).split(self.d_out, dim=-1)   # each (T, d_out)
        y = p_self + self.bias
        y = y + F.pad(p_prev[:-1], (0, 0, 1, 0)) * has_prev               # row t gets W_prev x[t-1]
        y = y + F.pad(p_next[1:], (0, 0, 0, 1)) * has_next                # row t gets W_next x[t+1]
        return y


class ModalityReconstruction(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_model: int, backend: str | None = None, kernel: int = 3):
        super().__init__()
        self.enc1 = PackedConv1d(d_in, d_hidden, kernel)
        self.enc2 = PackedConv1d(d_hidden, d_model, kernel)
        self.dec1 = PackedConv1d(d_model, d_hidden, kernel)
        self.out = nn.Linear(d_hidden, d_in)                             # pointwise projection d_h -> d_m
        self.backend = backend

    def forward(self, x: torch.Tensor, has_prev: torch.Tensor, has_next: torch.Tensor,
                with_loss: bool = True, input_dropout: float = 0.0,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: (T, d_m) -> z: (T, d), L_rec: scalar. The encoder reads x with input_dropout (training only);
        # the loss reconstructs the clean x. valid: the real rows of a padded batch (Batch.valid); the loss
        # is then the sum over the real rows divided by T M, as if the padding rows had a zero residual.
        x_in = F.dropout(x, input_dropout, self.training) if input_dropout else x
        a1 = F.gelu(self.enc1(x_in, has_prev, has_next))                 # (T, d_h)
        z = self.enc2(a1, has_prev, has_next)                            # (T, d)
        if not with_loss:
            return z, None
        b1 = F.gelu(self.dec1(z, has_prev, has_next)) + a1               # (T, d_h)
        if valid is not None:
            # a padding row reads h = 0 and the target b: its residual 0 W^T + b - b is exactly 0 in every
            # implementation (the ops cast b and the target alike), so it adds nothing to the loss or gradients
            keep = valid[:, None]
            b1 = torch.where(keep, b1, 0.0)
            x = torch.where(keep, x, self.out.bias.detach().to(x.dtype))
        loss = reconstruction_loss(b1, self.out.weight, self.out.bias, x, backend=self.backend)
        return z, loss

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, has_prev: torch.Tensor, has_next: torch.Tensor) -> torch.Tensor:
        """x_hat (T, d_m), for inspection only; training never builds it."""
        a1 = F.gelu(self.enc1(x, has_prev, has_next))
        b1 = F.gelu(self.dec1(self.enc2(a1, has_prev, has_next), has_prev, has_next)) + a1
        return self.out(b1)
