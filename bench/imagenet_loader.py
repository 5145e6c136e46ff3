"""ImageNet-scale input on one core: decode, reduced-size decode, the two-view transform, ImageFolder against
shards (file:// and a local S3 server), start-up with 100,000 files against 100 shards, cores for 3,000 images/s;
the two sample orders over shards (per-sample `global`, shard-local `blocks`) from file:// and S3, a whole epoch
each: images per CPU-second, requests per image, bytes fetched per byte used.

    python bench/imagenet_loader.py            # about 5 minutes on one AMD EPYC core
    python bench/imagenet_loader.py --quick    # about 1-2 minutes: fewer images, 20,000 files for start-up
    python bench/imagenet_loader.py --orders   # only the orders: 2,048 samples an epoch (--quick: 1,024)

Writes ImageNet-like JPEGs to a temporary directory: sizes as ImageNet's training set has them (most 500 px on
the long side at 4:3 / 3:2 / 1:1 / portrait, one in six 600-1,200 px, one in twenty 1,600-2,800 px) and JPEG
quality 75-95, with natural-image-like content (a 1/f amplitude spectrum in three tinted channels plus a few
flat shapes), not noise. Every rate is images/s in this process with torch on one thread; the baseline of each
ratio is torchvision's full decode measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from extrema.data import datasets, decode, loaders, transforms
from extrema.data.shard_format import ShardWriter
from extrema.data.shard_order import OrderSettings, global_permutation
from extrema.data.shards import HEADER, ShardedImages
from extrema.spec import StorageSpec
from extrema.stages.pretrain import SampleMasks
from launch.backends.ray.head import free_ports

CROP = 224
TARGET = 3000  # images/s a GPU node's input must sustain


def natural_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A (h, w) RGB image with a 1/f amplitude spectrum (like photographs) and a few flat shapes."""
    sh, sw = max(h // 4, 8), max(w // 4, 8)  # synthesise at 1/4 size, then upsample: smooth, cheap
    fy, fx = np.fft.fftfreq(sh)[:, None], np.fft.rfftfreq(sw)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(sh, sw))
    chans = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        field = np.fft.irfft2(amp * np.exp(1j * phase), s=(sh, sw))
        chans.append((field - field.mean()) / (field.std() + 1e-8))
    mix = rng.normal(0, 0.5, (3, 3)) + np.eye(3)
    img = np.tensordot(mix, np.stack(chans), axes=1) * 40 + rng.uniform(60, 190, (3, 1, 1))
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    out = small.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return out


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(h, w) drawn roughly as ImageNet's training images are sized."""
    u = rng.random()
    long = 500 if u < 0.8 else int(rng.integers(600, 1201)) if u < 0.95 else int(rng.integers(1600, 2801))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3], p=[0.4, 0.2, 0.1, 0.2, 0.1])
    return (int(long / aspect), long) if aspect >= 1 else (long, int(long * aspect))


def write_images(root: Path, n: int, classes: int, seed: int = 0) -> list[tuple[bytes, int]]:
    """n JPEGs as root/train/<class>/<k>.JPEG; returns (bytes, class) in ImageFolder order."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = imagenet_like_size(rng)
        buf = io.BytesIO()
        natural_image(rng, h, w).save(buf, "JPEG", quality=int(rng.choice([75, 85, 90, 95])))
        cls = k % classes
        (root / "train" / f"c{cls:03d}").mkdir(parents=True, exist_ok=True)
        (root / "train" / f"c{cls:03d}" / f"{k:06d}.JPEG").write_bytes(buf.getvalue())
    files = sorted((root / "train").rglob("*.JPEG"))
    return [(p.read_bytes(), int(p.parent.name[1:])) for p in files]


def write_shards(fs_url: str, samples: list[tuple[bytes, int]], classes: int, per_shard: int) -> None:
    """The samples as tar shards (per_shard samples each) with their index."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(fs_url)
    writer = ShardWriter(fs, path, per_shard * 200_000)
    for blob, label in samples:
        writer.add(blob, "jpg", label)
    writer.finish([f"c{c:03d}" for c in range(classes)])


def rate(fn: Callable[[int], object], n: int, repeats: int = 3) -> float:
    """Images per CPU-second of this process for fn(i), i in range(n): the best of `repeats` passes after one
    warm-up call. CPU time, not wall time: what a core of the training node spends (a local S3 server's own
    work, on the same cores here, is not counted)."""
    fn(0)
    best = 0.0
    for _ in range(repeats):
        t = time.process_time()
        for i in range(n):
            fn(i)
        best = max(best, n / max(time.process_time() - t, 1e-9))
    return best


def startup(root: Path, files: int, shards: int) -> tuple[float, float]:
    """Seconds to open an ImageFolder of `files` tiny files and the same as `shards` shards (file://)."""
    blob = b"\xff\xd8" + bytes(100)
    per_class = files // 100
    for c in range(100):
        d = root / "many" / "train" / f"c{c:03d}"
        d.mkdir(parents=True)
        for k in range(per_class):
            (d / f"{k:06d}.JPEG").write_bytes(blob)
    write_shards(
        str(root / "many_shards" / "train"), [(blob, k // per_class) for k in range(files)], 100, files // shards
    )
    t = time.perf_counter()
    datasets.FsImageFolder(str(root / "many" / "train"))
    folder = time.perf_counter() - t
    t = time.perf_counter()
    ShardedImages(str(root / "many_shards" / "train"))
    return folder, time.perf_counter() - t


def start_s3(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A moto S3 server on a free port (stopped by the caller, by PID)."""
    port = free_ports(1)[0]
    log = (root / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"), timeout=10).close()
    return proc, endpoint


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each of this process's threads, by native thread id (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def order_rows(
    tmp: Path, samples: list[tuple[bytes, int]], endpoint: str, total: int, repeats: int
) -> tuple[list[tuple[str, float, float, float]], list[float], list[str]]:
    """(name, images per CPU-second, requests per image, bytes fetched per byte used) of the two-view pipeline
    (colour on the device, reduced decode, masks) over one epoch of `total` samples in each order, from file://
    and from the S3 server: the best of `repeats` passes, each with a fresh reader (a cold block cache); each
    round's ratio of S3 block reads to file:// block reads (the two passes next to each other in time); and each
    block pass's CPU per image of the calling (decoding) thread and of the others (fetching), from /proc."""
    from fsspec.core import url_to_fs

    from extrema.data.object_store import storage_options

    data = [samples[k % len(samples)] for k in range(total)]  # the JPEGs again and again: the same mix
    s3 = StorageSpec(endpoint_url=endpoint)
    urls = {"file://": str(tmp / "epoch" / "train"), "S3 server": "s3://bench/epoch/train"}
    for url in urls.values():
        fs, path = url_to_fs(url, **storage_options(url, s3))
        writer = ShardWriter(fs, path, 10**12)
        for k, (blob, label) in enumerate(data):
            if k and k % 1024 == 0:  # shards of 1,024 samples: four blocks of the default 256
                writer._close_shard()
            writer.add(blob, "jpg", label)
        writer.finish([f"c{c:03d}" for c in range(10)])
    masks = SampleMasks(196, 5, 0.8, "disjoint")
    dev = transforms.TwoViewTransform(CROP, "spatial_consistent_color", device_color=True)
    batch = 256
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    ratios: list[float] = []
    split: list[str] = []
    for _ in range(repeats):  # the configurations in turn, so that a change of load falls on all of them
        this_round: dict[tuple[str, str], float] = {}
        for where, url in urls.items():
            for order in ("blocks", "global"):
                storage = s3 if url.startswith("s3") else None
                base = ShardedImages(url, storage, decode.Decoding(True), OrderSettings(order))  # type: ignore[arg-type]
                views = loaders.PretrainViews(base, dev, 0, masks)
                follow = loaders.shard_local_order(views, batch, 0, total // batch)
                perm = (follow or (lambda e: global_permutation(total, 0, e)))(0)[: total // batch * batch].tolist()
                me, threads = threading.get_native_id(), thread_cpu()
                t = time.process_time()
                for i in perm:
                    views[(0, i)]
                r = len(perm) / max(time.process_time() - t, 1e-9)
                spent = {k: v - threads.get(k, 0.0) for k, v in thread_cpu().items()}
                if order == "blocks":
                    mine, others = spent.get(me, 0.0), sum(v for k, v in spent.items() if k != me)
                    split.append(f"{where}: decoding thread {1e3 * mine / len(perm):.3f} ms an image, other threads "
                                 f"{1e3 * others / len(perm):.3f}")  # fmt: skip
                used = int((base.members["size"][perm].astype(np.int64) + HEADER).sum())
                fetched = base.cache_stats.bytes_fetched or used  # read image by image: what was used
                best = results.get((order, where), (0.0, 0.0, 0.0))[0]
                results[(order, where)] = (max(best, r), base.requests / len(perm), fetched / used)
                this_round[(order, where)] = r
        ratios.append(this_round[("blocks", "S3 server")] / this_round[("blocks", "file://")])
    rows = [(f"{order} order, {where}", *results[(order, where)]) for where in urls for order in ("blocks", "global")]
    return rows, ratios, split


def device_decode_rate(blobs: list[bytes], batch: int = 128, repeats: int = 5) -> float:
    """Images/s of batched nvJPEG decoding + crop + resize to 224 on the GPU (data.decode: gpu)."""
    device = torch.device("cuda")
    datas = [decode.as_tensor(blobs[i % len(blobs)]) for i in range(batch)]
    t = transforms.TwoViewTransform(CROP, "spatial_consistent_color", device_color=True)
    geometry = torch.stack([t.deferred(blobs[i % len(blobs)])[1] for i in range(batch)])
    decode.crop_batch(decode.decode_batch(datas, device), geometry, CROP)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        decode.crop_batch(decode.decode_batch(datas, device), geometry, CROP)
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    """Print the measurements as a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and files: a minute or two")
    ap.add_argument("--images", type=int, help="JPEGs written (200; --quick 60)")
    ap.add_argument("--files", type=int, help="files of the start-up test (100,000; --quick 20,000)")
    ap.add_argument("--gpu", action="store_true", help="only: batched nvJPEG decode + crop on the GPU against 1 core")
    ap.add_argument("--orders", action="store_true", help="only: the two sample orders from file:// and S3")
    ap.add_argument("--rounds", type=int, help="passes of each order and source, interleaved (3; --quick 2)")
    args = ap.parse_args()
    n = args.images or (60 if args.quick else 200)
    files = args.files or (20_000 if args.quick else 100_000)
    torch.set_num_threads(1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
    tmp = Path(tempfile.mkdtemp(prefix="imagenet-bench-"))
    proc = None
    try:
        t0 = time.perf_counter()
        samples = write_images(tmp / "folder", n, classes=10)
        sizes = [len(b) for b, _ in samples]
        print(f"wrote {n} JPEGs in {time.perf_counter() - t0:.0f} s: median {statistics.median(sizes) / 1e3:.0f} KB, "
              f"largest {max(sizes) / 1e3:.0f} KB", file=sys.stderr)  # fmt: skip
        if args.gpu:
            gpu = device_decode_rate([b for b, _ in samples])
            cpu = rate(lambda i: decode.decode_rgb(samples[i % n][0]), n)
            print(f"{torch.cuda.get_device_name()}: decode + crop of batches of 128 on the GPU {gpu:,.0f} images/s; "
                  f"full decode on one CPU core {cpu:,.0f} images/s ({gpu / cpu:.1f}x)")  # fmt: skip
            return
        write_shards(str(tmp / "shards" / "train"), samples, 10, max(n // 4, 1))
        proc, endpoint = start_s3(tmp)
        total = 1024 if args.quick else 2048
        epoch, ratios, split = order_rows(tmp, samples, endpoint, total, args.rounds or (2 if args.quick else 3))
        print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, 1 thread; one epoch of "
              f"{total} samples (the {n} JPEGs repeated), shards of 1,024, blocks of 256\n")  # fmt: skip
        print("| two views, colour on the device, reduced decode | images per CPU-second | requests per image | "
              "bytes fetched per byte used |\n|---|---|---|---|")  # fmt: skip
        for name, r, req, amp in epoch:
            print(f"| {name} | {r:,.0f} | {req:.4f} | {amp:.2f} |")
        file_blocks, s3_blocks = epoch[0][1], epoch[2][1]
        print(f"\nS3 (blocks) / file:// (blocks): {s3_blocks / file_blocks:.2f}; S3 (global) / file:// (global): "
              f"{epoch[3][1] / epoch[1][1]:.2f}; cores for {TARGET:,} images/s from S3: blocks "
              f"{TARGET / s3_blocks:.1f}, global {TARGET / epoch[3][1]:.1f}")  # fmt: skip
        print(f"S3 (blocks) / file:// (blocks) round by round: median {statistics.median(ratios):.2f}, "
              f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds")  # fmt: skip
        print("CPU of each block pass, by thread (/proc/self/task; clock ticks of 10 ms):")
        for line in split:
            print(f"  {line}")
        if args.orders:
            return
        s3 = StorageSpec(endpoint_url=endpoint)
        write_shards_s3 = ShardWriter
        from fsspec.core import url_to_fs

        from extrema.data.object_store import storage_options

        fs, path = url_to_fs("s3://bench/shards/train", **storage_options("s3://bench/shards/train", s3))
        w = write_shards_s3(fs, path, 10**12)
        for blob, label in samples:
            w.add(blob, "jpg", label)
        w.finish([f"c{c:03d}" for c in range(10)])

        masks = SampleMasks(196, 5, 0.8, "disjoint")
        host = transforms.TwoViewTransform(CROP, "spatial_consistent_color")
        dev = transforms.TwoViewTransform(CROP, "spatial_consistent_color", device_color=True)
        blobs = [b for b, _ in samples]

        def views(base: datasets.LabeledImages, transform: transforms.TwoViewTransform) -> Callable[[int], object]:
            v = loaders.PretrainViews(base, transform, 0, masks)
            return lambda i: v[(0, i % n)]

        def seeded(fn: Callable[[int], object]) -> Callable[[int], object]:
            def call(i: int) -> object:
                torch.manual_seed(i)
                return fn(i)

            return call

        def folder(reduced: bool) -> datasets.FsImageFolder:
            return datasets.FsImageFolder(str(tmp / "folder" / "train"), decoding=decode.Decoding(reduced))

        def shards(url: str, storage: StorageSpec | None = None) -> ShardedImages:
            return ShardedImages(url, storage, decode.Decoding(True))

        def crops(some: list[bytes], reduced: bool) -> float:
            return rate(seeded(lambda i: host.crop_encoded(some[i % len(some)], reduced)), len(some))

        baseline = rate(lambda i: decode.decode_rgb(blobs[i % n]), n)
        local = shards(str(tmp / "shards" / "train"))
        rows: list[tuple[str, float]] = [
            ("decode, full size (torchvision; baseline)", baseline),
            ("decode + RandomResizedCrop(224) + flip, full-size decode", crops(blobs, False)),
            ("decode + RandomResizedCrop(224) + flip, reduced-size decode", crops(blobs, True)),
            ("two views, colour on the host, full-size decode", rate(views(folder(False), host), n)),
            ("two views, colour on the host, reduced-size decode", rate(views(folder(True), host), n)),
            ("two views, colour on the device, full-size decode", rate(views(folder(False), dev), n)),
            ("two views, colour on the device, reduced (ImageFolder, file://)", rate(views(folder(True), dev), n)),
            ("two views, colour on the device, reduced (shards, file://)", rate(views(local, dev), n)),
        ]
        remote_folder = shards("s3://bench/shards/train", s3)
        rows.append(
            ("two views, colour on the device, reduced (shards, S3 server)", rate(views(remote_folder, dev), n))
        )
        gets = remote_folder.requests / (3 * n + 1)
        large = [b for b in blobs if max(decode.read_header(b).height, decode.read_header(b).width) >= 1600]
        if large:
            k = len(large)
            rows[3:3] = [
                (f"  the {k} images over 1,600 px, crop + flip: full-size decode", crops(large, False)),
                (f"  the {k} images over 1,600 px, crop + flip: reduced-size decode", crops(large, True)),
            ]
        objects = 300 if args.quick else 1000
        fs.pipe({f"bench/many/train/c{k % 10:03d}/{k:06d}.JPEG": b"x" for k in range(objects)})
        t = time.perf_counter()
        datasets.FsImageFolder("s3://bench/many/train", s3)
        s3_folder = time.perf_counter() - t
        t = time.perf_counter()
        shards("s3://bench/shards/train", s3)
        s3_shards = time.perf_counter() - t

        t_folder, t_shards = startup(tmp, files, 100 if files >= 100_000 else max(files // 1000, 1))
        width = max(len(r[0]) for r in rows)
        print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, 1 thread; {n} images\n")
        print(f"| {'measurement'.ljust(width)} | images per CPU-second | vs baseline |")
        print(f"|{'-' * (width + 2)}|---|---|")
        for name, r in rows:
            print(f"| {name.ljust(width)} | {r:,.0f} | {r / baseline:.2f}x |")
        best = rows[-2][1]
        host_full = next(r for name, r in rows if name.startswith("two views, colour on the host, full"))
        print(f"\nGETs per image from the S3 server (shards): {gets:.2f}")
        print(f"start-up, {files:,} files: ImageFolder {t_folder:.2f} s; the same as shards: {t_shards:.3f} s "
              f"({t_folder / t_shards:,.0f}x)")  # fmt: skip
        print(f"cores for {TARGET:,} images/s (colour on the device, reduced decode, shards): {TARGET / best:.1f}; "
              f"colour on the host, full decode: {TARGET / host_full:.1f}")  # fmt: skip
        print(f"start-up on the S3 server, {objects:,} objects: ImageFolder {s3_folder:.2f} s "
              f"({s3_folder / objects * 1e6:.0f} us an object: {s3_folder / objects * 1.28e6:.0f} s for ImageNet's "
              f"1.28 M); shards: {s3_shards:.3f} s (two GETs, any size)")  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
