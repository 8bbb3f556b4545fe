"""Variational fusion (CMATH.md step 4): fine-grained views F_c -> one coarse latent z.

Per central modality c: (mu_c, logvar_c) = Linear(F_c). The experts are fused as a product of Gaussians
with a standard-normal prior expert (kernels.variational_fusion):
    P = 1 + sum_c exp(-logvar_c),  var = 1/P,  mu = var * sum_c mu_c exp(-logvar_c)
    z = mu + sqrt(var) * eps (training),  z = mu (evaluation)
The op also returns KL(N(mu, var) || N(0, I)) and the latent distillation term of step 6.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import variational_fusion

LOGVAR_BOUND = 8.0   # logvar = 8 tanh(raw / 8): keeps exp(-logvar) finite without cutting gradients (ours)


class VariationalFusion(nn.Module):
    def __init__(self, centrals: tuple[str, ...], d_model: int, d_latent: int, detach_teacher: bool,
                 backend: str | None):
        super().__init__()
        self.experts = nn.ModuleDict({c: nn.Linear(d_model, 2 * d_latent) for c in centrals})
        self.detach_teacher, self.backend = detach_teacher, backend

    def forward(self, fine: dict[str, torch.Tensor], *, seed: int, sample: bool, eps_offset: int = 0):
        # fine: c -> F_c (T, d). Returns z, mu_f, logvar_f (T, d_z) and kl_prior, kl_consistency (scalars)
        params = torch.stack([self.experts[c](f) for c, f in fine.items()])          # (C, T, 2 d_z)
        mu, raw_logvar = params.chunk(2, dim=-1)                                     # (C, T, d_z) each
        logvar = LOGVAR_BOUND * torch.tanh(raw_logvar / LOGVAR_BOUND)
        return variational_fusion(mu.contiguous(), logvar.contiguous(), seed=seed, sample=sample,
                                  detach_teacher=self.detach_teacher, eps_offset=eps_offset, backend=self.backend)
