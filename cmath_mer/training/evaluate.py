"""A trained model on conversations: class probabilities per utterance (sharded over the ranks of a
distributed run), metrics of a split, and a run folder's model loaded back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmath_mer.data import ConversationDataset
from cmath_mer.data.batching import eval_shards
from cmath_mer.errors import CheckpointError, ConfigError
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import config_from_dict, config_to_dict, load_config
from cmath_mer.training import distributed
from cmath_mer.training.checkpoint import load_checkpoint, read_metadata
from cmath_mer.training.metrics import classification_metrics
from cmath_mer.training.precision import Precision

EVAL_BATCH_UTTERANCES = 4096   # no gradients at evaluation: larger batches


@torch.inference_mode()
def predict_conversations(model: CMATH, data: ConversationDataset, conversations: list[int],
                          batch_utterances: int = EVAL_BATCH_UTTERANCES, precision: str | None = None,
                          sharded: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predictions, probabilities) of every utterance of the given conversations, in the order the
    conversations are given; batches are length-bucketed internally. `precision` (bf16, fp16, fp32): the
    autocast of the forward; None runs under whatever autocast the caller set (training sets its own).
    sharded (every rank of a distributed run calls it): each rank runs some of the very batches one process
    would run, and the outputs are gathered, so every rank returns the single-process arrays exactly."""
    model.eval()
    if precision is not None:
        with Precision(precision, next(model.parameters()).device).autocast():
            return predict_conversations(model, data, conversations, batch_utterances, sharded=sharded)
    device = next(model.parameters()).device
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}          # conversation -> (labels, probs)
    groups = data.bucketed_batches(list(conversations), batch_utterances, shuffle=False)
    ctx = distributed.context()
    if sharded and ctx.active:
        groups = eval_shards(groups, data.lengths(), ctx.world_size)[ctx.rank]
    for group in groups:
        batch = data.batch(group, model.config.modalities).to(device)
        probs = model(batch, with_loss=False).logits.float().softmax(-1).cpu()
        cu = batch.cu_seqlens.tolist()
        for i, conv in enumerate(group):
            rows[conv] = batch.labels[cu[i]:cu[i + 1]].cpu(), probs[cu[i]:cu[i + 1]]
    if sharded and ctx.active:
        rows = {conv: row for part in distributed.all_gather(rows) for conv, row in part.items()}
    if not conversations:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, model.config.num_classes))
    labels = torch.cat([rows[c][0] for c in conversations])
    probs = torch.cat([rows[c][1] for c in conversations])
    return labels.numpy(), probs.argmax(-1).numpy(), probs.numpy()


def evaluate_split(model, data, conversations, sharded: bool = False) -> tuple[dict | None, np.ndarray, np.ndarray]:
    """Metrics of the conversations (None when none of their utterances is labelled), labels, predictions.
    sharded: every rank of a distributed run calls it and gets the single-process result."""
    y, p, _ = predict_conversations(model, data, conversations, sharded=sharded)
    if not (y >= 0).any():
        return None, y, p
    return classification_metrics(y, p, data.class_names), y, p


def load_trained(checkpoint_dir: str | Path, device: str = "cpu") -> CMATH:
    """The model of a run folder's best.safetensors (last.safetensors before best was first written),
    built from the config the checkpoint carries; a config.json beside it must say the same (an edited
    config would silently change predictions)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint {folder}: not a run folder"
                              + (" (no such folder)" if not folder.exists() else ""))
    path = folder / "best.safetensors"
    if not path.exists() and (folder / "last.safetensors").exists():
        # killed in epoch 1 between its two writes: last holds the only epoch, the one validation selects
        path = folder / "last.safetensors"
    meta = read_metadata(path)
    if meta["config"] is not None:
        try:
            config = config_from_dict(meta["config"], f"{path} (metadata 'config')")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
        if (folder / "config.json").exists():
            try:
                beside = config_to_dict(load_config(folder / "config.json"))
            except ConfigError as err:
                raise CheckpointError(str(err)) from None
            if beside != meta["config"]:
                trained = meta["config"]
                diff = ", ".join(f"{k}: {beside.get(k)!r} there, {trained[k]!r} trained"
                                 for k in trained if beside.get(k) != trained[k])
                raise CheckpointError(f"{folder / 'config.json'}: does not match the config {path.name} was "
                                      f"trained with ({diff}); restore it or retrain")
    else:                                                           # a checkpoint from before configs were embedded
        try:
            config = load_config(folder / "config.json")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    model = CMATH(config).to(device)
    load_checkpoint(path, model, None, device, averaged=True)
    model.eval()
    return model


def evaluation_conversations(data: ConversationDataset) -> list[int]:
    """The test split when the data has one, else every conversation."""
    return data.indices("test") or list(range(len(data)))
