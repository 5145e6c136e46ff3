"""`extrema-launch data shard SRC_URL DST_URL --shard-size 1GB`: write an ImageFolder's splits as tar shards.

    extrema-launch data shard file:///data/imagenet s3://bucket/imagenet-shards --shard-size 1GB
    extrema-launch data shard /data/imagenet /lustre/imagenet-shards --splits train val

Each split `SRC_URL/<split>/<class>/<image>` becomes `DST_URL/<split>/shard-NNNNNN.tar` (webdataset members
`<key>.jpg` + `<key>.cls`), `members.bin` and `index.json` (written last: it marks the split complete). Train on
them with `data.dataset: shards` and `data.root: DST_URL`. s3:// URLs take their endpoint and credentials from
the environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)
or the options below. Torch-free, like the rest of launch/.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from extrema.data.object_store import DataSourceError, ProcessFs, access_error
from extrema.data.shard_format import INDEX, join, parse_size, shard_image_folder
from extrema.spec import StorageSpec
from launch.cli.arguments import add_command
from launch.inputs.errors import UsageError

SPLITS = ("train", "val")


def add_parser(subparsers: Any) -> None:
    """Register `data shard` on the CLI's subcommand parsers."""
    data = add_command(
        subparsers,
        "data",
        None,
        "prepare datasets (data shard: an ImageFolder as tar shards)",
        description="Prepare datasets.\n\n  data shard: write an ImageFolder's splits as tar shards with an index.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    help = "write the splits of an ImageFolder as tar shards with an index, on any fsspec URL"
    p = add_command(sub, "shard", cmd_shard, help, description=__doc__)
    p.add_argument("src", metavar="SRC_URL", help="ImageFolder root: SRC_URL/<split>/<class>/<image>")
    p.add_argument("dst", metavar="DST_URL", help="shard root: DST_URL/<split>/shard-NNNNNN.tar + index")
    p.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 1GB, 256MB, 64MiB (1GB)")
    p.add_argument("--splits", nargs="+", metavar="SPLIT", help="split directories (default: those of train, val)")
    p.add_argument("--overwrite", action="store_true", help="write a split again even if its index exists")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs (else AWS_ENDPOINT_URL[_S3])")
    p.add_argument("--region", help="S3 region for s3:// URLs")
    p.add_argument("--profile", help="named profile of ~/.aws for s3:// URLs (else AWS_PROFILE)")


def storage_of(args: argparse.Namespace) -> StorageSpec:
    """The object-store settings the options give (no secret ever passes through them)."""
    try:
        return StorageSpec(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)
    except ValidationError as e:
        raise UsageError("; ".join(f"--{'-'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from e


def cmd_shard(args: argparse.Namespace, out: Console) -> int:
    """Write every requested split; exit 0, or raise UsageError (exit 2) for a bad size, URL or source."""
    try:
        shard_bytes = parse_size(args.shard_size)
    except ValueError as e:
        raise UsageError(f"--shard-size: {e}") from e
    storage = storage_of(args)
    try:
        src, dst = ProcessFs(args.src, storage), ProcessFs(args.dst, storage)
        src_fs, dst_fs = src.get(), dst.get()
        splits = args.splits or [s for s in SPLITS if src_fs.isdir(join(src.path, s))]
    except DataSourceError as e:
        raise UsageError(str(e)) from e
    except Exception as e:
        raise UsageError(str(access_error(e, args.src, storage))) from e
    if not splits:
        raise UsageError(f"{args.src}: no split directory ({', '.join(SPLITS)}); name them with --splits")
    for split in splits:
        target = join(dst.path, split)
        if dst_fs.exists(join(target, INDEX)) and not args.overwrite:
            raise UsageError(f"{args.dst}/{split} is already sharded ({INDEX} exists); --overwrite writes it again")
    for split in splits:
        started, last = time.monotonic(), [0.0]

        def progress(done: int, total: int, split: str = split, last: list[float] = last) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= 10:
                last[0] = now
                out.print(f"{split}: {done:,}/{total:,} images", highlight=False)

        try:
            index = shard_image_folder(
                src_fs, join(src.path, split), dst_fs, join(dst.path, split), shard_bytes, progress
            )
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{args.src}/{split}: {e}") from e
        size = sum(s.bytes for s in index.shards)
        out.print(
            f"{split}: {len(index.members):,} images, {len(index.classes)} classes -> {len(index.shards)} shards "
            f"({size / 1e9:.2f} GB) in {args.dst.rstrip('/')}/{split} ({time.monotonic() - started:.0f} s)",
            highlight=False,
        )
    return 0
