"""Variational fusion (CMATH.md step 4): fine-grained views F_c -> one coarse latent z.

Per central modality c: (mu_c, logvar_c) = Linear(F_c). The experts are fused as a product of Gaussians
with a standard-normal prior expert (kernels.variational_fusion):
    P = 1 + sum_c exp(-logvar_c),  var = 1/P,  mu = var * sum_c mu_c exp(-logvar_c)
    z = mu + sqrt(var) * eps (training),  z = mu (evaluation)
The op also returns KL(N(mu, var) || N(0, I)) and the latent distillation term of step 6.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from cmath_mer.kernels import variational_fusion

LOGVAR_BOUND = 8.0   # logvar = 8 tanh(raw / 8): keeps exp(-logvar) finite without cutting gradients (ours)
RECOMPUTE_ROWS = 8192   # rows per piece of the fusion of a long batch (forward_recomputed)


class VariationalFusion(nn.Module):
    def __init__(self, centrals: tuple[str, ...], d_model: int, d_latent: int, detach_teacher: bool,
                 backend: str | None):
        super().__init__()
        self.experts = nn.ModuleDict({c: nn.Linear(d_model, 2 * d_latent) for c in centrals})
        self.detach_teacher, self.backend = detach_teacher, backend

    def forward(self, fine: dict[str, torch.Tensor], *, seed: int, sample: bool, eps_offset: int = 0,
                valid: torch.Tensor | None = None):
        # fine: c -> F_c (T, d). Returns z, mu_f, logvar_f (T, d_z) and kl_prior, kl_consistency (scalars).
        # valid: the real rows of a padded batch (Batch.valid); the KL terms are then their sums over the real
        # rows divided by T
        params = torch.stack([self.experts[c](f) for c, f in fine.items()])          # (C, T, 2 d_z)
        mu, raw_logvar = params.chunk(2, dim=-1)                                     # (C, T, d_z) each
        logvar = LOGVAR_BOUND * torch.tanh(raw_logvar / LOGVAR_BOUND)
        if valid is not None:        # padding rows: every expert N(0, 1), no gradient back to them
            keep = valid[None, :, None]
            mu, logvar = torch.where(keep, mu, 0.0), torch.where(keep, logvar, 0.0)
        out = variational_fusion(mu.contiguous(), logvar.contiguous(), seed=seed, sample=sample,
                                 detach_teacher=self.detach_teacher, eps_offset=eps_offset, backend=self.backend)
        if valid is None:
            return out
        # C standard-normal experts and the prior fuse to N(0, 1/(1+C)): a padding row adds the same known
        # constant to each KL term's sum (for kl_consistency once per expert); taken out here
        C, T, Z = mu.shape
        per_row = 0.5 * Z * (math.log1p(C) + 1.0 / (1 + C) - 1.0)
        padding = (T - valid.sum()) * (per_row / T)
        z, mu_f, logvar_f, kl_prior, kl_consistency = out
        return z, mu_f, logvar_f, kl_prior - padding, kl_consistency - C * padding

    def forward_recomputed(self, fine: dict[str, torch.Tensor], *, seed: int, sample: bool, eps_offset: int = 0,
                           rows: int | None = None, valid: torch.Tensor | None = None):
        """forward(), for long batches (model.py): the same outputs, computed and recomputed in pieces of
        `rows` rows (default RECOMPUTE_ROWS); see _FusionInPieces."""
        names = tuple(fine)
        params = tuple(self.parameters())
        return _FusionInPieces.apply(self, names, RECOMPUTE_ROWS if rows is None else rows, seed, sample,
                                     eps_offset, valid, len(names), *fine.values(), *params)


class _FusionInPieces(torch.autograd.Function):
    """The fusion of a long batch, `rows` rows at a time, forward and backward.

    The fusion is row by row except for its two means over T. Done for the whole batch at once, its
    backward holds ~15 (C, T, d_z)-sized temporaries (the experts' parameters, tanh, exp, the KL terms):
    45 (T, 256) tensors at C = 3, once the peak of a long step. Here the forward runs each piece without
    a graph and writes it into the (T, d_z) outputs; the backward recomputes one piece at a time and
    writes its input gradients into (T, d) buffers. Checkpointing each piece would do the same maths,
    but it keeps every piece's outputs and gradients as separate blocks of a few MiB between short-lived
    temporaries, and glibc's heap, which serves blocks under 32 MiB, then kept ~20 (T, d) tensors' worth
    of freed memory it could not hand back (measured at 262,144 rows); preallocated outputs leave the
    pieces nothing to keep. eps is drawn by the row's index in the whole batch (eps_offset), so each
    piece draws what the whole batch would; the means are sums of the pieces' shares. The fusion draws
    no torch random numbers, so its recomputation gives the very same values."""

    @staticmethod
    def forward(ctx, fusion, names, rows, seed, sample, eps_offset, valid, n_fine, *tensors):
        fine = tensors[:n_fine]
        T, Z = fine[0].shape[0], fusion.experts[names[0]].out_features // 2
        outs, kl_prior, kl_consistency = None, 0.0, 0.0
        for a in range(0, T, rows):
            n = min(rows, T - a)
            out = fusion({c: f[a:a + n] for c, f in zip(names, fine)}, seed=seed, sample=sample,
                         eps_offset=eps_offset + a * Z, valid=None if valid is None else valid[a:a + n])
            if outs is None:                                    # z, mu_f, logvar_f: (T, d_z), the pieces' dtype
                outs = [p.new_empty(T, Z) for p in out[:3]]
            for buf, piece in zip(outs, out[:3]):
                buf[a:a + n].copy_(piece)
            kl_prior = kl_prior + out[3] * (n / T)              # each piece's mean over its n rows
            kl_consistency = kl_consistency + out[4] * (n / T)
        ctx.save_for_backward(*fine, *(() if valid is None else (valid,)))
        # the backward recomputes under the forward's autocast state, as torch.utils.checkpoint does
        dev = fine[0].device.type
        ctx.autocast = dict(device_type=dev, enabled=torch.is_autocast_enabled(dev),
                            dtype=torch.get_autocast_dtype(dev))
        ctx.args = (fusion, names, rows, seed, sample, eps_offset, n_fine)
        return (*outs, kl_prior, kl_consistency)

    @staticmethod
    def backward(ctx, *grads):
        fusion, names, rows, seed, sample, eps_offset, n_fine = ctx.args
        fine, valid = ctx.saved_tensors[:n_fine], (ctx.saved_tensors[n_fine:] or (None,))[0]
        params = tuple(fusion.parameters())
        T, Z = fine[0].shape[0], fusion.experts[names[0]].out_features // 2
        d_fine = [torch.zeros_like(f) for f in fine]
        d_params = [torch.zeros_like(p) for p in params]
        for a in range(0, T, rows):
            n = min(rows, T - a)
            pieces = [f[a:a + n].detach().requires_grad_() for f in fine]
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = fusion(dict(zip(names, pieces)), seed=seed, sample=sample, eps_offset=eps_offset + a * Z,
                             valid=None if valid is None else valid[a:a + n])
                out = (*out[:3], out[3] * (n / T), out[4] * (n / T))
                used = [(o, g if g.dim() == 0 else g[a:a + n]) for o, g in zip(out, grads)
                        if g is not None and o.requires_grad]
                got = torch.autograd.grad([o for o, _ in used], [*pieces, *params], [g for _, g in used],
                                          allow_unused=True)
            for buf, g in zip(d_fine, got[:len(pieces)]):
                if g is not None:
                    buf[a:a + n].copy_(g)
            for buf, g in zip(d_params, got[len(pieces):]):
                if g is not None:
                    buf.add_(g)
        return (None,) * 8 + tuple(d_fine) + tuple(d_params)
