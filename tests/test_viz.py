"""Attention maps: real probabilities of the last layers (they sum to one and reproduce the SDPA output), rendered."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from extrema import entry
from extrema.data.augment import normalize
from extrema.models.extrema import random_masks
from extrema.models.vit import Block, ClassAttentionBlock, VisionTransformer, gather_visible
from extrema.viz import attention
from tests.stage_runs import make_run

DESIGNS = ("cait", "vit", "avgpool")


def encoder(design: str) -> VisionTransformer:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, cls_design=design)  # type: ignore[arg-type]
    for p in enc.parameters():  # away from the near-uniform attention of the initialisation
        p.data.add_(0.2 * torch.randn_like(p))
    return enc.eval()


@pytest.mark.parametrize("design", DESIGNS)
def test_probabilities_sum_to_one_and_are_the_ones_sdpa_uses(design: str) -> None:
    enc = encoder(design)
    x = torch.randn(3, 3, 32, 32)
    probs = attention.last_attention(enc, x)
    tokens = 64 + (design == "vit")
    assert probs["self"].shape == (3, 4, tokens, tokens)
    torch.testing.assert_close(probs["self"].sum(-1), torch.ones(3, 4, tokens))
    assert (probs["self"] >= 0).all()
    # Rebuild the last block's attention output from the probabilities and compare with the module's own (SDPA).
    with torch.no_grad():
        t = enc.embed(x)
        if design == "vit":
            t = torch.cat([enc.cls_token.expand(3, -1, -1), t], 1)  # type: ignore[union-attr]
        t = enc.blocks[0](t)
        last = enc.blocks[-1]
        assert isinstance(last, Block)
        h = last.norm1(t)
        v = last.attn.qkv(h).reshape(3, tokens, 3, 4, 16)[:, :, 2].transpose(1, 2)
        mixed = (probs["self"] @ v).transpose(1, 2).reshape(3, tokens, 64)
        torch.testing.assert_close(last.attn.proj(mixed), last.attn(h), rtol=1e-4, atol=1e-5)
        if design == "cait":
            assert probs["class"].shape == (3, 4, 1, 65)
            torch.testing.assert_close(probs["class"].sum(-1), torch.ones(3, 4, 1))
            patches = last(t)
            cls = enc.cls_token.expand(3, -1, -1)  # type: ignore[union-attr]
            cls = enc.blocks_token[0](cls, patches)
            ca = enc.blocks_token[-1]
            assert isinstance(ca, ClassAttentionBlock)
            u = ca.norm1(torch.cat([cls, patches], 1))
            v = ca.attn.v(u).reshape(3, 65, 4, 16).transpose(1, 2)
            out = ca.attn.proj((probs["class"] @ v).transpose(1, 2).reshape(3, 1, 64))
            torch.testing.assert_close(out, ca.attn(u), rtol=1e-4, atol=1e-5)
        else:
            assert "class" not in probs


def test_masked_inputs_attend_over_the_visible_tokens_only() -> None:
    enc = encoder("avgpool")
    visible = random_masks(2, 64, 1, 0.75, generator=torch.Generator().manual_seed(0))
    probs = attention.last_attention(enc, torch.randn(2, 3, 32, 32), visible)
    assert probs["self"].shape == (2, 4, 16, 16)
    torch.testing.assert_close(probs["self"].sum(-1), torch.ones(2, 4, 16))
    assert gather_visible(torch.zeros(2, 64, 1), visible).shape == (2, 16, 1)


@pytest.mark.parametrize("design", DESIGNS)
def test_maps_are_head_means_over_the_patch_keys(design: str) -> None:
    enc = encoder(design)
    x = torch.randn(2, 3, 32, 32)
    queries = attention.default_queries(enc, 8)
    assert queries[0] == "cls" if design != "avgpool" else "cls" not in queries
    maps = attention.attention_maps(enc, x, queries)
    assert maps.shape == (2, len(queries), 8, 8)
    probs = attention.last_attention(enc, x)
    sums = maps.sum((-1, -2))
    patch_queries = [i for i, q in enumerate(queries) if q != "cls"]
    offset = 1 if design == "vit" else 0
    # Patch queries: all their mass is on patches except (for vit) the class key's share.
    expected = 1 - probs["self"][:, :, offset:, 0].mean(1) if design == "vit" else torch.ones(2, 64)
    for j in patch_queries:
        torch.testing.assert_close(sums[:, j], expected[:, int(queries[j])])  # type: ignore[call-overload]
    if design == "cait":
        torch.testing.assert_close(sums[:, 0], 1 - probs["class"][:, :, 0, 0].mean(1))
    if design == "avgpool":
        with pytest.raises(ValueError, match="no class token"):
            attention.attention_maps(enc, x, ["cls"])
    with pytest.raises(ValueError, match="outside the 8x8 grid"):
        attention.attention_maps(enc, x, [64])


def test_render_attention_of_a_pretrained_run(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "r0")
    make_run(run_dir, {"stages": ["pretrain"], "pretrain": {"steps": 4, "ckpt_every": 4}})
    entry.run_stage(run_dir, "pretrain")
    fig = attention.render_attention(run_dir, images=(0, 5, 7))
    assert [Path(f).name for f in fig.files] == ["attention.png", "attention.svg"]
    assert Path(fig.files[0]).parent == tmp_path / "r0" / "viz"
    head = Path(fig.files[0]).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", head[16:24])
    assert 800 < w < 2500 and 600 < h < 2000
    assert fig.queries == ["cls", 18, 36, 54] and fig.maps.shape == (3, 4, 8, 8)
    assert fig.images.dtype == torch.uint8 and fig.images.shape == (3, 3, 32, 32)
    # The export and the checkpoint hold the same EMA encoder: the maps agree whichever is read.
    ckpt_dir = str(tmp_path / "r0" / "pretrain" / "ckpt")
    again = attention.attention_maps(
        attention.load_encoder(run_dir, "ema", checkpoint=ckpt_dir),
        normalize(fig.images.float() / 255),
        fig.queries,
    )
    torch.testing.assert_close(again, fig.maps)
