"""The tiny FSDP pretraining sweep the multi-node tests run (`test_multinode`, `test_bad_nodes`, `test_four_nodes`),
and its reference: the same sweep on the local backend, one node, two processes, run once per test session
(fixture `one_node_two_processes`, loaded from `tests/conftest.py`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster_sweeps import cli
from tests.clusters.slurm_nodes import SlurmNodes
from tests.stage_runs import TINY_EXPERIMENT, merge

STEPS = 30
COLLECTIVE_TIMEOUT_S = 8
EXPERIMENT = merge(
    TINY_EXPERIMENT,
    {
        "model": {"drop_path_rate": 0.0},
        "stages": ["pretrain"],
        "pretrain": {"steps": STEPS, "ckpt_every": 5, "keep_last": 10, "strategy": "fsdp"},
    },
)
TWO_NODES = {
    "nodes": 2,
    "processes_per_node": 1,
    "cpus_per_task": 1,
    "time_min": 20,
    "network_interface": "eth0",
    "collective_timeout_s": COLLECTIVE_TIMEOUT_S,
}


def sweep_file(path: Path, root: Path, launcher: dict[str, Any], experiment: dict[str, Any] | None = None) -> Path:
    """A one-run sweep of the tiny FSDP pretrain (or `experiment`) with the given launcher section."""
    doc = {"name": "mn", "root": str(root), "base": experiment or EXPERIMENT, "launcher": launcher}
    path.write_text(yaml.safe_dump(doc))
    return path


def slurm_sweep(
    tmp_path: Path,
    cluster: SlurmNodes,
    resources: dict[str, Any] = TWO_NODES,
    experiment: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Submit the one-run sweep (or `experiment`) with these resources to the cluster's partition through the CLI;
    (sweep file, run directory)."""
    launcher = {"backend": "slurm", "resources": {**resources, "partition": cluster.partition}}
    path = sweep_file(tmp_path / "mn.yaml", tmp_path / "runs", launcher, experiment)
    code, out = cli("sweep", str(path))
    assert code == 0, out
    return path, only_run(tmp_path / "runs")


def only_run(root: Path) -> Path:
    """The run directory of the sweep's single run."""
    runs = [p for p in (root / "mn").iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{10,}", p.name)]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="session")
def one_node_two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same sweep on the local backend, one node, two processes (torchrun)."""
    tmp = tmp_path_factory.mktemp("reference")
    launcher = {"backend": "local", "resources": {"processes_per_node": 2, "cpus_per_task": 1}}
    path = sweep_file(tmp / "ref.yaml", tmp / "runs", launcher)
    code, out = cli("sweep", str(path))
    assert code == 0, out
    run = only_run(tmp / "runs")
    assert json.loads((run / "pretrain" / "provenance.json").read_text())["world_size"] == 2
    return run
