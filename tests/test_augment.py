"""The batched colour augmentation reproduces torchvision's per-image colour transforms."""

import itertools

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from extrema.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_COLOR_PARAMS,
    apply_color,
    color_jitter,
    grayscale,
    normalize,
    sample_color_params,
    two_views,
)

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
    from extrema.data import datasets, loaders, transforms
    from extrema.spec import DataSpec

    ds = datasets.build_dataset(DataSpec(dataset="synthetic", synthetic_size=16), "train")
    host = loaders.PretrainViews(ds, transforms.TwoViewTransform(32, "spatial_consistent_color"), seed=3)
    dev = loaders.PretrainViews(
        ds, transforms.TwoViewTransform(32, "spatial_consistent_color", device_color=True), seed=3
    )
    keys = [(0, i) for i in range(16)]
    h1, h2, _ = zip(*[host[k] for k in keys])
    crops, params, _ = zip(*[dev[k] for k in keys])
    d1, d2 = two_views(torch.stack(crops), torch.stack(params), color=True)
    torch.testing.assert_close(d1, torch.stack(h1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d2, torch.stack(h2), atol=1e-4, rtol=1e-4)


# The implementation before the sync-free rewrite (commit bd4ad18), kept verbatim as the bit-for-bit reference:
# it gathers each op's samples with `.nonzero()` and skips empty groups with `numel()`, a host sync each on CUDA.


def old_blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = ratio.view(-1, 1, 1, 1)
    return (x * r + other * (1 - r)).clamp(0, 1)


def old_adjust(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    if op == 0:
        return old_blend(x, torch.zeros_like(x), factor)
    if op == 1:
        return old_blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == 2:
        return old_blend(x, grayscale(x), factor)
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=1)
    h = (h + factor.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=1))


def old_apply_color(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    params = params.to(x.device)
    applied = params[:, 0] > 0.5
    order = params[:, 6:10].long()
    x = x.clone()
    for pos in range(4):
        for op in range(4):
            sel = (applied & (order[:, pos] == op)).nonzero().squeeze(1)
            if sel.numel():
                x[sel] = old_adjust(x[sel], op, params[sel, 1 + op])
    gray = (params[:, 5] > 0.5).view(-1, 1, 1, 1)
    return torch.where(gray, grayscale(x).expand_as(x), x)


def old_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def old_two_views(crops: torch.Tensor, params: torch.Tensor, color: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = crops.float().div_(255)
    if not color:
        view = old_normalize(x)
        return view, view
    return old_normalize(old_apply_color(x, params[:, 0])), old_normalize(old_apply_color(x, params[:, 1]))


def every_case_params(g: torch.Generator, repeats: int = 1) -> torch.Tensor:
    """(24 * 4 * repeats, 10) parameters: every op order x jitter applied or not x grayscale or not, shuffled,
    with factors drawn from the recipe's ranges."""
    rows = []
    for order in itertools.permutations(range(4)):
        for applied, gray in itertools.product((0.0, 1.0), repeat=2):
            for _ in range(repeats):
                u = torch.rand(4, generator=g)
                factors = [0.6 + 0.8 * u[0], 0.6 + 0.8 * u[1], 0.8 + 0.4 * u[2], -0.1 + 0.2 * u[3]]
                rows.append([applied, *map(float, factors), gray, *map(float, order)])
    params = torch.tensor(rows, dtype=torch.float32)
    return params[torch.randperm(len(rows), generator=g)]


def every_case_images(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Random images in [0, 1] with the hue op's edge cases: grey pixels (max == min), black, white, saturated."""
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, 0, :] = x[:, :1, 0, :]  # grey row: max == min
    x[:, :, 1, :2] = 0.0
    x[:, :, 1, 2:4] = 1.0
    x[:, 0, 2, :], x[:, 1:, 2, :] = 1.0, 0.0  # pure red
    return x


@pytest.mark.parametrize("size", [12, 67])
def test_sync_free_color_equals_the_old_implementation_bit_for_bit(size: int) -> None:
    g = torch.Generator().manual_seed(5)
    params = every_case_params(g, repeats=2)
    x = every_case_images(g, len(params), size)
    got = apply_color(x, params)
    want = old_apply_color(x, params)
    assert torch.equal(got, want)
    changed = (got != x).flatten(1).any(1)
    untouched = (params[:, 0] < 0.5) & (params[:, 5] < 0.5)
    assert torch.equal(changed, ~untouched)  # every jittered or greyed sample changed; the others kept bit for bit


def test_sync_free_two_views_equal_the_old_ones_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(6)
    p1, p2 = every_case_params(g), every_case_params(g)
    params = torch.stack((p1, p2), dim=1)
    crops = torch.randint(0, 256, (len(p1), 3, 16, 16), dtype=torch.uint8, generator=g)
    for color in (True, False):
        got, want = two_views(crops, params, color), old_two_views(crops, params, color)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_normalize_keeps_its_constants_on_the_device_per_dtype() -> None:
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(normalize(x), old_normalize(x))
    assert torch.equal(normalize(x.double()), old_normalize(x.double()))
    assert normalize(x.bfloat16()).dtype == torch.bfloat16


class NoHostData(TorchFunctionMode):
    """Forbids making a tensor from Python data (on CUDA: a host-to-device copy) and reading a tensor's values
    back to Python (on CUDA: a device-to-host sync)."""

    FORBIDDEN = frozenset(
        {torch.tensor, torch.as_tensor, torch.from_numpy}
        | {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero, torch.Tensor.__bool__, torch.nonzero}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.FORBIDDEN:
            raise RuntimeError(f"host data: {func.__name__}")
        return func(*args, **(kwargs or {}))


def run_without_host_data(fn, *args):  # type: ignore[no-untyped-def]
    """`fn` on meta tensors (shapes without data) under `NoHostData`: this checks on a CPU what CUDA's sync debug
    mode checks on a GPU. A meta tensor has no values, so every op whose result needs one on the host fails:
    `.nonzero()`, a boolean-mask index, `masked_select`, `.item()`, `.tolist()`, `bool(tensor)`, `.cpu()`; and the
    mode rejects tensors built from Python lists per call."""
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with NoHostData():
        return fn(*meta)


def color_batch(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p1, p2 = every_case_params(g), every_case_params(g)
    crops = torch.randint(0, 256, (len(p1), 3, size, size), dtype=torch.uint8, generator=g)
    return crops, torch.stack((p1, p2), dim=1)


def test_colour_path_reads_no_device_data_on_the_host() -> None:
    crops, params = color_batch(7, 8)
    two_views(crops.to("meta"), params.to("meta"), True)  # first call: the device constants are cached once
    v1, v2 = run_without_host_data(two_views, crops, params, True)
    s1, s2 = run_without_host_data(two_views, crops, params, False)
    assert v1.shape == v2.shape == s1.shape == s2.shape == crops.shape and v1.device.type == "meta"


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x.nonzero(),
        lambda x: x[x > 0.5],
        lambda x: x.masked_select(x > 0.5),
        lambda x: x.sum().item(),
        lambda x: x.sum(1).tolist(),
        lambda x: x if x.sum() > 0 else -x,
        lambda x: x * torch.tensor([1.0, 2.0, 3.0], device=x.device),
        lambda x: x.cpu(),
    ],
    ids=["nonzero", "mask_index", "masked_select", "item", "tolist", "bool", "tensor_from_list", "cpu"],
)
def test_the_host_data_check_catches_each_syncing_call(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((RuntimeError, NotImplementedError)):
        run_without_host_data(fn, torch.rand(4, 3))


def test_the_host_data_check_rejects_the_old_implementation() -> None:
    """The check has teeth: the old path fails it, both its `.nonzero()` colour ops and its normalisation."""
    crops, params = color_batch(8, 8)
    with pytest.raises((RuntimeError, NotImplementedError), match="nonzero"):
        run_without_host_data(old_apply_color, crops.float() / 255, params[:, 0])
    with pytest.raises(RuntimeError, match="host data: tensor"):
        run_without_host_data(old_normalize, crops.float() / 255)
    with pytest.raises((RuntimeError, NotImplementedError)):
        run_without_host_data(old_two_views, crops, params, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_color_step_never_synchronises() -> None:
    crops, params = (t.cuda() for t in color_batch(9, 32))
    two_views(crops, params, True)  # first call: the cached device constants are copied up once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        v1, v2 = two_views(crops, params, True)
        s1, _ = two_views(crops, params, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    w1, w2 = old_two_views(crops, params, True)  # on CUDA a reduction may group differently per batch size
    torch.testing.assert_close(v1, w1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v2, w2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, old_normalize(crops.float() / 255))
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            old_apply_color(crops.float() / 255, params[:, 0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
