"""ViT presets, position embedding and the three class-token designs."""

import pytest
import torch

from extrema.models.vit import VisionTransformer, build_vit, count_params, gather_visible, sincos_pos_embed_2d
from extrema.spec import ModelSpec

# (backbone without CA blocks, +CA blocks, projector, predictor) in millions, from the spec's table.
SPEC_TABLE = {
    "vit_tiny": (5.5, 0.9, 18.6, 2.1),
    "vit_small": (21.6, 3.6, 19.4, 2.1),
    "vit_base": (85.7, 14.2, 21.0, 2.1),
    "vit_large": (303.1, 25.2, 22.0, 2.1),
}


@pytest.mark.parametrize("arch", sorted(SPEC_TABLE))
def test_preset_parameter_counts_match_spec_table(arch: str) -> None:
    from extrema.models.extrema import mlp_head

    with torch.device("meta"):
        enc = build_vit(ModelSpec(arch=arch))
        spec = ModelSpec(arch=arch)
        proj = mlp_head(3, spec.dims[0], 4096, 256)
        pred = mlp_head(2, 256, 4096, 256)
    ca = count_params(enc.blocks_token)
    backbone = count_params(enc) - ca - enc.cls_token.numel()
    expected = SPEC_TABLE[arch]
    assert backbone / 1e6 == pytest.approx(expected[0], abs=0.06)
    assert ca / 1e6 == pytest.approx(expected[1], abs=0.05)
    assert count_params(proj) / 1e6 == pytest.approx(expected[2], abs=0.05)
    assert count_params(pred) / 1e6 == pytest.approx(expected[3], abs=0.05)
    assert enc.patch_embed.kernel_size == (16, 16)


def test_sincos_layout_matches_mae() -> None:
    """First half encodes the column (x), second half the row (y); each half is [sin | cos]."""
    d, gh, gw = 16, 3, 5
    pe = sincos_pos_embed_2d(d, gh, gw)
    assert pe.shape == (gh * gw, d)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    for idx in [0, 7, 14]:
        row, col = divmod(idx, gw)
        want = torch.cat(
            [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
        ).float()
        torch.testing.assert_close(pe[idx], want)
    assert not any(isinstance(p, torch.nn.Parameter) and p is pe for p in VisionTransformer().parameters())


@pytest.mark.parametrize("design", ["cait", "vit", "avgpool"])
@pytest.mark.parametrize("img", [32, 48])
def test_designs_shapes(design: str, img: int) -> None:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=img, patch_size=4, embed_dim=64, depth=2, num_heads=2, cls_design=design)
    x = torch.randn(3, 3, img, img)
    inst, patches = enc.forward_features(x)
    n = (img // 4) ** 2
    assert inst.shape == (3, 64) and patches.shape == (3, n, 64)
    visible = torch.stack([torch.randperm(n)[:5] for _ in range(2 * 3)]).reshape(2, 3, 5)
    inst, patches = enc.forward_features(x, visible)
    assert inst.shape == (6, 64) and patches.shape == (6, 5, 64)
    assert enc(x).shape == (3, 64)


def test_position_embedding_for_other_resolution() -> None:
    enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2)
    assert enc.embed(torch.randn(1, 3, 32, 48)).shape == (1, 8 * 12, 64)
    torch.testing.assert_close(enc.pos_embed_for(8, 12), sincos_pos_embed_2d(64, 8, 12).unsqueeze(0))


def test_cait_patch_tokens_not_updated_by_class_attention() -> None:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, cls_design="cait")
    x = torch.randn(2, 3, 32, 32)
    _, patches = enc.forward_features(x)
    torch.testing.assert_close(patches, enc.forward_blocks(enc.embed(x)))
    assert len(enc.blocks_token) == 2
    for blk in enc.blocks_token:
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)


def test_vit_design_class_token_is_never_masked_and_attends_everywhere() -> None:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, cls_design="vit")
    assert len(enc.blocks_token) == 0
    tokens = enc.embed(torch.randn(2, 3, 32, 32))
    out = enc.forward_blocks(tokens)
    assert out.shape == (2, 17, 64)
    # The class token's output depends on the patch tokens (it takes part in self-attention).
    out2 = enc.forward_blocks(tokens + 1.0)
    assert not torch.allclose(out[:, 0], out2[:, 0])


def test_avgpool_design_has_no_class_token() -> None:
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, cls_design="avgpool")
    assert enc.cls_token is None and len(enc.blocks_token) == 0
    x = torch.randn(2, 3, 32, 32)
    inst, patches = enc.forward_features(x)
    torch.testing.assert_close(inst, patches.mean(1))


def test_drop_path_is_identity_in_eval_and_random_in_train() -> None:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))
    enc.train()
    assert not torch.allclose(enc(x), enc(x))
    rates = [b.drop_path.p for b in enc.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)


def test_gather_visible_is_mask_major() -> None:
    b, n, d, m, k = 3, 10, 4, 2, 3
    tokens = torch.arange(b * n * d, dtype=torch.float32).reshape(b, n, d)
    visible = torch.stack([torch.stack([torch.randperm(n)[:k] for _ in range(b)]) for _ in range(m)])
    out = gather_visible(tokens, visible)
    assert out.shape == (m * b, k, d)
    for mi in range(m):
        for bi in range(b):
            torch.testing.assert_close(out[mi * b + bi], tokens[bi, visible[mi, bi]])


@pytest.mark.parametrize("design", ["cait", "vit", "avgpool"])
def test_timm_named_parts_agree_with_the_forward_pass(design: str) -> None:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, cls_design=design).eval()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 32, 32)
    inst, patches = enc.forward_features(x)
    torch.testing.assert_close(enc.forward_head(inst), enc(x))
    taps = enc.forward_intermediates(x, (2, 0, 2))
    assert [t.shape for t in taps] == [(2, 64, 64)] * 3
    torch.testing.assert_close(taps[0], patches)
    torch.testing.assert_close(taps[1], enc.blocks[0](enc.prefix(enc.embed(x)))[:, enc.num_prefix_tokens :])
    if design == "avgpool":
        assert not enc.has_cls_query
        with pytest.raises(ValueError, match="no class token"):
            enc.cls_attention(x)
        return
    full = enc.cls_attention(x, class_key=True)
    assert full.shape == (2, 2, 65)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(enc.cls_attention(x), full[:, :, 1:])
    if design == "vit":
        torch.testing.assert_close(full, enc.last_self_attention(x)[:, :, 0])
