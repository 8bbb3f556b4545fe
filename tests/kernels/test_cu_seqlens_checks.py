"""cu_seqlens that break the packed layout (first 0, last T, non-decreasing) are refused before a Triton kernel
reads them: by the op's own guard when the tensor is on the CPU (a host read costs no synchronisation there),
and where batches are built on the host (Batch, ConversationDataset.batch, cu_seqlens_from), so a batch moved
to the GPU was checked before it went. Without these checks the kernels left rows unwritten or read past the
tensors."""
from __future__ import annotations

import pytest
import torch

from cmath_mer.data.dataset import Batch, ConversationDataset, DataError
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from

from helpers import needs_triton


def _broken(lengths):
    """(description, offsets, T) of three broken layouts of a random batch with these lengths."""
    cu = cu_seqlens_from(lengths).tolist()
    T = cu[-1]
    i = int(torch.randint(1, len(lengths), ()))
    swapped = cu[:i] + [cu[i + 1], cu[i]] + cu[i + 2:]               # a decreasing pair inside
    return [("start", [1] + cu[1:], T), ("end", cu[:-1] + [T - 1], T), ("decrease", swapped, T)]


def _lengths():
    return [int(n) for n in torch.randint(1, 20, (int(torch.randint(3, 7, ())),))]


@needs_triton
@pytest.mark.parametrize("case", [0, 1, 2])
def test_the_triton_op_refuses_a_broken_layout_on_the_cpu(nan_poison, case):
    from cmath_mer.kernels.attention import fused
    lengths = _lengths()
    what, bounds, T = _broken(lengths)[case]
    q, k, v = torch.randn(T, 2, 16), torch.randn(1, T, 2, 16), torch.randn(1, T, 2, 16)
    cu = torch.tensor(bounds, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens") as err:
        fused.fused_multi_source_attention(q, k, v, cu, max_seqlen=max(lengths))
    assert "\n" not in str(err.value), what
    fused.fused_multi_source_attention(q, k, v, cu_seqlens_from(lengths))          # the good layout runs


@pytest.mark.parametrize("case", [0, 1, 2])
def test_a_batch_built_on_the_host_with_a_broken_layout_names_the_conversation_and_field(case):
    lengths = _lengths()
    what, bounds, T = _broken(lengths)[case]
    ids = [f"conv{i}" for i in range(len(lengths))]
    with pytest.raises(DataError, match=r"field 'cu_seqlens'") as err:
        Batch({"text": torch.randn(T, 3)}, torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long),
              torch.tensor(bounds, dtype=torch.int32), ids)
    assert "conversation 'conv" in str(err.value), what
    Batch({"text": torch.randn(T, 3)}, torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long),
          cu_seqlens_from(lengths), ids)


def test_a_negative_length_is_refused_where_offsets_are_made():
    lengths = _lengths()
    i = int(torch.randint(0, len(lengths), ()))
    lengths[i] = -lengths[i]
    with pytest.raises(ValueError, match=f"conversation {i} .*negative length"):
        cu_seqlens_from(lengths)


def test_dataset_batch_names_the_file_conversation_and_field_of_decreasing_offsets():
    lengths = _lengths()
    cu = cu_seqlens_from(lengths, torch.int64)
    i = int(torch.randint(1, len(lengths), ()))
    cu[i] = cu[i + 1] + 1                                            # conversation i-1 overlaps, i decreases
    T = int(cu[-1])
    ids = [f"dia{j}" for j in range(len(lengths))]
    ds = ConversationDataset({"text": torch.randn(T, 3)}, torch.zeros(T, dtype=torch.long),
                             torch.zeros(T, dtype=torch.long), cu, ["train"] * len(lengths), ids, ("a", "b"), 1,
                             source="corpus.pt")
    with pytest.raises(DataError, match=rf"corpus.pt: conversation 'dia{i}': field 'cu_seqlens'"):
        ds.batch(list(range(len(lengths))))
