"""Graphed steps replay batches padded to shape classes (training/graphs.py): the padding rows must change
nothing, neither the loss (every term, every normaliser) nor the gradients nor the meter's counts, and a corpus
of many batch sizes must capture no more graphs than it has classes."""
from __future__ import annotations

import pytest
import torch

from cmath_mer.bench import model_batch
from cmath_mer.kernels.cu_seqlens import length_bound
from cmath_mer.model.batch import IGNORE_INDEX
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset
from cmath_mer.training.graphs import (
    SharedFeatures,
    padded_shape,
    padded_size,
    padding_offsets,
    round_up,
    static_copy,
)
from cmath_mer.training.meter import StepMeter
from cmath_mer.training.precision import Precision
from cmath_mer.training.step import GraphedStepper, Stepper

from helpers import StandInGraphs


def _config(backend="torch", **kw):
    # no dropout: a padded batch draws its dropout masks over more rows (graphed runs are random like eager ones)
    return preset("iemocap", backend=backend, d_model=32, n_heads=2, n_layers=1, d_hidden=32, d_latent=16,
                  dropout=0.0, **kw)


def _lengths(gen, n_max=6, len_max=40):
    n = int(torch.randint(1, n_max + 1, (), generator=gen))
    return [int(x) for x in torch.randint(1, len_max + 1, (n,), generator=gen)]


def _loss_and_grads(model, batch, seed):
    model.zero_grad(set_to_none=True)
    out = model(batch, seed=seed)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _trained_looking(model, gen):
    """Random parameters (an initialised model has zero biases, under which a zero padding row stays zero
    through the encoders and would hide a missing mask) and, when the model standardises, random statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.startswith(("input_mean", "input_std")):
                buf.copy_(torch.rand(buf.shape, generator=gen) + (0.5 if "std" in name else -0.5))
    return model


def _batch_to_pad(cfg, gen, seed, **kw):
    """A random batch that its class pads (one already of a class size is replayed as it is)."""
    while True:
        batch = model_batch(cfg, _lengths(gen, **kw), "cpu", seed=seed)
        if padded_size(batch)[0] > batch.num_utterances:
            return batch


def _unlabel_some(batch, gen):
    """Some utterances without a label: they still count in every term but the cross-entropies."""
    drop = torch.rand(batch.num_utterances, generator=gen) < 0.3
    batch.labels = torch.where(drop, IGNORE_INDEX, batch.labels)
    return batch


@pytest.mark.parametrize("recompute", [False, True])
def test_a_padded_batch_has_the_loss_and_gradients_of_the_batch(recompute):
    """A fresh random batch, with unlabelled utterances and class weights: the padded batch's every loss term,
    its normalisers and every gradient equal the batch's own (fp32; the model reduces its losses in fp32), also
    on the recompute path (checkpoints and the fusion in pieces)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    cfg = _config(recompute_from=1 if recompute else None, utterance_skip=True, standardize_inputs=True)
    torch.manual_seed(seed)
    model = _trained_looking(CMATH(cfg).train(), gen)
    model.class_weight.copy_(torch.rand(cfg.num_classes, generator=gen) + 0.5)
    batch = _unlabel_some(_batch_to_pad(cfg, gen, seed), gen)
    padded = static_copy(batch, SharedFeatures(), pad=True)
    assert padded.num_utterances > batch.num_utterances and int(padded.valid.sum()) == batch.num_utterances
    out, grads = _loss_and_grads(model, batch, seed)
    out_p, grads_p = _loss_and_grads(model, padded, seed)
    tol = dict(rtol=2e-5, atol=1e-6)
    for term, value in out.losses.items():
        torch.testing.assert_close(out_p.losses[term], value, **tol, msg=term)
    torch.testing.assert_close(out_p.loss, out.loss, **tol)
    torch.testing.assert_close(out_p.logits[:batch.num_utterances], out.logits, **tol)
    assert grads.keys() == grads_p.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, **tol, msg=name)
    torch.testing.assert_close(model.loss_totals(padded), model.loss_totals(batch), **tol)


def test_a_padded_batch_has_the_loss_and_gradients_of_the_batch_on_the_triton_kernels():
    """The same on the Triton ops (interpreted on the CPU), a small case, fp32."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    cfg = _config("triton", recompute_from=None)
    torch.manual_seed(seed)
    model = _trained_looking(CMATH(cfg).train(), gen)
    batch = _unlabel_some(_batch_to_pad(cfg, gen, seed, n_max=3, len_max=12), gen)
    padded = static_copy(batch, SharedFeatures(), pad=True)
    out, grads = _loss_and_grads(model, batch, seed)
    out_p, grads_p = _loss_and_grads(model, padded, seed)
    for term, value in out.losses.items():
        torch.testing.assert_close(out_p.losses[term], value, rtol=2e-5, atol=1e-6, msg=term)
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, rtol=2e-5, atol=1e-6, msg=name)


def test_padding_layout_keeps_the_length_bound_true_and_the_classes_close():
    """Random batch sizes: at most 1/8 more rows (beyond 16) and a power of two of conversations, a padding row
    wherever there are padding conversations; every padding conversation within the batch's rounded bound, the
    offsets ending at the padded rows; the padded batch's fields are the batch's, then padding rows that count
    nowhere. A batch already of a class size is not padded."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    cfg = _config()
    for _ in range(20):
        lengths = _lengths(gen, n_max=12, len_max=70)
        batch = model_batch(cfg, lengths, "cpu")
        T, B = sum(lengths), len(lengths)
        rows, conversations = padded_size(batch)
        assert T <= rows <= max(17, T + 1 + T // 8) and conversations >= B
        assert conversations & (conversations - 1) == 0 and (rows > T) == (conversations > B)
        padded = static_copy(batch, SharedFeatures(), pad=True)
        cu = padded.cu_seqlens.tolist()
        assert len(cu) == conversations + 1 and cu[-1] == rows and cu[:B + 1] == batch.cu_seqlens.tolist()
        assert cu[B + 1:] == padding_offsets(T, rows, conversations - B, padded.max_seqlen)
        sizes = [b - a for a, b in zip(cu, cu[1:])]
        assert all(n >= 0 for n in sizes[B:]) and max(sizes) <= padded.max_seqlen == length_bound(max(lengths))
        assert torch.equal(padded.labels[T:], torch.full((rows - T,), IGNORE_INDEX))
        assert torch.equal(padded.labels[:T], batch.labels) and torch.equal(padded.speakers[:T], batch.speakers)
        for m, x in batch.features.items():
            assert torch.equal(padded.features[m][:T], x) and not padded.features[m][T:].any()
        assert padded.valid[:T].all() and not padded.valid[T:].any()
    assert padded_size(model_batch(cfg, [4096], "cpu")) == (4096, 1)
    assert padded_size(model_batch(cfg, [20, 12], "cpu")) == (32, 2)
    assert padded_size(model_batch(cfg, [20, 10, 2], "cpu")) == (36, 4)   # a padding row for the 4th
    assert padding_offsets(10, 60, 4, 16) == [12, 28, 44, 60]
    assert padding_offsets(10, 20, 3, 16) == [10, 10, 20]
    assert [round_up(n, 4) for n in (1, 16, 17, 33, 100, 1000)] == [1, 16, 18, 36, 104, 1024]


def _steppers(seed, cfg):
    torch.manual_seed(seed)
    a, b = CMATH(cfg).train(), CMATH(cfg).train()
    b.load_state_dict(a.state_dict())
    # Adam's eps well above the noise of gradients that are 0 in exact arithmetic (a key bias under softmax),
    # whose sign would otherwise decide a full-size update
    opt_a = torch.optim.AdamW(a.parameters(), lr=2.0 ** -9, eps=1e-4, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=2.0 ** -9, eps=1e-4, fused=True)
    eager = Stepper(a, a, opt_a, Precision("fp32", "cpu"), 1.0, StepMeter("cpu"))
    graphs = StandInGraphs()
    graphed = GraphedStepper(b, opt_b, Precision("fp32", "cpu"), 1.0, StepMeter("cpu"), graphs)
    return (a, eager), (b, graphed), graphs


def _split(gen, total, parts, longest):
    """`parts` random conversation lengths of 1..longest adding up to total."""
    while True:
        cuts = sorted(int(x) for x in torch.randperm(total - 1, generator=gen)[:parts - 1] + 1)
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        if max(lengths) <= longest:
            return lengths


def test_a_corpus_of_many_batch_sizes_captures_one_graph_per_class():
    """A stand-in graphed run over batches of ten distinct sizes (33-42 utterances, three conversations of at
    most 16) captures one graph per padded class (three), and follows the eager, unpadded steps: parameters,
    the meter's loss and its utterance count."""
    seed = int(torch.randint(0, 1000, ()))
    gen = torch.Generator().manual_seed(seed)
    cfg = _config()
    (a, eager), (b, graphed), graphs = _steppers(seed, cfg)
    sizes = [int(t) + 33 for t in torch.randperm(10, generator=gen)]
    batches = [model_batch(cfg, _split(gen, T, 3, 16), "cpu", seed=seed * 100 + i) for i, T in enumerate(sizes)]
    for step, batch in enumerate(batches):
        for stepper in (eager, graphed):
            stepper([batch], seed, step)
    classes = {padded_shape(b) for b in batches}
    assert len(classes) == 3 and graphs.captures == graphed.captured == 3
    assert graphed.replayed == len(batches) - 3 and graphed.uncaptured == 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    ma, mb = eager.meter.read(), graphed.meter.read()
    assert mb["utterances"] == ma["utterances"] == sum(sizes)
    assert mb["loss_sum"] == pytest.approx(ma["loss_sum"], rel=1e-5)
