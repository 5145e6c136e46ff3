"""Datasets, transforms, the step-exact batch sampler and the per-sample seeded pretraining views."""

from __future__ import annotations

import gzip
import random
import struct
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png
from torchvision.transforms import v2

from extrema.data import augment, datasets, loaders, transforms
from extrema.spec import DataSpec

DEBIAN = Path(datasets.FASHION_MNIST_DEBIAN_DIR)
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)


def idx_bytes(arr: np.ndarray) -> bytes:
    """An uint8 array in the IDX format."""
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fashion_files(url: str, n: int, gz: bool) -> None:
    """The first n train and t10k items of the Debian copy, written as IDX files under a directory URL."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            raw = idx_bytes(datasets.read_idx(str(DEBIAN / f"{name}.gz"))[:n])
            with fs.open(f"{root}/{name}.gz" if gz else f"{root}/{name}", "wb") as f:
                f.write(gzip.compress(raw, compresslevel=1) if gz else raw)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@needs_debian
def test_fashion_mnist_from_debian_files() -> None:
    spec = DataSpec(dataset="fashion_mnist")
    train, val = datasets.build_dataset(spec, "train"), datasets.build_dataset(spec, "val")
    assert (len(train), len(val)) == (60000, 10000)
    assert train.classes == val.classes and len(train.classes) == 10 and train.classes[9] == "Ankle boot"
    img, label = train[0]
    assert img.shape == (3, 28, 28) and img.dtype == torch.uint8 and isinstance(label, int)
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    assert label == 9 and val[0][1] == 9  # the first item of both files is an ankle boot
    assert torch.bincount(torch.as_tensor(train.targets)).tolist() == [6000] * 10
    assert torch.bincount(torch.as_tensor(val.targets)).tolist() == [1000] * 10
    assert 0 < img.float().mean() < 255


@needs_debian
@pytest.mark.parametrize(("protocol", "gz"), [("memory", True), ("file", False)])
def test_fashion_mnist_root_wins_and_reads_any_fsspec_url(protocol: str, gz: bool, tmp_path: Path) -> None:
    root = f"memory://fm-{uuid.uuid4().hex}" if protocol == "memory" else f"file://{tmp_path}"
    write_fashion_files(root, 50, gz)
    spec = DataSpec(dataset="fashion_mnist", root=root)
    train, val = datasets.build_dataset(spec, "train"), datasets.build_dataset(spec, "val")
    full = datasets.build_dataset(DataSpec(dataset="fashion_mnist"), "train")
    assert (len(train), len(val)) == (50, 50)
    assert torch.equal(train[7][0], full[7][0]) and train[7][1] == full[7][1]


def test_fashion_mnist_not_found_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty, debian = tmp_path / "empty", tmp_path / "no-debian-package"
    empty.mkdir()
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(debian))
    with pytest.raises(FileNotFoundError) as err:
        datasets.build_dataset(DataSpec(dataset="fashion_mnist", root=str(empty)), "train")
    msg = str(err.value)
    assert str(empty) in msg and str(debian) in msg and "cache_dir" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


@needs_debian
def test_fashion_mnist_cache_dir_is_the_third_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_files(str(tmp_path / "cache"), 30, gz=True)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "no-debian-package"))
    spec = DataSpec(dataset="fashion_mnist", root=str(tmp_path / "missing"), cache_dir=str(tmp_path / "cache"))
    assert len(datasets.build_dataset(spec, "val")) == 30


def test_parse_idx_refuses_other_files() -> None:
    with pytest.raises(ValueError, match="IDX"):
        datasets.parse_idx(b"\x89PNG\r\n\x1a\n")
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(datasets.parse_idx(idx_bytes(arr)), arr)


# ------------------------------------------------------------------------------------------------ ImageFolder


def write_image_folder(url: str, split: str, fmt: str) -> dict[str, torch.Tensor]:
    """A tiny <split>/<class>/<image> tree of smooth random images; returns `<class>/<k>` -> written image."""
    fs, root = fsspec.core.url_to_fs(url)
    g = torch.Generator().manual_seed(0)
    written = {}
    for cls, count in (("zebra", 2), ("ant", 3)):
        fs.makedirs(f"{root}/{split}/{cls}", exist_ok=True)
        for k in range(count):
            coarse = torch.rand(1, 3, 3, 3, generator=g) * 255
            img = torch.nn.functional.interpolate(coarse, size=(12 + k, 10), mode="bilinear")[0].to(torch.uint8)
            blob = encode_png(img) if fmt == "png" else encode_jpeg(img, quality=95)
            fs.pipe_file(f"{root}/{split}/{cls}/{k}.{fmt}", bytes(blob.numpy()))
            written[f"{cls}/{k}"] = img
    fs.pipe_file(f"{root}/{split}/ant/notes.txt", b"not an image")
    return written


def test_image_folder_on_memory_url_decodes_png_exactly() -> None:
    root = f"memory://imgs-{uuid.uuid4().hex}"
    written = write_image_folder(root, "train", "png")
    ds = datasets.build_dataset(DataSpec(dataset="imagefolder", root=root), "train")
    assert ds.classes == ["ant", "zebra"] and len(ds) == 5
    assert torch.as_tensor(ds.targets).tolist() == [0, 0, 0, 1, 1]
    img, label = ds[3]
    assert label == 1 and torch.equal(img, written["zebra/0"])
    assert torch.equal(ds[2][0], written["ant/2"])


def test_image_folder_on_file_url_decodes_jpeg_and_grayscale(tmp_path: Path) -> None:
    written = write_image_folder(f"file://{tmp_path}", "validation", "jpg")
    gray = torch.full((1, 8, 8), 77, dtype=torch.uint8)
    (tmp_path / "validation" / "zebra" / "gray.png").write_bytes(bytes(encode_png(gray).numpy()))
    spec = DataSpec(dataset="imagefolder", root=f"file://{tmp_path}", val_split="validation")
    ds = datasets.build_dataset(spec, "val")
    assert len(ds) == 6
    img, label = ds[0]
    assert label == 0 and img.shape == written["ant/0"].shape and img.dtype == torch.uint8
    assert (img.float() - written["ant/0"].float()).abs().mean() < 12  # lossy, but the same picture
    assert (img.float() - written["ant/1"][:, :12].float()).abs().mean() > 20
    gray_rgb, _ = ds[5]
    assert gray_rgb.shape == (3, 8, 8) and (gray_rgb == 77).all()


def test_image_folder_errors_are_clear(tmp_path: Path) -> None:
    spec = DataSpec(dataset="imagefolder", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.build_dataset(spec, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subdirectories"):
        datasets.build_dataset(spec, "train")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        datasets.build_dataset(spec, "train")


# -------------------------------------------------------------------------------------------------- Synthetic


def test_synthetic_is_seeded_and_splits_differ() -> None:
    spec = DataSpec(dataset="synthetic", synthetic_size=40)
    train, val = datasets.build_dataset(spec, "train"), datasets.build_dataset(spec, "val")
    again = datasets.build_dataset(spec, "train")
    assert len(train) == len(val) == 40 and len(train.classes) == 10
    img, label = train[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and 0 <= label < 10
    assert torch.bincount(torch.as_tensor(train.targets), minlength=10).tolist() == [4] * 10
    assert all(torch.equal(train[i][0], again[i][0]) for i in range(40))
    assert not torch.equal(train[0][0], val[0][0])
    assert not torch.equal(train[0][0], datasets.build_dataset(spec, "train", seed=1)[0][0])


def test_synthetic_classes_are_separable_by_nearest_neighbour() -> None:
    spec = DataSpec(dataset="synthetic", synthetic_size=200)
    train, val = datasets.build_dataset(spec, "train"), datasets.build_dataset(spec, "val")

    def feats(ds: datasets.LabeledImages) -> torch.Tensor:
        x = torch.stack([ds[i][0] for i in range(len(ds))]).float().flatten(1)
        return torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)

    nearest = (feats(val) @ feats(train).T).argmax(1)
    acc = (torch.as_tensor(train.targets)[nearest] == torch.as_tensor(val.targets)).float().mean()
    assert acc > 0.5  # chance is 0.1


# ------------------------------------------------------------------------------------------------- Transforms


def gray_noise(size: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (1, size, size), generator=torch.Generator().manual_seed(1)).to(torch.uint8)


def comonotonic(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b orders every pair of pixels as a does (ties allowed): b is a monotone per-pixel map of a."""
    a, b = a.flatten().double(), b.flatten().double()
    return bool((((a[:, None] - a[None]) * (b[:, None] - b[None])) >= 0).all())


def test_two_view_shapes_and_spatial_returns_one_tensor() -> None:
    img = gray_noise().expand(3, -1, -1)
    for aug in ("spatial_consistent_color", "spatial"):
        v1, v2_ = transforms.TwoViewTransform(32, aug)(img)  # type: ignore[arg-type]
        assert v1.shape == v2_.shape == (3, 32, 32) and v1.dtype == torch.float32
        assert v1.min() > -2.2 and v1.max() < 2.7  # ImageNet-normalized [0, 1]
    v1, v2_ = transforms.TwoViewTransform(32, "spatial")(img)
    assert v1 is v2_
    with pytest.raises(ValueError):
        transforms.TwoViewTransform(32, "blur")  # type: ignore[arg-type]


def test_consistent_color_views_share_geometry() -> None:
    # On a gray image every colour op here (jitter in any order, grayscale) is one monotone map applied to
    # every pixel, so two views of the same crop order all pixel pairs alike; different crops do not.
    img = gray_noise().expand(3, -1, -1)
    t = transforms.TwoViewTransform(32, "spatial_consistent_color")
    differ = 0
    for seed in range(12):
        torch.manual_seed(seed)
        a1, a2 = t(img)
        torch.manual_seed(seed + 1000)
        b1, _ = t(img)
        assert comonotonic(a1[0], a2[0]), seed
        assert not comonotonic(a1[0], b1[0]), seed  # the check sees a different crop
        differ += not torch.equal(a1, a2)
    assert differ >= 6  # and the colour of the two views is drawn independently


def test_consistent_color_views_differ_only_in_colour() -> None:
    img = torch.randint(0, 256, (3, 28, 28), generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    t = transforms.TwoViewTransform(32, "spatial_consistent_color")
    differ = 0
    for seed in range(20):
        torch.manual_seed(seed)
        v1, v2_ = t(img)
        differ += not torch.equal(v1, v2_)
    assert differ >= 15  # both views keep their colour with probability (0.2 * 0.8)^2
    t.color = v2.Identity()  # switch the per-view colour ops off: what remains is shared
    for seed in range(5):
        torch.manual_seed(seed)
        v1, v2_ = t(img)
        assert v1 is not v2_ and torch.equal(v1, v2_)


def test_eval_and_classify_transforms() -> None:
    img = gray_noise().expand(3, -1, -1).contiguous()
    out = transforms.eval_transform(32)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, transforms.eval_transform(32)(img))
    just_resized = v2.Compose([v2.Resize(32), v2.ToDtype(torch.float32, scale=True)])(img)
    mean, std = torch.tensor(augment.IMAGENET_MEAN)[:, None, None], torch.tensor(augment.IMAGENET_STD)[:, None, None]
    assert torch.allclose(transforms.eval_transform(32, crop_pct=1.0)(img), (just_resized - mean) / std)
    assert not torch.allclose(out, (just_resized - mean) / std)  # 0.875 crops the centre of a 36 px resize
    assert transforms.classify_transform(16)(img).shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------- Sampling


def global_batches(num_items: int, batch: int, steps: int, world: int, start: int = 0) -> list[list[tuple[int, int]]]:
    ranks = [list(loaders.StepBatchSampler(num_items, batch, 7, start, steps, r, world)) for r in range(world)]
    return [[pair for r in ranks for pair in r[s]] for s in range(steps - start)]


def test_sampler_global_batch_is_independent_of_world_size() -> None:
    one = global_batches(50, 8, 14, world=1)
    assert len(one) == 14 and all(len(b) == 8 for b in one)
    assert global_batches(50, 8, 14, world=2) == one == global_batches(50, 8, 14, world=4)
    assert len(loaders.StepBatchSampler(50, 8, 7, 3, 14, 1, 2)) == 11


def test_sampler_resume_gives_exactly_the_tail() -> None:
    full = global_batches(50, 8, 20, world=2)
    for start in (0, 5, 6, 13, 20):
        assert global_batches(50, 8, 20, world=2, start=start) == full[start:]


def test_sampler_epochs_are_permutations() -> None:
    steps_per_epoch = 50 // 8
    batches = global_batches(50, 8, 3 * steps_per_epoch, world=1)
    orders = []
    for e in range(3):
        pairs = [p for b in batches[e * steps_per_epoch : (e + 1) * steps_per_epoch] for p in b]
        assert {ep for ep, _ in pairs} == {e}
        idx = [i for _, i in pairs]
        assert len(set(idx)) == len(idx) == 48 and set(idx) <= set(range(50))
        orders.append(idx)
    assert orders[0] != orders[1] != orders[2]
    assert next(iter(loaders.StepBatchSampler(50, 8, 8, 0, 6))) != batches[0]  # another seed, another order


def test_sampler_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        loaders.StepBatchSampler(50, 9, 0, 0, 10, 0, 2)
    with pytest.raises(ValueError, match="smaller"):
        loaders.StepBatchSampler(5, 8, 0, 0, 10)
    with pytest.raises(ValueError, match="start_step"):
        loaders.StepBatchSampler(50, 8, 0, 11, 10)


# ----------------------------------------------------------------------------------------- Pretraining views


def four_of_sixteen(g: torch.Generator) -> torch.Tensor:
    """A mask of 4 of 16 tokens (module level: loader workers unpickle the dataset)."""
    return torch.randperm(16, generator=g)[:4]


def make_views(seed: int = 3) -> loaders.PretrainViews:
    base = datasets.build_dataset(DataSpec(dataset="synthetic", synthetic_size=32), "train")
    transform = transforms.TwoViewTransform(16, "spatial_consistent_color")
    return loaders.PretrainViews(base, transform, seed, mask_fn=four_of_sixteen)


def test_pretrain_views_depend_only_on_seed_epoch_index() -> None:
    views = make_views()
    torch.manual_seed(0)
    random.seed(0)
    first = views[(1, 5)]
    torch.manual_seed(12345)
    random.seed(12345)
    torch.rand(7)
    state = torch.get_rng_state()
    again = views[(1, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[2].shape == (4,)
    for other in (views[(2, 5)], views[(1, 6)], make_views(seed=4)[(1, 5)]):
        assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])
    plain = loaders.PretrainViews(views.base, views.transform, 3)
    assert plain[(1, 5)][2].numel() == 0 and torch.equal(plain[(1, 5)][0], first[0])


def test_step_loader_same_batches_for_any_workers_and_world_size() -> None:
    views = make_views()

    def batches(workers: int, rank: int, world: int, start: int = 0) -> list[list[torch.Tensor]]:
        sampler = loaders.StepBatchSampler(len(views), 8, 1, start, 6, rank, world)
        return list(loaders.step_loader(views, sampler, workers))

    serial = batches(0, 0, 1)
    assert len(serial) == 6
    v1, v2_, masks = serial[0]
    assert v1.shape == v2_.shape == (8, 3, 16, 16) and masks.shape == (8, 4)
    for a, b in zip(serial, batches(2, 0, 1)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    halves = zip(batches(0, 0, 2), batches(0, 1, 2))
    for a, (r0, r1) in zip(serial, halves):
        assert all(torch.equal(x, torch.cat([y, z])) for x, y, z in zip(a, r0, r1))
    for a, b in zip(serial[4:], batches(0, 0, 1, start=4)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_eval_loader_order_and_seeded_limit() -> None:
    base = datasets.build_dataset(DataSpec(dataset="synthetic", synthetic_size=60), "val")
    transform = transforms.eval_transform(16, crop_pct=1.0)
    labels = torch.cat([y for _, y in loaders.eval_loader(base, transform, 16, 0)])
    assert torch.equal(labels, torch.as_tensor(base.targets))

    def subset(seed: int) -> torch.Tensor:
        return torch.cat([x for x, _ in loaders.eval_loader(base, transform, 8, 0, limit=20, seed=seed)])

    a = subset(0)
    assert a.shape == (20, 3, 16, 16)
    assert torch.equal(a, subset(0)) and not torch.equal(a, subset(1))
    assert len(loaders.eval_loader(base, transform, 8, 0, limit=1000).dataset) == 60
