"""Reference variational fusion (CMATH.md step 4 and the latent half of step 6), in PyTorch.

Product of Gaussian experts with a standard-normal prior expert:
    P = 1 + sum_c exp(-logvar_c),  var_f = 1 / P,  mu_f = var_f * sum_c mu_c * exp(-logvar_c)
A confident expert (small logvar_c) dominates the fused mean; a noisy one fades.
"""
from __future__ import annotations

import torch

from .philox import philox_randn


def gaussian_kl(mu_p: torch.Tensor, logvar_p: torch.Tensor, mu_q: torch.Tensor,
                logvar_q: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_p, exp(logvar_p)) || N(mu_q, exp(logvar_q)))."""
    return 0.5 * (logvar_q - logvar_p + (logvar_p.exp() + (mu_p - mu_q) ** 2) * (-logvar_q).exp() - 1.0)


def naive_variational_fusion(mu: torch.Tensor, logvar: torch.Tensor, *, seed: int, sample: bool,
                             detach_teacher: bool = True, eps_offset: int = 0):
    """mu, logvar: (C, T, Z). Returns (z, mu_f, logvar_f, kl_prior, kl_consistency).

    z, mu_f, logvar_f: (T, Z); kl_prior and kl_consistency are scalars (mean over T, sum over C and Z).
    eps[t, j] = word m % 4 of tl.randn4x(seed, m // 4), m = eps_offset + t * Z + j (philox.py): the Triton
    kernel draws the very same numbers.
    eps_offset = (rows before this batch) * Z when the batch is one part of a larger one (a rank's share of a
    distributed step, a micro-batch): the parts together draw what the whole batch draws.
    """
    C, T, Z = mu.shape
    precision = torch.exp(-logvar)                                        # (C, T, Z)
    precision_f = 1.0 + precision.sum(0)                                  # (T, Z), prior expert adds 1
    logvar_f = -torch.log(precision_f)
    mu_f = (mu * precision).sum(0) / precision_f                          # (T, Z)
    if sample:
        eps = philox_randn(seed, T * Z, mu.device, eps_offset).view(T, Z).to(mu.dtype)
        z = mu_f + torch.exp(0.5 * logvar_f) * eps
    else:
        z = mu_f
    zeros = torch.zeros_like(mu_f)
    kl_prior = gaussian_kl(mu_f, logvar_f, zeros, zeros).sum() / T
    mu_t, logvar_t = (mu_f.detach(), logvar_f.detach()) if detach_teacher else (mu_f, logvar_f)
    kl_consistency = gaussian_kl(mu_t, logvar_t, mu, logvar).sum() / T   # broadcasts over C
    return z, mu_f, logvar_f, kl_prior, kl_consistency
