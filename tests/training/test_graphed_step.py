"""--cuda-graphs (training/graphs.py) without a GPU: a stand-in for the CUDA graph API records the captured step
and replays it by running it again on the static buffers, which is what a graph replay computes. What a
replay must read from memory (the batch, the variational seed, the learning rate) is then checked against
eager steps; the capture itself was verified on an H100 (benchmarks/results/2026-11-26-h100, run 3)."""
from __future__ import annotations

import pytest
import torch

from cmath_mer.bench import model_batch
from cmath_mer.errors import ConfigError
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.graphs import batch_shape
from cmath_mer.training.meter import StepMeter
from cmath_mer.training.precision import Precision
from cmath_mer.training.step import GraphedStepper, Stepper
from cmath_mer.training.train import resolve_cuda_graphs

from helpers import StandInGraphs


def _steppers(seed, pad=False):
    """An eager and a graphed stepper of one model; unpadded by default, so that the graphed steps equal the eager
    ones bit for bit (padding changes the dropout draws; test_graphed_padding.py checks it)."""
    cfg = preset("iemocap", backend="torch", d_model=32, n_heads=2, n_layers=1, d_hidden=32, d_latent=16)
    torch.manual_seed(seed)
    a = CMATH(cfg).train()
    b = CMATH(cfg).train()
    b.load_state_dict(a.state_dict())
    lr = 2.0 ** -9                          # exact in fp32: the graphed AdamW holds it in a float32 tensor
    opt_a = torch.optim.AdamW(a.parameters(), lr=lr, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=lr, fused=True)
    eager = Stepper(a, a, opt_a, Precision("fp32", "cpu"), 1.0, StepMeter("cpu"))
    graphs = StandInGraphs()
    graphed = GraphedStepper(b, opt_b, Precision("fp32", "cpu"), 1.0, StepMeter("cpu"), graphs, pad=pad)
    return cfg, (a, eager), (b, graphed), graphs


def test_replays_read_the_batch_seed_and_learning_rate_of_each_step():
    seed = int(torch.randint(0, 1000, ()))
    cfg, (a, eager), (b, graphed), graphs = _steppers(seed)
    # two shapes, alternating, each batch with new data: the second and later steps of a shape are replays
    shapes = [[5, 9], [12], [5, 9], [12], [5, 9], [12]]
    lrs = [2.0 ** -9, 2.0 ** -9, 2.0 ** -10, 2.0 ** -10, 2.0 ** -11, 2.0 ** -8]
    for step, (lengths, lr) in enumerate(zip(shapes, lrs)):
        batch = model_batch(cfg, lengths, "cpu", seed=seed * 100 + step)
        for stepper in (eager, graphed):
            torch.manual_seed(step)              # the same dropout draws for both
            stepper.set_lr(lr)
            stepper([batch], seed, step)
    assert graphs.captures == 2 and graphed.captured == 2 and graphed.replayed == 4
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    ma, mb = eager.meter.read(), graphed.meter.read()
    assert ma == mb and ma["steps"] == 6 and ma["first_step"] == 1


def test_a_new_shape_is_a_real_eager_step_then_a_capture():
    cfg, (a, eager), (b, graphed), graphs = _steppers(0)
    before = [p.detach().clone() for p in b.parameters()]
    graphed([model_batch(cfg, [7], "cpu")], 0, 0)
    assert graphs.captures == 1 and graphed.replayed == 0
    assert any(not torch.equal(p, q) for p, q in zip(before, b.parameters()))     # the eager step updated
    assert batch_shape(model_batch(cfg, [7], "cpu")) != batch_shape(model_batch(cfg, [3, 4], "cpu"))
    # the bound on the lengths picks the attention backward's kernels: rounded (a power of two >= 16) it is
    # part of the shape, and the static batch of a capture holds the rounded bound, true for every batch of it
    assert batch_shape(model_batch(cfg, [15, 15], "cpu")) != batch_shape(model_batch(cfg, [5, 25], "cpu"))
    assert batch_shape(model_batch(cfg, [10, 20], "cpu")) == batch_shape(model_batch(cfg, [2, 28], "cpu"))
    graphed([model_batch(cfg, [2, 28], "cpu")], 0, 1)
    (_, static), = [v for k, v in graphed.graphs.items() if k[0] == 30]
    assert static.max_seqlen == 32
    with pytest.raises(ValueError, match="one micro-batch"):
        graphed([model_batch(cfg, [7], "cpu")] * 2, 0, 1)


@pytest.mark.parametrize("settings,why", [
    (dict(device="cpu", precision="bf16"), "CUDA device"),
    (dict(device="cuda", precision="fp16"), "fp16"),
    (dict(device="cuda", precision="bf16", accumulate=2), "accumulate"),
    (dict(device="cuda", precision="bf16", compile=True), "compile"),
])
def test_cuda_graphs_refuse_what_they_cannot_capture(settings, why):
    cfg = preset("iemocap", backend="triton")
    with pytest.raises(ConfigError, match=why):
        resolve_cuda_graphs(TrainConfig(cuda_graphs=True, **settings), cfg)
    chosen, _ = resolve_cuda_graphs(TrainConfig(cuda_graphs=False, **settings), cfg)    # off: nothing to check
    assert chosen.cuda_graphs is False


def test_cuda_graphs_are_the_default_wherever_a_run_can_take_them():
    """A run that does not choose (the CLI's default) replays its steps from CUDA graphs when every condition
    holds (a CUDA device, the Triton ops, bf16 or TF32 fp32, one micro-batch, eager modules, one process),
    and otherwise runs eager and says why; --no-cuda-graphs keeps an eligible run eager."""
    triton = preset("iemocap", backend="triton")
    chosen, why = resolve_cuda_graphs(TrainConfig(device="cuda", precision="bf16"), triton)
    assert chosen.cuda_graphs is True and why is None
    chosen, _ = resolve_cuda_graphs(TrainConfig(device="cuda", precision="bf16", cuda_graphs=False), triton)
    assert chosen.cuda_graphs is False
    for settings, word in ((dict(device="cpu", precision="fp32"), "CUDA device"),
                           (dict(device="cuda", precision="fp16"), "fp16"),
                           (dict(device="cuda", precision="bf16", accumulate=2), "accumulate"),
                           (dict(device="cuda", precision="bf16", compile=True), "compile")):
        chosen, why = resolve_cuda_graphs(TrainConfig(**settings), triton)
        assert chosen.cuda_graphs is False and word in why, settings
    chosen, why = resolve_cuda_graphs(TrainConfig(device="cuda", precision="bf16"), preset("iemocap", backend="torch"))
    assert chosen.cuda_graphs is False and "Triton" in why


def test_shapes_beyond_the_cap_run_the_same_step_eagerly(monkeypatch):
    """At most MAX_GRAPHS shapes are captured; further shapes run the step's body uncaptured, and the parameters
    still follow the eager steps exactly."""
    seed = int(torch.randint(0, 1000, ()))
    cfg, (a, eager), (b, graphed), graphs = _steppers(seed)
    monkeypatch.setattr(GraphedStepper, "MAX_GRAPHS", 2)
    plan = [[12], [7, 9], [20], [12], [5, 5, 5], [7, 9]]
    for step, lengths in enumerate(plan):
        batch = model_batch(cfg, lengths, "cpu", seed=seed * 100 + step)
        for stepper in (eager, graphed):
            torch.manual_seed(step)
            stepper([batch], seed, step)
    assert (graphed.captured, graphed.replayed, graphed.uncaptured) == (2, 2, 2)
    assert graphs.captures == 2
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_static_batches_of_every_shape_view_one_feature_buffer_per_modality():
    """Captures of several shapes keep one copy of the features (views of one buffer per modality, a new one
    when a longer batch comes), and replays still read each step's own batch: the parameters equal eager
    steps."""
    seed = int(torch.randint(0, 1000, ()))
    cfg, (a, eager), (b, graphed), graphs = _steppers(seed)
    sizes = [int(n) for n in torch.randint(2, 14, (3,))]
    shapes = [[20, 20], [sizes[0]], [sizes[0], sizes[1]], [sizes[0], sizes[1], sizes[2]], [35, 35]]
    plan = shapes + shapes[::-1]                               # every shape captured, then every one replayed
    for step, lengths in enumerate(plan):
        batch = model_batch(cfg, lengths, "cpu", seed=seed * 100 + step)
        for stepper in (eager, graphed):
            torch.manual_seed(step)
            stepper([batch], seed, step)
    assert graphed.captured == 5 and graphed.replayed == 5
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    statics = [static for _, static in graphed.graphs.values()]
    for m in statics[0].features:
        storages = {x.features[m].untyped_storage().data_ptr(): x.features[m].untyped_storage().nbytes()
                    for x in statics}
        assert len(storages) == 2          # the four batches up to 40 utterances share one; the 70 a second
        assert all(x.features[m].data_ptr() == x.features[m].untyped_storage().data_ptr() for x in statics)
        row_bytes = statics[0].features[m][0].nbytes
        assert sum(storages.values()) <= 4.5 * 70 * row_bytes                     # SharedFeatures' bound


def test_captures_let_the_prefetcher_thread_pin_memory(monkeypatch):
    """Prefetcher pins the next batches on its own thread during a capture: CudaGraphs captures in the
    thread_local mode, where only the capturing thread's unsafe calls invalidate the graph (the default,
    global, fails the capture on a pin_memory from any thread)."""
    import contextlib

    from cmath_mer.training.graphs import CudaGraphs
    seen = []

    @contextlib.contextmanager
    def graph(cuda_graph, **kwargs):                     # torch.cuda.graph's signature, recorded
        seen.append(kwargs)
        yield
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    ran = []
    CudaGraphs(torch.device("cuda")).capture(lambda: ran.append(1))
    assert ran == [1] and seen == [dict(pool="pool", capture_error_mode="thread_local")]
