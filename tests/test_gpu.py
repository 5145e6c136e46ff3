"""GPU-only: bf16 ExtreMA training for a few steps is finite and its loss decreases."""

import pytest
import torch

from extrema.models.extrema import ExtreMA, random_masks
from extrema.optim import build_adamw, param_groups
from extrema.spec import ModelSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_is_finite_and_decreasing() -> None:
    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch="vit_micro", mlp_dim=512, drop_path_rate=0.0)).cuda().train()
    opt = build_adamw(param_groups(model, 0.05), lr=5e-4, betas=(0.9, 0.95))
    x = torch.randn(64, 3, 32, 32, device="cuda")
    losses = []
    for _ in range(20):
        model.update_target(0.99)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, x, random_masks(64, 64, 8, 0.9, device="cuda"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
