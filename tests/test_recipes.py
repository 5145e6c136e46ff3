"""Every sweep file in jobs/ as it will run, scaled down in size only (tests/recipes.py): its own stages and settings
(FSDP, the kNN monitor at start, between checkpoints and at the end, background checkpoint saves) at two processes
on the local backend; the ViT-B recipe also with DDP, killed mid-run and resumed to the same bits, compiled block
by block, and across two nodes of a real Slurm cluster.

Before the first of these existed, any pretraining of two or more processes with the default `strategy: fsdp` and
`knn_monitor: true` failed at its first step (the monitor ran the target encoder before the FSDP root).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from extrema.run import rundir
from extrema.spec import SINGLE_PROCESS_STAGES
from extrema.train import ckpt
from launch.runstore import store
from launch.sweepfile.expand import load_runs
from tests.cluster_sweeps import cli
from tests.clusters.slurm_nodes import SlurmNodes
from tests.recipes import RECIPES, STEPS, scaled_down
from tests.stage_runs import checkpointed_model, shard_ranks

# bench/gpu_smoke.sh runs these on GPUs: one rank per GPU, as many ranks as it has GPUs (two at most).
RANKS = int(os.environ.get("EXTREMA_RECIPE_RANKS", "2"))
GPUS = int(os.environ.get("EXTREMA_RECIPE_GPUS", "0"))
TWO_PROCESSES = {
    "backend": "local",
    "max_parallel": 1,
    "resources": {"processes_per_node": RANKS, "gpus_per_node": GPUS * RANKS, "cpus_per_task": 1},
}
VIT_BASE = next(r for r in RECIPES if r.name == "vit_base_in1k.yaml")
needs_fashion_mnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(), reason="apt-get install dataset-fashion-mnist"
)


def recipe_doc(tmp: Path, recipe: Path, launcher: dict[str, Any], write: bool = True) -> dict[str, Any]:
    """The scaled-down recipe as a sweep document rooted under tmp, single-process stages given one process."""
    doc = scaled_down(recipe, tmp.parent / "data", write)
    launcher = copy.deepcopy(launcher)
    for stage in SINGLE_PROCESS_STAGES.intersection(doc["base"]["stages"]):  # as the user must say (sweep refuses)
        launcher.setdefault("stages", {})[stage] = {"nodes": 1, "processes_per_node": 1, "gpus_per_node": GPUS}
    doc.update(root=str(tmp / "runs"), launcher=launcher)
    return doc


def recipe_sweep(tmp: Path, recipe: Path, launcher: dict[str, Any], **base: dict[str, Any]) -> Path:
    """Write the scaled-down recipe (with `base` sections merged in) as a sweep file rooted under tmp."""
    doc = recipe_doc(tmp, recipe, launcher)
    for section, values in base.items():
        doc["base"].setdefault(section, {}).update(values)
    path = tmp / recipe.name
    path.write_text(yaml.safe_dump(doc))
    return path


def stage_records(run: Path) -> dict[str, dict[str, Any]]:
    """stage -> status record, for every stage directory of a run."""
    return {p.name: dict(store.read_status(str(p))) for p in run.iterdir() if (p / "spec.json").exists()}


def assert_ran_as_the_recipe_says(path: Path) -> Path:
    """Every stage completed at world size 2; the pretraining monitored and saved as its recipe says. The run."""
    doc = yaml.safe_load(path.read_text())
    run = only_run(path)
    records = stage_records(run)
    assert set(records) == set(doc["base"]["stages"]), records
    failed = {s: r.get("error") for s, r in records.items() if r.get("state") != "completed"}
    assert not failed, failed
    for stage in records:
        prov = json.loads((run / stage / "provenance.json").read_text())
        ranks = 1 if stage in SINGLE_PROCESS_STAGES else RANKS
        assert prov["world_size"] == ranks, (stage, prov["world_size"])
    p = doc["base"]["pretrain"]
    result = json.loads((run / "pretrain" / "result.json").read_text())
    assert result["steps"] == STEPS and result["world_size"] == RANKS
    saved = ckpt.list_steps(str(run / "pretrain" / "ckpt"))
    assert {2, 4, 6} <= {s for s, complete in saved.items() if complete}, saved
    if p.get("knn_monitor", True):
        evaluated = [r["step"] for r in rundir.read_jsonl(str(run / "pretrain" / "metrics.jsonl")) if "knn_top1" in r]
        periodic = bool(p.get("knn_every_epochs"))  # scaled to every second step where the recipe sets it
        assert evaluated[0] == 0 and evaluated[-1] == STEPS and len(evaluated) >= (3 if periodic else 2), evaluated
        for key in ("knn_top1", "knn_init_top1", "knn_pixels_top1"):
            assert 0 <= result[key] <= 100, (key, result)
    return run


def code_paths(doc: Any) -> Any:
    """A sweep document with every number left out: two recipes with equal results here differ only in numbers
    (masking ratio and count, seeds, schedules), which take the same code paths once scaled down."""
    if isinstance(doc, dict):
        return {k: code_paths(v) for k, v in doc.items() if k != "name"}
    if isinstance(doc, list):
        return [code_paths(v) for v in doc]
    return None if isinstance(doc, int | float) and not isinstance(doc, bool) else doc


def first_experiment(recipe: Path) -> str:
    """The scaled-down recipe's first run as the launcher resolves it, without its numbers, as canonical JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(recipe_doc(Path(tmp), recipe, TWO_PROCESSES, write=False)))
        experiment = load_runs(path)[1][0].experiment
    return json.dumps(code_paths(experiment.model_dump(mode="json")), sort_keys=True)


def local_recipe_params() -> list[Any]:
    """Every recipe but the ViT-B one (tested below with its variants), less those that take another's code paths
    (the ViT-S recipe is the ViT-B one at another size; the Fashion-MNIST pretraining recipes differ in masking and
    seeds); Fashion-MNIST recipes need the data."""
    params = []
    seen = {first_experiment(VIT_BASE)}
    for recipe in RECIPES:
        key = first_experiment(recipe)
        if key in seen:
            continue
        seen.add(key)
        marks = [needs_fashion_mnist] if "fashion_mnist" in key else []
        params.append(pytest.param(recipe, id=recipe.stem, marks=marks))
    return params


@pytest.mark.parametrize("recipe", local_recipe_params())
def test_each_recipe_runs_with_its_own_settings_at_two_processes(recipe: Path, tmp_path: Path) -> None:
    path = recipe_sweep(tmp_path, recipe, TWO_PROCESSES)
    code, out = cli("sweep", str(path))
    assert code == 0, out[-3000:]
    assert_ran_as_the_recipe_says(path)


@pytest.fixture(scope="module")
def vit_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ViT-B recipe scaled down, run through at two processes (FSDP, monitor, background saves): the run."""
    tmp = tmp_path_factory.mktemp("vit_base")
    path = recipe_sweep(tmp, VIT_BASE, TWO_PROCESSES)
    code, out = cli("sweep", str(path))
    assert code == 0, out[-3000:]
    return assert_ran_as_the_recipe_says(path)


def test_the_vit_base_recipe_runs_every_stage_at_two_processes_with_fsdp(vit_base: Path) -> None:
    spec = json.loads((vit_base / "pretrain" / "spec.json").read_text())["experiment"]["pretrain"]
    assert spec["strategy"] == "fsdp" and spec["knn_monitor"] and spec["async_save"]
    assert shard_ranks(vit_base / "pretrain" / "ckpt" / f"step-{STEPS}") == {0, 1}  # sharded: one file per rank


def test_the_vit_base_recipe_pretrains_with_ddp_and_gradient_accumulation(tmp_path: Path) -> None:
    path = pretrain_only(tmp_path, STEPS)
    doc = yaml.safe_load(path.read_text())
    doc["base"]["pretrain"].update(strategy="ddp", accum_steps=2)
    path.write_text(yaml.safe_dump(doc))
    code, out = cli("sweep", str(path))
    assert code == 0, out[-3000:]
    assert_ran_as_the_recipe_says(path)


def rank_pids(run: Path) -> list[int]:
    """PIDs of the processes running a stage of this run (`extrema.entry` on its directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"extrema.entry" in cmd and str(run).encode() in cmd and b"torch.distributed.run" not in cmd[1:3]:
            pids.append(int(entry.name))
    return pids


def pretrain_only(tmp: Path, steps: int) -> Path:
    """The ViT-B recipe's pretraining alone, `steps` long, as a sweep file under tmp."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = recipe_sweep(tmp, VIT_BASE, TWO_PROCESSES, pretrain={"steps": steps})
    doc = yaml.safe_load(path.read_text())
    doc["base"]["stages"] = ["pretrain"]
    path.write_text(yaml.safe_dump(doc))
    return path


def only_run(path: Path) -> Path:
    """The run directory of a one-run sweep file."""
    doc = yaml.safe_load(path.read_text())
    [run] = [p for p in (Path(doc["root"]) / doc["name"]).iterdir() if (p / "pretrain").is_dir()]
    return run


def test_the_vit_base_recipe_killed_mid_run_resumes_to_the_same_bits(vit_base: Path, tmp_path: Path) -> None:
    # Killed past its first checkpoint (step 2 of 6), resumed, and compared with the module's straight run of the
    # same pretraining (`vit_base`: the same settings and data; its later stages run after the pretraining ends).
    path = pretrain_only(tmp_path, STEPS)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "sweep", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    sweep_dir = tmp_path / "runs" / yaml.safe_load(path.read_text())["name"]
    deadline = time.monotonic() + 240
    killed: list[int] = []
    while time.monotonic() < deadline and not killed and sweep.poll() is None:
        ckpts = list(sweep_dir.glob("*/pretrain/ckpt")) if sweep_dir.exists() else []
        if ckpts and any(complete for s, complete in ckpt.list_steps(str(ckpts[0])).items() if s >= 2):
            killed = rank_pids(ckpts[0].parent.parent)
            if killed:
                os.kill(max(killed), signal.SIGKILL)  # one rank, as a node's OOM killer would
        time.sleep(0.1)
    out, _ = sweep.communicate(timeout=240)
    assert killed, f"no rank seen past a checkpoint: {out[-3000:]}"
    run = only_run(path)
    assert stage_records(run)["pretrain"]["state"] == "failed", out[-3000:]
    resumed_from = ckpt.latest_step(str(run / "pretrain" / "ckpt"))
    assert resumed_from is not None and 2 <= resumed_from < STEPS, resumed_from  # steps are left to train
    code, out = cli("sweep", str(path), "--retry-failed")
    assert code == 0, out[-3000:]
    record = stage_records(run)["pretrain"]
    assert record["attempts"] == 2 and record["state"] == "completed", record
    a, b = checkpointed_model(run / "pretrain"), checkpointed_model(vit_base / "pretrain")
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not differ, differ[:5]


def test_the_vit_base_recipe_compiled_block_by_block_trains_as_eager(
    vit_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo captures each block (the graphs FSDP2's hooks must not break); aot_eager instead of Inductor keeps the
    # suite's compile time to seconds on two cores: the captured graphs are the same.
    backend = os.environ.get("EXTREMA_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("EXTREMA_COMPILE_BACKEND", backend)
    path = pretrain_only(tmp_path, STEPS)
    doc = yaml.safe_load(path.read_text())
    doc["base"]["pretrain"]["compile"] = True
    path.write_text(yaml.safe_dump(doc))
    code, out = cli("sweep", str(path))
    assert code == 0, out[-3000:]
    run = only_run(path)

    def losses(r: Path) -> list[float]:
        return [m["loss"] for m in rundir.read_jsonl(str(r / "pretrain" / "metrics.jsonl")) if "loss" in m]

    rel = 1e-4 if backend == "aot_eager" else 2e-2  # Inductor fuses and reorders: bf16 rounding differs
    assert losses(run) == pytest.approx(losses(vit_base), rel=rel, abs=1e-6)


@pytest.mark.slurm
def test_the_vit_base_recipe_runs_across_two_slurm_nodes(
    slurm_two_nodes: SlurmNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_CONF", str(slurm_two_nodes.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    resources = {
        "nodes": 2,
        "processes_per_node": 1,
        "cpus_per_task": 1,
        "time_min": 20,
        "network_interface": "eth0",
        "collective_timeout_s": 30,
        "partition": slurm_two_nodes.partition,
    }
    path = recipe_sweep(tmp_path, VIT_BASE, {"backend": "slurm", "resources": resources})
    code, out = cli("sweep", str(path))
    assert code == 0, out[-3000:]
    doc = yaml.safe_load(path.read_text())
    sweep_dir = tmp_path / "runs" / doc["name"]
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        runs = [p for p in sweep_dir.iterdir() if (p / "pretrain").is_dir()]
        states = {s: r.get("state") for s, r in stage_records(runs[0]).items()} if runs else {}
        if states and all(v in ("completed", "failed", "cancelled") for v in states.values()):
            break
        time.sleep(1)
    run = assert_ran_as_the_recipe_says(path)
    prov = json.loads((run / "pretrain" / "provenance.json").read_text())
    assert prov["hosts"] == ["n1", "n2"], prov["hosts"]
