"""The pretrain and knn stages end to end on CPU: learning, determinism, golden trace, exact resume."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from extrema import entry
from extrema.models.extrema import ExtreMA
from extrema.run import rundir
from extrema.train import ckpt
from tests.stage_runs import make_run

GOLDEN = Path(__file__).parent / "assets" / "golden_pretrain_loss.json"


def losses(stage_dir: Path) -> list[float]:
    return [r["loss"] for r in rundir.read_jsonl(str(stage_dir / "metrics.jsonl")) if "loss" in r]


def final_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    spec = json.loads((stage_dir / "spec.json").read_text())
    from extrema.spec import RunSpec

    model = ExtreMA(RunSpec.model_validate(spec).experiment.model)
    url = ckpt.step_url(str(stage_dir / "ckpt"), ckpt.latest_step(str(stage_dir / "ckpt")))
    ckpt.load_module(url, model, prefix="")
    return model.state_dict()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ref")
    make_run(str(run))
    assert entry.main([str(run), "pretrain"]) == 0
    return run


def test_pretrain_learns_and_writes_its_files(reference_run: Path) -> None:
    stage = reference_run / "pretrain"
    trace = losses(stage)
    assert len(trace) == 12
    assert sum(trace[-3:]) / 3 < sum(trace[:3]) / 3 - 0.2
    result = json.loads((stage / "result.json").read_text())
    assert result["steps"] == 12 and result["loss_final"] == pytest.approx(trace[-1])
    status = json.loads((stage / "status.json").read_text())
    assert status["state"] == "completed" and status["attempts"] == 1
    prov = json.loads((stage / "provenance.json").read_text())
    assert prov["world_size"] == 1 and torch.__version__.startswith(prov["packages"]["torch"])
    assert {"git_sha", "git_dirty", "packages", "host"} <= prov.keys()
    assert ckpt.latest_step(str(stage / "ckpt")) == 12
    records = rundir.read_jsonl(str(stage / "metrics.jsonl"))
    assert all({"lr", "momentum", "wd", "total_steps"} <= r.keys() for r in records if "loss" in r)
    assert records[-1]["momentum"] > records[0]["momentum"]


def test_same_seed_same_losses_and_golden_trace(reference_run: Path, tmp_path: Path) -> None:
    make_run(str(tmp_path))
    assert entry.main([str(tmp_path), "pretrain"]) == 0
    assert losses(tmp_path / "pretrain") == losses(reference_run / "pretrain")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(
            json.dumps({"loss": losses(reference_run / "pretrain"), "torch": torch.__version__}, indent=1)
        )
    golden = json.loads(GOLDEN.read_text())
    assert losses(reference_run / "pretrain") == pytest.approx(golden["loss"], rel=2e-4, abs=1e-5)


def test_resume_from_checkpoint_is_exact(reference_run: Path, tmp_path: Path) -> None:
    """A run that stopped after its step-6 checkpoint continues to bitwise the same weights and losses."""
    make_run(str(tmp_path))
    stage = tmp_path / "pretrain"
    shutil.copytree(reference_run / "pretrain" / "ckpt" / "step-6", stage / "ckpt" / "step-6")
    # A half-written later step (no .metadata) must be ignored and removed.
    (stage / "ckpt" / "step-9").mkdir()
    (stage / "ckpt" / "step-9" / "__0_0.distcp").write_bytes(b"partial")
    ref_records = rundir.read_jsonl(str(reference_run / "pretrain" / "metrics.jsonl"))
    rundir.write_text_atomic(
        str(stage / "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in ref_records if r.get("step", 0) <= 6)
    )
    assert entry.main([str(tmp_path), "pretrain"]) == 0
    assert not (stage / "ckpt" / "step-9").exists()
    assert losses(stage) == losses(reference_run / "pretrain")
    ref, resumed = final_weights(reference_run / "pretrain"), final_weights(stage)
    assert ref.keys() == resumed.keys()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_settings_outside_a_runs_identity_leave_its_training_unchanged(reference_run: Path, tmp_path: Path) -> None:
    """Loader processes, log and checkpoint cadence, retention and background saves are outside a run's identity
    (`extrema.spec.identity`): the same run with each changed trains to bitwise the same weights and losses."""
    changed = {
        "data": {"num_workers": 2},
        "pretrain": {"log_every": 5, "ckpt_every": 5, "keep_last": 1, "keep_every": 10, "async_save": True},
    }
    make_run(str(tmp_path), changed)
    assert entry.main([str(tmp_path), "pretrain"]) == 0
    stage = tmp_path / "pretrain"
    ref, other = final_weights(reference_run / "pretrain"), final_weights(stage)
    assert ref.keys() == other.keys() and all(torch.equal(ref[k], other[k]) for k in ref)
    trace = losses(reference_run / "pretrain")  # every step; each log of the other is the mean since its last
    windows = [trace[0:5], trace[5:10], trace[10:12]]
    assert losses(stage) == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-6)
    assert sorted(p.name for p in (stage / "ckpt").iterdir() if p.name.startswith("step-")) == ["step-10", "step-12"]


def test_knn_stage_reads_the_pretrain_checkpoint(reference_run: Path) -> None:
    assert entry.main([str(reference_run), "knn"]) == 0
    result = json.loads((reference_run / "knn" / "result.json").read_text())
    assert 10.0 < result["knn_top1"] <= 100.0 and result["knn_top5"] >= result["knn_top1"]
    assert result["checkpoint"].endswith("step-12")
    assert result["protocol"]["k"] == 10


def test_bf16_and_infonce_and_symmetric_run(tmp_path: Path) -> None:
    make_run(
        str(tmp_path),
        {"pretrain": {"steps": 3, "precision": "bf16", "loss": "infonce", "symmetric": True, "accum_steps": 2}},
    )
    assert entry.main([str(tmp_path), "pretrain"]) == 0
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(tmp_path / "pretrain"))


@pytest.mark.parametrize("design", ["vit", "avgpool"])
def test_other_class_token_designs_train(tmp_path: Path, design: str) -> None:
    make_run(str(tmp_path), {"model": {"cls_token": design}, "pretrain": {"steps": 4}})
    assert entry.main([str(tmp_path), "pretrain"]) == 0
    assert len(losses(tmp_path / "pretrain")) == 4


def test_failed_stage_reports_failure(tmp_path: Path) -> None:
    make_run(str(tmp_path), {"data": {"dataset": "imagefolder", "root": str(tmp_path / "nowhere")}})
    assert entry.main([str(tmp_path), "pretrain"]) == 1
    status = json.loads((tmp_path / "pretrain" / "status.json").read_text())
    assert status["state"] == "failed" and "nowhere" in status["error"]
    assert entry.main([str(tmp_path / "missing"), "pretrain"]) == 2
