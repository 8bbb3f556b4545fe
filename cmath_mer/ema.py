"""Exponential moving average of the weights (Polyak averaging), what the model is evaluated and selected
with when TrainConfig.ema_decay is set.

Why: on corpora of this field's size the validation split is small (MELD: ~1,000 utterances), and the
weights of consecutive epochs differ enough that choosing the epoch by validation F1 picks whichever
epoch's idiosyncratic errors happen to suit that split. The average moves slowly, so consecutive epochs'
models differ less, the validation curve is smoother, and the chosen epoch generalises better.
Checkpoints keep both the raw weights (to resume training) and the average (to evaluate and predict).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.average = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """average <- decay * average + (1 - decay) * weights, after every optimizer step."""
        for name, p in model.named_parameters():
            self.average[name].lerp_(p.detach(), 1.0 - self.decay)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.average[name].copy_(value)

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """The model holds the averaged weights inside the block, its own weights again after it."""
        params = dict(model.named_parameters())
        raw = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.average[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(raw[name])
