"""No checkpoint runs code: a DCP step whose `.metadata` or non-tensor entry is a crafted pickle is refused by every
loader (resume, `*.checkpoint` URLs, kNN), and the marker its pickle would create never appears.

Each crafted file is first shown to be live: torch's own reader creates the marker.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

from extrema import ckpt, contract, entry, interop, rundir
from extrema.models.extrema import ExtreMA
from extrema.safe_dcp import SafeFsspecReader, UnsafeCheckpoint
from extrema.spec import ModelSpec
from tests.stage_runs import TINY_EXPERIMENT, checkpointed_model, make_run
from tests.test_probe import PROBE

# Complete steps 2 and 4; both kept.
SETUP = {"pretrain": {"steps": 4, "ckpt_every": 2, "keep_last": 5}}
SHARD = "__0_0.distcp"


class MakesMarker:
    """Unpickled without restriction, it creates the directory `path`: a stand-in for any code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny pretrain run."""
    run = tmp_path_factory.mktemp("uninterrupted")
    make_run(str(run), SETUP)
    assert entry.main([str(run), "pretrain"]) == 0
    assert ckpt.complete_steps(str(run / "pretrain" / "ckpt")) == [4, 2]
    return run


def copy_run(reference: Path, run: Path) -> Path:
    """A run whose pretrain stage holds a copy of the reference checkpoints; returns its ckpt dir."""
    make_run(str(run), SETUP)
    shutil.copytree(reference / "pretrain" / "ckpt", run / "pretrain" / "ckpt")
    return run / "pretrain" / "ckpt"


def craft_metadata(step_dir: Path, marker: Path) -> None:
    (step_dir / ".metadata").write_bytes(pickle.dumps(MakesMarker(marker)))


def craft_entry(step_dir: Path, fqn: str, marker: Path) -> None:
    """Put a torch.save'd MakesMarker in place of a non-tensor entry's bytes; later entries and .metadata follow."""
    meta = pickle.loads((step_dir / ".metadata").read_bytes())  # our own checkpoint: trusted
    index = next(i for i in meta.storage_data if i.fqn == fqn)
    info = meta.storage_data[index]
    buf = io.BytesIO()
    torch.save(MakesMarker(marker), buf)
    payload = buf.getvalue()
    shard = step_dir / info.relative_path
    data = shard.read_bytes()
    shard.write_bytes(data[: info.offset] + payload + data[info.offset + info.length :])
    shift = len(payload) - info.length
    for i, other in meta.storage_data.items():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            meta.storage_data[i] = dataclasses.replace(other, offset=other.offset + shift)
    meta.storage_data[index] = dataclasses.replace(info, length=len(payload))
    (step_dir / ".metadata").write_bytes(pickle.dumps(meta))


def nested(fqn: str) -> dict[str, Any]:
    """A DCP load template asking for one non-tensor entry, e.g. 'extra.knn'."""
    head, _, rest = fqn.partition(".")
    return {head: nested(rest) if "." in rest else {rest: None}}


def test_the_crafted_files_run_code_through_torchs_own_reader(reference: Path, tmp_path: Path) -> None:
    ckpt_dir = copy_run(reference, tmp_path / "run")
    craft_metadata(ckpt_dir / "step-4", tmp_path / "by-metadata")
    with pytest.raises(AttributeError):  # the pickle's result is no Metadata, but its code ran
        FsspecReader(str(ckpt_dir / "step-4")).read_metadata()
    assert (tmp_path / "by-metadata").exists()

    craft_entry(ckpt_dir / "step-2", "extra.knn", tmp_path / "by-entry")
    dcp.load(nested("extra.knn"), storage_reader=FsspecReader(str(ckpt_dir / "step-2")))
    assert (tmp_path / "by-entry").exists()


def test_the_allow_list_reads_real_metadata_exactly(reference: Path) -> None:
    for step in (2, 4):
        url = ckpt.step_url(str(reference / "pretrain" / "ckpt"), step)
        plain = pickle.loads(Path(url, ".metadata").read_bytes())
        safe = SafeFsspecReader(url).read_metadata()
        assert safe.state_dict_metadata == plain.state_dict_metadata and safe.storage_data == plain.storage_data
        assert safe.planner_data == plain.planner_data


def load_target_encoder(url: str) -> None:
    ckpt.load_module(url, ExtreMA(ModelSpec(**TINY_EXPERIMENT["model"])).target.encoder, "target.encoder.")


LOADERS: dict[str, Callable[[str], Any]] = {
    "ckpt.verify": ckpt.verify,
    "ckpt.load": lambda url: ckpt.load(url, nested("extra.step")),
    "ckpt.load_module (knn)": load_target_encoder,
    "interop.encoder_weights (probe, finetune, detect, inpaint)": lambda url: interop.encoder_weights(url, "ema"),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_crafted_metadata_is_refused_by_every_loader(reference: Path, tmp_path: Path, loader: str) -> None:
    step_dir = copy_run(reference, tmp_path / "run") / "step-4"
    craft_metadata(step_dir, tmp_path / "marker")
    with pytest.raises(ckpt.CheckpointError) as caught:
        LOADERS[loader](str(step_dir))
    assert f"{step_dir}/.metadata: refused to load posix.mkdir" in str(caught.value)
    assert not (tmp_path / "marker").exists()


def test_crafted_rank_local_metadata_is_refused(reference: Path, tmp_path: Path) -> None:
    """DCP falls back to `__<rank>.metadata` when `.metadata` does not read: that file is read safely too."""
    step_dir = copy_run(reference, tmp_path / "run") / "step-4"
    (step_dir / ".metadata").rename(step_dir / "moved.metadata")
    craft_metadata(step_dir, tmp_path / "marker")
    (step_dir / ".metadata").rename(step_dir / "__0.metadata")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(str(step_dir), nested("extra.step"))
    assert not (tmp_path / "marker").exists()
    with pytest.raises(UnsafeCheckpoint, match=r"__0\.metadata: refused to load posix\.mkdir"):
        SafeFsspecReader(str(step_dir)).read_metadata(rank=0)


def test_a_crafted_entry_is_refused_by_ckpt_load(reference: Path, tmp_path: Path) -> None:
    step_dir = copy_run(reference, tmp_path / "run") / "step-4"
    craft_entry(step_dir, "extra.knn", tmp_path / "marker")
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load(str(step_dir), nested("extra.knn"))
    assert f"{step_dir}/{SHARD}: entry extra.knn does not load weights-only" in str(caught.value)
    assert "posix.mkdir" in str(caught.value)
    assert not (tmp_path / "marker").exists()


def resumes_past(run: Path, reference: Path, marker: Path, why: str) -> None:
    """Resuming sets step 4 aside for `why`, runs nothing from it, and ends as the uninterrupted run."""
    stage, ckpt_dir = run / "pretrain", run / "pretrain" / "ckpt"
    assert entry.main([str(run), "pretrain"]) == 0
    assert not marker.exists()
    logged = [r["step"] for r in rundir.read_jsonl(str(stage / "metrics.jsonl")) if "loss" in r]
    assert logged == [3, 4]  # resumed from step 2
    skips = contract.read_status(str(stage))["checkpoint_skips"]
    assert [s["step"] for s in skips] == [4] and why in skips[0]["reason"], skips
    assert len(list((ckpt_dir / ckpt.CORRUPT_DIR).iterdir())) == 1
    resumed, uninterrupted = checkpointed_model(stage), checkpointed_model(reference / "pretrain")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_resume_sets_aside_a_step_with_crafted_metadata(reference: Path, tmp_path: Path) -> None:
    ckpt_dir = copy_run(reference, tmp_path / "run")
    craft_metadata(ckpt_dir / "step-4", tmp_path / "marker")
    resumes_past(tmp_path / "run", reference, tmp_path / "marker", ".metadata: refused to load posix.mkdir")


@pytest.mark.parametrize("fqn", ["extra.knn", "optim.param_groups.0.lr"])
def test_resume_sets_aside_a_step_with_a_crafted_entry(reference: Path, tmp_path: Path, fqn: str) -> None:
    ckpt_dir = copy_run(reference, tmp_path / "run")
    craft_entry(ckpt_dir / "step-4", fqn, tmp_path / "marker")
    resumes_past(tmp_path / "run", reference, tmp_path / "marker", f"{SHARD}: entry {fqn} does not load weights-only")


@pytest.mark.parametrize("stage", ["knn", "probe"])
def test_a_checkpoint_url_with_crafted_metadata_fails_the_stage_and_runs_nothing(
    reference: Path, tmp_path: Path, stage: str
) -> None:
    step_dir = copy_run(reference, tmp_path / "source") / "step-4"
    craft_metadata(step_dir, tmp_path / "marker")
    settings = {**(PROBE if stage == "probe" else {}), "checkpoint": str(step_dir)}
    make_run(str(tmp_path / "run"), {"stages": [stage], stage: settings})
    assert entry.main([str(tmp_path / "run"), stage]) == contract.EXIT_FAILED
    assert not (tmp_path / "marker").exists()
    error = contract.read_status(str(tmp_path / "run" / stage))["error"]
    assert f"{step_dir}/.metadata: refused to load posix.mkdir" in error, error
