"""The table of class-token designs is the one place a design is described: the encoder, the classifier, the figures
and the timm export all read it, so a new design that reuses an existing readout is a row."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from extrema.models import classifier
from extrema.models.designs import DESIGNS, design
from extrema.models.vit import VisionTransformer
from extrema.spec import ModelSpec
from extrema.train import weights

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def encoder(name: str) -> VisionTransformer:
    torch.manual_seed(5)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, cls_design=name)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit.eval()


def test_the_table_is_the_specs_list_of_designs() -> None:
    assert list(DESIGNS) == list(typing.get_args(ModelSpec.model_fields["cls_token"].annotation))
    assert [d.name for d in DESIGNS.values() if d.official] == ["cait"]  # the official release holds cait only
    with pytest.raises(ValueError, match="unknown class-token design 'nope'; known: cait, vit, avgpool"):
        design("nope")


@pytest.mark.parametrize("like", ["vit", "avgpool"])
def test_a_fourth_design_added_as_a_row_runs_everywhere(like: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A toy design described like `like` under another name: built, read out, finetuned and exported to timm through
    the table alone, equal to `like` bit for bit."""
    monkeypatch.setitem(DESIGNS, "toy", dataclasses.replace(DESIGNS[like], name="toy", finetune_as="toy"))
    toy, ref = encoder("toy"), encoder(like)
    assert toy.state_dict().keys() == ref.state_dict().keys()
    assert toy.num_prefix_tokens == ref.num_prefix_tokens and toy.has_cls_query == ref.has_cls_query
    with torch.no_grad():
        assert torch.equal(toy(IMAGES), ref(IMAGES))
    assert classifier.finetune_design("toy") == "toy"  # type: ignore[arg-type]
    assert classifier.discarded_keys("toy") == classifier.discarded_keys(like)  # type: ignore[arg-type]
    assert DESIGNS["toy"].attention_source == DESIGNS[like].attention_source
    assert weights.timm_config(toy) == weights.timm_config(ref)
    timm_model = weights.build_timm(weights.timm_config(toy)).eval()
    timm_model.load_state_dict(weights.to_timm(toy), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(IMAGES), toy(IMAGES), rtol=1e-5, atol=1e-5)
