"""`--cuda-graphs`: the training step captured in a CUDA graph once per batch shape, then replayed.

Why. On an H100 the eager step is bound by the host: a 16 x ~100-utterance step issues ~2,000 kernel
launches and spends 16 ms of GPU time in 175 ms of wall time (profile, benchmarks/results/2026-11-26-h100);
the same step replayed from a CUDA graph took 7.6 ms against 87.5 ms eager, bitwise equal.

How (PyTorch's whole-network capture, once per (utterances, conversations) shape):
- The first step of a shape runs eagerly, on a side stream (a real, counted step: autotuning, the caching
  allocator and AdamW's state happen there), then the same step is captured on static copies of that batch.
  Every later step of that shape copies its batch into the static buffers and replays the graph. Batches
  group conversations sorted by length, so the shapes of the first epoch recur in every later one.
- Whatever changes between replays is read from device memory: the batch buffers, the variational seed
  (the kernels load it), the learning rate (a tensor in fused, capturable AdamW). Dropout draws new numbers
  on every replay (PyTorch's generator is graph-safe), so a run is as random as an eager one, not equal to it.
- Batches are padded to a few shape classes (padded_size), so a corpus whose batches all differ in size
  captures tens of graphs, not one per batch: the utterances rounded up to 4 significant bits (classes 1/16
  to 1/8 apart), the conversations to a power of two. The padding rows form conversations of their own, at
  most the batch's rounded length bound each (the bound stays true), after zero-length ones that fill up the
  conversation count; Batch.valid marks the real rows, and the model leaves the padding rows out of every
  loss term, the loss's normalisers and the meter's utterance counts (model/cmath.py). Eager steps are not
  padded.
- All graphs share one memory pool: nothing allocated inside a capture outlives its replay (gradients,
  optimizer state and meters exist before the first capture), so one graph may reuse another's memory. The
  static batches' features are views of one buffer per modality (SharedFeatures): about one batch of
  features on the GPU, however many shapes are captured.

When (train.resolve_cuda_graphs: a run that does not choose takes CUDA graphs wherever these hold): a CUDA
device, the Triton ops (the reference attention reads cu_seqlens on the host), bf16 or fp32 with TF32 (fp16's
loss scaler reads its inf flag on the host), no gradient accumulation, no torch.compile, one process.
"""
from __future__ import annotations

import torch

from cmath_mer.kernels.cu_seqlens import length_bound


def batch_shape(batch) -> tuple:
    """What a captured graph is specialised to: every tensor's shape (T utterances, B conversations) and the
    bound on the conversation lengths, rounded (packing.length_bound): the attention backward picks its kernels
    from the bound on the host, so a graph replays only for batches within the bound it was captured with."""
    return (batch.num_utterances, batch.cu_seqlens.numel(),
            tuple((m, tuple(x.shape), x.dtype) for m, x in sorted(batch.features.items())),
            length_bound(batch.max_seqlen))


ROW_BITS = 4            # significant bits kept of a padded batch's utterance count


def round_up(n: int, bits: int) -> int:
    """The least m * 2^e >= n with m < 2^bits: n itself up to 2^bits, then steps of at most 1/2^(bits-1)."""
    shift = max(0, n.bit_length() - bits)
    return -(-n >> shift) << shift


def padded_size(batch) -> tuple[int, int]:
    """(rows, conversations) of the padded batch a graph replays `batch` in: as many as the batch's when both
    are already class sizes. Padding conversations come with at least one padding row: the zero-length ones
    start and end at a row index inside the batch (cu_seqlens.neighbour_masks indexes them)."""
    T, B = batch.num_utterances, batch.cu_seqlens.numel() - 1
    bound = length_bound(batch.max_seqlen)

    def conversations(rows: int) -> int:
        return 1 << (B + -(-(rows - T) // (bound or max(rows - T, 1))) - 1).bit_length()
    rows = round_up(T, ROW_BITS)
    if rows == T and conversations(rows) > B:
        rows = round_up(T + 1, ROW_BITS)
    return rows, conversations(rows)


def padding_offsets(T: int, rows: int, pads: int, bound: int | None) -> list[int]:
    """The ends of `pads` padding conversations after T real rows, the last at `rows`: the leading ones empty,
    the others at most `bound` rows each (bound None: one conversation takes all the padding rows). No padding
    conversation without a padding row (padded_size)."""
    step = bound or rows - T
    return [max(T, rows - (pads - 1 - j) * step) for j in range(pads)]


def padded_shape(batch) -> tuple:
    """batch_shape of the padded batch a graph replays `batch` in."""
    rows, conversations = padded_size(batch)
    return (rows, conversations + 1,
            tuple((m, (rows, *x.shape[1:]), x.dtype) for m, x in sorted(batch.features.items())),
            length_bound(batch.max_seqlen))


class SharedFeatures:
    """One buffer per modality that the static batches of all graphs view: a replay's features sit in its first
    T rows. Steps run one after another on one stream, so one buffer serves every batch shape, and the static
    inputs of a run hold about one batch, not one copy per captured shape (a corpus whose batches all differ
    in size would otherwise sit on the GPU once more, in pieces). A batch longer than the buffer gets a new one
    of at least 1.5x the rows; graphs captured before keep the old one alive through their views, so all the
    buffers together stay under 3x the last one, itself under 1.5x the longest batch (a bucketed epoch's
    batches are about `batch_utterances` each: one or two buffers)."""

    GROWTH = 1.5

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def view(self, modality: str, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """The first `rows` (default: x's) rows of the buffer for tensors like x."""
        rows = x.shape[0] if rows is None else rows
        buf = self.buffers.get(modality)
        same_kind = (buf is not None and buf.shape[1:] == x.shape[1:] and buf.dtype == x.dtype
                     and buf.device == x.device)
        if not same_kind or buf.shape[0] < rows:
            size = max(rows, int(buf.shape[0] * self.GROWTH)) if same_kind else rows
            buf = self.buffers[modality] = x.new_empty((size, *x.shape[1:]))
        return buf[:rows]


def static_copy(batch, shared: SharedFeatures, pad: bool = False):
    """Buffers a graph reads its batch from, filled with this batch (padded to padded_size when `pad`): the
    features as views of the shared buffers, the rest (a few ints per utterance) its own; its bound is the
    rounded one, true for every batch of the shape."""
    from cmath_mer.model.batch import Batch
    if not pad:
        features = {m: shared.view(m, x).copy_(x) for m, x in batch.features.items()}
        return Batch(features, batch.speakers.clone(), batch.labels.clone(), batch.cu_seqlens.clone(),
                     list(batch.conversation_ids), length_bound(batch.max_seqlen))
    rows, conversations = padded_size(batch)
    features = {m: shared.view(m, x, rows) for m, x in batch.features.items()}
    cu = batch.cu_seqlens
    # the offsets of a valid layout, for the host check of Batch; fill writes this batch's own
    cu_layout = torch.arange(conversations + 1, dtype=cu.dtype).clamp_max(1) * rows
    static = Batch(features, batch.speakers.new_empty(rows), batch.labels.new_empty(rows),
                   cu_layout.to(cu.device), list(batch.conversation_ids), length_bound(batch.max_seqlen),
                   valid=torch.empty(rows, dtype=torch.bool, device=cu.device))
    fill(static, batch)
    return static


def fill(static, batch) -> None:
    """Copies `batch` into the static buffers; a padded static batch gets padding rows after it (zero
    features, speaker 0, no label) in the conversations padding_offsets lays out."""
    T, B = batch.num_utterances, batch.cu_seqlens.numel() - 1
    for m, x in batch.features.items():
        static.features[m][:T].copy_(x, non_blocking=True)
    static.speakers[:T].copy_(batch.speakers, non_blocking=True)
    static.labels[:T].copy_(batch.labels, non_blocking=True)
    static.cu_seqlens[:B + 1].copy_(batch.cu_seqlens, non_blocking=True)
    if static.valid is None:
        return
    from cmath_mer.model.batch import IGNORE_INDEX
    for x in static.features.values():
        x[T:].zero_()                      # finite: a masked row's gradients are 0 x its inputs
    static.speakers[T:].zero_()
    static.labels[T:].fill_(IGNORE_INDEX)
    static.valid[:T].fill_(True)
    static.valid[T:].fill_(False)
    rows, pads = static.num_utterances, static.cu_seqlens.numel() - 1 - B
    if pads:            # padding_offsets, computed on the device: no host tensor to copy (and wait for)
        tail = static.cu_seqlens[B + 1:]
        countdown = torch.arange(pads - 1, -1, -1, dtype=tail.dtype, device=tail.device)
        torch.clamp(countdown * -(static.max_seqlen or rows - T) + rows, min=T, out=tail)


class CudaGraphs:
    """The CUDA side: an eager run on a side stream (the capture recipe's warm-up) and a capture into a
    graph that shares the stepper's memory pool. Tests on the CPU pass a stand-in with the same methods."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def eager(self, fn) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        # thread_local: Prefetcher's thread pins the next batches (a pinned host allocation, event
        # queries) while this thread captures, and in the default "global" mode such a call from any thread
        # during a capture invalidates it; the capture's own thread is still checked
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        return graph


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Fused, capturable AdamW with its learning rate in a device tensor and its step counters on the device
    (also after a checkpoint of an eager run was loaded into it)."""
    for group in optimizer.param_groups:
        group["fused"], group["capturable"], group["foreach"] = True, True, None
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
