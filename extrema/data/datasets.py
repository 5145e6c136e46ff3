"""Datasets: Fashion-MNIST, ImageFolder on any fsspec URL, a seeded synthetic set."""

from __future__ import annotations

import functools
import gzip
import math
import os
import warnings
from typing import Any, Literal, Protocol

import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.utils import download_url

from extrema.data import decode
from extrema.data.object_store import ProcessFs, access_error
from extrema.data.seeds import seed_of
from extrema.data.shard_format import IMAGE_EXTENSIONS, list_image_folder
from extrema.data.shard_order import order_settings
from extrema.data.shards import ShardedImages
from extrema.spec import DataSpec, StorageSpec

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
        url = f"{spec.root.rstrip('/')}/{sub}"
        if spec.dataset == "imagefolder":
            return FsImageFolder(url, spec.storage, decoding)
        return ShardedImages(url, spec.storage, decoding, order_settings(spec))
    if spec.dataset == "synthetic":
        return SyntheticImages(spec.synthetic_size, seed_of(seed, 0 if split == "train" else 1))
    raise ValueError(f"unknown dataset {spec.dataset!r}")
