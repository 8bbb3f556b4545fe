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
from torch.utils.checkpoint import checkpoint

from .kernels import variational_fusion

LOGVAR_BOUND = 8.0   # logvar = 8 tanh(raw / 8): keeps exp(-logvar) finite without cutting gradients (ours)
RECOMPUTE_ROWS = 8192   # rows per recomputed piece of the fusion (forward_recomputed)


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

    def forward_recomputed(self, fine: dict[str, torch.Tensor], *, seed: int, sample: bool, eps_offset: int = 0,
                           rows: int | None = None):
        """forward(), each piece of `rows` rows checkpointed on its own (long batches, model.py).

        The fusion is row by row except for its two means over T, and its recompute in the backward holds
        ~15 (C, T, d_z)-sized temporaries (the experts' parameters, tanh, exp, the KL terms): recomputed for
        the whole batch at once, that was the peak of a long step (45 (T, 256) tensors at C = 3). Piece by
        piece it holds one piece's worth. eps is drawn by the row's index in the whole batch (eps_offset),
        so every piece draws what the whole batch would; the means become sums of the pieces' shares."""
        rows = RECOMPUTE_ROWS if rows is None else rows
        T = next(iter(fine.values())).shape[0]
        Z = self.experts[next(iter(fine))].out_features // 2
        pieces = {c: f.split(rows) for c, f in fine.items()}   # split, not slices: one backward (a cat)
        outs, kl_prior, kl_consistency = [], 0.0, 0.0
        for i, a in enumerate(range(0, T, rows)):
            n = min(rows, T - a)
            z, mu_f, logvar_f, kp, kc = checkpoint(self, {c: p[i] for c, p in pieces.items()}, seed=seed,
                                                   sample=sample, eps_offset=eps_offset + a * Z,
                                                   use_reentrant=False)
            outs.append((z, mu_f, logvar_f))
            kl_prior = kl_prior + kp * (n / T)                # each piece's mean over its n rows
            kl_consistency = kl_consistency + kc * (n / T)
        z, mu_f, logvar_f = (torch.cat(o) for o in zip(*outs))
        return z, mu_f, logvar_f, kl_prior, kl_consistency
