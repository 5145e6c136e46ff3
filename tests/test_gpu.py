"""GPU-only: bf16 ExtreMA training for a few steps is finite and its loss decreases."""

import pytest
import torch

from extrema.models.extrema import ExtreMA, random_masks
from extrema.spec import ModelSpec
from extrema.train.optim import build_adamw, param_groups

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


def test_the_pretraining_step_never_waits_for_the_host() -> None:
    """The whole step (colour augmentation on the device, EMA update, masked forward and backward, clipping, AdamW)
    under CUDA's sync debug mode set to error: any host-device synchronisation raises."""
    from extrema.spec import PretrainSpec
    from extrema.stages.pretrain import train_step
    from extrema.train.dist import World

    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch="vit_micro", mlp_dim=512)).cuda().train()
    opt = build_adamw(param_groups(model, 0.05), lr=5e-4, betas=(0.9, 0.95))
    p = PretrainSpec(steps=2, batch_size=16, accum_steps=2, clip_grad=1.0, masking={"ratio": 0.9, "num_masks": 8})
    world = World(0, 1, 0, torch.device("cuda", torch.cuda.current_device()))
    crops = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8).pin_memory()
    params = torch.rand(16, 2, 10)
    params[..., 6:] = torch.stack([torch.randperm(4) for _ in range(32)]).view(16, 2, 4).float()
    masks = torch.stack([random_masks(1, 64, 8, 0.9)[:, 0] for _ in range(16)]).pin_memory()
    batch = (crops, params.pin_memory(), masks)
    train_step(model, opt, batch, p, world, torch.bfloat16, True, True)  # warm-up: lazy state, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            model.update_target(0.99)
            loss = train_step(model, opt, batch, p, world, torch.bfloat16, True, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
