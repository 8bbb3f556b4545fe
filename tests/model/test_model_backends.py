"""The whole model with backend 'triton' (kernels under TRITON_INTERPRET=1) against backend 'torch' on the
same weights and batch: the same losses and gradients within fp32 tolerance."""
import pytest
import torch

from cmath_mer.model.cmath import CMATH

from helpers import assert_rel_close, needs_triton, random_batch, small_config

pytestmark = needs_triton


def run(model, batch, seed):
    model.zero_grad(set_to_none=True)
    out = model(batch, seed=seed)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("train_mode", [False, True], ids=["no-sampling", "sampling"])
@pytest.mark.parametrize("modalities,window", [(("text", "audio", "visual"), None),
                                               (("text", "audio", "visual"), 2),
                                               (("text",), None)])
def test_triton_backend_matches_torch_backend(train_mode, modalities, window):
    torch.manual_seed(11)
    ref = CMATH(small_config(modalities, window=window, backend="torch"))
    fused = CMATH(small_config(modalities, window=window, backend="triton"))
    fused.load_state_dict(ref.state_dict())
    ref.train(train_mode), fused.train(train_mode)               # dropout is 0: train mode only samples z
    batch = random_batch([1, 9, 17, 4], modalities, seed=int(torch.randint(0, 2**30, ())))
    seed = int(torch.randint(0, 2**31 - 1, ()))
    out_r, grads_r = run(ref, batch, seed)
    out_f, grads_f = run(fused, batch, seed)
    for name in out_r.losses:
        assert_rel_close(f"loss {name}", out_f.losses[name].detach(), out_r.losses[name].detach(), 1e-5)
    assert_rel_close("logits", out_f.logits.detach(), out_r.logits.detach(), 1e-5)
    for name, g in grads_r.items():
        assert_rel_close(f"grad {name}", grads_f[name], g, 1e-4)


def test_model_hands_the_batch_bound_to_the_onepass_backward(monkeypatch):
    """A batch packed on the host carries max_seqlen (the longest of its lengths, host numbers): the model hands
    it to every attention call, the Triton backward then runs in one pass, and the step equals the torch
    backend's. A batch without it takes the multi-kernel backward."""
    from cmath_mer.data.dataset import Batch, ConversationDataset
    from cmath_mer.kernels.attention import fused as attn
    seen = []
    real = attn.attention_backward

    def spy(*args):
        seen.append(args[-1])                                       # max_seqlen, as the launcher gets it
        return real(*args)
    monkeypatch.setattr(attn, "attention_backward", spy)
    lengths = [1, 9, 17, 4]
    b = random_batch(lengths, seed=3)
    data = ConversationDataset(b.features, b.speakers, b.labels, b.cu_seqlens, ["train"] * 4, list("abcd"),
                               ("a", "b", "c", "d"), 3)
    batch = data.batch([2, 0, 3])
    assert batch.max_seqlen == 17 and batch.to("cpu").max_seqlen == 17
    torch.manual_seed(5)
    ref = CMATH(small_config(window=2, backend="torch"))
    fused = CMATH(small_config(window=2, backend="triton"))
    fused.load_state_dict(ref.state_dict())
    out_r, grads_r = run(ref, batch, 1)
    out_f, grads_f = run(fused, batch, 1)
    assert seen and all(m == 17 for m in seen) and attn.onepass_block(17, 8) == 32
    assert_rel_close("loss", out_f.loss.detach(), out_r.loss.detach(), 1e-5)
    for name, g in grads_r.items():
        assert_rel_close(f"grad {name}", grads_f[name], g, 1e-4)
    seen.clear()
    run(fused, Batch(batch.features, batch.speakers, batch.labels, batch.cu_seqlens), 1)
    assert seen and all(m == -1 for m in seen)
