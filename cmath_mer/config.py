"""Configuration dataclasses and the two presets. Saved as JSON beside every checkpoint.

Fields marked (paper) follow the abstract of Zhu et al. 2024; fields marked (ours) are our reconstruction
of what the abstract leaves open (shared/design/CMATH.md), each a choice a user can change.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

MODALITIES = ("text", "audio", "visual")   # the order peers' pickles store them in (T, A, V)


@dataclass
class CMATHConfig:
    # --- data (read from the data, presets only give defaults) ---
    modalities: tuple[str, ...] = MODALITIES
    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 1024, "audio": 1582, "visual": 342})
    num_classes: int = 6
    class_names: tuple[str, ...] = ("hap", "sad", "neu", "ang", "exc", "fru")
    num_speakers: int = 2
    encoders: dict | None = None        # modality -> what made its features (name, version, dim), copied
                                        # from featurized data, so predict can featurize raw conversations alike
    # --- widths ---
    d_model: int = 256                  # d: hidden width (ours)
    n_heads: int = 8                    # H (ours)
    n_layers: int = 2                   # L_cma blocks per CMA-Transformer (ours)
    d_hidden: int = 256                 # d_h: U-Net hidden width of modality reconstruction (ours)
    d_latent: int | None = None         # d_z: variational latent width, None = d_model (ours)
    ffn_mult: int = 4                   # FFN width = ffn_mult * d (ours)
    # --- structure ---
    central_modalities: tuple[str, ...] | None = None   # which modalities get a CMA-Transformer; None = all (paper: asymmetric central/auxiliary)
    window: int | None = None           # attention only within |i - j| <= window; None = whole conversation (ours)
    dropout: float = 0.1
    # --- loss (CMATH.md step 7) ---
    tau: float = 2.0                    # distillation temperature
    g_fine: float = 0.5                 # weight of the fine-grained heads' cross-entropy
    g_kd: float = 0.5                   # weight of the hierarchical distillation (logit + latent)
    l_rec: float = 0.1                  # weight of the reconstruction loss
    beta: float = 0.01                  # weight of KL to the prior
    latent_kl_per_dim: bool = True      # divide the latent KL terms (KD_latent, KL_prior) by d_z, so their
                                        # scale does not grow with the latent width and swamp the CE (ours)
    detach_teacher: bool = True         # coarse teacher is a constant in the distillation terms
    class_weights: bool = True          # inverse training frequency weights in the cross-entropies
    class_weight_power: float = 1.0     # w_k = (N / (K n_k)) ** power: 1 = inverse frequency, 0.5 tempered (ours)
    label_smoothing: float = 0.0        # in every cross-entropy (ours)
    # --- implementation ---
    backend: str | None = None          # torch | triton | auto; None = env var CMATH_BACKEND, else auto
    recompute_from: int | None = 2048   # batches of at least this many utterances recompute CMA blocks in
                                        # the backward (activation checkpointing); None = never

    def __post_init__(self):
        self.modalities = tuple(self.modalities)
        self.class_names = tuple(self.class_names)
        if self.central_modalities is not None:
            self.central_modalities = tuple(self.central_modalities)
        if not self.modalities:
            raise ValueError("config: `modalities` must name at least one of text, audio, visual")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"config: unknown modality {unknown[0]!r}; choose from {', '.join(MODALITIES)}")
        for m in self.centrals:
            if m not in self.modalities:
                raise ValueError(f"config: central modality {m!r} is not among modalities {self.modalities}")
        if self.d_model % self.n_heads:
            raise ValueError(f"config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"config: {len(self.class_names)} class names for num_classes={self.num_classes}")

    @property
    def centrals(self) -> tuple[str, ...]:
        return self.modalities if self.central_modalities is None else self.central_modalities

    @property
    def latent(self) -> int:
        return self.d_model if self.d_latent is None else self.d_latent


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
    device: str = "cpu"
    warmup_epochs: float = 0.0          # linear learning-rate warmup over this many epochs' steps
    lr_schedule: str = "constant"       # constant | cosine (decays to 0 at the last epoch of `epochs`)
    patience: int | None = None         # stop after this many epochs without a better validation wF1

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train config: lr_schedule={self.lr_schedule!r}: choose constant or cosine")


PRESETS: dict[str, dict] = {
    "iemocap": dict(num_classes=6, class_names=("hap", "sad", "neu", "ang", "exc", "fru"), num_speakers=2,
                    input_dims={"text": 1024, "audio": 1582, "visual": 342}),
    "meld": dict(num_classes=7, class_names=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
                 num_speakers=9, input_dims={"text": 1024, "audio": 300, "visual": 342}),
}


def preset(name: str, **overrides) -> CMATHConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return CMATHConfig(**{**PRESETS[name], **overrides})


def save_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(obj), indent=2) + "\n")


def load_config(path: str | Path) -> CMATHConfig:
    return CMATHConfig(**json.loads(Path(path).read_text()))
