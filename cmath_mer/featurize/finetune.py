"""`featurize --finetune`: fit the text encoder to the corpus's own emotion labels before extracting features.

The encoder (the embedded all-MiniLM-L6-v2, or any local sentence-transformers / Hugging Face folder) is
trained as an utterance-level classifier (its sentence embedding -> a linear head, cross-entropy with class
weights tempered to the square root of inverse frequency) on the **train** conversations, the epoch chosen
by weighted F1 on the **valid** conversations (early stopping); test rows are never read beyond their text.
When the tables have no validation split, a seeded fraction of the training conversations is held out
(the same draw as `train`'s) and becomes the output's `valid` split, so every later run chooses its epoch
on conversations the encoder was not fitted on.

The fine-tuned encoder is saved beside the output, `<out>.encoder/` (a sentence-transformers folder, written
to a temporary folder and renamed into place), with `finetune.json` saying what made it. A re-run with the
same base model, train/valid rows and options reuses it; features are cached by its fingerprint like any
encoder's. An interrupted fine-tune leaves neither the folder nor the output.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cmath_mer.training.metrics import classification_metrics
from cmath_mer.training.precision import Precision

from ..data import DataError
from .tables import Corpus
from .text import DEFAULT_MODEL, TextEncoder, base_model_folder, fingerprint, folder_encoder, load_sentence_transformer

RECORD = "finetune.json"          # inside the encoder folder: what made it (part of its fingerprint)
HEAD_LR = 1e-3                    # the freshly initialised head learns faster than the pretrained encoder
CLASS_WEIGHT_POWER = 0.5          # tempered inverse-frequency weights, as the `meld` recipe's
WARMUP_FRACTION = 0.1             # of all steps: linear warmup, then linear decay to zero
EVAL_BATCH = 128


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    max_tokens: int = 64
    patience: int | None = None       # stop after this many epochs without a better valid weighted F1
    seed: int = 0
    precision: str = "fp32"
    valid_fraction: float = 0.1       # held out of train when the tables have no validation split

    def check(self) -> "FinetuneOptions":
        """A ValueError naming the option for a value that cannot be used."""
        for option, value, low in (("--epochs", self.epochs, 1), ("--finetune-batch-size", self.batch_size, 1),
                                   ("--max-tokens", self.max_tokens, 2), ("--seed", self.seed, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{option} {value}: must be an integer of at least {low}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"--patience {self.patience}: must be an integer of at least 1")
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"--lr {self.lr}: must be a positive number of at most 1")
        if not 0 < self.valid_fraction < 1:
            raise ValueError(f"valid_fraction {self.valid_fraction}: must be between 0 and 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision {self.precision!r}: choose fp32, bf16 or fp16")
        return self


def encoder_folder(out: str | Path) -> Path:
    """Where featurize keeps the fine-tuned encoder for an output file: beside it, `<out>.encoder/`."""
    out = Path(out)
    return out.with_name(out.name + ".encoder")


# ------------------------------------------------------------------------------------------------- splits

def fitting_splits(corpus: Corpus, options: FinetuneOptions) -> tuple[list[int], list[int], bool]:
    """(train, valid) conversation indices of the corpus, and whether valid was carved out of train.
    The carving is train.make_splits's: the sorted training conversations shuffled by `seed`."""
    train = [i for i, c in enumerate(corpus.conversations) if c[0].split == "train"]
    valid = [i for i, c in enumerate(corpus.conversations) if c[0].split == "valid"]
    carved = not valid
    if carved and len(train) > 1:
        order = sorted(train)
        random.Random(options.seed).shuffle(order)
        n_valid = max(1, round(options.valid_fraction * len(order)))
        valid, train = sorted(order[:n_valid]), sorted(order[n_valid:])
    _check_labels(corpus, train, "train")
    _check_labels(corpus, valid, "valid")
    return train, valid, carved


def _check_labels(corpus: Corpus, conversations: list[int], split: str) -> None:
    labels = {u.label for i in conversations for u in corpus.conversations[i] if u.label is not None}
    if len(labels) >= (2 if split == "train" else 1):
        return
    names = ", ".join(t.name for t in corpus.tables)
    found = f"its labels are all {labels.pop()!r}" if labels else "none of its rows has a label"
    what = {"train": "labelled training utterances of at least two classes",
            "valid": "labelled validation utterances to choose the epoch on"}[split]
    raise DataError(f"{names}: field 'label': --finetune needs {what}, and split {split!r} has "
                    f"{sum(len(corpus.conversations[i]) for i in conversations)} rows: {found}")


def _rows(corpus: Corpus, conversations: list[int]) -> tuple[list[str], list[int]]:
    """(texts, class indices) of the labelled utterances of these conversations."""
    index = {n: i for i, n in enumerate(corpus.class_names)}
    rows = [(u.text, index[u.label]) for i in conversations for u in corpus.conversations[i]
            if u.label is not None]
    return [t for t, _ in rows], [y for _, y in rows]


def recipe_key(base_fingerprint: str, corpus: Corpus, train: list[int], valid: list[int],
               options: FinetuneOptions) -> str:
    """What a fine-tuned encoder depends on: the base weights, the options, and the text and label of
    every train and valid row (test rows are not part of it)."""
    h = hashlib.sha256(json.dumps({"base": base_fingerprint, "options": asdict(options),
                                   "classes": list(corpus.class_names)}, sort_keys=True).encode())
    for split, conversations in (("train", train), ("valid", valid)):
        texts, labels = _rows(corpus, conversations)
        h.update(json.dumps([split, texts, labels]).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ training

class _Classifier(torch.nn.Module):
    """Sentence embedding -> class logits: a cosine classifier (the embedding is unit-normalised, as
    all-MiniLM-L6-v2's already is), scaled so its logits start in a useful range."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.head = torch.nn.Linear(dim, classes)
        self.scale = math.sqrt(dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(embedding.float(), dim=-1) * self.scale)


def _embed(net, texts: list[str]) -> torch.Tensor:
    prepare = net.preprocess if hasattr(net, "preprocess") else net.tokenize      # renamed in 5.x
    features = {k: v.to(net.device) if torch.is_tensor(v) else v for k, v in prepare(texts).items()}
    return net(features)["sentence_embedding"]


def _batches(texts: list[str], batch_size: int, generator: random.Random) -> list[list[int]]:
    """Shuffled batches of rows of similar length (less padding), in shuffled order."""
    order = list(range(len(texts)))
    generator.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(texts[i]))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    generator.shuffle(batches)
    return batches


@torch.no_grad()
def valid_score(net, classifier: _Classifier, texts: list[str], labels: list[int],
                class_names: tuple[str, ...], autocast) -> float:
    """Weighted F1 (percent) of the classifier on the validation rows."""
    net.eval()
    preds = []
    for start in range(0, len(texts), EVAL_BATCH):
        with autocast():
            preds.append(classifier(_embed(net, texts[start:start + EVAL_BATCH])).argmax(-1).cpu())
    net.train()
    return classification_metrics(np.asarray(labels), torch.cat(preds).numpy(), class_names)["weighted_f1"]


def _class_weights(labels: list[int], classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(labels), minlength=classes).float()
    weights = (len(labels) / (classes * counts.clamp_min(1))) ** CLASS_WEIGHT_POWER
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def _train(net, corpus: Corpus, train: list[int], valid: list[int], options: FinetuneOptions,
           progress: bool, log) -> dict:
    """Fine-tune `net` in place; it ends with the weights of the validation-chosen epoch. Returns the
    history and the choice."""
    torch.manual_seed(options.seed)
    texts, labels = _rows(corpus, train)
    valid_texts, valid_labels = _rows(corpus, valid)
    dim = net.get_embedding_dimension() if hasattr(net, "get_embedding_dimension") \
        else net.get_sentence_embedding_dimension()
    classifier = _Classifier(dim, len(corpus.class_names)).to(net.device)
    precision = Precision(options.precision, net.device)
    optimizer = torch.optim.AdamW([{"params": net.parameters(), "lr": options.lr},
                                   {"params": classifier.parameters(), "lr": HEAD_LR}], weight_decay=0.01)
    rng = random.Random(options.seed)
    steps = options.epochs * math.ceil(len(texts) / options.batch_size)
    warmup = max(1, round(WARMUP_FRACTION * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    weights = _class_weights(labels, len(corpus.class_names)).to(net.device)
    target = torch.tensor(labels)
    best, history, waited = None, [], 0
    net.train()
    for epoch in range(1, options.epochs + 1):
        total, seen = 0.0, 0
        bar = tqdm(_batches(texts, options.batch_size, rng), desc=f"fine-tune epoch {epoch}/{options.epochs}",
                   unit="batch", disable=not progress)
        for batch in bar:
            with precision.autocast():
                logits = classifier(_embed(net, [texts[i] for i in batch]))
            loss = F.cross_entropy(logits.float(), target[batch].to(net.device), weight=weights)
            optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
            schedule.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        score = valid_score(net, classifier, valid_texts, valid_labels, corpus.class_names, precision.autocast)
        history.append({"epoch": epoch, "train_loss": total / max(1, seen), "valid_weighted_f1": score})
        log(f"fine-tune epoch {epoch}: training loss {total / max(1, seen):.4f}, valid weighted F1 {score:.2f}")
        if best is None or score > best[0]:
            best, waited = (score, epoch, copy.deepcopy(net.state_dict())), 0
        else:
            waited += 1
            if options.patience is not None and waited >= options.patience:
                log(f"fine-tune: no better valid weighted F1 for {waited} epoch(s); stopping")
                break
    score, epoch, state = best
    net.load_state_dict(state)
    return {"epoch": epoch, "valid_weighted_f1": score, "history": history}


# ---------------------------------------------------------------------------------------- the saved folder

def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale(folder: Path) -> None:
    """Temporary folders of fine-tunes that were killed before they finished (ours by their name)."""
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    """Move the finished folder into place; a previous fine-tune's folder is replaced only once the new
    one is complete."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finetuned_encoder(corpus: Corpus, base: str | None, folder: Path, options: FinetuneOptions, *,
                      device: str | None = None, progress: bool = True, log=print) -> tuple[TextEncoder, list[int]]:
    """The fine-tuned encoder in `folder` (trained now, or reused when it was made from the same base,
    rows and options), and the conversations it was validated on (to mark as `valid` in the output)."""
    options.check()
    train, valid, carved = fitting_splits(corpus, options)
    base_folder = base_model_folder(base)
    if not base_folder.is_dir():
        raise FileNotFoundError(f"--text-encoder {base}: no such model folder (a local sentence-transformers "
                                f"or Hugging Face model folder; nothing is downloaded)")
    base_name = "all-MiniLM-L6-v2" if base is None else base_folder.name
    base_print = fingerprint(base_folder)
    key = recipe_key(base_print, corpus, train, valid, options)
    folder = Path(folder)
    record = _read_record(folder) if folder.exists() else None
    if folder.exists() and record is None:
        raise DataError(f"{folder}: exists and is not a fine-tuned encoder of featurize (no {RECORD}); "
                        f"move it away or name another --out")
    if record is None or record.get("recipe") != key:
        _remove_stale(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            net, _ = load_sentence_transformer(base_folder, device)
            net.max_seq_length = options.max_tokens
            result = _train(net, corpus, train, valid, options, progress, log)
            net.save(str(tmp), create_model_card=False)
            record = {"recipe": key, "base_model": DEFAULT_MODEL if base is None else str(base_folder),
                      "base_name": base_name, "base_fingerprint": base_print,
                      "fitted_on": "train", "chosen_on": "valid", "valid_carved_from_train": carved,
                      "train_utterances": len(_rows(corpus, train)[0]),
                      "valid_utterances": len(_rows(corpus, valid)[0]),
                      "options": asdict(options), **result}
            (tmp / RECORD).write_text(json.dumps(record, indent=1))
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        log(f"fine-tune: reusing {folder} (same base model, train/valid rows and options)")
    extra = {"finetune": {k: record[k] for k in ("base_model", "base_name", "base_fingerprint", "fitted_on",
                                                  "chosen_on", "valid_carved_from_train", "epoch",
                                                  "valid_weighted_f1", "options")}}
    encoder = folder_encoder(folder, device, name=f"{base_name} fine-tuned", model_id=str(folder.resolve()),
                             extra=extra)
    return encoder, valid


def mark_valid(corpus: Corpus, valid: list[int]) -> None:
    """The conversations the encoder was validated on become the output's `valid` split."""
    for i in valid:
        for u in corpus.conversations[i]:
            u.split = "valid"
