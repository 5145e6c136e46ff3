"""The batched colour augmentation reproduces torchvision's per-image colour transforms."""

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from extrema.augment import NUM_COLOR_PARAMS, apply_color, color_jitter, normalize, sample_color_params, two_views

OPS = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]


def reference(img: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """torchvision v2 functional ops applied to one image in the parameters' order."""
    out = img
    if p[0] > 0.5:
        for op in p[6:10].long().tolist():
            out = OPS[op](out, float(p[1 + op]))
    if p[5] > 0.5:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    return out


def test_batched_color_matches_torchvision_per_image() -> None:
    torch.manual_seed(0)
    imgs = torch.rand(64, 3, 12, 12)
    jitter = color_jitter()
    params = torch.stack([sample_color_params(jitter, imgs[i]) for i in range(64)])
    assert params.shape == (64, NUM_COLOR_PARAMS)
    assert 0 < params[:, 0].sum() < 64 and 0 < params[:, 5].sum() < 64  # both branches exercised
    got = apply_color(imgs, params)
    want = torch.stack([reference(imgs[i], params[i]) for i in range(64)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_parameters_follow_the_recipe_ranges() -> None:
    torch.manual_seed(1)
    jitter = color_jitter()
    p = torch.stack([sample_color_params(jitter, torch.zeros(3, 4, 4)) for _ in range(2000)])
    assert p[:, 0].mean().item() == pytest.approx(0.8, abs=0.03)
    assert p[:, 5].mean().item() == pytest.approx(0.2, abs=0.03)
    assert p[:, 1].min() >= 0.6 and p[:, 1].max() <= 1.4
    assert p[:, 3].min() >= 0.8 and p[:, 3].max() <= 1.2
    assert p[:, 4].abs().max() <= 0.1
    assert all(sorted(row) == [0, 1, 2, 3] for row in p[:, 6:].long().tolist())


def test_two_views_share_geometry_and_differ_in_colour() -> None:
    torch.manual_seed(2)
    crops = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    jitter = color_jitter()
    params = torch.stack(
        [torch.stack([sample_color_params(jitter, crops[i]), sample_color_params(jitter, crops[i])]) for i in range(8)]
    )
    v1, v2 = two_views(crops, params, color=True)
    assert v1.shape == v2.shape == (8, 3, 16, 16)
    assert not torch.allclose(v1, v2)
    s1, s2 = two_views(crops, params, color=False)
    assert s1 is s2
    torch.testing.assert_close(s1, normalize(crops.float() / 255))


def test_device_colour_path_gives_the_same_views_as_the_per_sample_path() -> None:
    from extrema import data
    from extrema.spec import DataSpec

    ds = data.build_dataset(DataSpec(dataset="synthetic", synthetic_size=16), "train")
    host = data.PretrainViews(ds, data.TwoViewTransform(32, "spatial_consistent_color"), seed=3)
    dev = data.PretrainViews(ds, data.TwoViewTransform(32, "spatial_consistent_color", device_color=True), seed=3)
    keys = [(0, i) for i in range(16)]
    h1, h2, _ = zip(*[host[k] for k in keys])
    crops, params, _ = zip(*[dev[k] for k in keys])
    d1, d2 = two_views(torch.stack(crops), torch.stack(params), color=True)
    torch.testing.assert_close(d1, torch.stack(h1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d2, torch.stack(h2), atol=1e-4, rtol=1e-4)
