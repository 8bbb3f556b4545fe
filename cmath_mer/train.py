"""Training and evaluation loops: AdamW, class weights, length-bucketed batches, validation selection,
atomic checkpoints, resume. The CLI (cli.py) is a thin layer over `train`, `evaluate` and `predict`."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .config import CMATHConfig, TrainConfig, load_config, preset
from .data import IGNORE_INDEX, ConversationDataset, DataError, check_compatible
from .metrics import classification_metrics, save_confusion_matrix
from .model import CMATH


def build_config(data: ConversationDataset, preset_name: str, modalities: tuple[str, ...] | None = None,
                 **overrides) -> CMATHConfig:
    """Preset defaults, then what the data says (dimensions, classes, speakers), then explicit overrides."""
    mods = tuple(modalities) if modalities else data.modalities
    missing = [m for m in mods if m not in data.modalities]
    if missing:
        raise DataError(f"{data.source}: modality {missing[0]!r} was asked for but the data has only "
                        f"{', '.join(data.modalities)} (field features)")
    encoders = data.metadata.get("encoders")
    if encoders is not None:
        encoders = {m: encoders[m] for m in mods if m in encoders}
    return preset(preset_name, modalities=mods, input_dims={m: data.input_dims[m] for m in mods},
                  num_classes=data.num_classes, class_names=data.class_names,
                  num_speakers=max(1, data.num_speakers), encoders=encoders, **overrides)


def make_splits(data: ConversationDataset, valid_fraction: float, seed: int) -> dict[str, list[int]]:
    """train/valid/test conversation indices. Without a validation split in the data (IEMOCAP), a seeded
    `valid_fraction` of the training conversations is held out for model selection."""
    splits = {s: data.indices(s) for s in ("train", "valid", "test")}
    if not splits["valid"] and splits["train"]:
        train = sorted(splits["train"])
        random.Random(seed).shuffle(train)
        n_valid = max(1, round(valid_fraction * len(train))) if len(train) > 1 else 0
        splits["valid"], splits["train"] = sorted(train[:n_valid]), sorted(train[n_valid:])
    if not splits["train"]:
        raise DataError(f"{data.source}: no training conversations (field split)")
    return splits


def inverse_frequency_weights(data: ConversationDataset, conversations: list[int], power: float = 1.0) -> torch.Tensor:
    """w_k = (N / (K * n_k)) ** power over the labelled training utterances (power 1: inverse frequency,
    below 1: tempered, nearer the plain CE that weighted F1 rewards); a class absent from training gets 0."""
    rows = torch.cat([data.labels[a:b] for a, b in ((int(data.cu_seqlens[i]), int(data.cu_seqlens[i + 1]))
                                                     for i in conversations)])
    rows = rows[rows != IGNORE_INDEX]
    counts = torch.bincount(rows, minlength=data.num_classes).float()
    weights = (rows.numel() / (data.num_classes * counts.clamp_min(1))) ** power
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


EVAL_BATCH_UTTERANCES = 4096   # no gradients at evaluation: larger batches


@torch.no_grad()
def predict_conversations(model: CMATH, data: ConversationDataset, conversations: list[int],
                          batch_utterances: int = EVAL_BATCH_UTTERANCES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predictions, probabilities) of every utterance of the given conversations, in the order the
    conversations are given; batches are length-bucketed internally."""
    model.eval()
    device = next(model.parameters()).device
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}          # conversation -> (labels, probs)
    for group in data.bucketed_batches(list(conversations), batch_utterances, shuffle=False):
        batch = data.batch(group, model.config.modalities).to(device)
        probs = model(batch, with_loss=False).logits.float().softmax(-1).cpu()
        cu = batch.cu_seqlens.tolist()
        for i, conv in enumerate(group):
            rows[conv] = batch.labels[cu[i]:cu[i + 1]].cpu(), probs[cu[i]:cu[i + 1]]
    if not conversations:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, model.config.num_classes))
    labels = torch.cat([rows[c][0] for c in conversations])
    probs = torch.cat([rows[c][1] for c in conversations])
    return labels.numpy(), probs.argmax(-1).numpy(), probs.numpy()


def evaluate_split(model, data, conversations) -> tuple[dict, np.ndarray, np.ndarray]:
    y, p, _ = predict_conversations(model, data, conversations)
    return classification_metrics(y, p, data.class_names), y, p


def learning_rate(tcfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warmup over `warmup_epochs`, then constant or cosine decay to 0 at the end of `epochs`.
    A function of the global step alone, so a resumed run follows the same schedule."""
    warmup = tcfg.warmup_epochs * steps_per_epoch
    total = max(tcfg.epochs * steps_per_epoch, 1)
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if tcfg.lr_schedule == "cosine" and step >= warmup:
        scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))
    return tcfg.lr * scale


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31 - 1)   # eps of the variational sample: new for every step


def train(data: ConversationDataset, config: CMATHConfig, tcfg: TrainConfig, out_dir: str | Path,
          *, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train CMATH, select the epoch on validation, write config.json, best.safetensors, last.safetensors,
    metrics.json and confusion_matrix.png into out_dir. Returns the metrics dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = tcfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    check_compatible(data, config)
    torch.manual_seed(tcfg.seed)
    model = CMATH(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    state = {"epoch": 0, "global_step": 0, "history": [], "best_valid": None, "best_test": None}
    if resume:
        ckpt = out / "last.safetensors"
        if not ckpt.exists():
            raise FileNotFoundError(f"--resume: {ckpt} does not exist (nothing to resume)")
        saved = load_config(out / "config.json")
        if saved != config:
            raise ValueError(f"--resume: {out / 'config.json'} differs from this run's config; "
                             "resume with the same preset, modalities and options")
        state = load_checkpoint(ckpt, model, optimizer, device)
        splits = state["splits"]
        log(f"resumed from {ckpt} after epoch {state['epoch']}")
    else:
        splits = make_splits(data, tcfg.valid_fraction, tcfg.seed)
        state["splits"] = splits
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(tcfg), indent=2) + "\n")
    if config.class_weights:
        model.class_weight.copy_(inverse_frequency_weights(data, splits["train"], config.class_weight_power))

    lengths = data.lengths()
    n_train = sum(lengths[i] for i in splits["train"])
    log(f"data {data.source}: {len(data)} conversations ({len(splits['train'])} train, {len(splits['valid'])} "
        f"valid, {len(splits['test'])} test), modalities {','.join(config.modalities)}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")
    for epoch in range(state["epoch"] + 1, tcfg.epochs + 1):
        torch.manual_seed(tcfg.seed * 10_007 + epoch)        # dropout stream: same run whether resumed or not
        model.train()
        batches = data.bucketed_batches(splits["train"], tcfg.batch_utterances, shuffle=True,
                                        seed=tcfg.seed * 10_007 + epoch)
        total, count, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch")
        for group in bar:
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(tcfg, state["global_step"], len(batches))
            batch = data.batch(group, config.modalities).to(device)
            out_b = model(batch, seed=_step_seed(tcfg.seed, state["global_step"]))
            optimizer.zero_grad(set_to_none=True)
            out_b.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            state["global_step"] += 1
            loss = out_b.loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at epoch {epoch}, step {state['global_step']}")
            total += loss * batch.num_utterances
            count += batch.num_utterances
            bar.set_postfix(loss=f"{loss:.3f}")
        train_seconds = time.perf_counter() - t0
        valid, _, _ = evaluate_split(model, data, splits["valid"]) if splits["valid"] else (None, None, None)
        test, y_test, p_test = evaluate_split(model, data, splits["test"]) if splits["test"] else (None, None, None)
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "utterances_per_second": n_train / train_seconds,
               "valid": valid, "test": test}
        state["history"].append(row)
        state["epoch"] = epoch
        score = valid["weighted_f1"] if valid else -row["train_loss"]
        if state["best_valid"] is None or score > state["best_valid"]["score"]:
            state["best_valid"] = {"score": score, "epoch": epoch, "valid": valid, "test": test}
            save_checkpoint(out / "best.safetensors", model, optimizer, state)
            if test is not None:
                save_confusion_matrix(y_test, p_test, data.class_names, out / "confusion_matrix.png",
                                      f"test, epoch {epoch} (selected on validation)")
        if test is not None and (state["best_test"] is None
                                 or test["weighted_f1"] > state["best_test"]["weighted_f1"]):
            state["best_test"] = {"weighted_f1": test["weighted_f1"], "accuracy": test["accuracy"], "epoch": epoch}
        save_checkpoint(out / "last.safetensors", model, optimizer, state)
        _write_metrics(out, state)
        log(f"epoch {epoch:3d}/{tcfg.epochs}  loss {row['train_loss']:.4f}  "
            + (f"valid wF1 {valid['weighted_f1']:5.2f} acc {valid['accuracy']:5.2f}  " if valid else "")
            + (f"test wF1 {test['weighted_f1']:5.2f} acc {test['accuracy']:5.2f}  " if test else "")
            + f"{row['utterances_per_second']:.0f} utt/s")
        if tcfg.patience is not None and valid and epoch - state["best_valid"]["epoch"] >= tcfg.patience:
            log(f"early stop: no better validation weighted F1 for {tcfg.patience} epochs "
                f"(best epoch {state['best_valid']['epoch']})")
            break
    return json.loads((out / "metrics.json").read_text())


def _write_metrics(out: Path, state: dict) -> None:
    best = state["best_valid"]
    test = best["test"] or {}
    metrics = {
        "selected_by_validation": {"weighted_f1": test.get("weighted_f1"), "accuracy": test.get("accuracy"),
                                   "per_class_f1": test.get("per_class_f1"), "epoch": best["epoch"],
                                   "valid_weighted_f1": (best["valid"] or {}).get("weighted_f1")},
        "best_test_epoch": state["best_test"],
        "history": state["history"],
    }
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))


def load_trained(checkpoint_dir: str | Path, device: str = "cpu") -> CMATH:
    ckpt = Path(checkpoint_dir)
    config = load_config(ckpt / "config.json")
    model = CMATH(config).to(device)
    load_checkpoint(ckpt / "best.safetensors", model, None, device)
    model.eval()
    return model


def evaluation_conversations(data: ConversationDataset) -> list[int]:
    """The test split when the data has one, else every conversation."""
    return data.indices("test") or list(range(len(data)))
