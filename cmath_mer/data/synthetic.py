"""Synthetic conversations: the embedded demo data and the data of tests and benchmarks.

The generator is built around the premises of CMATH (docs/CMATH.md):

* **Uneven modality quality.** Each modality m carries the label as a class prototype of norm
  ``signal[m]`` (in units of the noise standard deviation) added to isotropic Gaussian noise. The
  prototypes of one modality are orthonormal directions (when d_m >= classes), so ``signal[m]`` alone fixes
  how separable the classes are in that modality, whatever its width. Defaults: text 2.0 (strong), audio
  1.25 (medium), visual 0.75 (weak): a Bayes classifier on one signal-bearing utterance gets about
  76 % / 53 % / 37 % of 6 classes right.
* **Emotional inertia.** Labels follow a Markov chain within a conversation: with probability ``inertia``
  the label repeats, otherwise it is drawn afresh from ``class_prior``.
* **Context-only utterances.** A fraction ``context_only`` of utterances carry no label signal in any
  modality (pure noise): only their neighbours (through inertia) reveal their label.
* **Missing signal.** Independently per modality, a fraction ``missing_signal`` of the other utterances
  carry no signal in that modality, so fusing modalities pays.
* **Speakers.** Each conversation has 2..4 participants (all of them when ``num_speakers`` <= 2) who take
  turns (a turn changes with probability ``turn_switch``); every speaker adds a fixed nuisance offset of
  norm ``speaker_shift`` to every modality.

Everything is vectorised: features are made in row chunks by a thread pool, each chunk with its own
generator seeded from (seed, modality, chunk), so the result depends on ``seed`` only (not on the number
of threads). 200k utterances of 1024 + 1582 + 342 float32 dimensions take a few seconds.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.config import MODALITIES, PRESETS

from .dataset import SPLITS, ConversationDataset

# Class frequencies of the real corpora (training sets), used as the presets' default class priors.
_IEMOCAP_PRIOR = (648, 1084, 1708, 1103, 1041, 1849)          # hap sad neu ang exc fru
_MELD_PRIOR = (4710, 1205, 268, 683, 1743, 271, 1109)         # neutral surprise fear sadness joy disgust anger

SYNTHETIC_PRESETS: dict[str, dict] = {
    "iemocap": dict(conversations=151, min_length=20, max_length=110, class_prior=_IEMOCAP_PRIOR,
                    speaker_names=("M", "F")),
    "meld": dict(conversations=1433, min_length=1, max_length=24, class_prior=_MELD_PRIOR),
}

DEFAULT_SIGNAL = {"text": 2.0, "audio": 1.25, "visual": 0.75}
_CHUNK_ROWS = 16384


def make_synthetic(preset: str | None = "iemocap", *, conversations: int | None = None,
                   min_length: int | None = None, max_length: int | None = None,
                   lengths: list[int] | None = None, input_dims: dict[str, int] | None = None,
                   modalities: tuple[str, ...] | None = None, num_classes: int | None = None,
                   class_names: tuple[str, ...] | None = None, num_speakers: int | None = None,
                   class_prior: tuple[float, ...] | None = None, signal: dict[str, float] | None = None,
                   inertia: float = 0.8, context_only: float = 0.15, missing_signal: float = 0.1,
                   speaker_shift: float = 0.5, turn_switch: float = 0.7,
                   split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                   seed: int = 0, world_seed: int = 0, threads: int | None = None,
                   return_truth: bool = False) -> ConversationDataset:
    """A synthetic corpus of conversations (see the module docstring for the model of the data).

    preset: 'iemocap' (6 classes, dims text 1024 / audio 1582 / visual 342, 2 speakers 'M'/'F', 151
        conversations of 20..110 utterances, IEMOCAP class frequencies), 'meld' (7 classes, 1024 / 300 /
        342, 9 speakers, 1433 conversations of 1..24 utterances, MELD class frequencies) or None (give
        input_dims and num_classes or class_names; 2 speakers, 100 conversations of 10..50 utterances).
    conversations, min_length, max_length: number of conversations, lengths drawn uniformly in
        [min_length, max_length]. lengths: an explicit list of conversation lengths (overrides the three).
    input_dims: modality -> width (overrides the preset's; also picks the modalities unless `modalities`).
    modalities: subset of text, audio, visual (kept in T, A, V order).
    num_classes / class_names, num_speakers: overrides of the preset's.
    class_prior: relative class frequencies (default: the preset's corpus frequencies, else uniform).
    signal: modality -> prototype norm in noise standard deviations (default text 2.0, audio 1.25,
        visual 0.75; a modality not named keeps its default, an unknown one gets 1.0).
    inertia: probability that an utterance repeats the previous label (default 0.8).
    context_only: fraction of utterances with no signal in any modality (default 0.15).
    missing_signal: per modality, fraction of the remaining utterances with no signal there (default 0.1).
    speaker_shift: norm of each speaker's nuisance offset, per modality (default 0.5).
    turn_switch: probability that the next utterance is by another participant (default 0.7).
    split_fractions: (train, valid, test) fractions of the conversations (default 0.7 / 0.1 / 0.2).
    seed: draws conversations, labels, speakers, noise and splits.
    world_seed: draws the class prototypes and speaker offsets (default 0), so corpora made with different
        `seed`s and the same world_seed are samples of the same task (train on one, test on another).
    threads: worker threads (default torch.get_num_threads()).
    return_truth: also return a dict of the hidden variables, (T,) bool tensors: 'informative' (not
        context-only) and 'carries.<modality>' (that modality holds the label signal).
    """
    spec = _resolve(preset, conversations, min_length, max_length, lengths, input_dims, modalities,
                    num_classes, class_names, num_speakers, class_prior, signal)
    for name, p in (("inertia", inertia), ("context_only", context_only), ("missing_signal", missing_signal),
                    ("turn_switch", turn_switch)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"synthetic: {name}={p} must lie in [0, 1]")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or sum(split_fractions) <= 0:
        raise ValueError(f"synthetic: split_fractions={split_fractions} must be three non-negative fractions")

    g = torch.Generator().manual_seed(seed)
    lens = spec["lengths"]
    if lens is None:
        n, lo, hi = spec["lengths_spec"]
        lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    B, C, S = len(lens), spec["num_classes"], spec["num_speakers"]
    lengths_t = torch.tensor(lens, dtype=torch.int64)
    cu = cu_seqlens_from(lengths_t, torch.int64)
    T = int(cu[-1])
    conv = torch.repeat_interleave(torch.arange(B), lengths_t)           # (T,) conversation of each row
    start = torch.zeros(T, dtype=torch.bool)
    start[cu[:-1]] = True
    pos = torch.arange(T)

    # Labels: Markov chain with inertia. At a change point (and at every conversation start) a fresh label is
    # drawn from the prior; elsewhere the label of the last change point is kept.
    prior = torch.tensor(spec["class_prior"], dtype=torch.float64)
    fresh = torch.multinomial(prior / prior.sum(), T, replacement=True, generator=g) if T else \
        torch.zeros(0, dtype=torch.int64)
    change = (torch.rand(T, generator=g) >= inertia) | start
    last_change = torch.cummax(torch.where(change, pos, torch.zeros_like(pos)), 0).values if T else pos
    labels = fresh[last_change]

    # Speakers: k participants per conversation, turns change with probability turn_switch.
    k_max = min(S, 4)
    k = torch.randint(min(2, S), k_max + 1, (B,), generator=g) if S > 1 else torch.ones(B, dtype=torch.int64)
    base = torch.randint(0, S, (B,), generator=g)
    switch = ((torch.rand(T, generator=g) < turn_switch) & ~start).long()
    turns = torch.cumsum(switch, 0)
    turns = turns - turns[cu[:-1]].repeat_interleave(lengths_t)          # turn index within its conversation
    speakers = (base[conv] + turns % k[conv]) % S

    # Which utterances carry signal in which modality.
    informative = torch.rand(T, generator=g) >= context_only
    mods = spec["modalities"]
    carries = {m: informative & (torch.rand(T, generator=g) >= missing_signal) for m in mods}

    # Per modality: W = [prototypes * signal ; speaker offsets], (C + S, d); features = noise + A @ W where
    # A (T, C + S) holds the signal indicator in the label's column and a one in the speaker's column.
    weights = {}
    for m in mods:                       # the "world": its own generator, so every `seed` shares it
        d = spec["input_dims"][m]
        gw = torch.Generator().manual_seed(world_seed * len(MODALITIES) + MODALITIES.index(m))
        weights[m] = torch.cat([_prototypes(C, d, gw) * spec["signal"][m],
                                _directions(S, d, gw) * speaker_shift]).float()
    mod_seeds = {m: int(torch.randint(0, 2**62, (1,), generator=g)) for m in mods}

    features = {m: torch.empty(T, spec["input_dims"][m], dtype=torch.float32) for m in mods}
    jobs = [(m, r) for m in mods for r in range(0, T, _CHUNK_ROWS)]

    def fill(job):
        m, r0 = job
        r1 = min(T, r0 + _CHUNK_ROWS)
        out = features[m][r0:r1]
        out.normal_(generator=torch.Generator().manual_seed(mod_seeds[m] + r0 // _CHUNK_ROWS))
        a = torch.zeros(r1 - r0, C + S, dtype=torch.float32)
        rows = torch.arange(r1 - r0)
        a[rows, labels[r0:r1]] = carries[m][r0:r1].float()
        a[rows, C + speakers[r0:r1]] = 1.0
        out.addmm_(a, weights[m])

    workers = threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    if workers > 1 and len(jobs) > 1:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)                                     # parallel over chunks, not inside them
        try:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fill, jobs))
        finally:
            torch.set_num_threads(prev)
    else:
        for job in jobs:
            fill(job)

    splits = _assign_splits(B, split_fractions, g)
    names = spec["speaker_names"] or tuple(f"speaker{i}" for i in range(S))
    dataset = ConversationDataset(features=features, speakers=speakers, labels=labels, cu_seqlens=cu,
                               splits=splits, conversation_ids=[f"conv{i:0{len(str(max(B - 1, 0)))}d}"
                                                                for i in range(B)],
                               class_names=spec["class_names"], num_speakers=S,
                               source=f"synthetic(preset={preset}, seed={seed})", speaker_names=names)
    if return_truth:
        return dataset, {"informative": informative, **{f"carries.{m}": c for m, c in carries.items()}}
    return dataset


def _resolve(preset, conversations, min_length, max_length, lengths, input_dims, modalities, num_classes,
             class_names, num_speakers, class_prior, signal) -> dict:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"synthetic: unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or None")
    base = dict(PRESETS[preset]) if preset else {}
    extra = dict(SYNTHETIC_PRESETS[preset]) if preset else dict(conversations=100, min_length=10, max_length=50)

    dims = dict(input_dims) if input_dims is not None else dict(base.get("input_dims", {}))
    if not dims:
        raise ValueError("synthetic: give input_dims (e.g. {'text': 64}) or a preset")
    if modalities is not None:
        missing = [m for m in modalities if m not in dims]
        if missing:
            raise ValueError(f"synthetic: modality {missing[0]!r} has no width in input_dims {dims}")
    mods = tuple(m for m in MODALITIES if m in (modalities if modalities is not None else dims))
    unknown = [m for m in (modalities or dims) if m not in MODALITIES]
    if unknown:
        raise ValueError(f"synthetic: unknown modality {unknown[0]!r}; choose from {', '.join(MODALITIES)}")
    if not mods:
        raise ValueError("synthetic: no modality selected")
    for m in mods:
        if int(dims[m]) < 1:
            raise ValueError(f"synthetic: input_dims[{m!r}]={dims[m]} must be >= 1")

    if class_names is not None:
        names = tuple(class_names)
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"synthetic: {len(names)} class names for num_classes={num_classes}")
    elif num_classes is not None:
        names = (tuple(base["class_names"]) if base and len(base["class_names"]) == num_classes
                 else tuple(f"class{i}" for i in range(num_classes)))
    elif base:
        names = tuple(base["class_names"])
    else:
        raise ValueError("synthetic: give num_classes or class_names (or a preset)")
    C = len(names)
    if C < 1:
        raise ValueError("synthetic: at least one class")

    S = int(num_speakers if num_speakers is not None else base.get("num_speakers", 2))
    if S < 1:
        raise ValueError(f"synthetic: num_speakers={S} must be >= 1")
    speaker_names = extra.get("speaker_names") if S == base.get("num_speakers") else None

    if lengths is not None:
        lens = [int(n) for n in lengths]
        if any(n < 1 for n in lens):
            raise ValueError("synthetic: every conversation needs at least one utterance")
    else:
        n = int(conversations if conversations is not None else extra["conversations"])
        lo = int(min_length if min_length is not None else extra["min_length"])
        hi = int(max_length if max_length is not None else max(lo, extra["max_length"]))
        if n < 0 or lo < 1 or hi < lo:
            raise ValueError(f"synthetic: need conversations >= 0 and 1 <= min_length <= max_length "
                             f"(got {n}, {lo}, {hi})")
        lens = None
        lens_spec = (n, lo, hi)

    if class_prior is None:
        class_prior = extra.get("class_prior") if extra.get("class_prior") and len(extra["class_prior"]) == C \
            else (1.0,) * C
    if len(class_prior) != C or min(class_prior) < 0 or sum(class_prior) <= 0:
        raise ValueError(f"synthetic: class_prior needs {C} non-negative weights, got {class_prior}")

    sig = {m: float((signal or {}).get(m, DEFAULT_SIGNAL.get(m, 1.0))) for m in mods}
    out = dict(modalities=mods, input_dims={m: int(dims[m]) for m in mods}, class_names=names, num_classes=C,
               num_speakers=S, speaker_names=speaker_names, class_prior=tuple(float(p) for p in class_prior),
               signal=sig, lengths=lens)
    if lens is None:
        out["lengths_spec"] = lens_spec
    return out


def _directions(k: int, d: int, g: torch.Generator) -> torch.Tensor:
    """k random unit vectors in R^d."""
    v = torch.randn(k, d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _prototypes(k: int, d: int, g: torch.Generator) -> torch.Tensor:
    """k unit vectors in R^d, orthonormal when d >= k (so the signal norm alone sets separability)."""
    if d < k:
        return _directions(k, d, g)
    q, r = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


def _assign_splits(B: int, fractions, g: torch.Generator) -> list[str]:
    total = float(sum(fractions))
    counts = [int(math.floor(B * f / total)) for f in fractions]
    # hand out the remainder to the largest fractional parts, and give every non-zero fraction a
    # conversation when there are enough
    rema = sorted(range(3), key=lambda i: -(B * fractions[i] / total - counts[i]))
    for i in rema[:B - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if fractions[i] > 0 and counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    order = torch.randperm(B, generator=g).tolist()
    splits = [""] * B
    at = 0
    for name, c in zip(SPLITS, counts):
        for i in order[at:at + c]:
            splits[i] = name
        at += c
    return splits
