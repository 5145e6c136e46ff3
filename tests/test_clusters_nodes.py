"""The two-node clusters really span two hosts: a gloo all_reduce across the Slurm nodes, and a STRICT_SPREAD
placement group across the Ray nodes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.clusters.ray_nodes import RayNodes
from tests.clusters.slurm_nodes import SlurmNodes

ALL_REDUCE = """\
import json, os, socket, subprocess, sys
from datetime import timedelta

import torch
import torch.distributed as dist

nodes = subprocess.run(
    ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
).stdout.split()
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
os.environ.update(
    MASTER_ADDR=socket.gethostbyname(nodes[0]),  # through the node's hosts file: an address the other node reaches
    MASTER_PORT=str(20000 + int(os.environ["SLURM_JOB_ID"]) % 10000),
    GLOO_SOCKET_IFNAME="eth0",
)
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
dist.destroy_process_group()
out = {"rank": rank, "host": socket.gethostname(), "sum": total.item(), "master": os.environ["MASTER_ADDR"]}
open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w").write(json.dumps(out))
"""

SPREAD = """\
import json, socket

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init()
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=60)


@ray.remote(num_cpus=1)
def host():
    return socket.gethostname()


refs = [
    host.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
    for i in range(2)
]
print("HOSTS=" + json.dumps(sorted(ray.get(refs, timeout=60))))
"""


def wait_job(c: SlurmNodes, job_id: str, timeout_s: float) -> str:
    """Poll slurmctld until the job has left PENDING/RUNNING/COMPLETING; its last state."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = c.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        state = next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "UNKNOWN")
        if state not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


@pytest.mark.slurm
def test_gloo_all_reduce_spans_both_slurm_nodes(slurm_two_nodes: SlurmNodes, tmp_path: Path) -> None:
    c = slurm_two_nodes
    assert c.node_names == ["n1", "n2"]
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE)
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/sh\nexec srun {sys.executable} {tmp_path / 'all_reduce.py'} {tmp_path}\n")
    out = tmp_path / "job.out"
    sbatch = c.run("sbatch", "--parsable", "-N2", "--ntasks-per-node=1", "--time=3", f"--output={out}", str(script))
    job_id = sbatch.stdout.strip()
    state = wait_job(c, job_id, timeout_s=180)
    log = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]
    assert sorted(r["host"] for r in ranks) == ["n1", "n2"]
    assert {r["master"] for r in ranks} == {c.net.nodes["n1"].address}


@pytest.mark.ray
def test_strict_spread_tasks_run_on_both_ray_nodes(
    ray_two_nodes: RayNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    # Ray's clients prefer RAY_ADDRESS to their address argument, and `ray_cluster` may have set it to its own head.
    monkeypatch.setenv("RAY_ADDRESS", ray_two_nodes.address)
    script = tmp_path / "spread.py"
    script.write_text(SPREAD)
    client = JobSubmissionClient(ray_two_nodes.address)
    job = client.submit_job(entrypoint=f"{sys.executable} {script}")
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    hosts = next(line for line in logs.splitlines() if line.startswith("HOSTS="))
    assert json.loads(hosts.removeprefix("HOSTS=")) == ["n1", "n2"]
