"""No checkpoint runs code: a DCP step whose `.metadata` or non-tensor entry is a crafted pickle is refused by every
loader (resume, `*.checkpoint` URLs, kNN), and the marker its pickle would create never appears.

Each crafted file is first shown to be live: torch's own reader creates the marker. Checkpoints write their
non-tensor entries as tagged JSON, never as pickles; entries pickled by older checkpoints still load weights-only.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from extrema import entry
from extrema.models.extrema import ExtreMA
from extrema.run import contract, rundir
from extrema.spec import ModelSpec
from extrema.train import ckpt, weights
from extrema.train.optim import LARS, build_adamw, param_groups, set_hyperparams
from extrema.train.safe_dcp import JSON_MAGIC, SafeFsspecReader, UnsafeCheckpoint, decode_state, encode_state
from tests.stage_runs import TINY_EXPERIMENT, checkpointed_model, make_run, shard
from tests.test_probe import PROBE

# Complete steps 2 and 4; both kept.
SETUP = {"pretrain": {"steps": 4, "ckpt_every": 2, "keep_last": 5}}


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
    """Put a torch.save'd MakesMarker in place of a non-tensor entry's bytes."""
    buf = io.BytesIO()
    torch.save(MakesMarker(marker), buf)
    replace_entry(step_dir, fqn, buf.getvalue())


def replace_entry(step_dir: Path, fqn: str, payload: bytes) -> None:
    """Put `payload` in place of a non-tensor entry's bytes; later entries and .metadata follow."""
    meta = pickle.loads((step_dir / ".metadata").read_bytes())  # our own checkpoint: trusted
    index = next(i for i in meta.storage_data if i.fqn == fqn)
    info = meta.storage_data[index]
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
    """A DCP load template asking for one non-tensor entry, e.g. 'extra.init_top1'."""
    head, _, rest = fqn.partition(".")
    return {head: nested(rest) if "." in rest else {rest: None}}


def test_the_crafted_files_run_code_through_torchs_own_reader(reference: Path, tmp_path: Path) -> None:
    ckpt_dir = copy_run(reference, tmp_path / "run")
    craft_metadata(ckpt_dir / "step-4", tmp_path / "by-metadata")
    with pytest.raises(AttributeError):  # the pickle's result is no Metadata, but its code ran
        FsspecReader(str(ckpt_dir / "step-4")).read_metadata()
    assert (tmp_path / "by-metadata").exists()

    craft_entry(ckpt_dir / "step-2", "extra.init_top1", tmp_path / "by-entry")
    dcp.load(nested("extra.init_top1"), storage_reader=FsspecReader(str(ckpt_dir / "step-2")))
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
    "weights.encoder_weights (probe, finetune, detect, inpaint)": lambda url: weights.encoder_weights(url, "ema"),
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


@pytest.mark.parametrize("name", ["../../outside.distcp", "/etc/hostname", "__0_0.distcp/../../x", "notes.txt"])
def test_metadata_naming_a_file_outside_its_step_is_refused(reference: Path, tmp_path: Path, name: str) -> None:
    step_dir = copy_run(reference, tmp_path / "run") / "step-4"
    meta = pickle.loads((step_dir / ".metadata").read_bytes())  # our own checkpoint: trusted
    index = next(iter(meta.storage_data))
    meta.storage_data[index] = dataclasses.replace(meta.storage_data[index], relative_path=name)
    (step_dir / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeCheckpoint, match="not one in its step directory"):
        SafeFsspecReader(str(step_dir)).read_metadata()
    with pytest.raises(ckpt.CheckpointError, match="not one in its step directory"):
        ckpt.load(str(step_dir), nested("extra.step"))


def test_a_crafted_entry_is_refused_by_ckpt_load(reference: Path, tmp_path: Path) -> None:
    step_dir = copy_run(reference, tmp_path / "run") / "step-4"
    craft_entry(step_dir, "extra.init_top1", tmp_path / "marker")
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load(str(step_dir), nested("extra.init_top1"))
    assert f"{step_dir}/{shard(step_dir)}: entry extra.init_top1 does not load weights-only" in str(caught.value)
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


@pytest.mark.parametrize("fqn", ["extra.init_top1", "optim.param_groups.0.lr"])
def test_resume_sets_aside_a_step_with_a_crafted_entry(reference: Path, tmp_path: Path, fqn: str) -> None:
    ckpt_dir = copy_run(reference, tmp_path / "run")
    craft_entry(ckpt_dir / "step-4", fqn, tmp_path / "marker")
    why = f"{shard(ckpt_dir / 'step-4')}: entry {fqn} does not load weights-only"
    resumes_past(tmp_path / "run", reference, tmp_path / "marker", why)


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


def entry_bytes(step_dir: Path) -> dict[str, bytes]:
    """The stored bytes of every non-tensor entry of a step, by FQN."""
    meta = SafeFsspecReader(str(step_dir)).read_metadata()
    out = {}
    for fqn, item in meta.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            info = meta.storage_data[MetadataIndex(fqn)]
            out[fqn] = (step_dir / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
    return out


def test_a_pretrain_checkpoint_pickles_no_non_tensor_entry(reference: Path) -> None:
    for step in (2, 4):
        stored = entry_bytes(reference / "pretrain" / "ckpt" / f"step-{step}")
        assert {
            "extra.step",
            "extra.init_top1",
            "optim.param_groups.0.betas",
            "optim.param_groups.0.params",
        } <= stored.keys()
        for fqn, data in stored.items():
            assert data.startswith(JSON_MAGIC) and not data.startswith((b"\x80", b"PK")), (fqn, data[:20])
        assert decode_state(stored["extra.step"]) == step
        assert type(decode_state(stored["optim.param_groups.0.betas"])) is tuple


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (NaN equals NaN; -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


VALUES: dict[str, Any] = {
    "int": 3,
    "big": -(2**70),
    "float": 1.5,
    "whole": 1.0,
    "tiny": 5e-324,
    "neg_zero": -0.0,
    "nan": math.nan,
    "inf": math.inf,
    "neg_inf": -math.inf,
    "betas": (0.9, 0.95),
    "none": None,
    "yes": True,
    "no": False,
    "text": 'naïve "json" \\ \n {"tuple": []} \ud800',
    "empty": "",
    "list": [1, 2.5, "x", None, False],
    # DCP splits dicts (and lists holding containers) into entries of their own; a tuple is one entry
    "nested": ({"a": (1, [2.0, None, math.nan]), "b": {"c": "d", "e": ()}}, [[], {}], {}, ("x", -math.inf)),
}


def test_json_state_round_trips_through_ckpt_save_and_load(tmp_path: Path) -> None:
    for name, value in VALUES.items():
        assert same(decode_state(encode_state(value, name)), value), name
    url = ckpt.save(str(tmp_path / "ckpt"), 1, {"extra": dict(VALUES), "w": torch.arange(3.0)})
    assert all(data.startswith(JSON_MAGIC) for data in entry_bytes(Path(url)).values())
    back: dict[str, Any] = {"extra": dict.fromkeys(VALUES), "w": torch.zeros(3)}
    ckpt.load(url, back)
    assert same(back["extra"], VALUES) and torch.equal(back["w"], torch.arange(3.0))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_optimizer_hyperparameters_round_trip_as_json(tmp_path: Path, optimizer: str) -> None:
    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        groups = param_groups(model, 0.05)
        if optimizer == "adamw":
            return model, build_adamw(groups, 1e-3, (0.9, 0.95))
        if optimizer == "sgd":
            return model, torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        return model, LARS(groups, lr=0.1, weight_decay=0.05)

    model, opt = build(0)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    set_hyperparams(opt, 0.25, 0.01)
    url = ckpt.save(str(tmp_path / "ckpt"), 1, ckpt.training_state(model, opt, {"step": 1}))
    assert all(data.startswith(JSON_MAGIC) for data in entry_bytes(Path(url)).values())
    fresh, fresh_opt = build(1)
    set_hyperparams(fresh_opt, 9.0, 9.0)  # DCP loads the keys the template has: wd_enabled too
    ckpt.load_training_state(url, fresh, fresh_opt, ckpt.training_state(fresh, fresh_opt, {"step": 0}))
    hyper = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in (opt, fresh_opt)]
    assert same(hyper[1], hyper[0])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_a_background_save_writes_json_too(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        saver = ckpt.Saver(str(tmp_path / "ckpt"))
        url = saver.save(1, {"extra": {"step": 1, "t": (1, 2.0)}}, background=True)
        saver.wait()
    finally:
        dist.destroy_process_group()
    assert [decode_state(data) for data in entry_bytes(Path(url)).values()] == [1, (1, 2.0)]


@pytest.mark.parametrize(
    ("value", "where", "what"),
    [
        ({"ok": 1, "bad": {1, 2}}, "extra.x['bad']", "set"),
        (np.float64(0.5), "extra.x", "float64"),
        ([torch.float32], "extra.x[0]", "dtype"),
        ({1: "a"}, "extra.x", "dict key 1 \\(int\\)"),
        (torch.device("cpu"), "extra.x", "device"),
    ],
)
def test_non_json_state_is_refused_naming_the_key(tmp_path: Path, value: Any, where: str, what: str) -> None:
    with pytest.raises(TypeError, match=rf"checkpoint entry {re.escape(where)}[ :].*{what}"):
        encode_state(value, "extra.x")
    inside = re.escape("extra.x[0]" + where.removeprefix("extra.x"))  # in a tuple, which DCP does not split up
    with pytest.raises(ckpt.CheckpointError, match=rf"not saved: TypeError: checkpoint entry {inside}[ :].*{what}"):
        ckpt.save(str(tmp_path / "ckpt"), 1, {"extra": {"x": (value,)}})
    assert not ckpt.complete_steps(str(tmp_path / "ckpt"))


def test_an_old_pickled_checkpoint_still_loads(tmp_path: Path) -> None:
    url = str(tmp_path / "step-1")
    dcp.save({"extra": dict(VALUES), "w": torch.arange(3.0)}, storage_writer=FsspecWriter(url))
    assert all(data.startswith(b"PK") for data in entry_bytes(Path(url)).values())  # torch.save's zip format
    back: dict[str, Any] = {"extra": dict.fromkeys(VALUES), "w": torch.zeros(3)}
    ckpt.load(url, back)
    assert same(back["extra"], VALUES) and torch.equal(back["w"], torch.arange(3.0))


@pytest.mark.parametrize("payload", [b'{"set":[1]}', b'{"float":"1e999"}', b"NaN", b"[1,2]", b'{"tuple":[1]', b"\xff"])
def test_a_malformed_json_entry_is_refused_naming_it(reference: Path, tmp_path: Path, payload: bytes) -> None:
    step_dir = copy_run(reference, tmp_path / "run") / "step-4"
    replace_entry(step_dir, "extra.init_top1", JSON_MAGIC + payload)
    with pytest.raises(
        ckpt.CheckpointError, match=f"{re.escape(str(step_dir))}/{shard(step_dir)}: entry extra.init_top1 is not valid"
    ):
        ckpt.load(str(step_dir), nested("extra.init_top1"))
