"""A training run's settings (TrainConfig) and each preset's training recipe. Saved as train_config.json
beside every checkpoint; the model's own settings are model/config.py's CMATHConfig."""
from __future__ import annotations

from dataclasses import dataclass

from cmath_mer.errors import ConfigError
from cmath_mer.model.config import _float, _int
from cmath_mer.options import PRECISIONS


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_utterances: int = 256         # length-bucketed batches hold about this many utterances (a longer
                                        # conversation gets a batch of its own)
    grad_clip: float = 1.0
    valid_fraction: float = 0.1         # held out of train when the data has no validation split (IEMOCAP)
    seed: int = 0
    device: str = "auto"                # auto = cuda when torch sees one, else cpu; cpu, cuda, cuda:N
    warmup_epochs: float = 0.0          # linear learning-rate warmup over this many epochs' steps
    lr_schedule: str = "constant"       # constant | cosine (decays to 0 at the last epoch of `epochs`)
    patience: int | None = None         # stop after this many epochs without a better validation wF1
    baseline: bool = True               # also fit the context-free logistic regression (baseline.py)
    ema_decay: float | None = None      # evaluate, select and save an average of the weights (ema.py)
    ema_warmup: bool = False            # ramp the average's decay in: min(ema_decay, (1 + n) / (10 + n)) at
                                        # update n, so it does not lag behind the early epochs (ema.py)
    precision: str | None = None        # bf16 | fp16 | fp32 autocast of the forward (fp32 master weights);
                                        # None = bf16 on CUDA cards that support it, else fp32 (train.py
                                        # stores the choice, so a resumed run keeps it)
    accumulate: int = 1                 # micro-batches per optimizer step: each batch is split in this many
                                        # (same effective batch, less memory)
    compile: bool = False               # torch.compile the model for training
    deterministic: bool = False         # torch.use_deterministic_algorithms: bitwise-reproducible runs
    data_on_device: bool = False        # keep the whole corpus on the GPU (batches gathered there)
    cuda_graphs: bool | None = None     # replay each batch shape's step from a CUDA graph (training/graphs.py);
                                        # None = wherever the run can (train resolves and stores it)
    keep_last: bool = False             # keep last.safetensors (the optimizer state) when the run finishes, so
                                        # that --resume --epochs can extend it; best.safetensors is weights only
    world_size: int = 1                 # processes training together (torchrun), set from its environment by
                                        # train.py; batch_utterances is per step over all of them

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train config: lr_schedule={self.lr_schedule!r}: choose constant or cosine")
        _float("warmup_epochs", self.warmup_epochs, 0.0)
        if self.patience is not None:
            _int("patience", self.patience, 1)
        _int("epochs", self.epochs, 1)
        _float("lr", self.lr, 0.0, low_open=True)
        _float("weight_decay", self.weight_decay, 0.0)
        _int("batch_utterances", self.batch_utterances, 1)
        _float("grad_clip", self.grad_clip, 0.0, low_open=True)
        _float("valid_fraction", self.valid_fraction, 0.0, 1.0, high_open=True)
        _int("seed", self.seed, 0)
        if self.ema_decay is not None:
            _float("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        if not isinstance(self.keep_last, bool):
            raise ConfigError(f"train config: `keep_last` must be true or false, got {self.keep_last!r}")
        if not isinstance(self.baseline, bool):
            raise ConfigError(f"train config: `baseline` must be true or false, got {self.baseline!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"config: `device` must be a device name such as cpu or cuda, got {self.device!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"train config: `precision` {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        _int("accumulate", self.accumulate, 1)
        _int("world_size", self.world_size, 1)
        for name in ("compile", "deterministic", "data_on_device", "cuda_graphs", "ema_warmup"):
            if not isinstance(getattr(self, name), bool) and not (name == "cuda_graphs" and self.cuda_graphs is None):
                raise ConfigError(f"train config: `{name}` must be true or false, got {getattr(self, name)!r}")


# The training recipe of each preset (TrainConfig fields); the MELD one was chosen by the sweep in
# docs/experiments/meld_recipe.md on real MELD conversations (validation-selected; MELD dev held out as the test).
TRAIN_PRESETS: dict[str, dict] = {
    # chosen on the synthetic IEMOCAP-shaped corpus (docs/experiments/meld_recipe.md, grid
    # docs/experiments/recipe/iemocap_synth_recipe.json, 3 seeds):
    # round 3's MELD schedule (warmup, cosine, ramped weight average) over 8 epochs, +6 validation points
    "iemocap": dict(epochs=8, warmup_epochs=2.0, lr_schedule="cosine", ema_decay=0.99, ema_warmup=True),
    # round 3: 3 warmup epochs and the model evaluated (and selected, saved) as a weight average whose decay
    # ramps in (min(0.99, (1 + n) / (10 + n)) at step n; it stays below 0.99 over these 432 steps), so the
    # validation curve changes by < 2 points between epochs after warmup
    "meld": dict(epochs=12, warmup_epochs=3.0, lr_schedule="cosine", lr=1e-3, batch_utterances=256,
                 ema_decay=0.99, ema_warmup=True),
}


def train_preset(name: str, **overrides) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(TRAIN_PRESETS)}")
    return TrainConfig(**{**TRAIN_PRESETS[name], **overrides})
