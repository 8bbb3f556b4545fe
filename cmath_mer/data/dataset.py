"""Packed conversations: every per-utterance tensor is (T, ...) with cu_seqlens, no padding anywhere."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from cmath_mer.errors import DataError
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.batch import IGNORE_INDEX, Batch  # noqa: F401  (the data package names them too)

SPLITS = ("train", "valid", "test")


@dataclass
class ConversationDataset:
    """All conversations of a corpus, packed. Conversation i spans rows cu_seqlens[i]:cu_seqlens[i+1]."""
    features: dict[str, torch.Tensor]    # modality -> (T, d_m) float32, modalities in T, A, V order
    speakers: torch.Tensor               # (T,) int64 in [0, num_speakers)
    labels: torch.Tensor                 # (T,) int64 in [0, num_classes) or IGNORE_INDEX
    cu_seqlens: torch.Tensor             # (B+1,) int64 offsets (int32 is made per batch)
    splits: list[str]                    # (B,) one of SPLITS per conversation
    conversation_ids: list[str]          # (B,)
    class_names: tuple[str, ...]
    num_speakers: int
    source: str = "<memory>"             # the file it came from, for error messages
    speaker_names: tuple[str, ...] | None = None   # (num_speakers,) names of speaker indices, if known
    # what the data came from beyond the tensors, kept in the file's header: featurize writes `encoders`
    # (name, version, width per modality), `inputs`, `speaker_map` and `transcript` (store.py lists them)
    metadata: dict = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.features)

    @property
    def input_dims(self) -> dict[str, int]:
        return {m: x.shape[1] for m, x in self.features.items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.conversation_ids)

    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def batch(self, conversations: list[int], modalities: tuple[str, ...] | None = None) -> Batch:
        """Pack the given conversations (indices) into one Batch."""
        bounds = self.cu_seqlens.tolist()
        lengths = [bounds[i + 1] - bounds[i] for i in conversations]
        bad = next((i for i, n in zip(conversations, lengths) if n < 0), None)
        if bad is not None:
            raise DataError(f"{self.source}: conversation {self.conversation_ids[bad]!r}: field 'cu_seqlens': "
                            f"offsets decrease ({bounds[bad]} then {bounds[bad + 1]})")
        rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in conversations])
        cu = cu_seqlens_from(lengths)
        mods = self.modalities if modalities is None else modalities
        return Batch({m: self.features[m][rows] for m in mods}, self.speakers[rows], self.labels[rows], cu,
                     [self.conversation_ids[i] for i in conversations], max(lengths, default=0))

    def bucketed_batches(self, conversations: list[int], max_utterances: int, *, shuffle: bool,
                         seed: int = 0) -> list[list[int]]:
        """Group conversations of similar length into batches of about max_utterances utterances.

        Sorting by length keeps batches homogeneous; the order of batches is shuffled when training.
        A conversation longer than max_utterances gets a batch of its own (never dropped, never cut).
        """
        lengths = self.lengths()
        rng = random.Random(seed)
        order = sorted(conversations, key=lambda i: (lengths[i], rng.random() if shuffle else i))
        batches, current, size = [], [], 0
        for i in order:
            if current and size + lengths[i] > max_utterances:
                batches.append(current)
                current, size = [], 0
            current.append(i)
            size += lengths[i]
        if current:
            batches.append(current)
        if shuffle:
            rng.shuffle(batches)
        return batches
