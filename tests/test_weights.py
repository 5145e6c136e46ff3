"""Weights in and out: strict loading, official and timm layouts (real timm), DCP, .pth and safetensors sources."""

from pathlib import Path

import pytest
import torch
from torch import nn

from extrema.models.classifier import Classifier, discarded_keys, fresh_keys
from extrema.models.extrema import ExtreMA
from extrema.models.vit import VisionTransformer, build_vit, resize_pos_embed, sincos_pos_embed_2d
from extrema.spec import ModelSpec
from extrema.train import ckpt, weights
from tests.weight_sources import DEPTH, GRID, PICO, D, official_checkpoint, save_pretrain_checkpoint

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_official_import_maps_every_key_of_the_chosen_branch() -> None:
    official = official_checkpoint()
    sd = official["state_dict"]
    assert isinstance(sd, dict)
    for branch, prefix in (("student", "module.base_encoder."), ("ema", "module.momentum_encoder.")):
        got = weights.from_official(official, branch)  # type: ignore[arg-type]
        encoder = build_vit(PICO)
        weights.use_pos_embed(encoder, got.pop("pos_embed"), learnable=False)
        weights.load_strict(encoder, got, "official")
        assert torch.equal(encoder.patch_embed.weight, sd[prefix + "patch_embed.proj.weight"])
        assert torch.equal(encoder.blocks[1].attn.qkv.weight, sd[prefix + "blocks.1.attn.qkv.weight"])
        assert torch.equal(encoder.blocks_token[0].attn.k.bias, sd[prefix + "blocks_token.0.attn.k.bias"])
        assert torch.equal(encoder.blocks_token[1].gamma_2, sd[prefix + "blocks_token.1.gamma_2"])
        assert torch.equal(encoder.cls_token, sd[prefix + "cls_token"])  # type: ignore[arg-type]
        assert torch.equal(encoder.norm.weight, sd[prefix + "norm.weight"])
        assert not any(k.startswith("head") for k in got)
    # The documented sin-cos layout is ours: the imported table changes nothing.
    fresh = build_vit(PICO)
    assert torch.equal(encoder.pos_embed, fresh.pos_embed)  # type: ignore[arg-type]


def test_official_pth_through_pth_encoder(tmp_path: Path) -> None:
    url = str(tmp_path / "extrema_mask08x5_color_1k_300ep.pth")
    torch.save(official_checkpoint(), url)
    assert weights.resolve(url) == url
    got = weights.encoder_weights(url, "ema")
    sd = official_checkpoint()["state_dict"]
    assert torch.equal(got["blocks.0.mlp.fc1.weight"], sd["module.momentum_encoder.blocks.0.mlp.fc1.weight"])  # type: ignore[index]
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither an official ExtreMA checkpoint nor a timm"):
        weights.encoder_weights(str(tmp_path / "other.pth"), "ema")


def test_strict_loading_names_missing_unexpected_and_misshapen_keys() -> None:
    encoder = build_vit(PICO)
    got = dict(encoder.state_dict())
    del got["blocks.1.attn.qkv.weight"]
    got["blocks.7.attn.qkv.weight"] = torch.zeros(1)
    got["norm.bias"] = torch.zeros(D + 1)
    with pytest.raises(ValueError) as err:
        weights.load_strict(build_vit(PICO), got, "ckpt-x")
    msg = str(err.value)
    assert "ckpt-x" in msg
    assert "missing keys (1): blocks.1.attn.qkv.weight" in msg
    assert "unexpected keys (1): blocks.7.attn.qkv.weight" in msg
    assert "norm.bias (checkpoint (65,) vs model (64,))" in msg


def test_strict_loading_rejects_a_wider_checkpoint_and_loads_a_matching_one() -> None:
    wide = build_vit(ModelSpec(arch="vit_nano"))  # D 128, depth 4
    with pytest.raises(ValueError, match="shape mismatches") as err:
        weights.load_strict(build_vit(PICO), wide.state_dict(), "nano")
    msg = str(err.value)
    assert "unexpected keys (24): blocks.2." in msg and "more)" in msg
    assert "blocks.0.attn.qkv.weight (checkpoint (384, 128) vs model (192, 64))" in msg
    src, dst = build_vit(PICO), build_vit(PICO)
    weights.load_strict(dst, src.state_dict(), "pico")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


TIMM_KEYS = {
    "vit": {"cls_token", "pos_embed", "norm.weight", "norm.bias"},
    "avgpool": {"pos_embed", "fc_norm.weight", "fc_norm.bias"},
    "cait": {"pos_embed", "cls_token", "norm.weight", "norm.bias"},
}


def timm_block_keys(depth: int) -> set[str]:
    names = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    return {f"blocks.{i}.{n}.{p}" for i in range(depth) for n in names for p in ("weight", "bias")}


@pytest.mark.parametrize("design", ["vit", "avgpool", "cait"])
def test_timm_export_has_the_timm_layout(design: str) -> None:
    encoder = build_vit(PICO.model_copy(update={"cls_token": design}))
    exported = weights.to_timm(encoder)
    expected = TIMM_KEYS[design] | timm_block_keys(DEPTH) | {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    if design == "cait":
        expected |= {f"blocks.{i}.gamma_{j}" for i in range(DEPTH) for j in (1, 2)}
        expected |= {f"blocks.{i}.attn.proj_{h}.{p}" for i in range(DEPTH) for h in "lw" for p in ("weight", "bias")}
        expected |= {f"blocks_token_only.{k}" for k in build_vit(PICO).blocks_token.state_dict()}
    assert set(exported) == expected
    grid_tokens = GRID * GRID + (1 if design == "vit" else 0)
    assert exported["pos_embed"].shape == (1, grid_tokens, D)
    config = weights.timm_config(encoder)
    kwargs = config["kwargs"]
    assert config["model"] == ("cait" if design == "cait" else "vision_transformer")
    if design != "cait":
        assert kwargs["class_token"] == (design == "vit") and kwargs["fc_norm"] == (design == "avgpool")
    assert kwargs["mlp_ratio"] == 4.0 and kwargs["patch_size"] == 4 and kwargs["num_classes"] == 0


@pytest.mark.parametrize("design", ["vit", "avgpool", "cait"])
def test_timm_round_trip_is_exact(design: str) -> None:
    spec = PICO.model_copy(update={"cls_token": design})
    torch.manual_seed(1)
    encoder = build_vit(spec).eval()
    exported = weights.to_timm(encoder)
    if design == "vit":
        # A trained timm model has a position for its class token; the import folds it into cls_token.
        delta = torch.randn(1, 1, D)
        exported["pos_embed"][:, :1] += delta
        exported["cls_token"] -= delta
    exported["head.weight"] = torch.zeros(10, D)
    imported = weights.from_timm(exported)
    back = build_vit(spec).eval()
    weights.use_pos_embed(back, imported.pop("pos_embed"), learnable=False)
    weights.load_strict(back, imported, "timm")
    with torch.no_grad():
        torch.testing.assert_close(back(IMAGES), encoder(IMAGES), rtol=1e-5, atol=1e-5)


def test_cait_export_feeds_the_finetune_backbone() -> None:
    torch.manual_seed(2)
    encoder = build_vit(PICO).eval()
    imported = weights.from_timm(weights.to_timm(encoder))
    model = Classifier(PICO, num_classes=5, drop_path_rate=0.0).eval()
    weights.use_pos_embed(model.encoder, imported.pop("pos_embed"), learnable=True)
    weights.load_strict(model.encoder, imported, "timm", discarded_keys("cait"), (*fresh_keys("cait"), "pos_embed"))
    with torch.no_grad():
        tokens = encoder.forward_features(IMAGES)[1]
        torch.testing.assert_close(model.encoder.forward_features(IMAGES)[1], tokens)


def test_position_table_interpolation_and_learnable_table() -> None:
    table = sincos_pos_embed_2d(D, 4, 4).unsqueeze(0)
    assert resize_pos_embed(table, 4) is table
    resized = resize_pos_embed(table, GRID)
    assert resized.shape == (1, GRID * GRID, D)
    constant = torch.ones(1, 16, D) * 0.5
    torch.testing.assert_close(resize_pos_embed(constant, 6), torch.full((1, 36, D), 0.5))
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.zeros(1, 15, D), 4)
    encoder = build_vit(PICO)
    weights.use_pos_embed(encoder, table, learnable=True)
    assert isinstance(encoder.pos_embed, nn.Parameter) and "pos_embed" in encoder.state_dict()
    torch.testing.assert_close(encoder.pos_embed.data, resized)
    fixed = build_vit(PICO)
    weights.use_pos_embed(fixed, None, learnable=False)
    assert "pos_embed" not in fixed.state_dict()


def test_dcp_source_gives_the_chosen_branch(tmp_path: Path) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    model = save_pretrain_checkpoint(ckpt_dir, PICO)
    url = weights.resolve(ckpt_dir)
    assert url == ckpt.step_url(ckpt_dir, 5) and weights.resolve(url) == url
    for branch, encoder in (("student", model.online.encoder), ("ema", model.target.encoder)):
        got = weights.encoder_weights(url, branch)  # type: ignore[arg-type]
        assert got.keys() == encoder.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"neither a \.pth or \.safetensors file"):
        weights.resolve(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no complete pretrain checkpoint"):
        weights.pretrain_checkpoint(str(tmp_path / "run" / "probe"))


def test_export_of_a_loaded_official_encoder_is_loadable(tmp_path: Path) -> None:
    """Official release -> our encoder -> timm .pth -> the finetune classifier: the whole conversion chain."""
    got = weights.from_official(official_checkpoint(), "student")  # type: ignore[arg-type]
    encoder: VisionTransformer = build_vit(PICO)
    weights.use_pos_embed(encoder, got.pop("pos_embed"), learnable=False)
    weights.load_strict(encoder, got, "official")
    url = str(tmp_path / "timm.pth")
    torch.save(weights.to_timm(encoder), url)
    again = weights.encoder_weights(url, "student")
    assert torch.equal(again["blocks.1.mlp.fc2.weight"], encoder.blocks[1].mlp.fc2.weight)
    assert torch.equal(again["blocks_token.0.gamma_1"], encoder.blocks_token[0].gamma_1)  # timm's Cait layout


def perturbed_encoder(design: str) -> VisionTransformer:
    """A pico encoder away from its initialisation (layer scale too), as after training."""
    torch.manual_seed(3)
    encoder = build_vit(PICO.model_copy(update={"cls_token": design}), drop_path_rate=0.0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


@pytest.mark.parametrize(("design", "suffix"), [("vit", ".pth"), ("avgpool", ".safetensors"), ("cait", ".pth")])
def test_timm_export_loads_strictly_into_real_timm_and_matches(design: str, suffix: str, tmp_path: Path) -> None:
    encoder = perturbed_encoder(design)
    url = str(tmp_path / f"export{suffix}")
    weights.save_weights(url, weights.to_timm(encoder))
    timm_model = weights.build_timm(weights.timm_config(encoder)).eval()
    state = weights.read_safetensors(url) if suffix == ".safetensors" else weights.read_pth(url)
    timm_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(IMAGES), encoder(IMAGES), rtol=1e-5, atol=1e-5)
    # ... and every stage's loader takes the file back, exactly.
    back = build_vit(PICO.model_copy(update={"cls_token": design}), drop_path_rate=0.0).eval()
    weights.load_encoder(back, url, "ema")
    with torch.no_grad():
        torch.testing.assert_close(back(IMAGES), encoder(IMAGES), rtol=1e-5, atol=1e-5)


def test_timm_layer_scale_other_than_one_and_real_talking_heads_are_refused() -> None:
    exported = weights.to_timm(perturbed_encoder("cait"))
    scaled = dict(exported, **{"blocks.0.gamma_1": exported["blocks.0.gamma_1"] * 0.5})
    with pytest.raises(ValueError, match="layer scale in the self-attention blocks"):
        weights.from_timm(scaled)
    mixed = dict(exported, **{"blocks.1.attn.proj_w.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj_w\.weight: talking heads .*identity only"):
        weights.from_timm(mixed)
    # timm's own Cait (talking heads) and the earlier exports with timm's standard Attention both come back.
    plain = {k: v for k, v in exported.items() if ".attn.proj_" not in k}
    assert weights.from_timm(plain).keys() == weights.from_timm(exported).keys()


def trained_model(seed: int = 4) -> ExtreMA:
    """A pico ExtreMA whose target, projectors and predictor all differ from any initialisation."""
    torch.manual_seed(seed)
    model = ExtreMA(PICO)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_official_checkpoint_fills_every_part_strictly(tmp_path: Path) -> None:
    model = trained_model()
    url = str(tmp_path / "official.pth")
    weights.save_weights(url, {"epoch": 300, **weights.to_official(model)})
    sd = weights.read_pth(url)["state_dict"]
    assert {k.split(".")[1] for k in sd} == {"base_encoder", "momentum_encoder", "predictor"}
    assert "module.base_encoder.head.6.weight" in sd and "module.momentum_encoder.patch_embed.proj.bias" in sd
    fresh = ExtreMA(PICO)
    weights.load_extrema(fresh, url)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # The encoder-only loader reads the same file for either branch.
    assert torch.equal(weights.encoder_weights(url, "ema")["norm.bias"], model.target.encoder.norm.bias)
    broken = dict(sd)
    del broken["module.predictor.3.weight"]
    broken["module.predictor.9.weight"] = torch.zeros(2)
    broken["module.base_encoder.head.0.bias"] = torch.zeros(3)
    weights.save_weights(url, {"state_dict": broken})
    with pytest.raises(ValueError) as err:
        weights.load_extrema(ExtreMA(PICO), url)
    msg = str(err.value)
    assert "missing keys (1): predictor.3.weight" in msg and "unexpected keys (1): predictor.9.weight" in msg
    assert "online.projector.0.bias (checkpoint (3,) vs model (32,))" in msg


def test_a_dcp_step_fills_every_part(tmp_path: Path) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    model = save_pretrain_checkpoint(ckpt_dir, PICO)
    fresh = ExtreMA(PICO)
    weights.load_extrema(fresh, ckpt_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
