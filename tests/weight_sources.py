"""Weight sources for tests: the official release's layout written from its documented shapes, and DCP pretrain
checkpoints of the project's own model."""

from __future__ import annotations

import torch

from extrema.models.extrema import ExtreMA
from extrema.models.vit import sincos_pos_embed_2d
from extrema.spec import ModelSpec
from extrema.train import ckpt

PICO = ModelSpec(arch="vit_pico", mlp_dim=32, proj_dim=16)  # D 64, depth 2, heads 2, patch 4, 32 px
D, DEPTH, GRID = 64, 2, 8


def official_encoder_layout(d: int, depth: int, ca_layers: int, num_patches: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of one encoder of the official release, written from the documented `vits.py` layout."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, num_patches, d),
        "patch_embed.proj.weight": (d, 3, 4, 4),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,)}
        shapes |= {b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,)}
        shapes |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
        shapes |= {b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,)}
        shapes |= {b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)}
    for i in range(ca_layers):
        b = f"blocks_token.{i}."
        shapes |= {b + "gamma_1": (d,), b + "gamma_2": (d,)}
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,)}
        for proj in ("q", "k", "v", "proj"):
            shapes |= {b + f"attn.{proj}.weight": (d, d), b + f"attn.{proj}.bias": (d,)}
        shapes |= {b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,)}
        shapes |= {b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)}
    # The projector replaces the encoder's head: Linear, LN, GELU, Linear, LN, GELU, Linear.
    shapes |= {"head.0.weight": (32, d), "head.0.bias": (32,), "head.1.weight": (32,), "head.1.bias": (32,)}
    shapes |= {"head.3.weight": (32, 32), "head.6.weight": (16, 32), "head.6.bias": (16,)}
    return shapes


def official_checkpoint(seed: int = 0) -> dict[str, object]:
    """A synthetic official checkpoint: {'epoch', 'arch', 'state_dict': module.base/momentum_encoder + predictor}."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for branch in ("base_encoder", "momentum_encoder"):
        for key, shape in official_encoder_layout(D, DEPTH, 2, GRID * GRID).items():
            sd[f"module.{branch}.{key}"] = torch.randn(shape, generator=g)
        sd[f"module.{branch}.pos_embed"] = sincos_pos_embed_2d(D, GRID, GRID).unsqueeze(0)
    sd["module.predictor.0.weight"] = torch.randn(32, 16, generator=g)
    return {"epoch": 300, "arch": "vit_base", "state_dict": sd}


def save_pretrain_checkpoint(ckpt_dir: str, spec: ModelSpec, step: int = 5, seed: int = 0) -> ExtreMA:
    """A DCP pretrain checkpoint whose EMA target differs from the student (as after training)."""
    torch.manual_seed(seed)
    model = ExtreMA(spec)
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.SGD(model.online.parameters(), lr=0.1)
    ckpt.save(ckpt_dir, step, ckpt.training_state(model, optimizer, {"step": step}))
    return model
