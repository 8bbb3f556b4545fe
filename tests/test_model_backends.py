"""The whole model with backend 'triton' (kernels under TRITON_INTERPRET=1) against backend 'torch' on the
same weights and batch: the same losses and gradients within fp32 tolerance."""
import pytest
import torch

from cmath_mer.model import CMATH
from helpers import assert_rel_close, needs_triton
from test_model import random_batch, small_config

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
