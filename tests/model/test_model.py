"""CMATH on the reference path: shapes, conversation isolation, modality subsets, losses, gradients."""
import itertools

import pytest
import torch

from cmath_mer.data import Batch
from cmath_mer.kernels.cu_seqlens import neighbour_masks, positions
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.distillation import logit_distillation
from cmath_mer.model.reconstruction import PackedConv1d

from helpers import cu_seqlens_from, random_batch, small_config


def test_packed_conv_equals_per_conversation_conv1d():
    torch.manual_seed(0)
    lengths = [1, 5, 2, 9]
    conv = PackedConv1d(6, 4)
    x = torch.randn(sum(lengths), 6)
    cu = cu_seqlens_from(lengths)
    out = conv(x, *neighbour_masks(cu, x.shape[0]))
    # the same weights as a torch Conv1d with zero 'same' padding, applied to each conversation alone
    w = conv.taps.weight.view(3, 4, 6).permute(1, 2, 0)                 # (out, in, tap)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.conv1d(x[a:b].t()[None], w, conv.bias, padding=1)[0].t()
        torch.testing.assert_close(out[a:b], ref, rtol=1e-5, atol=1e-5)


def test_positions_restart_at_each_conversation():
    cu = cu_seqlens_from([3, 1, 4])
    assert positions(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("modalities", [m for r in (1, 2, 3)
                                        for m in itertools.combinations(("text", "audio", "visual"), r)])
def test_every_modality_subset_trains(modalities):
    torch.manual_seed(1)
    model = CMATH(small_config(modalities))
    batch = random_batch([4, 1, 11], modalities)
    out = model(batch, seed=3)
    T = batch.num_utterances
    assert out.logits.shape == (T, 4)
    assert set(out.fine_logits) == set(modalities)
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if len(modalities) == 1:
        assert not hasattr(model.cma[modalities[0]].blocks[0], "cross_attn")


def test_conversations_do_not_leak_into_each_other():
    torch.manual_seed(2)
    model = CMATH(small_config()).eval()
    lengths = [5, 7, 3]
    batch = random_batch(lengths)
    base = model(batch).logits
    changed = Batch({m: x.clone() for m, x in batch.features.items()}, batch.speakers.clone(),
                    batch.labels, batch.cu_seqlens)
    for x in changed.features.values():
        x[5:12] += torch.randn(7, x.shape[1]) * 3                      # only conversation 1 changes
    new = model(changed).logits
    torch.testing.assert_close(new[:5], base[:5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new[12:], base[12:], rtol=1e-5, atol=1e-5)
    assert (new[5:12] - base[5:12]).abs().max() > 1e-3


def test_batched_equals_alone():
    torch.manual_seed(3)
    model = CMATH(small_config(window=2)).eval()
    batch = random_batch([6, 1, 9], seed=5)
    together = model(batch).logits
    alone = []
    for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
        one = Batch({m: x[a:b] for m, x in batch.features.items()}, batch.speakers[a:b], batch.labels[a:b],
                    cu_seqlens_from([b - a]))
        alone.append(model(one).logits)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_window_limits_context():
    torch.manual_seed(4)
    model = CMATH(small_config(window=1, n_layers=1)).eval()
    batch = random_batch([12])
    base = model(batch).logits
    far = Batch({m: x.clone() for m, x in batch.features.items()}, batch.speakers, batch.labels, batch.cu_seqlens)
    for x in far.features.values():
        x[11] += 5.0
    # one block, window 1, conv receptive field +-2 (encoder) : utterance 0..6 cannot see utterance 11
    torch.testing.assert_close(model(far).logits[:6], base[:6], rtol=1e-5, atol=1e-5)


def test_sampling_only_in_training_and_seeded():
    torch.manual_seed(5)
    model = CMATH(small_config())
    batch = random_batch([8, 3])
    a, b, c = (model(batch, seed=s).losses["ce"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    assert torch.equal(model(batch, seed=1).logits, model(batch, seed=2).logits)


def test_logit_distillation_zero_iff_student_matches_and_teacher_detached():
    torch.manual_seed(6)
    coarse = torch.randn(10, 4, requires_grad=True)
    same = logit_distillation(coarse, [coarse.detach().clone()], tau=2.0)
    assert same.abs() < 1e-6
    student = torch.randn(10, 4, requires_grad=True)
    kd = logit_distillation(coarse, [student], tau=2.0)
    assert kd > 0
    kd.backward()
    assert coarse.grad is None and student.grad.abs().sum() > 0


def test_unlabelled_batch_has_zero_cross_entropy():
    torch.manual_seed(7)
    model = CMATH(small_config())
    batch = random_batch([4])
    batch.labels[:] = -100
    out = model(batch)
    assert out.losses["ce"] == 0 and torch.isfinite(out.loss)


def test_recomputed_blocks_give_the_same_gradients():
    torch.manual_seed(8)
    plain = CMATH(small_config(dropout=0.1, recompute_from=None))
    recomputed = CMATH(small_config(dropout=0.1, recompute_from=1))        # every batch recomputes
    recomputed.load_state_dict(plain.state_dict())
    batch = random_batch([6, 13], seed=int(torch.randint(0, 2**30, ())))
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(99)                                              # the same dropout masks
        out = model(batch, seed=4)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_long_batch_memory_savings_give_the_same_step(monkeypatch):
    # what a long windowed batch does to save memory (the whole transformer recomputed, the fusion recomputed
    # in pieces of rows, Philox eps drawn in chunks) leaves the step's loss and every gradient as the plain
    # step's; tiny pieces so that a conversation of 40 spans many of them
    import cmath_mer.kernels.variational.philox as philox
    import cmath_mer.model.fusion as vf
    monkeypatch.setattr(vf, "RECOMPUTE_ROWS", 7)
    monkeypatch.setattr(philox, "CHUNK", 50)                 # d_z = 32: a piece of 7 rows is 224 draws
    seed = int(torch.randint(0, 2**30, ()))
    torch.manual_seed(seed)
    plain = CMATH(small_config(dropout=0.1, input_dropout=0.2, window=3, recompute_from=None))
    saving = CMATH(small_config(dropout=0.1, input_dropout=0.2, window=3, recompute_from=1))
    saving.load_state_dict(plain.state_dict())
    batch = random_batch([40, 5, 12], seed=seed + 1)
    outs, grads = [], []
    for model in (plain, saving):
        torch.manual_seed(seed + 2)                                           # the same dropout masks
        out = model(batch, seed=seed % 1000, row_offset=3)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, value in outs[0].losses.items():
        torch.testing.assert_close(outs[1].losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=f"{name} (seed {seed})")


@pytest.mark.parametrize("autocast,rows,exact", [(False, 5, False), (True, 23, True)])
def test_fusion_in_pieces_equals_the_fusion(autocast, rows, exact):
    # VariationalFusion.forward_recomputed (run and recomputed in pieces in one autograd function) gives
    # forward()'s outputs and gradients: in pieces of 5 rows in fp32, and under CPU bf16 autocast in one
    # piece, where it must be bitwise (its backward recomputes under the forward's autocast state; without
    # it the gradients differ by ~0.5 %)
    from cmath_mer.model.fusion import VariationalFusion
    seed = int(torch.randint(0, 2**30, ()))
    torch.manual_seed(seed)
    fusion = VariationalFusion(("text", "audio"), 16, 12, True, "torch")
    fine = {c: torch.randn(23, 16) for c in ("text", "audio")}
    weights = [torch.randn(23, 12), torch.randn(23, 12), torch.randn(23, 12), torch.randn(()), torch.randn(())]
    results = []
    for run in (lambda f: fusion(f, seed=seed % 997, sample=True, eps_offset=40),
                lambda f: fusion.forward_recomputed(f, seed=seed % 997, sample=True, eps_offset=40, rows=rows)):
        leaves = {c: x.clone().requires_grad_() for c, x in fine.items()}
        fusion.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(leaves)
        sum((o.float() * w).sum() for o, w in zip(out, weights)).backward()
        results.append(([o.detach() for o in out], [leaves[c].grad for c in fine],
                        [p.grad.clone() for p in fusion.parameters()]))
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(sum(results[1], []), sum(results[0], [])):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol, msg=f"seed {seed}")


def test_philox_in_chunks_draws_the_same_numbers(monkeypatch):
    import cmath_mer.kernels.variational.philox as philox
    seed, offset = (int(x) for x in torch.randint(0, 2**40, (2,)))
    whole = philox.philox_randn(seed, 1000, offset=offset)
    monkeypatch.setattr(philox, "CHUNK", 64)
    assert torch.equal(philox.philox_randn(seed, 1000, offset=offset), whole)


def _perturbed(batch: Batch, row: int, scale: float = 5.0) -> Batch:
    out = Batch({m: x.clone() for m, x in batch.features.items()}, batch.speakers, batch.labels, batch.cu_seqlens)
    for x in out.features.values():
        x[row] += scale
    return out


def test_pointwise_reconstruction_with_window_0_sees_no_other_utterance():
    # rec_kernel 1 + window 0: changing utterance 5 changes the prediction of utterance 5 and of no other;
    # with the kernel-3 U-Net (the default) window 0 still lets the neighbours 4 and 6 see it
    torch.manual_seed(11)
    batch = random_batch([12])
    for kernel, moved in ((1, [5]), (3, [3, 4, 5, 6, 7])):     # kernel 3: two convs deep, +-2 utterances
        model = CMATH(small_config(window=0, rec_kernel=kernel)).eval()
        diff = (model(_perturbed(batch, 5)).logits - model(batch).logits).abs().amax(-1)
        assert (diff > 1e-5).nonzero().flatten().tolist() == moved, kernel
    conv = PackedConv1d(6, 4, kernel=1)
    assert conv.taps.weight.shape == (4, 6)
    with pytest.raises(ValueError, match="kernel"):
        PackedConv1d(6, 4, kernel=2)
    with pytest.raises(Exception, match="rec_kernel"):
        small_config(rec_kernel=2)


def test_position_scale_scales_the_sinusoidal_encoding_and_0_removes_it():
    from cmath_mer.model.cmath import sinusoidal
    torch.manual_seed(12)
    codes = {"text": torch.randn(1, 32).expand(6, 32)}          # the same code at positions 0..5
    speakers, pos = torch.zeros(6, dtype=torch.long), torch.arange(6)
    model = CMATH(small_config(("text",), position_scale=0.0)).eval()
    h0 = model.embedding(codes, speakers, pos)["text"]
    torch.testing.assert_close(h0, h0[:1].expand(6, 32))        # position does not matter at all
    for s in (0.25, 1.0):
        model.embedding.position_scale = s
        h = model.embedding(codes, speakers, pos)["text"]
        torch.testing.assert_close(h - h0, s * sinusoidal(pos, 32))
    assert CMATH(small_config(("text",))).embedding.position_scale == 1.0   # default: the full encoding


def test_utterance_skip_adds_a_per_utterance_path_beside_the_context():
    torch.manual_seed(13)
    batch = random_batch([7, 5])
    plain = CMATH(small_config()).eval()
    skip = CMATH(small_config(utterance_skip=True)).eval()
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) == {f"skip.{c}.{p}" for c in ("text", "audio", "visual")
                                               for p in ("weight", "bias")}
    for lin in skip.skip.values():                               # a zero skip: exactly the plain model
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    torch.testing.assert_close(skip(batch).logits, plain(batch).logits)
    torch.nn.init.normal_(skip.skip["text"].weight)               # a live skip changes the prediction
    assert not torch.allclose(skip(batch).logits, plain(batch).logits, atol=1e-3)
    # and the skip reads the utterance's own code only: with every attention limited to the utterance itself
    # and a pointwise encoder, the skip model stays context-free
    free = CMATH(small_config(utterance_skip=True, window=0, rec_kernel=1)).eval()
    diff = (free(_perturbed(batch, 2)).logits - free(batch).logits).abs().amax(-1)
    assert (diff > 1e-5).nonzero().flatten().tolist() == [2]
