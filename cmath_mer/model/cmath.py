"""CMATH: the whole model in the order data flows (docs/CMATH.md).

    x_m (T, d_m) --ModalityReconstruction--> z_m (T, d), L_rec            step 1
    h_m = LN(z_m) + s pos + speaker; dropout      (s = position_scale)    step 2
    F_c = CMATransformer_c(h_c; auxiliaries h_a, a != c)                  step 3
          [+ Linear(dropout(LN(z_c))) with utterance_skip]
    z, mu, var, KL_prior, KD_latent = VariationalFusion({F_c})            step 4
    coarse = head(z); fine_c = head_c(F_c)                                step 5
    KD_logit = tau^2 sum_c KL(coarse || fine_c)                           step 6
    loss = CE(coarse) + g_fine sum_c CE(fine_c) + g_kd (KD_logit + KD_latent) + l_rec L_rec + beta KL_prior
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cmath_mer.kernels.cu_seqlens import neighbour_masks, positions
from cmath_mer.model.batch import IGNORE_INDEX, Batch
from cmath_mer.model.cma_transformer import CMATransformer
from cmath_mer.model.config import CMATHConfig
from cmath_mer.model.distillation import hierarchical_distillation
from cmath_mer.model.fusion import VariationalFusion
from cmath_mer.model.reconstruction import ModalityReconstruction


def sinusoidal(pos: torch.Tensor, d: int) -> torch.Tensor:
    """(T,) int positions -> (T, d) sinusoidal encodings (Vaswani et al.), any conversation length."""
    freqs = torch.exp(torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / d))
    angles = pos.float()[:, None] * freqs[None, :]                                  # (T, d/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :d]


class UtteranceEmbedding(nn.Module):
    """h_m = LayerNorm(z_m) + position_scale * sinusoidal position in the conversation + speaker embedding;
    dropout. At position_scale 1 the encoding has the norm of the layer-normed code (both ~sqrt(d)), so it
    can drown the utterance's own content; a smaller scale keeps the order as a hint."""

    def __init__(self, modalities: tuple[str, ...], d_model: int, num_speakers: int, dropout: float,
                 position_scale: float = 1.0):
        super().__init__()
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in modalities})
        self.speaker = nn.Embedding(num_speakers, d_model)
        self.drop = nn.Dropout(dropout)
        self.d_model, self.position_scale = d_model, position_scale

    def forward(self, codes: dict[str, torch.Tensor], speakers: torch.Tensor, pos: torch.Tensor):
        shared = self.speaker(speakers)                                               # (T, d)
        if self.position_scale:
            shared = shared + self.position_scale * sinusoidal(pos, self.d_model)
        return {m: self.drop(self.norms[m](z) + shared) for m, z in codes.items()}


def label_weight(labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The CE normaliser of a batch: the summed class weight of its labelled utterances (their count without
    class weights), a 0-dim fp32 tensor on the labels' device."""
    labelled = labels != IGNORE_INDEX
    # no boolean indexing: its data-dependent shape would break a torch.compile(fullgraph=True) graph
    w = torch.where(labelled, weight[labels.clamp_min(0)], 0.0) if weight is not None else labelled.float()
    return w.sum()


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None,
                           label_smoothing: float = 0.0, normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over labelled utterances (weighted as torch does); 0 when a batch has no labels at all.
    normaliser: the label weight of the whole step when this batch is one part of it (label_weight)."""
    nll = F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum",
                          label_smoothing=label_smoothing)
    if normaliser is None:
        normaliser = label_weight(labels, weight)
    return nll / normaliser.clamp_min(1e-12)


@dataclass
class CMATHOutput:
    logits: torch.Tensor                                  # (T, n_classes) coarse head: the prediction
    fine_logits: dict[str, torch.Tensor]                  # c -> (T, n_classes)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None


class CMATH(nn.Module):
    def __init__(self, config: CMATHConfig):
        super().__init__()
        self.config = cfg = config
        self.reconstruction = nn.ModuleDict({
            m: ModalityReconstruction(cfg.input_dims[m], cfg.d_hidden, cfg.d_model, cfg.backend, cfg.rec_kernel)
            for m in cfg.modalities})
        self.embedding = UtteranceEmbedding(cfg.modalities, cfg.d_model, cfg.num_speakers, cfg.dropout,
                                            cfg.position_scale)
        self.cma = nn.ModuleDict({
            c: CMATransformer(cfg.d_model, cfg.n_heads, cfg.n_layers, len(cfg.modalities) - 1, cfg.ffn_mult,
                              cfg.dropout, cfg.window, cfg.backend, cfg.recompute_from)
            for c in cfg.centrals})
        if cfg.utterance_skip:      # a per-utterance path beside the attended context (an MLP-like shortcut)
            self.skip = nn.ModuleDict({c: nn.Linear(cfg.d_model, cfg.d_model) for c in cfg.centrals})
        self.fusion = VariationalFusion(cfg.centrals, cfg.d_model, cfg.latent, cfg.detach_teacher, cfg.backend)
        self.coarse_head = nn.Linear(cfg.latent, cfg.num_classes)
        self.fine_heads = nn.ModuleDict({c: nn.Linear(cfg.d_model, cfg.num_classes) for c in cfg.centrals})
        self.register_buffer("class_weight", torch.ones(cfg.num_classes), persistent=True)
        if cfg.standardize_inputs:                           # set from the training utterances by train.py
            for m in cfg.modalities:
                self.register_buffer(f"input_mean_{m}", torch.zeros(cfg.input_dims[m]), persistent=True)
                self.register_buffer(f"input_std_{m}", torch.ones(cfg.input_dims[m]), persistent=True)

    def standardized(self, m: str, x: torch.Tensor) -> torch.Tensor:
        if not self.config.standardize_inputs:
            return x
        return (x - getattr(self, f"input_mean_{m}")) / getattr(self, f"input_std_{m}")

    def loss_totals(self, batch: Batch) -> torch.Tensor:
        """(2,) fp32 on the device: the CE normaliser (label_weight) and the utterance count of the batch.
        Summed over the parts of a step (micro-batches, ranks) they are what `forward(totals=...)` takes."""
        weight = self.class_weight if self.config.class_weights else None
        T = batch.real_utterances
        T = batch.labels.new_full((), T, dtype=torch.float32) if isinstance(T, int) else T.float()
        return torch.stack([label_weight(batch.labels, weight).float(), T])

    def forward(self, batch: Batch, *, seed: int = 0, with_loss: bool = True, row_offset: int = 0,
                totals: torch.Tensor | None = None) -> CMATHOutput:
        """The outputs, and the loss when with_loss. A training step may be split in parts (micro-batches,
        the ranks of a distributed run); then row_offset is the number of the step's utterances before this
        part (the variational eps of a row is drawn by its index in the whole step) and totals is the sum of
        the parts' loss_totals: every loss term is this part's share of the whole step's mean, so the parts'
        losses add up to the loss of the step's batch however it was split. totals None: the batch's own.
        A padded batch (batch.valid) has the loss and gradients of its real rows alone."""
        cfg = self.config
        T = batch.num_utterances
        cu = batch.cu_seqlens
        valid = batch.valid
        has_prev, has_next = neighbour_masks(cu, T)                                   # (T, 1) each
        # Long batches (recompute_from) keep only the inputs of reconstruction, embedding and fusion for the
        # backward and redo them there (one modality at a time): memory linear in T with a small constant.
        recompute = (cfg.recompute_from is not None and self.training and torch.is_grad_enabled()
                     and T >= cfg.recompute_from)
        run = (lambda fn, *a, **kw: checkpoint(fn, *a, use_reentrant=False, **kw)) if recompute else \
            (lambda fn, *a, **kw: fn(*a, **kw))
        codes, rec = {}, {}
        for m in cfg.modalities:                                                       # step 1
            codes[m], rec[m] = run(self.reconstruction[m], self.standardized(m, batch.features[m]), has_prev,
                                   has_next, with_loss, cfg.input_dropout, valid)
        h = run(self.embedding, codes, batch.speakers, positions(cu, T))               # step 2: m -> (T, d)
        fine = {c: self.cma[c](h[c], [h[a] for a in cfg.modalities if a != c], cu,    # step 3: c -> (T, d)
                               batch.max_seqlen) for c in cfg.centrals}
        if cfg.utterance_skip:      # each view also carries its utterance's own code, free of positions/speakers
            fine = {c: f + self.skip[c](F.dropout(self.embedding.norms[c](codes[c]), cfg.dropout, self.training))
                    for c, f in fine.items()}                                          # c -> (T, d)
        # the fusion in pieces is an autograd.Function whose backward calls autograd.grad, which dynamo cannot
        # trace: under torch.compile the fusion is traced whole (the partitioner decides what it keeps)
        pieces = recompute and not torch.compiler.is_compiling()
        fusion = self.fusion.forward_recomputed if pieces else self.fusion                           # step 4
        z, mu_f, logvar_f, kl_prior, kd_latent = fusion(fine, seed=seed,
                                                        sample=self.training and cfg.variational_sample,
                                                        eps_offset=row_offset * cfg.latent, valid=valid)
        coarse = self.coarse_head(z)                                                   # step 5: (T, classes)
        fine_logits = {c: self.fine_heads[c](f) for c, f in fine.items()}
        out = CMATHOutput(coarse, fine_logits)
        if not with_loss:
            return out
        weight = self.class_weight if cfg.class_weights else None                      # step 7
        # losses are reduced in fp32 whatever the autocast dtype of the forward (no-ops in fp32)
        coarse, fine_logits = coarse.float(), {c: f.float() for c, f in fine_logits.items()}
        kd_latent, kl_prior = kd_latent.float(), kl_prior.float()
        if valid is not None:       # padding rows: equal (zero) logits, whose distillation terms are exactly 0
            keep = valid[:, None]
            coarse = torch.where(keep, coarse, 0.0)
            fine_logits = {c: torch.where(keep, f, 0.0) for c, f in fine_logits.items()}
        kd_logit, kd_latent = hierarchical_distillation(coarse, list(fine_logits.values()), kd_latent,
                                                        cfg.tau, cfg.detach_teacher)   # step 6
        per_dim = 1.0 / cfg.latent if cfg.latent_kl_per_dim else 1.0
        # a part of a step: its means over its T utterances become its share of the step's mean (x T / T_step),
        # and CE divides by the step's label weight. The means of a padded batch are sums over its real rows
        # divided by all T rows: x T / (real rows) makes them means over the real rows
        count = totals[1] if totals is not None else None if valid is None else valid.sum()
        share = 1.0 if count is None else T / count
        norm = None if totals is None else totals[0]
        out.losses = {
            "ce": weighted_cross_entropy(coarse, batch.labels, weight, cfg.label_smoothing, norm),
            "ce_fine": sum(weighted_cross_entropy(f, batch.labels, weight, cfg.label_smoothing, norm)
                           for f in fine_logits.values()),
            "kd_logit": kd_logit * share,
            "kd_latent": kd_latent * per_dim * share,
            "rec": sum(r.float() for r in rec.values()) * share,
            "kl_prior": kl_prior * per_dim * share,
        }
        L = out.losses
        out.loss = (L["ce"] + cfg.g_fine * L["ce_fine"] + cfg.g_kd * (L["kd_logit"] + L["kd_latent"])
                    + cfg.l_rec * L["rec"] + cfg.beta * L["kl_prior"])
        return out
