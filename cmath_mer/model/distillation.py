"""Hierarchical distillation (CMATH.md step 6): the coarse representation teaches each fine-grained one.

    logit level:  tau^2 * KL(softmax(coarse / tau) || softmax(fine_c / tau)), summed over c, mean over t
    latent level: KL(N(mu, var) || N(mu_c, var_c)), summed over c and latent dims, mean over t
                  (computed inside kernels.variational_fusion as kl_consistency, beside the fusion it uses)
The teacher (coarse side) is a constant when detach_teacher (default), so distillation moves the students.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_distillation(coarse: torch.Tensor, fine: list[torch.Tensor], tau: float,
                       detach_teacher: bool = True) -> torch.Tensor:
    # coarse: (T, n_classes); fine: C tensors (T, n_classes) -> scalar
    teacher = coarse.detach() if detach_teacher else coarse
    log_p_teacher = F.log_softmax(teacher / tau, dim=-1)
    total = coarse.new_zeros(())
    for student in fine:
        log_p_student = F.log_softmax(student / tau, dim=-1)
        total = total + F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return tau ** 2 * total


def hierarchical_distillation(coarse: torch.Tensor, fine: list[torch.Tensor], kl_consistency: torch.Tensor,
                              tau: float, detach_teacher: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD_logit, KD_latent): the two levels of the hierarchy."""
    return logit_distillation(coarse, fine, tau, detach_teacher), kl_consistency
