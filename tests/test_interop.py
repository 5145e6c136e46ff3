"""Weights in and out: strict loading, the official ExtreMA layout, timm export round trips, DCP and .pth sources."""

from pathlib import Path

import pytest
import torch
from torch import nn

from extrema import ckpt, interop
from extrema.models.classifier import Classifier, discarded_keys, fresh_keys
from extrema.models.extrema import ExtreMA
from extrema.models.vit import VisionTransformer, build_vit, sincos_pos_embed_2d
from extrema.spec import ModelSpec

PICO = ModelSpec(arch="vit_pico", mlp_dim=32, proj_dim=16)  # D 64, depth 2, heads 2, patch 4, 32 px
D, DEPTH, GRID = 64, 2, 8
IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


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


def test_official_import_maps_every_key_of_the_chosen_branch() -> None:
    official = official_checkpoint()
    sd = official["state_dict"]
    assert isinstance(sd, dict)
    for branch, prefix in (("student", "module.base_encoder."), ("ema", "module.momentum_encoder.")):
        weights = interop.from_official(official, branch)  # type: ignore[arg-type]
        encoder = build_vit(PICO)
        interop.use_pos_embed(encoder, weights.pop("pos_embed"), learnable=False)
        interop.load_strict(encoder, weights, "official")
        assert torch.equal(encoder.patch_embed.weight, sd[prefix + "patch_embed.proj.weight"])
        assert torch.equal(encoder.blocks[1].attn.qkv.weight, sd[prefix + "blocks.1.attn.qkv.weight"])
        assert torch.equal(encoder.blocks_token[0].attn.k.bias, sd[prefix + "blocks_token.0.attn.k.bias"])
        assert torch.equal(encoder.blocks_token[1].gamma_2, sd[prefix + "blocks_token.1.gamma_2"])
        assert torch.equal(encoder.cls_token, sd[prefix + "cls_token"])  # type: ignore[arg-type]
        assert torch.equal(encoder.norm.weight, sd[prefix + "norm.weight"])
        assert not any(k.startswith("head") for k in weights)
    # The documented sin-cos layout is ours: the imported table changes nothing.
    fresh = build_vit(PICO)
    assert torch.equal(encoder.pos_embed, fresh.pos_embed)  # type: ignore[arg-type]


def test_official_pth_through_pth_encoder(tmp_path: Path) -> None:
    url = str(tmp_path / "extrema_mask08x5_color_1k_300ep.pth")
    torch.save(official_checkpoint(), url)
    assert interop.resolve(url) == url
    weights = interop.encoder_weights(url, "ema")
    sd = official_checkpoint()["state_dict"]
    assert torch.equal(weights["blocks.0.mlp.fc1.weight"], sd["module.momentum_encoder.blocks.0.mlp.fc1.weight"])  # type: ignore[index]
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither an official ExtreMA checkpoint nor a timm"):
        interop.encoder_weights(str(tmp_path / "other.pth"), "ema")


def test_strict_loading_names_missing_unexpected_and_misshapen_keys() -> None:
    encoder = build_vit(PICO)
    weights = dict(encoder.state_dict())
    del weights["blocks.1.attn.qkv.weight"]
    weights["blocks.7.attn.qkv.weight"] = torch.zeros(1)
    weights["norm.bias"] = torch.zeros(D + 1)
    with pytest.raises(ValueError) as err:
        interop.load_strict(build_vit(PICO), weights, "ckpt-x")
    msg = str(err.value)
    assert "ckpt-x" in msg
    assert "missing keys (1): blocks.1.attn.qkv.weight" in msg
    assert "unexpected keys (1): blocks.7.attn.qkv.weight" in msg
    assert "norm.bias (checkpoint (65,) vs model (64,))" in msg


def test_strict_loading_rejects_a_wider_checkpoint_and_loads_a_matching_one() -> None:
    wide = build_vit(ModelSpec(arch="vit_nano"))  # D 128, depth 4
    with pytest.raises(ValueError, match="shape mismatches") as err:
        interop.load_strict(build_vit(PICO), wide.state_dict(), "nano")
    msg = str(err.value)
    assert "unexpected keys (24): blocks.2." in msg and "more)" in msg
    assert "blocks.0.attn.qkv.weight (checkpoint (384, 128) vs model (192, 64))" in msg
    src, dst = build_vit(PICO), build_vit(PICO)
    interop.load_strict(dst, src.state_dict(), "pico")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


TIMM_KEYS = {
    "vit": {"cls_token", "pos_embed", "norm.weight", "norm.bias"},
    "avgpool": {"pos_embed", "fc_norm.weight", "fc_norm.bias"},
    "cait": {"pos_embed", "norm.weight", "norm.bias"},
}


def timm_block_keys(depth: int) -> set[str]:
    names = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    return {f"blocks.{i}.{n}.{p}" for i in range(depth) for n in names for p in ("weight", "bias")}


@pytest.mark.parametrize("design", ["vit", "avgpool", "cait"])
def test_timm_export_has_the_timm_layout(design: str) -> None:
    encoder = build_vit(PICO.model_copy(update={"cls_token": design}))
    exported = interop.to_timm(encoder)
    expected = TIMM_KEYS[design] | timm_block_keys(DEPTH) | {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert set(exported) == expected
    grid_tokens = GRID * GRID + (1 if design == "vit" else 0)
    assert exported["pos_embed"].shape == (1, grid_tokens, D)
    kwargs = interop.timm_kwargs(encoder)
    assert kwargs["class_token"] == (design == "vit") and kwargs["fc_norm"] == (design == "avgpool")
    assert kwargs["mlp_ratio"] == 4.0 and kwargs["patch_size"] == 4 and kwargs["num_classes"] == 0


@pytest.mark.parametrize("design", ["vit", "avgpool"])
def test_timm_round_trip_is_exact(design: str) -> None:
    spec = PICO.model_copy(update={"cls_token": design})
    torch.manual_seed(1)
    encoder = build_vit(spec).eval()
    exported = interop.to_timm(encoder)
    if design == "vit":
        # A trained timm model has a position for its class token; the import folds it into cls_token.
        delta = torch.randn(1, 1, D)
        exported["pos_embed"][:, :1] += delta
        exported["cls_token"] -= delta
    exported["head.weight"] = torch.zeros(10, D)
    imported = interop.from_timm(exported)
    back = build_vit(spec).eval()
    interop.use_pos_embed(back, imported.pop("pos_embed"), learnable=False)
    interop.load_strict(back, imported, "timm")
    with torch.no_grad():
        torch.testing.assert_close(back(IMAGES), encoder(IMAGES), rtol=1e-5, atol=1e-5)


def test_cait_export_feeds_the_finetune_backbone() -> None:
    torch.manual_seed(2)
    encoder = build_vit(PICO).eval()
    imported = interop.from_timm(interop.to_timm(encoder))
    model = Classifier(PICO, num_classes=5, drop_path_rate=0.0).eval()
    interop.use_pos_embed(model.encoder, imported.pop("pos_embed"), learnable=True)
    interop.load_strict(model.encoder, imported, "timm", discarded_keys("cait"), (*fresh_keys("cait"), "pos_embed"))
    with torch.no_grad():
        tokens = encoder.forward_features(IMAGES)[1]
        torch.testing.assert_close(model.encoder.forward_features(IMAGES)[1], tokens)


def test_position_table_interpolation_and_learnable_table() -> None:
    table = sincos_pos_embed_2d(D, 4, 4).unsqueeze(0)
    assert interop.resize_pos_embed(table, 4) is table
    resized = interop.resize_pos_embed(table, GRID)
    assert resized.shape == (1, GRID * GRID, D)
    constant = torch.ones(1, 16, D) * 0.5
    torch.testing.assert_close(interop.resize_pos_embed(constant, 6), torch.full((1, 36, D), 0.5))
    with pytest.raises(ValueError, match="not a square grid"):
        interop.resize_pos_embed(torch.zeros(1, 15, D), 4)
    encoder = build_vit(PICO)
    interop.use_pos_embed(encoder, table, learnable=True)
    assert isinstance(encoder.pos_embed, nn.Parameter) and "pos_embed" in encoder.state_dict()
    torch.testing.assert_close(encoder.pos_embed.data, resized)
    fixed = build_vit(PICO)
    interop.use_pos_embed(fixed, None, learnable=False)
    assert "pos_embed" not in fixed.state_dict()


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


def test_dcp_source_gives_the_chosen_branch(tmp_path: Path) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    model = save_pretrain_checkpoint(ckpt_dir, PICO)
    url = interop.resolve(ckpt_dir)
    assert url == ckpt.step_url(ckpt_dir, 5) and interop.resolve(url) == url
    for branch, encoder in (("student", model.online.encoder), ("ema", model.target.encoder)):
        weights = interop.encoder_weights(url, branch)  # type: ignore[arg-type]
        assert weights.keys() == encoder.state_dict().keys()
        assert all(torch.equal(weights[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"neither a \.pth file"):
        interop.resolve(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no complete pretrain checkpoint"):
        interop.pretrain_checkpoint(str(tmp_path / "run" / "probe"))


def test_export_of_a_loaded_official_encoder_is_loadable(tmp_path: Path) -> None:
    """Official release -> our encoder -> timm .pth -> the finetune classifier: the whole conversion chain."""
    weights = interop.from_official(official_checkpoint(), "student")  # type: ignore[arg-type]
    encoder: VisionTransformer = build_vit(PICO)
    interop.use_pos_embed(encoder, weights.pop("pos_embed"), learnable=False)
    interop.load_strict(encoder, weights, "official")
    url = str(tmp_path / "timm.pth")
    torch.save(interop.to_timm(encoder), url)
    again = interop.encoder_weights(url, "student")
    assert torch.equal(again["blocks.1.mlp.fc2.weight"], encoder.blocks[1].mlp.fc2.weight)
    assert "blocks_token.0.gamma_1" not in again and "cls_token" not in again
