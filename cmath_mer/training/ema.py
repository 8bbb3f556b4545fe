"""Exponential moving average of the weights (Polyak averaging), what the model is evaluated and selected
with when TrainConfig.ema_decay is set.

Why: on corpora of this field's size the validation split is small (MELD: ~1,000 utterances), and the
weights of consecutive epochs differ enough that choosing the epoch by validation F1 picks whichever
epoch's idiosyncratic errors happen to suit that split. The average moves slowly, so consecutive epochs'
models differ less, the validation curve is smoother, and the chosen epoch generalises better.
Checkpoints keep both the raw weights (to resume training) and the average (to evaluate and predict).

The average starts at the initial weights. With a constant decay d it then lags: after n updates the
initial weights still weigh d**n (d 0.99, a MELD epoch of 36 steps: 0.70), so early epochs evaluate a blend
of a barely trained model, and the validation curve climbs in large steps while the average catches up.
`warmup` ramps the decay in, as TensorFlow's ExponentialMovingAverage(num_updates=...) does: the n-th
update (n = 0, 1, ...) uses min(decay, (1 + n) / (10 + n)), so the average tracks the weights at first
(0.1, 0.18, 0.25, ...) and smooths them with the full decay later (0.99 from n = 890). The update count is
saved with the training state, so a resumed run continues the same ramp.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0                 # updates so far: where the warmup ramp stands (saved by train.py)
        self.average = {name: p.detach().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        """The decay the next update uses: min(decay, (1 + n) / (10 + n)) with warmup, else decay."""
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """average <- d * average + (1 - d) * weights (d = current_decay()), after every optimizer step."""
        d = self.current_decay()
        for name, p in model.named_parameters():
            self.average[name].lerp_(p.detach(), 1.0 - d)
        self.updates += 1

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
