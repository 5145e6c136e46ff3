"""Tar shards: the `data shard` command, the index and its bounds, the map-style reader on file:// and on a real
S3 server (moto over HTTP through s3fs), exact resume of pretraining on shards, and clear errors."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from torchvision.io import encode_jpeg

from extrema import entry
from extrema.data import datasets, loaders, shard_format, transforms
from extrema.data.object_store import DataSourceError
from extrema.data.shards import ShardedImages
from extrema.run import rundir
from extrema.spec import DataSpec, StorageSpec
from extrema.train import ckpt
from launch.backends.ray.head import free_ports
from launch.cli import shard as shard_command
from launch.inputs.errors import UsageError
from tests.s3server import KEY, SECRET, S3Server, isolated_aws_env, s3_server  # noqa: F401  (fixture)
from tests.stage_runs import checkpointed_model, make_run

CLASSES = ("cat", "dog", "eel")


def smooth_image(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A uint8 (3, h, w) image of smooth colour blobs (JPEG-friendly, unlike noise)."""
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 255
    return (
        torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        .clamp(0, 255)
        .to(torch.uint8)
    )


def write_jpeg_folder(root: Path, per_class: dict[str, int]) -> None:
    """root/<split>/<class>/<k>.jpg of small smooth JPEGs of varied sizes, plus a non-image file."""
    g = torch.Generator().manual_seed(0)
    for split, n in per_class.items():
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = smooth_image(g, 36 + k % 5, 40 + k % 7)
                (root / split / c / f"{k:03d}.jpg").write_bytes(bytes(encode_jpeg(img, quality=90).numpy()))
        (root / split / "cat" / "notes.txt").write_text("not an image")


def shard(src: str, dst: str, *more: str) -> None:
    """Run `data shard SRC DST ...` through its own parser, as `extrema-launch` would."""
    parser = argparse.ArgumentParser()
    shard_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["data", "shard", src, dst, *more])
    assert args.fn(args, Console(file=open(os.devnull, "w"))) == 0  # noqa: SIM115


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of 48 train and 6 val images, and its shards (about 3 KB each) beside it."""
    root = tmp_path_factory.mktemp("in")
    write_jpeg_folder(root / "folder", {"train": 16, "val": 2})
    shard(f"file://{root / 'folder'}", f"file://{root / 'shards'}", "--shard-size", "12KB")
    return root


def test_shards_are_webdataset_tars_in_imagefolder_order(folder: Path) -> None:
    shards = sorted((folder / "shards" / "train").glob("shard-*.tar"))
    assert len(shards) >= 3
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.jpg", "000000000.cls"]
        assert tar.extractfile("000000000.cls").read() == b"0"  # type: ignore[union-attr]
    index = json.loads((folder / "shards" / "train" / "index.json").read_text())
    assert index["classes"] == list(CLASSES) and index["samples"] == 48
    assert [s["bytes"] for s in index["shards"]] == [p.stat().st_size for p in shards]
    tars = datasets.build_dataset(DataSpec(dataset="shards", root=f"file://{folder / 'shards'}"), "train")
    files = datasets.build_dataset(DataSpec(dataset="imagefolder", root=str(folder / "folder")), "train")
    assert tars.classes == files.classes and torch.equal(torch.as_tensor(tars.targets), files.targets)
    pairs = [(tars[i], files[i]) for i in range(len(files))]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in pairs)
    assert isinstance(tars, ShardedImages) and tars.requests == len(files)  # one range read per image
    with pytest.raises(IndexError):
        tars[48]


def test_shard_command_refuses_bad_input(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--shard-size"):
        shard(str(folder / "folder"), str(tmp_path / "x"), "--shard-size", "lots")
    with pytest.raises(UsageError, match="no split directory"):
        shard(str(tmp_path), str(tmp_path / "x"))
    with pytest.raises(UsageError, match="already sharded"):
        shard(str(folder / "folder"), str(folder / "shards"))
    with pytest.raises(UsageError, match="endpoint"):
        shard(str(folder / "folder"), str(tmp_path / "x"), "--endpoint-url", "ftp://nowhere")


def copy_split(folder: Path, tmp_path: Path) -> Path:
    split = tmp_path / "train"
    split.mkdir()
    for p in (folder / "shards" / "train").iterdir():
        (split / p.name).write_bytes(p.read_bytes())
    return split


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: d["shards"][0].update(name="../../etc/passwd"), "plain file name"),
        (lambda d: d["shards"][0].update(count=10**12), "integer in"),
        (lambda d: d["shards"][0].update(bytes=2000), "outside its shard"),
        (lambda d: d.update(classes=["a/b", "c", "d"]), "without '/'"),
        (lambda d: d.update(format="pickle"), "not an extrema-shards"),
    ],
)
def test_a_bad_index_is_refused(folder: Path, tmp_path: Path, edit: Any, reason: str) -> None:
    split = copy_split(folder, tmp_path)
    doc = json.loads((split / "index.json").read_text())
    edit(doc)
    (split / "index.json").write_text(json.dumps(doc))
    with pytest.raises(shard_format.ShardIndexError, match=reason):
        ShardedImages(str(split))


def test_index_sizes_are_bounded_and_a_stale_index_is_named(folder: Path, tmp_path: Path, monkeypatch) -> None:
    split = copy_split(folder, tmp_path)
    monkeypatch.setattr(shard_format, "MAX_INDEX_BYTES", 100)
    with pytest.raises(ValueError, match="more than the limit"):
        ShardedImages(str(split))
    monkeypatch.undo()
    (split / "members.bin").write_bytes((split / "members.bin").read_bytes() + bytes(16))
    with pytest.raises(ValueError, match="more than the limit"):
        ShardedImages(str(split))
    rows = np.frombuffer((folder / "shards" / "train" / "members.bin").read_bytes(), shard_format.MEMBER_DTYPE).copy()
    rows["offset"][1] = rows["offset"][0] + -(-int(rows["size"][0]) // 512) * 512 + 512  # sample 0's .cls member
    (split / "members.bin").write_bytes(rows.tobytes())
    ds = ShardedImages(str(split))
    with pytest.raises(shard_format.ShardIndexError, match=r"sample 1 .* stale or foreign index"):
        ds[1]


def test_same_batches_for_any_workers_and_world_size_and_as_imagefolder(folder: Path) -> None:
    def batches(dataset: str, root: Path, workers: int, world: int) -> list[torch.Tensor]:
        base = datasets.build_dataset(DataSpec(dataset=dataset, root=str(root)), "train")  # type: ignore[arg-type]
        views = loaders.PretrainViews(base, transforms.TwoViewTransform(16, "spatial_consistent_color"), 5)
        out = []
        for rank in range(world):
            sampler = loaders.StepBatchSampler(len(base), 8, 5, 2, 9, rank, world)
            out.append([b[0] for b in loaders.step_loader(views, sampler, workers)])
        return [torch.cat(parts) for parts in zip(*out)]

    reference = batches("imagefolder", folder / "folder", 0, 1)
    for workers, world in ((0, 1), (2, 2)):
        got = batches("shards", folder / "shards", workers, world)
        assert len(got) == 7 and all(torch.equal(a, b) for a, b in zip(got, reference))


# ------------------------------------------------------------------------------------------ on an S3 server

SETUP: dict[str, Any] = {"pretrain": {"steps": 8, "ckpt_every": 2, "keep_last": 4}}


def s3_spec(server: S3Server, bucket: str, **storage: Any) -> dict[str, Any]:
    return {
        "dataset": "shards",
        "root": f"s3://{bucket}/in",
        "storage": {"endpoint_url": server.endpoint, **storage},
        "num_workers": 1,
    }


@pytest.fixture(scope="module")
def s3_shards(s3_server: S3Server, folder: Path) -> S3Server:  # noqa: F811
    """The folder's shards written to s3://shards/in by the command, over HTTP."""
    s3_server.make_bucket("shards")
    with pytest.MonkeyPatch.context() as mp:
        isolated_aws_env(mp, folder)
        shard(str(folder / "folder"), "s3://shards/in", "--endpoint-url", s3_server.endpoint, "--shard-size", "12KB")
    return s3_server


def last_losses(stage: Path) -> dict[int, float]:
    """Each step's loss, the last one logged for it (a killed attempt may have logged steps it did not save)."""
    return {r["step"]: r["loss"] for r in rundir.read_jsonl(str(stage / "metrics.jsonl")) if "loss" in r}


def kill_mid_run_then_resume_equals(run: Path, reference: Path, launch: list[str]) -> None:
    """Start `python <launch> <run> pretrain` in its own process group (this process's thread count: bitwise CPU
    results depend on it), SIGKILL the group once a checkpoint past step 2 exists, resume in this process: the same
    losses and weights bits as `reference`, and no credential in the run directory."""
    ckpt_dir = str(run / "pretrain" / "ckpt")
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, *launch, str(run), "pretrain"]
    out = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(command, env={**os.environ, **threads}, start_new_session=True, text=True, **out)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 120
        while (ckpt.latest_step(ckpt_dir) or 0) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its loader workers, mid-run
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    saved = ckpt.latest_step(ckpt_dir)
    assert saved is not None and 2 <= saved < 8
    assert entry.main([str(run), "pretrain"]) == 0
    assert last_losses(run / "pretrain") == last_losses(reference / "pretrain")
    a, b = checkpointed_model(reference / "pretrain"), checkpointed_model(run / "pretrain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    written = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert SECRET.encode() not in written and KEY.encode() not in written


def test_pretrain_on_s3_shards_killed_and_resumed_equals_imagefolder(
    s3_shards: S3Server, folder: Path, tmp_path: Path, monkeypatch
) -> None:
    isolated_aws_env(monkeypatch, tmp_path)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    make_run(str(reference), {**SETUP, "data": {"dataset": "imagefolder", "root": str(folder / "folder")}})
    make_run(str(run), {**SETUP, "data": s3_spec(s3_shards, "shards")})
    assert entry.main([str(reference), "pretrain"]) == 0
    # Its own process group, so that the kill takes its loader worker (which reads the shards over HTTP) with it.
    kill_mid_run_then_resume_equals(run, reference, ["-m", "extrema.entry"])


def test_credentials_from_the_variables_the_spec_names(s3_shards: S3Server, tmp_path: Path, monkeypatch) -> None:
    isolated_aws_env(monkeypatch, tmp_path, credentials=False)
    monkeypatch.setenv("MY_KEY", KEY)
    monkeypatch.setenv("MY_SECRET", SECRET)
    spec = DataSpec.model_validate(s3_spec(s3_shards, "shards", key_env="MY_KEY", secret_env="MY_SECRET"))
    ds = datasets.build_dataset(spec, "val")
    assert len(ds) == 6 and ds[5][0].shape[0] == 3
    monkeypatch.delenv("MY_SECRET")
    with pytest.raises(DataSourceError, match="MY_SECRET"):
        datasets.build_dataset(spec, "val")


def test_wrong_bucket_missing_credentials_and_unreachable_endpoint_are_named(
    s3_shards: S3Server, tmp_path: Path, monkeypatch
) -> None:
    isolated_aws_env(monkeypatch, tmp_path)
    run = tmp_path / "run"
    make_run(str(run), {"data": s3_spec(s3_shards, "no-such-bucket")})
    assert entry.main([str(run), "pretrain"]) == 1
    error = json.loads((run / "pretrain" / "status.json").read_text())["error"]
    assert (
        error.startswith("DataSourceError: cannot read s3://no-such-bucket/in/train")
        and "the bucket 'no-such-bucket' does not exist" in error
    )

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    unreachable = DataSpec.model_validate(
        {**s3_spec(s3_shards, "shards"), "storage": {"endpoint_url": dead, "retries": 0, "connect_timeout_s": 2}}
    )
    with pytest.raises(DataSourceError, match="endpoint cannot be reached"):
        datasets.build_dataset(unreachable, "train")

    isolated_aws_env(monkeypatch, tmp_path, credentials=False)
    with pytest.raises(DataSourceError, match="no credentials"):
        datasets.build_dataset(DataSpec.model_validate(s3_spec(s3_shards, "shards")), "train")


def test_storage_settings_are_validated_and_hold_no_secret() -> None:
    with pytest.raises(ValueError, match="go together"):
        StorageSpec(key_env="K")
    with pytest.raises(ValueError, match="not an environment variable name"):
        StorageSpec(key_env="A B", secret_env="C")
    with pytest.raises(ValueError):
        StorageSpec(endpoint_url="http://host/`rm -rf`")
    assert "secret" not in {k for k in StorageSpec.model_fields if not k.endswith("_env")}
    with pytest.raises(ValueError, match="root is required"):
        DataSpec(dataset="shards")
