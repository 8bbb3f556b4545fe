"""The model's configuration (CMATHConfig) and the two presets. Saved as JSON beside every checkpoint
(training/config.py holds the training run's settings).

Fields marked (paper) follow the abstract of Zhu et al. 2024; fields marked (ours) are our reconstruction
of what the abstract leaves open (docs/CMATH.md), each a choice a user can change.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cmath_mer.errors import ConfigError
from cmath_mer.options import BACKENDS

MODALITIES = ("text", "audio", "visual")   # the order peers' pickles store them in (T, A, V)
MAX_SPEAKERS = 65_536                      # speaker embeddings; data with more distinct speakers is refused
# fields that come from the data (build_config), not from --set: the message says which option sets them
DERIVED_FIELDS = {"modalities": "--modalities", "input_dims": "the data's feature widths",
                  "num_classes": "the data's classes (--class-names for a pickle)",
                  "class_names": "the data's classes (--class-names for a pickle)",
                  "num_speakers": "the data's speakers",
                  "encoders": "the featurized data's metadata"}


def _names(field_name: str, value) -> tuple[str, ...]:
    """A list of distinct non-empty names (a plain string is refused: it would split into characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"config: `{field_name}` must be a list of names, got {value!r}")
    out = tuple(value)
    for v in out:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"config: `{field_name}` must hold non-empty names, got {v!r}")
    if len(set(out)) != len(out):
        dup = next(v for i, v in enumerate(out) if v in out[:i])
        raise ConfigError(f"config: `{field_name}` names {dup!r} twice")
    return out


def _int(field_name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config: `{field_name}` must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"config: `{field_name}` must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"config: `{field_name}` must be at most {high}, got {value}")


def _float(field_name: str, value, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config: `{field_name}` must be a finite number, got {value!r}")
    if low is not None and (value < low or low_open and value == low):
        raise ConfigError(f"config: `{field_name}` must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or high_open and value == high):
        raise ConfigError(f"config: `{field_name}` must be {'<' if high_open else '<='} {high}, got {value}")


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
    # which modalities get a CMA-Transformer; None = all (paper: asymmetric central/auxiliary)
    central_modalities: tuple[str, ...] | None = None
    window: int | None = None           # attention only within |i - j| <= window; None = whole conversation (ours)
    rec_kernel: int = 3                 # kernel of step 1's convolutions along the utterance axis: 3 = each code
                                        # also reads its two neighbours (the paper's U-Net, as we read it);
                                        # 1 = pointwise, all context then comes from attention (ours)
    position_scale: float = 1.0         # the sinusoidal position encoding is added times this; 0 = none. At 1
                                        # it is as large as the layer-normed code it is added to (ours)
    utterance_skip: bool = False        # F_c += Linear(LN(z_c)): the heads and the fusion also read each
                                        # utterance's own code, beside the attended context (ours)
    dropout: float = 0.1
    standardize_inputs: bool = False    # features -> (x - mean) / std, statistics of the training utterances
                                        # (kept in the model's buffers); step 1 then reads unit-scale inputs
    input_dropout: float = 0.0          # dropout on the input features; the reconstruction still targets the
                                        # clean features, so step 1 becomes a denoising autoencoder (ours)
    # --- loss (CMATH.md step 7) ---
    tau: float = 2.0                    # distillation temperature
    g_fine: float = 0.5                 # weight of the fine-grained heads' cross-entropy
    g_kd: float = 0.5                   # weight of the hierarchical distillation (logit + latent)
    l_rec: float = 0.1                  # weight of the reconstruction loss
    beta: float = 0.01                  # weight of KL to the prior
    latent_kl_per_dim: bool = True      # divide the latent KL terms (KD_latent, KL_prior) by d_z, so their
                                        # scale does not grow with the latent width and swamp the CE (ours)
    variational_sample: bool = True     # train on z ~ N(mu, var); False: on mu (the ablation without sampling)
    detach_teacher: bool = True         # coarse teacher is a constant in the distillation terms
    class_weights: bool = True          # inverse training frequency weights in the cross-entropies
    class_weight_power: float = 1.0     # w_k = (N / (K n_k)) ** power: 1 = inverse frequency, 0.5 tempered (ours)
    label_smoothing: float = 0.0        # in every cross-entropy (ours)
    # --- implementation ---
    backend: str | None = None          # torch | triton | auto; None = env var CMATH_BACKEND, else auto
    recompute_from: int | None = 2048   # batches of at least this many utterances recompute CMA blocks in
                                        # the backward (activation checkpointing); None = never

    def __post_init__(self):
        self.modalities = _names("modalities", self.modalities)
        self.class_names = _names("class_names", self.class_names)
        if self.central_modalities is not None:
            self.central_modalities = _names("central_modalities", self.central_modalities)
            if not self.central_modalities:
                raise ConfigError("config: `central_modalities` is empty; name at least one modality, or "
                                  "null for all")
        if not self.modalities:
            raise ConfigError("config: `modalities` must name at least one of text, audio, visual")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ConfigError(f"config: unknown modality {unknown[0]!r}; choose from {', '.join(MODALITIES)}")
        for m in self.centrals:
            if m not in self.modalities:
                raise ConfigError(f"config: central modality {m!r} is not among modalities {self.modalities}")
        if not isinstance(self.input_dims, dict):
            raise ConfigError(f"config: `input_dims` must be an object modality -> width, got "
                              f"{type(self.input_dims).__name__}")
        for m in self.modalities:
            if m not in self.input_dims:
                raise ConfigError(f"config: `input_dims` has no width for modality {m!r}")
            _int(f"input_dims.{m}", self.input_dims[m], 1)
        _int("num_classes", self.num_classes, 1)
        _int("num_speakers", self.num_speakers, 1, MAX_SPEAKERS)
        for name in ("d_model", "n_heads", "n_layers", "d_hidden", "ffn_mult"):
            _int(name, getattr(self, name), 1, 1 << 16)
        if self.d_latent is not None:
            _int("d_latent", self.d_latent, 1, 1 << 16)
        if self.window is not None:
            _int("window", self.window, 0)
        if self.rec_kernel not in (1, 3) or isinstance(self.rec_kernel, bool):
            raise ConfigError(f"config: `rec_kernel` must be 1 or 3, got {self.rec_kernel!r}")
        _float("position_scale", self.position_scale, 0.0)
        if self.recompute_from is not None:
            _int("recompute_from", self.recompute_from, 1)
        _float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _float("input_dropout", self.input_dropout, 0.0, 1.0, high_open=True)
        if not isinstance(self.standardize_inputs, bool):
            raise ConfigError(f"config: `standardize_inputs` must be true or false, got {self.standardize_inputs!r}")
        _float("tau", self.tau, 0.0, low_open=True)
        for name in ("g_fine", "g_kd", "l_rec", "beta", "class_weight_power"):
            _float(name, getattr(self, name), 0.0)
        _float("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        if self.encoders is not None and not isinstance(self.encoders, dict):
            raise ConfigError(f"config: `encoders` must be an object modality -> encoder or null, got "
                              f"{self.encoders!r:.80}")
        for name in ("latent_kl_per_dim", "detach_teacher", "class_weights", "variational_sample",
                     "utterance_skip"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config: `{name}` must be true or false, got {getattr(self, name)!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"config: `backend` {self.backend!r}: choose one of {', '.join(BACKENDS)} or null")
        if self.d_model % self.n_heads:
            raise ConfigError(f"config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if len(self.class_names) != self.num_classes:
            raise ConfigError(f"config: {len(self.class_names)} class names for num_classes={self.num_classes}")

    @property
    def centrals(self) -> tuple[str, ...]:
        return self.modalities if self.central_modalities is None else self.central_modalities

    @property
    def latent(self) -> int:
        return self.d_model if self.d_latent is None else self.d_latent


PRESETS: dict[str, dict] = {
    "iemocap": dict(num_classes=6, class_names=("hap", "sad", "neu", "ang", "exc", "fru"), num_speakers=2,
                    input_dims={"text": 1024, "audio": 1582, "visual": 342}),
    "meld": dict(num_classes=7, class_names=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
                 num_speakers=9, input_dims={"text": 1024, "audio": 300, "visual": 342},
                 # the recipe chosen on real MELD conversations (docs/RESULTS.md): a small model, heavy input
                 # dropout, class weights tempered to the square root of inverse frequency, a pointwise step 1
                 # (each utterance compressed on its own; context only through attention), two CMA blocks
                 d_model=128, n_heads=4, n_layers=2, d_hidden=128, dropout=0.3, input_dropout=0.5,
                 class_weight_power=0.5, rec_kernel=1),
}


def preset(name: str, **overrides) -> CMATHConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return CMATHConfig(**{**PRESETS[name], **overrides})


def save_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(obj), indent=2) + "\n")


def check_overrides(overrides, source: str = "--set") -> dict:
    """The overrides a user may give (--set): a JSON object of known, non-derived CMATHConfig fields."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: expected a JSON object of config fields, got {type(overrides).__name__}")
    fields = {f.name for f in dataclasses.fields(CMATHConfig)}
    for key in overrides:
        if key in DERIVED_FIELDS:
            raise ConfigError(f"{source}: field {key!r} is not set by hand: it comes from {DERIVED_FIELDS[key]}")
        if key not in fields:
            raise ConfigError(f"{source}: unknown config field {key!r}; known fields: "
                              f"{', '.join(sorted(fields - set(DERIVED_FIELDS)))}")
    return overrides


def config_from_dict(d, source: str) -> CMATHConfig:
    """A CMATHConfig from a JSON object (config.json, a checkpoint's metadata); ConfigError naming `source`."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object of config fields, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(CMATHConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown config field {unknown[0]!r}")
    try:
        return CMATHConfig(**d)
    except ConfigError as err:
        raise ConfigError(f"{source}: {str(err).removeprefix('config: ')}") from None


def config_to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))        # tuples as lists, as in the JSON file


def load_config(path: str | Path) -> CMATHConfig:
    """Read config.json; ConfigError naming the file when it is unreadable or holds a bad config."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"{path}: not a readable JSON config ({err})") from None
    return config_from_dict(d, str(path))
