"""Ray backend: every stage job is a Ray job (`JobSubmissionClient`); multi-worker stages run under Ray Train.

Each job's entrypoint is this module's small driver, submitted without entrypoint resources:

    python -m launch.backends.ray.backend --address URL --job-id ID [--slot ID] [--after ID ...] \
        --cpus C --gpus G --workers W RUN_DIR STAGE

The driver
1. waits until the job whose slot it takes (`--slot`) has ended, however it ended: with `launcher.max_parallel` n,
   the i-th job of a submission waits for the (i-n)-th, so the jobs form n lanes and at most n stages run at once;
2. waits until the Ray jobs it depends on have SUCCEEDED, and exits with 5 when one of them FAILED or was
   STOPPED. So `submit` returns at once, dependency order is kept by the cluster, and a waiting job holds no CPU
   or GPU that its upstream might need (every wait points at an earlier job: no lane can deadlock);
3. runs the stage where the resources are: world size 1 -> one Ray task that reserves the stage's CPUs/GPUs and
   calls `extrema.entry.main([run_dir, stage])` in its own worker process; world size > 1 -> Ray Train's
   `TorchTrainer`, one worker per rank (gloo on CPU, nccl on GPU), each calling `extrema.entry.main` inside the
   process group Ray Train set up. A failed attempt is retried by the driver itself, up to `max_failures` times
   (Ray's own retries are off), resuming from the stage's latest checkpoint in the run store; each attempt's
   placement leaves out the nodes the stage's failures named so far (`extrema.run.bad_nodes`: the attempt before
   may have named one) by a label selector on Ray's node id, as far as enough live nodes remain (unless
   `exclude_bad_nodes` is off: `--keep-bad-nodes`).

Stopping a Ray job (`cancel`) kills its driver and with it the task or trainer the driver owns. The cluster is
`address`, else RAY_ADDRESS, never one found by guessing; `extrema-launch sweep` starts a private local head
(`private_cluster`, `launch.backends.ray.head`) when neither is set, and copies each job's log into its stage's
`logs/` before it stops that head (`keep_logs`). Nothing here imports torch or ray at module level.

`launcher.container.image` becomes every job's `image_uri` (podman on the nodes): the driver and its tasks run the
image's `python` (or `launcher.python`). Ray takes no `working_dir` beside an image, so the code snapshot goes first
on the job's PYTHONPATH instead; it must be at the same path inside the image's containers (a shared filesystem the
nodes mount into them), else the job imports the image's own copy of the project.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from extrema.run import bad_nodes, rundir
from extrema.run.contract import EXIT_UPSTREAM_FAILED, StageDir
from extrema.spec import DEFAULT_COLLECTIVE_TIMEOUT_S
from launch.backends.base import (
    Backend,
    Job,
    LauncherSettings,
    PrivateCluster,
    RecordedJob,
    State,
    Unreachable,
    code_env,
)
from launch.backends.container import image_problem, python_problem
from launch.backends.log_source import LogSource
from launch.backends.ray.head import head_gone, start_head, stop_head
from launch.backends.ray.logs import ray_label
from launch.backends.ray.settings import RaySettings
from launch.inputs.errors import UsageError
from launch.runstore import store

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient
    from rich.console import Console


RAY_STATES: dict[str, State] = {
    "PENDING": State.PENDING,
    "RUNNING": State.RUNNING,
    "SUCCEEDED": State.COMPLETED,
    "FAILED": State.FAILED,
    "STOPPED": State.CANCELLED,
}
UPSTREAM_FAILED_EXIT = EXIT_UPSTREAM_FAILED
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id
HEAD_RECORD = "ray_head"  # the manifest's record of the private head a sweep started (RayHead.record())


ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def job_client(address: str) -> JobSubmissionClient:
    """A job client of exactly this cluster. Ray's own client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the
    address it is given, which would send a sweep meant for `launcher.ray_address` to another cluster; they are
    hidden while it connects (it keeps the address it resolved)."""
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.pop(k) for k in ADDRESS_VARIABLES if k in os.environ}
    try:
        return JobSubmissionClient(address)
    finally:
        os.environ.update(saved)


def unknown_job(error: RuntimeError) -> bool:
    """Whether the job API refused a request because it knows no such job (HTTP 404), not for another reason."""
    return "status code 404" in str(error)


def submission_id(key: str) -> str:
    """A fresh Ray submission id naming the job key (resubmissions get new ids)."""
    return f"extrema-{re.sub(r'[^A-Za-z0-9_-]', '-', key)[:80]}-{uuid.uuid4().hex[:8]}"


def storage_path(log_dir: str) -> str | None:
    """Where Ray Train keeps its run files: the log directory, when Ray can write there."""
    if log_dir.startswith("file://"):
        return log_dir.removeprefix("file://")
    if "://" not in log_dir or log_dir.split("://", 1)[0] in ("s3", "gs", "gcs", "abfs", "hdfs"):
        return log_dir
    return None


def driver_command(
    job: Job,
    job_id: str,
    address: str,
    after: Sequence[str],
    python: str,
    max_failures: int,
    storage: str | None,
    slot: str | None = None,
) -> list[str]:
    """argv of the driver that waits for its slot and for `after`, then runs the job's stage on the cluster."""
    r = job.resources
    gpus = r.gpus_per_node / r.processes_per_node if r.gpus_per_node else 0
    argv = [python, "-m", "launch.backends.ray.backend", f"--address={address}", f"--job-id={job_id}"]
    argv += [f"--slot={slot}"] if slot else []
    argv += [f"--after={a}" for a in after]
    argv += [f"--cpus={r.cpus_per_task}", f"--gpus={gpus:g}", f"--workers={r.world_size}", f"--nodes={r.nodes}"]
    argv += [f"--collective-timeout={r.collective_timeout_s:g}"]
    argv += [f"--max-failures={max_failures}"]
    argv += [] if r.exclude_bad_nodes else ["--keep-bad-nodes"]
    if storage:
        argv.append(f"--storage={storage}")
    return [*argv, "--", job.run_dir, job.stage]


def job_runtime_env(base: dict[str, Any] | None, job: Job, image: str | None = None) -> dict[str, Any]:
    """The Ray runtime environment of a job: `base` with the job's network settings added to its env_vars (they
    reach the driver, the task or every Ray Train worker of the job), the submitter's EXTREMA_* settings, and the
    driver's log deduplication off (it merges the ranks' lines that differ only in numbers). With an image, the
    job runs in it (`image_uri`, which Ray takes with env_vars and config only) with the code snapshot first on
    PYTHONPATH; without one, Ray ships the snapshot as the job's working_dir."""
    env = dict(base or {})
    code: dict[str, str] = {}
    if image:
        env["image_uri"] = image
        code = code_env(job.code_dir, None) if job.code_dir else {}
    elif job.code_dir:  # Ray packs it, serves it to every node and starts the driver and workers inside it
        env["working_dir"] = job.code_dir
    extra = {**forwarded(os.environ), **job.env(), **code, "RAY_DEDUP_LOGS": "0"}
    env["env_vars"] = {**(env.get("env_vars") or {}), **extra}
    return env


def forwarded(environ: Mapping[str, str]) -> dict[str, str]:
    """The submitter's EXTREMA_* settings (lease timing and the like), which a Slurm job inherits with the rest of
    the environment and a Ray job would not; a job id is each job's own."""
    return {k: v for k, v in environ.items() if k.startswith("EXTREMA_") and k != "EXTREMA_JOB_ID"}


def placement(nodes: int, workers: int) -> str:
    """Ray Train's placement strategy: one worker per node on distinct nodes (STRICT_SPREAD) when a stage asks for
    as many nodes as workers; spread as evenly as Ray can otherwise; packed on one node for a one-node stage."""
    if nodes <= 1:
        return "PACK"
    return "STRICT_SPREAD" if nodes == workers else "SPREAD"


class RayBackend(Backend):
    """Submit stage jobs as Ray jobs; status from `get_job_status`; cancel with `stop_job`."""

    name = "ray"
    retries_in_job = True  # the driver's task is retried (max_retries), a Ray Train run by its FailureConfig

    def __init__(
        self,
        address: str | None = None,
        max_failures: int = 1,
        python: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        image: str | None = None,
        max_parallel: int | None = None,
    ) -> None:
        for what, reason in [
            ("launcher.container.image", image and image_problem(image)),
            ("launcher.python", python and python_problem(python)),
        ]:
            if reason:
                raise ValueError(f"{what}: {reason}")
        if max_parallel is not None and max_parallel < 1:
            raise ValueError("launcher.max_parallel: must be at least 1")
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.max_failures = max_failures
        self.python = python or ("python" if image else sys.executable)
        self.runtime_env = runtime_env
        self.image = image
        self.max_parallel = max_parallel
        self._client: JobSubmissionClient | None = None

    @classmethod
    def from_launcher(cls, launcher: LauncherSettings, address: str | None = None) -> RayBackend:
        """The backend of the cluster at `address`, else launcher.ray_address, else RAY_ADDRESS; with the
        launcher's image, interpreter and max_parallel."""
        s = RaySettings.of(launcher)
        image = s.container.image if s.container else None
        return cls(address=address or s.ray_address, python=s.python, image=image, max_parallel=s.max_parallel)

    @classmethod
    def recorded_address(cls, status: Mapping[str, Any], launcher: LauncherSettings) -> str | None:
        """The cluster a stage was submitted to: recorded at submission, else the launcher's, else RAY_ADDRESS."""
        recorded = status.get("cluster")
        if recorded:
            return str(recorded)
        return RaySettings.of(launcher).ray_address or os.environ.get("RAY_ADDRESS") or None

    @classmethod
    def private_cluster(cls, launcher: LauncherSettings) -> PrivateCluster | None:
        """A local Ray head, when the sweep has no cluster to go to (no launcher.ray_address, no RAY_ADDRESS)."""
        if RaySettings.of(launcher).ray_address or os.environ.get("RAY_ADDRESS"):
            return None
        return PrivateCluster("a local Ray head started for this sweep", lambda out: local_head(launcher, out))

    @classmethod
    def states(
        cls, launcher: LauncherSettings, address: str | None, manifest: Mapping[str, Any] | None, job_ids: Sequence[str]
    ) -> dict[str, State]:
        """The states of jobs at `address`; UNKNOWN for every one when it was the sweep's own head, now stopped."""
        head = (manifest or {}).get(HEAD_RECORD)
        if isinstance(head, dict) and head.get("address") == address and head_gone(head):
            return dict.fromkeys(job_ids, State.UNKNOWN)
        if not address:
            raise Unreachable("no cluster address recorded, in launcher.ray_address or RAY_ADDRESS")
        return cls(address=address).status(job_ids)

    @classmethod
    def job_logs(cls, kept: list[LogSource], job: RecordedJob) -> list[LogSource]:
        """The stage's own files (its kept job log among them), else the job's log from the cluster; workers'
        lines labelled with their node and rank."""
        job_id = job.job_id
        name = "/" + ray_log_name(job_id)
        label = ray_label(job.ranks)
        out = [replace(o, label=label) if o.name.endswith(name) else o for o in kept]
        address = cls.recorded_address(job.status, job.launcher)
        if address and not any(o.name.endswith(name) for o in kept):
            backend = cls(address)

            def read(offset: int) -> bytes:  # the job API returns the whole log each time
                return backend.logs(job_id).encode()[offset:]

            out.append(LogSource(f"ray job {job_id} at {address}", read, label))
        return out

    @property
    def client(self) -> JobSubmissionClient:
        """The job client of the cluster (connected on first use); never a cluster found by guessing."""
        if self._client is None:
            if not self.address:
                raise RuntimeError("no Ray cluster address: set launcher.ray_address or RAY_ADDRESS")
            self._client = job_client(self.address)
        return self._client

    def submit(self, jobs: Sequence[Job], log_dir: str) -> dict[str, str]:
        """Submit every job at once; each driver waits for its slot (max_parallel lanes) and its upstream jobs.
        Returns key -> submission id."""
        keys = {j.key for j in jobs}
        ids: dict[str, str] = {}
        address = self.client.get_address()
        storage = storage_path(log_dir)
        for i, j in enumerate(jobs):
            missing = [a for a in j.after if a in keys and a not in ids]
            if missing:
                raise ValueError(f"jobs: {j.key} comes before {', '.join(missing)}, which it waits for")
            after = [ids[a] for a in j.after if a in ids]
            sid = submission_id(j.key)
            slot = slot_of(list(ids.values()), i, self.max_parallel)
            argv = driver_command(j, sid, address, after, self.python, self.max_failures, storage, slot)
            self.client.submit_job(
                entrypoint=shlex.join(argv),
                submission_id=sid,
                runtime_env=job_runtime_env(self.runtime_env, j, self.image),
                metadata={"key": j.key, "run_dir": j.run_dir, "stage": j.stage},
                entrypoint_num_cpus=0,
            )
            ids[j.key] = sid
        return ids

    def status(self, job_ids: Sequence[str]) -> dict[str, State]:
        """The state of each Ray job; UNKNOWN for ids the cluster does not know. Raises when it cannot be asked."""
        out: dict[str, State] = {}
        for i in dict.fromkeys(job_ids):
            try:
                out[i] = RAY_STATES.get(str(self.client.get_job_status(i)), State.UNKNOWN)
            except RuntimeError as e:
                if not unknown_job(e):
                    raise
                out[i] = State.UNKNOWN
        return out

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Stop the Ray jobs; jobs that already ended or are unknown are left as they are."""
        for i in dict.fromkeys(job_ids):
            try:
                self.client.stop_job(i)
            except RuntimeError as e:
                if not unknown_job(e):
                    raise

    def logs(self, job_id: str) -> str:
        """The driver's log of a Ray job (the stage's output included)."""
        return str(self.client.get_job_logs(job_id))

    def keep_logs(self, ids: Mapping[str, str], jobs: Mapping[str, Job]) -> None:
        """Copy each job's log into its stage's `logs/` (the private head that keeps them is about to stop)."""
        for key, job_id in ids.items():
            with contextlib.suppress(Exception):
                logs = StageDir.of(jobs[key].run_dir, jobs[key].stage).logs
                rundir.write_text_atomic(rundir.join(logs, ray_log_name(job_id)), self.logs(job_id))


def ray_log_name(job_id: str) -> str:
    """The name under which a Ray job's log is kept in the stage's `logs/` directory."""
    return f"ray-{store.safe_name(job_id, 'job id')}.log"


@contextlib.contextmanager
def local_head(launcher: LauncherSettings, out: Console) -> Iterator[tuple[LauncherSettings, dict[str, Any]]]:
    """A private local Ray head for one sweep: the launcher pointing at it and its manifest record; stopped on
    exit."""
    try:
        out.print("no Ray cluster address (launcher.ray_address, RAY_ADDRESS): starting a local Ray head ...")
        head = start_head()
    except ImportError as e:
        raise UsageError(f"backend 'ray' is not available here: {e}") from None
    out.print(f"local Ray head at {head.address} (pid {head.pid}); it stops when this sweep ends")
    try:
        yield launcher.model_copy(update={"ray_address": head.address}), {HEAD_RECORD: head.record()}
    finally:
        stop_head(head)


def run_entry(run_dir: str, stage: str, job_id: str) -> int:
    """Run one stage in this process with `extrema.entry`; raise on a non-zero exit so that Ray retries it."""
    os.environ["EXTREMA_JOB_ID"] = job_id
    from extrema import entry

    code = entry.main([run_dir, stage])
    if code:
        raise RuntimeError(f"extrema.entry {run_dir} {stage} exited with {code}")
    return code


def train_worker(config: dict[str, str]) -> None:
    """Ray Train loop of one rank: the stage runs inside the process group Ray Train set up."""
    run_entry(config["run_dir"], config["stage"], config["job_id"])


def slot_of(earlier: Sequence[str], index: int, max_parallel: int | None) -> str | None:
    """The job whose end the index-th job of a submission waits for: the (index - max_parallel)-th, so that the
    jobs form max_parallel lanes, one stage running in each; None when unbounded or among the first n."""
    if max_parallel is None or index < max_parallel:
        return None
    return earlier[index - max_parallel]


def wait_ended(address: str, job_id: str | None, poll_s: float) -> None:
    """Block until a job has ended, however it ended (or the cluster no longer knows it)."""
    if not job_id:
        return
    client = job_client(address)
    while True:
        try:
            if str(client.get_job_status(job_id)) in ("SUCCEEDED", "FAILED", "STOPPED"):
                return
        except RuntimeError as e:
            if unknown_job(e):
                return
            raise
        time.sleep(poll_s)


def wait_for(address: str, upstream: Sequence[str], poll_s: float) -> str | None:
    """Block until every upstream job has ended; the first one that did not succeed, else None."""
    if not upstream:
        return None
    client = job_client(address)
    pending = list(upstream)
    while pending:
        for i in list(pending):
            state = str(client.get_job_status(i))
            if state == "SUCCEEDED":
                pending.remove(i)
            elif state in ("FAILED", "STOPPED"):
                return f"{i} {state}"
        if pending:
            time.sleep(poll_s)
    return None


def alive_nodes() -> dict[str, list[str]]:
    """The cluster's live nodes: host name -> Ray node ids."""
    import ray

    out: dict[str, list[str]] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            out.setdefault(str(node.get("NodeManagerHostname")), []).append(str(node.get("NodeID")))
    return out


def avoiding(run_dir: str, stage: str, nodes: int) -> dict[str, str]:
    """The label selector that keeps the stage's workers off the nodes its failures named (`bad_nodes.avoided`:
    as far as `nodes` live nodes remain; one line says which it keeps); {} when there are none."""
    named = bad_nodes.of_stage(StageDir.of(run_dir, stage).url)
    if not named:
        return {}
    hosts = alive_nodes()
    excluded, kept = bad_nodes.avoided(named, list(hosts), nodes)
    if kept:
        print(bad_nodes.kept_line(f"launch.backends.ray: {stage}", kept, list(hosts), nodes), file=sys.stderr)
    ids = [i for host in excluded for i in hosts[host]]
    if not ids:
        return {}
    print(f"launch.backends.ray: {stage} avoids bad node(s) {', '.join(excluded)}", file=sys.stderr, flush=True)
    return {NODE_ID_LABEL: f"!in({','.join(ids)})"}


def run_stage(args: argparse.Namespace, job_id: str) -> None:
    """Run the stage on the cluster, retried up to `max_failures` times by this driver: each attempt places the
    stage afresh, off the nodes its failures named so far (a hung rank's, a straggler's, a lost one's)."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    for attempt in range(args.max_failures + 1):
        selector = {} if args.keep_bad_nodes else avoiding(args.run_dir, args.stage, args.nodes)
        try:
            run_attempt(args, job_id, selector, attempt)
            return
        except Exception as e:  # the attempt's task or worker group failed, however (Ray's errors, the stage's)
            if attempt >= args.max_failures:
                raise
            print(
                f"launch.backends.ray: {args.stage}: attempt {attempt + 1} of {args.max_failures + 1} failed "
                f"({type(e).__name__}); the next resumes from the last checkpoint",
                file=sys.stderr,
                flush=True,
            )


def run_attempt(args: argparse.Namespace, job_id: str, selector: dict[str, str], attempt: int) -> None:
    """One attempt: a resource-reserving task for one rank, a TorchTrainer for several; never retried by Ray."""
    import ray

    placed: dict[str, Any] = {"label_selector": selector} if selector else {}  # Ray Train v2's ScalingConfig
    if args.workers == 1:
        task = ray.remote(num_cpus=args.cpus, num_gpus=args.gpus, max_retries=0, max_calls=1)(run_entry)
        task = task.options(label_selector=selector) if selector else task
        ray.get(task.remote(args.run_dir, args.stage, job_id))
        return
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": float(args.cpus), **({"GPU": args.gpus} if args.gpus else {})}
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", job_id) + (f"-attempt{attempt + 1}" if attempt else "")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run_dir": args.run_dir, "stage": args.stage, "job_id": job_id},
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            use_gpu=args.gpus > 0,
            resources_per_worker=resources,
            placement_strategy=placement(args.nodes, args.workers),
            **placed,
        ),
        torch_config=TorchConfig(
            backend="nccl" if args.gpus else "gloo", timeout_s=max(1, round(args.collective_timeout))
        ),
        run_config=RunConfig(name=name, storage_path=args.storage, failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()


def main(argv: list[str] | None = None) -> int:
    """Driver entry point of a Ray job; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m launch.backends.ray.backend", description=__doc__)
    parser.add_argument("--address", required=True, help="dashboard URL of the cluster (to watch upstream jobs)")
    parser.add_argument("--job-id", default="ray", help="this job's submission id (recorded in status.json)")
    parser.add_argument("--slot", default=None, help="submission id that must end first (max_parallel lanes)")
    parser.add_argument("--after", action="append", default=[], help="submission id that must succeed first")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs per rank")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per rank")
    parser.add_argument("--workers", type=int, default=1, help="ranks (world size)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the ranks are spread over")
    parser.add_argument(
        "--collective-timeout", type=float, default=DEFAULT_COLLECTIVE_TIMEOUT_S, help="seconds per collective"
    )
    parser.add_argument("--max-failures", type=int, default=1, help="retries after a failure")
    parser.add_argument("--storage", default=None, help="Ray Train storage path")
    parser.add_argument("--keep-bad-nodes", action="store_true", help="place workers on the nodes failures named too")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between upstream status checks")
    parser.add_argument("run_dir")
    parser.add_argument("stage")
    args = parser.parse_args(argv)
    wait_ended(args.address, args.slot, args.poll)
    failed = wait_for(args.address, args.after, args.poll)
    if failed:
        print(f"launch.backends.ray: not running {args.run_dir} {args.stage}: upstream job {failed}", file=sys.stderr)
        return UPSTREAM_FAILED_EXIT
    print(
        f"launch.backends.ray: running {shlex.join([sys.executable, '-m', 'extrema.entry', args.run_dir, args.stage])}"
    )
    try:
        run_stage(args, args.job_id)
    except Exception as e:
        print(f"launch.backends.ray: {args.stage} of {args.run_dir} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
