"""The linear-probe stage end to end on CPU: learning, protocol, exact resume, baselines, strict loading, splits."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from extrema import entry
from extrema.eval.supervised import holdout_split
from extrema.models.vit import build_vit
from extrema.run import rundir
from extrema.spec import ProbeSpec
from extrema.stages.probe import frozen_encoder, probe_features
from extrema.train import weights
from tests.stage_runs import checkpointed_model, make_run
from tests.weight_sources import save_pretrain_checkpoint

PROBE: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 32,
    "train_size": 128,
    "warmup_epochs": 0.5,
    "optimizer": "sgd",
    "base_lr": 0.5,
    "val_size": 64,
    "eval_batch_size": 64,
}


def probe_run(run: Path, probe: dict[str, Any] | None = None, with_pretrain: bool = True) -> None:
    """A run directory whose pretrain stage holds a complete checkpoint at step 5, and a probe spec."""
    stages = ["pretrain", "probe"] if with_pretrain else ["probe"]
    exp = make_run(str(run), {"stages": stages, "probe": {**PROBE, **(probe or {})}})
    if with_pretrain:
        save_pretrain_checkpoint(str(run / "pretrain" / "ckpt"), exp.model)


def result(stage_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((stage_dir / "result.json").read_text())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("probe")
    probe_run(run)
    assert entry.main([str(run), "probe"]) == 0
    return run


def test_probe_learns_and_reports_its_protocol(reference: Path) -> None:
    out = result(reference / "probe")
    assert out["probe_top1"] > 30.0 and out["probe_top5"] >= out["probe_top1"]  # 10 classes: chance is 10%
    assert out["probe_best_top1"] >= out["probe_top1"] and out["probe_best_epoch"] in (1.0, 2.0)
    assert out["steps"] == 8 and out["epochs"] == 2.0
    assert out["checkpoint"].endswith("pretrain/ckpt/step-5")
    proto = out["protocol"]
    assert proto["lr"] == pytest.approx(0.5 * 32 / 256) and proto["effective_batch"] == 32
    assert proto["world_size"] == 1 and proto["encoder"] == "ema" and proto["final_norm"] is False
    assert proto["train_images"] == 128 and proto["val_images"] == 64 and proto["val_source"] == "val"
    records = rundir.read_jsonl(str(reference / "probe" / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    assert all({"top1", "top5", "loss", "lr"} <= r.keys() for r in records)
    assert records[-1]["top1"] == out["probe_top1"]


def test_probe_resumes_to_the_same_result(reference: Path, tmp_path: Path) -> None:
    """A probe that stopped after its epoch-1 checkpoint finishes with the same head and the same numbers."""
    probe_run(tmp_path)
    shutil.copytree(reference / "probe" / "ckpt" / "step-4", tmp_path / "probe" / "ckpt" / "step-4")
    first = rundir.read_jsonl(str(reference / "probe" / "metrics.jsonl"))[:1]
    rundir.write_text_atomic(str(tmp_path / "probe" / "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in first))
    copied = (tmp_path / "probe" / "ckpt" / "step-4" / ".metadata").stat().st_mtime_ns
    assert entry.main([str(tmp_path), "probe"]) == 0
    # It continued from step 4 rather than starting over (which would have rewritten step 4).
    assert (tmp_path / "probe" / "ckpt" / "step-4" / ".metadata").stat().st_mtime_ns == copied
    ref, resumed = result(reference / "probe"), result(tmp_path / "probe")
    assert {k: v for k, v in resumed.items() if k != "checkpoint"} == {
        k: v for k, v in ref.items() if k != "checkpoint"
    }
    assert rundir.read_jsonl(str(tmp_path / "probe" / "metrics.jsonl")) == rundir.read_jsonl(
        str(reference / "probe" / "metrics.jsonl")
    )
    a, b = checkpointed_model(reference / "probe"), checkpointed_model(tmp_path / "probe")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_baseline_with_lars_accumulation_and_holdout(tmp_path: Path) -> None:
    probe_run(
        tmp_path,
        {
            "init": "random",
            "optimizer": "lars",
            "accum_steps": 2,
            "batch_size": 64,
            "val_fraction": 0.25,
            "train_size": 128,
            "val_size": None,
            "epochs": 1,
        },
        with_pretrain=False,
    )
    assert entry.main([str(tmp_path), "probe"]) == 0
    out = result(tmp_path / "probe")
    assert out["checkpoint"] is None and out["steps"] == 2
    proto = out["protocol"]
    assert proto["init"] == "random" and proto["optimizer"] == "lars" and proto["accum_steps"] == 2
    assert proto["val_source"] == "train holdout 0.25" and proto["train_images"] == 128 and proto["val_images"] == 64
    assert 0.0 <= out["probe_top1"] <= 100.0


def test_mismatched_checkpoint_stops_the_stage_naming_keys(tmp_path: Path) -> None:
    from extrema.spec import ModelSpec

    url = tmp_path / "nano_encoder.pt"
    torch.save(build_vit(ModelSpec(arch="vit_nano")).state_dict(), url)
    probe_run(tmp_path / "run", {"checkpoint": str(url)}, with_pretrain=False)
    assert entry.main([str(tmp_path / "run"), "probe"]) == 1
    status = json.loads((tmp_path / "run" / "probe" / "status.json").read_text())
    assert status["state"] == "failed" and "ValueError" in status["error"]
    assert "unexpected keys (" in status["error"] and "blocks.2.attn.qkv.weight" in status["error"]
    assert "blocks.0.attn.qkv.weight (checkpoint (384, 128) vs model (192, 64))" in status["error"]
    probe_run(tmp_path / "bare", with_pretrain=False)
    assert entry.main([str(tmp_path / "bare"), "probe"]) == 1
    assert (
        "no complete pretrain checkpoint"
        in json.loads((tmp_path / "bare" / "probe" / "status.json").read_text())["error"]
    )


def test_probe_takes_the_chosen_branch_and_feature(tmp_path: Path) -> None:
    exp = make_run(str(tmp_path), {"stages": ["pretrain", "probe"]})
    model = save_pretrain_checkpoint(str(tmp_path / "ckpt"), exp.model)
    url = weights.resolve(str(tmp_path / "ckpt"))
    x = torch.randn(6, 3, 32, 32)
    for branch, expected in (("ema", model.target.encoder), ("student", model.online.encoder)):
        p = ProbeSpec(encoder=branch)  # type: ignore[arg-type]
        encoder = frozen_encoder(exp, p, url)
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in encoder.state_dict().items())
        assert not encoder.training and not any(q.requires_grad for q in encoder.parameters())
    with torch.no_grad():
        inst, patches = encoder.forward_features(x)
        torch.testing.assert_close(probe_features(encoder, x, ProbeSpec()), inst)
        torch.testing.assert_close(probe_features(encoder, x, ProbeSpec(final_norm=True)), encoder.norm(inst))
        torch.testing.assert_close(probe_features(encoder, x, ProbeSpec(feature="patch_mean")), patches.mean(1))
        # The encoder is frozen and in eval mode: micro-batching changes nothing the head sees.
        whole = probe_features(encoder, x, ProbeSpec())
        chunked = torch.cat([probe_features(encoder, c, ProbeSpec()) for c in x.chunk(3)])
        torch.testing.assert_close(chunked, whole)


def test_holdout_split_is_seeded_disjoint_and_complete() -> None:
    train, val = holdout_split(100, 0.1)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert sorted(train + val) == list(range(100)) and val == sorted(val)
    assert holdout_split(100, 0.1) == (train, val) and holdout_split(101, 0.1)[1] != val


def test_probe_spec_refuses_contradictions() -> None:
    with pytest.raises(ValueError, match="not used with init 'random'"):
        ProbeSpec(init="random", checkpoint="/x.pth")
    with pytest.raises(ValueError, match="not divisible by accum_steps"):
        ProbeSpec(batch_size=100, accum_steps=3)
