"""Our encoder in timm's layout: the state dict, the constructor arguments, and the model they build, exact for every
class-token design.

`vit` becomes timm's `VisionTransformer` with a class token (a zero position for it), `avgpool` one with average
pooling and `fc_norm`, `cait` timm's `Cait` with its defaults: the self-attention blocks' talking heads (`proj_l`,
`proj_w`) are the identity and their layer scale is one, which is our standard attention without layer scale, and the
class-attention blocks are `blocks_token_only`. So `timm.create_model(**create_model_args(config))`, or the class
itself with `config["kwargs"]`, builds the model with nothing but JSON: no class has to be named.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from extrema.models.designs import Design
from extrema.models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer

# A registered timm name per timm model: `create_model` takes every architecture argument from the file, so the
# name only picks the class (its preset arguments are all overridden).
TIMM_NAMES = {"vision_transformer": "vit_base_patch16_224", "cait": "cait_xxs24_224"}
TIMM_CLASSES = {
    "vision_transformer": "timm.models.vision_transformer.VisionTransformer",
    "cait": "timm.models.cait.Cait",
}
TALKING_HEADS = ("attn.proj_l", "attn.proj_w")  # timm Cait's self-attention: identity here, dropped on import


def timm_fc_norm(row: Design) -> bool:
    """Whether timm's ViT holds the design's final norm as `fc_norm` (after mean pooling) rather than `norm`."""
    return row.timm_model == "vision_transformer" and not row.class_token


def to_timm(encoder: VisionTransformer) -> dict[str, Tensor]:
    """Our encoder as a timm state dict for `build_timm(timm_config(encoder))`, exact for every design."""
    row = encoder.design
    out: dict[str, Tensor] = {}
    for key, value in encoder.state_dict().items():
        if key == "pos_embed" or (key == "cls_token" and not row.class_token):
            continue
        name = key
        if key.startswith("patch_embed."):
            name = "patch_embed.proj." + key.removeprefix("patch_embed.")
        elif key.startswith("norm.") and timm_fc_norm(row):
            name = "fc_norm." + key.removeprefix("norm.")
        elif key.startswith("blocks_token."):
            name = "blocks_token_only." + key.removeprefix("blocks_token.")
        out[name] = value.detach().clone().contiguous()
    if row.timm_model == "cait":
        dtype, heads = out["norm.weight"].dtype, encoder.num_heads
        for i in range(encoder.depth):
            for g in ("gamma_1", "gamma_2"):
                out[f"blocks.{i}.{g}"] = torch.ones(encoder.embed_dim, dtype=dtype)
            for proj in TALKING_HEADS:
                out[f"blocks.{i}.{proj}.weight"] = torch.eye(heads, dtype=dtype)
                out[f"blocks.{i}.{proj}.bias"] = torch.zeros(heads, dtype=dtype)
    pos = encoder.pos_embed.detach().clone()  # type: ignore[operator]
    if row.token_at_input:
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    out["pos_embed"] = pos.contiguous()
    return out


def timm_config(encoder: VisionTransformer) -> dict[str, Any]:
    """{"model": "vision_transformer" | "cait", "kwargs": JSON-able constructor arguments} matching `to_timm`."""
    row = encoder.design
    hidden: int = encoder.blocks[0].mlp.fc1.out_features  # type: ignore[union-attr,assignment]
    kwargs: dict[str, Any] = {
        "img_size": encoder.img_size,
        "patch_size": encoder.patch_size,
        "in_chans": encoder.patch_embed.in_channels,
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "num_heads": encoder.num_heads,
        "mlp_ratio": hidden / encoder.embed_dim,
        "qkv_bias": True,
        "num_classes": 0,
    }
    if row.timm_model == "cait":
        token_hidden: int = encoder.blocks_token[0].mlp.fc1.out_features  # type: ignore[union-attr,assignment]
        kwargs |= {
            "global_pool": "token",
            "depth_token_only": len(encoder.blocks_token),
            "mlp_ratio_token_only": token_hidden / encoder.embed_dim,
            "init_values": 1.0,
        }
        return {"model": "cait", "kwargs": kwargs}
    kwargs |= {
        "class_token": row.token_at_input,
        "global_pool": "token" if row.token_at_input else "avg",
        "fc_norm": timm_fc_norm(row),
    }
    return {"model": "vision_transformer", "kwargs": kwargs}


def create_model_args(config: dict[str, Any]) -> dict[str, Any]:
    """`timm.create_model(**args)` arguments for a `timm_config`: a registered name of the class, every
    architecture argument, and the input statistics the encoder was trained with (`pretrained_cfg`)."""
    kwargs = config["kwargs"]
    overlay = {
        "input_size": [kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"]],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "num_classes": 0,
        "url": "",
        "hf_hub_id": None,
    }
    return {"model_name": TIMM_NAMES[config["model"]], "pretrained": False, "pretrained_cfg_overlay": overlay, **kwargs}


def build_timm(config: dict[str, Any]) -> nn.Module:
    """The timm model a `timm_config` describes (imports timm; every argument comes from the config)."""
    if config["model"] == "cait":
        from timm.models.cait import Cait

        return Cait(**config["kwargs"])
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT(**config["kwargs"])
