"""Datasets (Fashion-MNIST, ImageFolder on any fsspec URL, a seeded synthetic set), transforms, step-exact loaders."""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets.utils import download_url
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from extrema import augment, decode
from extrema.dist import World
from extrema.object_store import ProcessFs, access_error
from extrema.shard_format import IMAGE_EXTENSIONS, list_image_folder
from extrema.shards import ShardedImages
from extrema.spec import DataSpec, StorageSpec

IMAGENET_MEAN, IMAGENET_STD = augment.IMAGENET_MEAN, augment.IMAGENET_STD
# torchvision 0.29 warns on every decode that decoding moves to torchcodec; decoding still works.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

Split = Literal["train", "val"]
Augmentation = Literal["spatial_consistent_color", "spatial"]


class LabeledImages(Protocol):
    """A dataset of (uint8 image (3, H, W), class index) pairs with its class names and targets."""

    classes: list[str]

    @property
    def targets(self) -> list[int] | Tensor: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Tensor, int]: ...


def seed_of(*parts: int) -> int:
    """A stable 63-bit seed mixed from integers (the same on every machine, process and Python run)."""
    digest = hashlib.blake2b(b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an IDX file (the MNIST format) into a numpy array."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError("not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=4 + 4 * ndim)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def idx_file(directory: str, stem: str) -> str | None:
    """URL of `<stem>.gz` or `<stem>` in a directory URL, whichever exists first."""
    for name in (f"{stem}.gz", stem):
        url = f"{directory.rstrip('/')}/{name}"
        fs, path = url_to_fs(url)
        if fs.isfile(path):
            return url
    return None


@functools.lru_cache(maxsize=8)
def _read_idx_cached(url: str, size: int) -> np.ndarray:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        raw = f.read()
    return parse_idx(gzip.decompress(raw) if url.endswith(".gz") else raw)


def read_idx(url: str) -> np.ndarray:
    """Read an IDX file (gzipped when its name ends in .gz) from any fsspec URL, parsed once per process."""
    fs, path = url_to_fs(url)
    return _read_idx_cached(url, int(fs.size(path)))


def split_files(directory: str, prefix: str) -> tuple[str, str] | None:
    """(images URL, labels URL) of one Fashion-MNIST split in a directory, or None when either is missing."""
    images = idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels = idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def download_fashion_mnist(cache_dir: str, prefix: str) -> tuple[str, str]:
    """Download one split's two files from the public mirror into a local cache directory (md5-checked)."""
    fs, path = url_to_fs(cache_dir)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"cache_dir must be a local directory, got {cache_dir!r}")
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        download_url(FASHION_MNIST_MIRROR + name, path, name, FASHION_MNIST_MD5[name])
    found = split_files(path, prefix)
    if found is None:
        raise FileNotFoundError(f"download into {path} did not leave the {prefix} files")
    return found


def locate_fashion_mnist(spec: DataSpec, prefix: str) -> tuple[str, str]:
    """Find one split's files: spec.root, then the Debian package directory, then spec.cache_dir (downloading)."""
    tried: list[str] = []
    if spec.root:
        found = split_files(spec.root, prefix)
        if found:
            return found
        tried.append(f"root {spec.root!r}: no {prefix}-*-ubyte[.gz] files")
    else:
        tried.append("root: not set")
    found = split_files(FASHION_MNIST_DEBIAN_DIR, prefix)
    if found:
        return found
    tried.append(f"{FASHION_MNIST_DEBIAN_DIR}: not present (apt-get install dataset-fashion-mnist)")
    if spec.cache_dir:
        cache_dir = os.path.expanduser(spec.cache_dir)
        found = split_files(cache_dir, prefix)
        if found:
            return found
        try:
            return download_fashion_mnist(cache_dir, prefix)
        except (OSError, RuntimeError, ValueError) as e:
            tried.append(f"cache_dir {spec.cache_dir!r}: download from {FASHION_MNIST_MIRROR} failed ({e})")
    else:
        tried.append("cache_dir: not set, so nothing was downloaded")
    raise FileNotFoundError(
        "Fashion-MNIST not found. Looked in:\n  - "
        + "\n  - ".join(tried)
        + "\nFix one of: set data.root to a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz; run `apt-get install dataset-fashion-mnist`; "
        "or set data.cache_dir to a writable directory on a machine that can reach the mirror."
    )


class FashionMNIST(Dataset[tuple[Tensor, int]]):
    """Fashion-MNIST from its IDX files; 28x28 grayscale returned as 3-channel uint8."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"images {images.shape} and labels {labels.shape} do not form a dataset")
        self.images = images
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.from_numpy(self.images[i]).expand(3, -1, -1).contiguous(), int(self.targets[i])


def fashion_mnist(spec: DataSpec, split: Split) -> FashionMNIST:
    """The train (60k) or val (10k, the t10k files) split of Fashion-MNIST."""
    images, labels = locate_fashion_mnist(spec, "train" if split == "train" else "t10k")
    return FashionMNIST(read_idx(images), read_idx(labels))


# ------------------------------------------------------------------------------------------------ ImageFolder


class FsImageFolder(Dataset[tuple[Tensor, int]]):
    """ImageNet layout `<split_dir>/<class>/<image>` on any fsspec URL; classes sorted, images decoded to RGB."""

    def __init__(self, url: str, storage: StorageSpec | None = None, decoding: decode.Decoding | None = None) -> None:
        self.url = url
        self.decoding = decoding or decode.Decoding()
        self.source = ProcessFs(url, storage)  # made again in each loader worker: s3fs is not fork-safe
        try:
            self.classes, samples = list_image_folder(self.source.get(), self.source.path)
        except FileNotFoundError as e:
            raise FileNotFoundError(str(e).replace(repr(self.source.path.rstrip("/")), repr(url))) from None
        except OSError as e:
            raise access_error(e, url, storage) from e
        empty = sorted(set(self.classes) - {self.classes[t] for _, t in samples})
        if empty:
            raise FileNotFoundError(f"image folder {url!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {empty[:5]}")
        self.samples = samples
        self.targets = torch.tensor([t for _, t in samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def fs(self) -> Any:
        """This process's filesystem of the folder."""
        return self.source.get()

    def encoded(self, i: int) -> tuple[bytes, int]:
        """The image file's bytes and its class."""
        path, target = self.samples[i]
        return self.fs.cat_file(path), target

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        data, target = self.encoded(i)
        return decode.decode_rgb(data), target


# -------------------------------------------------------------------------------------------------- Synthetic

SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE = 32


def synthetic_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n seeded 32x32 RGB images whose class fixes the stripe orientation (0-90 degrees) and the tint, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % SYNTHETIC_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    # Orientations stay within [0, 90] degrees so that a horizontal flip never turns one class into another.
    angle = labels * (math.pi / 2) / (SYNTHETIC_CLASSES - 1) + 0.05 * torch.randn(n, generator=g)
    freq = 0.35 + 0.15 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(SYNTHETIC_SIZE), torch.arange(SYNTHETIC_SIZE), indexing="ij")
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    stripes = torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, H, W) in [-1, 1]
    hue = 2 * math.pi * labels / SYNTHETIC_CLASSES + 0.3 * torch.randn(n, generator=g)
    tint = 0.5 + 0.4 * torch.stack([torch.cos(hue + k * 2 * math.pi / 3) for k in range(3)], dim=1)  # (n, 3)
    img = tint[:, :, None, None] * (0.55 + 0.4 * stripes[:, None]) + 0.08 * torch.randn(
        n, 3, SYNTHETIC_SIZE, SYNTHETIC_SIZE, generator=g
    )
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


class SyntheticImages(Dataset[tuple[Tensor, int]]):
    """A small seeded dataset with class-dependent structure, for tests and CPU demos only."""

    def __init__(self, n: int, seed: int) -> None:
        self.images, self.targets = synthetic_images(n, seed)
        self.classes = [f"class_{c}" for c in range(SYNTHETIC_CLASSES)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])


def build_dataset(spec: DataSpec, split: Split, seed: int = 0) -> LabeledImages:
    """The labelled images of one split of the dataset the spec names."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if spec.dataset == "fashion_mnist":
        return fashion_mnist(spec, split)
    if spec.dataset in ("imagefolder", "shards"):
        if not spec.root:
            raise ValueError(f"dataset {spec.dataset!r} needs data.root")
        sub = spec.train_split if split == "train" else spec.val_split
        decoding = decode.Decoding(spec.reduced_decode, spec.decode)
        reader = FsImageFolder if spec.dataset == "imagefolder" else ShardedImages
        return reader(f"{spec.root.rstrip('/')}/{sub}", spec.storage, decoding)
    if spec.dataset == "synthetic":
        return SyntheticImages(spec.synthetic_size, seed_of(seed, 0 if split == "train" else 1))
    raise ValueError(f"unknown dataset {spec.dataset!r}")


# ------------------------------------------------------------------------------------------------- Transforms


def to_normalized() -> v2.Compose:
    """uint8 image -> float32 in [0, 1] -> ImageNet-normalized."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoViewTransform:
    """Two views of one image: a shared crop and flip, then independent colour (or none: the same tensor twice).

    With `device_color` the colour stage is deferred: the call returns the uint8 crop and each view's colour
    parameters (drawn exactly as the v2 transforms draw them) for `extrema.augment.two_views` to apply to the
    whole batch on the training device.
    """

    def __init__(
        self, img_size: int, augmentation: Augmentation, crop_min: float = 0.2, device_color: bool = False
    ) -> None:
        if augmentation not in ("spatial_consistent_color", "spatial"):
            raise ValueError(f"unknown augmentation {augmentation!r}")
        self.augmentation = augmentation
        self.device_color = device_color
        self.size = img_size
        self.geometry = v2.Compose(
            [v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.jitter = augment.color_jitter()
        # Colour runs on the float crop: the same ops as on uint8, without intermediate rounding and a little faster.
        self.color = v2.Compose(
            [v2.RandomApply([self.jitter], p=augment.JITTER_P), v2.RandomGrayscale(augment.GRAYSCALE_P)]
        )
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, img: Tensor) -> tuple[Tensor, Tensor]:
        return self.views(self.geometry(img))

    def crop_params(self, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) for an image of that size, drawn from the global RNG exactly as `geometry` draws."""
        crop, flip = self.geometry.transforms
        p = crop.make_params([decode.shape_only(height, width)])
        return p["top"], p["left"], p["height"], p["width"], bool(torch.rand(1) < flip.p)

    def crop_encoded(self, data: bytes, reduced: bool) -> Tensor:
        """The uint8 crop of an encoded image, as `geometry` cuts it from the full decode; with `reduced`, a JPEG
        whose crop is 2, 4 or 8 times the output size is decoded at that fraction (the same region, one resample)."""
        try:
            header = decode.read_header(data) if reduced else None
        except (OSError, ValueError):  # a format PIL cannot read: torchvision may
            header = None
        if header is None or not header.jpeg:
            return self.geometry(decode.decode_rgb(data))
        top, left, h, w, flip = self.crop_params(header.height, header.width)
        scale = decode.dct_scale(h, w, self.size)
        if scale == 1:
            crop = F.resized_crop(decode.decode_rgb(data), top, left, h, w, [self.size, self.size], antialias=True)
        else:
            crop = decode.reduced_crop(data, (top, left, h, w), self.size, scale)
        return F.horizontal_flip(crop) if flip else crop

    def deferred(self, data: bytes) -> tuple[Tensor, Tensor, Tensor]:
        """For decoding on the device: the encoded bytes, (top, left, h, w, flip) and the views' colour parameters,
        drawn as the host path draws them. Any format `decode.decode_rgb` reads: the size from the header where PIL
        reads it, else from a CPU decode."""
        geometry = torch.tensor(self.crop_params(*decode.image_size(data)), dtype=torch.int64)
        if self.augmentation == "spatial":
            return decode.as_tensor(data), geometry, torch.empty(0)
        shape = decode.shape_only(self.size, self.size)
        color = torch.stack([augment.sample_color_params(self.jitter, shape) for _ in range(2)])
        return decode.as_tensor(data), geometry, color

    def views(self, crop: Tensor) -> tuple[Tensor, Tensor]:
        """The two views of a uint8 crop; with `device_color`, the crop and its views' colour parameters."""
        if self.device_color:
            if self.augmentation == "spatial":
                return crop, torch.empty(0)
            return crop, torch.stack([augment.sample_color_params(self.jitter, crop) for _ in range(2)])
        x = self.to_float(crop)
        if self.augmentation == "spatial":
            view = self.normalize(x)
            return view, view
        return self.normalize(self.color(x)), self.normalize(self.color(x))


def eval_crop_pct(img_size: int) -> float:
    """Evaluation centre-crop fraction: 0.875 at ImageNet sizes, none for small images."""
    return 1.0 if img_size <= 64 else 0.875


def eval_geometry(img_size: int, crop_pct: float = 0.875) -> Callable[[Tensor], Tensor]:
    """uint8 -> uint8: resize the short side to img_size / crop_pct, centre-crop img_size."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return v2.Compose([v2.Resize(int(img_size / crop_pct), antialias=True), v2.CenterCrop(img_size)])


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Callable[[Tensor], Tensor]:
    """Resize the short side to img_size / crop_pct, centre-crop img_size, normalize."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return v2.Compose([v2.Resize(int(img_size / crop_pct), antialias=True), v2.CenterCrop(img_size), to_normalized()])


def classify_transform(img_size: int) -> Callable[[Tensor], Tensor]:
    """Linear-probe training transform: RandomResizedCrop (default scale), flip, normalize."""
    return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip(), to_normalized()])


# ----------------------------------------------------------------------------------------------------- Loading


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of global batch s for every step s in [start_step, total_steps), as (epoch, index) pairs."""

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if global_batch <= 0 or world_size <= 0 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if num_items < global_batch:
            raise ValueError(f"dataset of {num_items} items is smaller than the global batch {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step {start_step} must lie in [0, total_steps={total_steps}]")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = num_items // global_batch

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch `epoch`: a permutation of all items, seeded by (seed, epoch) only."""
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(seed_of(self.seed, epoch)))

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world_size
        epoch, perm = -1, torch.empty(0, dtype=torch.int64)
        for step in range(self.start_step, self.total_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = self.permutation(epoch)
            start = (step % self.steps_per_epoch) * self.global_batch + self.rank * local
            yield [(epoch, i) for i in perm[start : start + local].tolist()]


class PretrainViews(Dataset[tuple[Tensor, ...]]):
    """(view1, view2, masks) of item (epoch, index); all its randomness derives from (seed, epoch, index) only.

    With a `device_color` transform the first two items are (uint8 crop, colour parameters) instead. A dataset of
    encoded images decoded on the device gives (encoded bytes, crop geometry, colour parameters, masks).
    """

    def __init__(
        self,
        base: LabeledImages,
        transform: TwoViewTransform,
        seed: int,
        mask_fn: Callable[[torch.Generator], Tensor] | None = None,
    ) -> None:
        self.base, self.transform, self.seed, self.mask_fn = base, transform, seed, mask_fn

    def __len__(self) -> int:
        return len(self.base)

    @property
    def device_decode(self) -> bool:
        """Whether images reach the training process encoded, to be decoded there (data.decode: gpu)."""
        return isinstance(self.base, decode.EncodedImages) and self.base.decoding.device == "gpu"

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, ...]:
        epoch, index = key
        encoded = self.base.encoded(index)[0] if isinstance(self.base, decode.EncodedImages) else None
        img = self.base[index][0] if encoded is None else None
        # v2 transforms draw from the global CPU generator: seed it per sample inside a fork that restores the
        # caller's state. Only the CPU generator: torch.manual_seed would also reseed CUDA (and is 100x slower).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_of(self.seed, epoch, index, 0))
            if encoded is None:
                views: tuple[Tensor, ...] = self.transform(img)  # type: ignore[arg-type]
            elif self.device_decode:
                views = self.transform.deferred(encoded)
            else:
                reduced = self.base.decoding.reduced  # type: ignore[attr-defined]
                views = self.transform.views(self.transform.crop_encoded(encoded, reduced))
        if self.mask_fn is None:
            return (*views, torch.empty(0))
        return (*views, self.mask_fn(torch.Generator().manual_seed(seed_of(self.seed, epoch, index, 1))))


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR2 to the training process, which saves a checkpoint before exiting."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def step_loader(
    dataset: Dataset,
    batch_sampler: StepBatchSampler,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The training batches of every stage, one per sampler step in step order; workers outlive the epochs."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
        # Samples are seeded by (seed, epoch, index); a private generator keeps the loader from drawing
        # its worker base seed from the global RNG, which the training step's drop path consumes.
        generator=torch.Generator().manual_seed(0),
    )


def step_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start_step: int,
    total_steps: int,
    world: World,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader | DeviceDecodedBatches:
    """This rank's share of every global batch from `start_step` on, in step order: the training input of every
    stage. Items are (epoch, index) keys of a dataset seeded by (seed, epoch, index), so a resumed run sees the
    same samples."""
    n = len(dataset)  # type: ignore[arg-type]
    sampler = StepBatchSampler(n, batch_size, seed, start_step, total_steps, world.rank, world.size)
    if isinstance(dataset, PretrainViews) and dataset.device_decode:
        loader = step_loader(dataset, sampler, num_workers, collate_encoded)
        return DeviceDecodedBatches(loader, dataset.transform, world.device)
    return step_loader(dataset, sampler, num_workers, collate_fn)


def collate_encoded(items: list[tuple[Tensor, ...]]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """A batch of encoded items: the images stay a list of byte tensors; geometry, colour and masks are stacked."""
    datas, geometry, color, masks = zip(*items)
    return list(datas), torch.stack(geometry), torch.stack(color), torch.stack(masks)


class DeviceDecodedBatches:
    """Batches decoded and cropped on the training device (batched nvJPEG on CUDA; the CPU without one), handed on
    as the host path hands them: (uint8 crops, colour parameters, masks) with colour on the device, else the views."""

    def __init__(self, loader: DataLoader, transform: TwoViewTransform, device: torch.device) -> None:
        self.loader, self.transform, self.device = loader, transform, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        color = self.transform.augmentation == "spatial_consistent_color"
        for datas, geometry, params, masks in self.loader:
            crops = decode.crop_batch(decode.decode_batch(datas, self.device), geometry, self.transform.size)
            if self.transform.device_color:
                yield crops, params.to(self.device, non_blocking=True), masks
            else:
                yield (*augment.two_views(crops, params, color), masks)


def ordered_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The evaluation batches of every stage, in dataset order; its workers too leave stop signals to the stage."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
        # An evaluation inside training (the kNN monitor) must not draw from the global RNG, which drop path
        # consumes: a resumed run first evaluates at another step than an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


class Transformed(Dataset[tuple[Tensor, int]]):
    """A labelled dataset with a transform applied to each image."""

    def __init__(self, base: LabeledImages, transform: Callable[[Tensor], Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, target = self.base[i]
        return self.transform(img), target


def subset_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random subset of `limit` of them in increasing order."""
    if limit is None or limit >= n:
        return list(range(n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, n, limit)))[:limit]
    return sorted(chosen.tolist())


def eval_loader(
    base: LabeledImages,
    transform: Callable[[Tensor], Tensor],
    batch_size: int,
    num_workers: int,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """(images, labels) batches in a fixed order, of all items or of a seeded subset of `limit` items.

    With world_size > 1 each rank gets a contiguous slice; concatenating the ranks' outputs in rank order
    restores the full order.
    """
    indices = subset_indices(len(base), limit, seed)
    per_rank = -(-len(indices) // world_size)
    data = Subset(Transformed(base, transform), indices[rank * per_rank : (rank + 1) * per_rank])
    return ordered_loader(data, batch_size, num_workers)


def eval_images(
    base: LabeledImages,
    geometry: Callable[[Tensor], Tensor],
    num_workers: int,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """This rank's slice of a (seeded subset of a) split as one uint8 tensor (N, 3, S, S) plus labels.

    Evaluation is deterministic, so callers can keep the result and reuse it for every evaluation.
    """
    loader = eval_loader(base, geometry, 256, num_workers, limit, seed, rank, world_size)
    xs, ys = zip(*loader) if len(loader.dataset) else ((torch.empty(0, dtype=torch.uint8),), (torch.empty(0),))  # type: ignore[arg-type]
    return torch.cat(xs), torch.cat(ys).long()
