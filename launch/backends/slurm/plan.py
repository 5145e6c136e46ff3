"""Slurm planning, pure: what goes into each sbatch script and how jobs become arrays. Imports no submitit.

Jobs are grouped by dependency level, sweep, stage, resources and the nodes they avoid (`--exclude`: the nodes the
stage's failures named, `extrema.run.bad_nodes`); each group goes out as job arrays of at most
`MaxArraySize` tasks, one `sbatch` per array. A downstream array whose task i waits for exactly task i of one
upstream array uses `aftercorr:<array>`, so a failed run holds back only its own downstream task; any other
dependency is `afterok` on the per-task ids `<array>_<i>` (or on a whole array when every task of it is awaited).

Every value that reaches the sbatch script (partition, account, qos, constraint, extra options, job names, the
code snapshot's path) is checked against a strict character set first; anything else is a ValueError naming the
field. The resource rules are launch.backends.resources' (SBATCH_FIELDS, SBATCH_OPTION, SBATCH_VALUE), which
already refused them at sweep validation; they are applied again here for specs built any other way.

Every task gets its `cpus_per_task` from srun's own `--cpus-per-task` as well as from `#SBATCH --cpus-per-task`:
Slurm 22.05 to 23.02 srun reads neither SLURM_CPUS_PER_TASK nor (before 23.11) SRUN_CPUS_PER_TASK, so a step
launched without the argument lays out (and binds) one CPU per task whatever the job was given.

A task runs in a container when the launcher names one (`launcher.container`): with pyxis, srun itself starts it
(`--container-image`, `--container-mounts` on the srun line, never `#SBATCH`: the batch script, with its setup lines,
stays on the host); with apptainer the task's command is `apptainer exec [--nv] --bind ... IMAGE python`. Either way
the sweep's log folder (submitit's pickles, the code snapshot) and a run store on a local path are mounted at the
same path inside (`container_mounts`), and the script states every mount.

`launch.backends.slurm.backend` submits these plans through submitit; `planned_arrays` and `sbatch_parameters` show them
without a cluster.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from launch.backends.base import Job, code_env
from launch.backends.container import ContainerSpec, image_problem, mount_pair, python_problem
from launch.backends.resources import SBATCH_FIELDS, ResourcesSpec, sbatch_option_problem, sbatch_text_problem
from launch.runstore import roots

JOB_ID = re.compile(r"\d+(?:_\d+)?")
JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,200}")
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


def checked(value: str, pattern: re.Pattern[str], field: str, allowed: str) -> str:
    """The value when it fully matches the pattern and has no '..'; else ValueError naming the field."""
    if not pattern.fullmatch(value) or ".." in value:
        raise ValueError(f"{field}: {value!r} cannot go into an sbatch script; allowed: {allowed}")
    return value


def task_cpus(r: ResourcesSpec) -> int:
    """cpus_per_task, which goes onto the srun line: a whole number of at least 1, else ValueError."""
    n = r.cpus_per_task
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"resources.cpus_per_task: {n!r} cannot go into an sbatch script; allowed: whole numbers >= 1")
    return n


def validate_resources(r: ResourcesSpec) -> None:
    """Refuse any resource value that could change the sbatch script beyond its own option
    (launch.backends.resources' rules)."""
    task_cpus(r)
    for field, rule in SBATCH_FIELDS.items():
        value = getattr(r, field)
        reason = None if value is None else sbatch_text_problem(value, rule)
        if reason:
            raise ValueError(f"resources.{field}: {reason}")
    for key, value in r.sbatch_extra.items():
        reason = sbatch_option_problem(key, value)
        if reason:
            raise ValueError(f"resources.sbatch_extra: {reason}")


def job_name(job: Job) -> str:
    """Slurm job name `<sweep>.<stage>`, from the run directory `<root>/<sweep>/<run_id>`."""
    sweep = job.run_dir.rstrip("/").split("/")[-2] if job.run_dir.count("/") else "extrema"
    return checked(f"{sweep}.{job.stage}", JOB_NAME, "job name", "letters, digits and _ . + - (no whitespace)")


def log_folder(log_dir: str) -> Path:
    """The local (shared) directory for sbatch scripts, pickles and logs; `file://` URLs allowed."""
    if not roots.is_local(log_dir):  # the rule launcher.slurm_folder is validated with
        raise ValueError(f"log_dir: Slurm needs a path on a shared filesystem, not {log_dir!r}")
    path = log_dir.split("://", 1)[-1]
    if any(ch in path for ch in "\n\r\0"):
        raise ValueError(f"log_dir: {log_dir!r} contains a control character")
    return Path(path)


def signal_delay_s(time_min: int) -> int:
    """Seconds before the time limit at which Slurm sends USR2 (checkpoint and requeue)."""
    return max(10, min(90, time_min * 6))


def sbatch_mem(mem_gb: float) -> str:
    """Memory as sbatch's --mem takes it: whole gigabytes as `<n>GB`, else megabytes (as submitit writes it)."""
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def sbatch_parameters(
    r: ResourcesSpec,
    name: str,
    dependency: str | None,
    array_parallelism: int,
    setup: Sequence[str] = (),
    srun_args: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """The parameters of one array's sbatch script, named as submitit's SlurmExecutor takes them (values already
    validated): `SlurmExecutor.update_parameters(**p)` submits with them, `slurm.sbatch_script` shows the script.
    srun gets `--cpus-per-task` itself (`srun_args`): it inherits it from sbatch only on Slurm < 22.05 or >= 23.11;
    `srun_args` adds the container's (`pyxis_args`)."""
    cpus = task_cpus(r)
    params: dict[str, Any] = {
        "job_name": name,
        "nodes": r.nodes,
        "ntasks_per_node": r.processes_per_node,
        "cpus_per_task": cpus,
        "srun_args": [f"--cpus-per-task={cpus}", *srun_args],
        "time": r.time_min,
        "signal_delay_s": signal_delay_s(r.time_min),
        "array_parallelism": array_parallelism,
    }
    optional = {
        "gpus_per_node": r.gpus_per_node or None,
        "mem": None if r.mem_gb is None else sbatch_mem(r.mem_gb),
        "partition": r.partition,
        "account": r.account,
        "qos": r.qos,
        "constraint": r.constraint,
        "dependency": dependency,
        "exclude": ",".join(checked_nodes(exclude)) or None,
        "additional_parameters": {k: (v if v else True) for k, v in r.sbatch_extra.items()} or None,
        "setup": list(setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def submitit_command(python: str, folder: Path) -> str:
    """The command every task of an sbatch script runs (under srun): submitit unpickles the task's StageCall from
    `folder` and calls it. `python` is already shell-quoted."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def dependency_levels(jobs: Sequence[Job]) -> dict[str, int]:
    """Longest chain of in-call dependencies above each job; jobs must come after the jobs they wait for."""
    keys = {j.key for j in jobs}
    if len(keys) != len(jobs):
        raise ValueError("jobs: duplicate job keys")
    level: dict[str, int] = {}
    for j in jobs:
        ups = [a for a in j.after if a in keys]
        for a in ups:
            if a not in level:
                raise ValueError(f"jobs: {j.key} comes before {a}, which it waits for")
        level[j.key] = 1 + max((level[a] for a in ups), default=-1)
    return level


def checked_nodes(nodes: Sequence[str]) -> list[str]:
    """Node names for `--exclude`, each checked to go into an sbatch script (ValueError naming it otherwise)."""
    return [checked(n, NODE_NAME, "excluded node", "letters, digits and _ . -") for n in nodes]


def array_groups(jobs: Sequence[Job], exclude: Mapping[str, Sequence[str]] | None = None) -> list[list[Job]]:
    """Jobs grouped by (level, job name, resources, nodes excluded: job key -> nodes), levels in order, groups in
    order of first appearance: the tasks of one array share one script, and so one exclusion."""
    level = dependency_levels(jobs)
    avoid = exclude or {}
    groups: dict[tuple[int, str, str, tuple[str, ...]], list[Job]] = {}
    for j in jobs:
        key = (level[j.key], job_name(j), j.resources.model_dump_json(), tuple(sorted(avoid.get(j.key, ()))))
        groups.setdefault(key, []).append(j)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]


def task_sort_key(job_id: str) -> tuple[int, int]:
    """Numeric order of `<id>` and `<array>_<i>` ids."""
    base, _, index = job_id.partition("_")
    return int(base), int(index) if index else -1


def afterok(job_ids: set[str], array_sizes: Mapping[str, int]) -> str | None:
    """`afterok:` on the given ids, naming a whole array when every one of its tasks is awaited."""
    if not job_ids:
        return None
    tasks: dict[str, set[int]] = {}
    for i in job_ids:
        base, _, index = i.partition("_")
        if index:
            tasks.setdefault(base, set()).add(int(index))
    whole = {b for b, idx in tasks.items() if idx == set(range(array_sizes.get(b, -1)))}
    out = {i for i in job_ids if i.partition("_")[0] not in whole} | whole
    return "afterok:" + ":".join(sorted(out, key=task_sort_key))


def plan_arrays(
    group: Sequence[Job], ids: Mapping[str, str], array_sizes: Mapping[str, int], max_size: int
) -> list[tuple[list[Job], str | None]]:
    """Split one group into arrays with their dependency: aftercorr where task i waits for exactly task i of one
    upstream array, else afterok, in chunks of at most max_size."""
    corr: dict[str, dict[int, Job]] = {}
    for j in group:
        ups = [ids[a] for a in j.after if a in ids]
        if len(ups) == 1 and "_" in ups[0]:
            base, _, index = ups[0].partition("_")
            corr.setdefault(base, {}).setdefault(int(index), j)
    plans: list[tuple[list[Job], str | None]] = []
    placed: set[str] = set()
    for base, by_index in corr.items():
        if len(by_index) > 1 and sorted(by_index) == list(range(len(by_index))) and len(by_index) <= max_size:
            chunk = [by_index[i] for i in range(len(by_index))]
            plans.append((chunk, f"aftercorr:{base}"))
            placed.update(j.key for j in chunk)
    rest = [j for j in group if j.key not in placed]
    for start in range(0, len(rest), max_size):
        chunk = rest[start : start + max_size]
        awaited = {ids[a] for j in chunk for a in j.after if a in ids}
        plans.append((chunk, afterok(awaited, array_sizes)))
    return plans


def send_arrays(
    jobs: Sequence[Job],
    max_size: int,
    sbatch: Callable[[list[Job], str | None], list[str]],
    exclude: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str]:
    """Send every array of the jobs with `sbatch(chunk, dependency) -> ids`, one call per array, levels in order;
    job key -> id. `exclude`: the nodes each job avoids (job key -> nodes); an array's jobs share theirs.
    `SlurmBackend.submit` passes a real submission, `planned_arrays` a stand-in."""
    ids: dict[str, str] = {}
    array_sizes: dict[str, int] = {}
    for group in array_groups(jobs, exclude):
        for chunk, dependency in plan_arrays(group, ids, array_sizes, max_size):
            got = sbatch(chunk, dependency)
            ids.update(zip((j.key for j in chunk), got))
            array_sizes[got[0].partition("_")[0]] = len(got)
    return ids


def planned_arrays(
    jobs: Sequence[Job], max_size: int, exclude: Mapping[str, Sequence[str]] | None = None
) -> list[tuple[list[str], str | None]]:
    """The arrays `submit` sends, one `sbatch` each, as (job keys, dependency), with stand-in job ids 1, 2, ...
    (an array of one job is a plain job, as submitit submits it). Pure: nothing is submitted."""
    sent: list[tuple[list[str], str | None]] = []

    def stand_in(chunk: list[Job], dependency: str | None) -> list[str]:
        sent.append(([j.key for j in chunk], dependency))
        base = str(len(sent))
        return [base] if len(chunk) == 1 else [f"{base}_{i}" for i in range(len(chunk))]

    send_arrays(jobs, max_size, stand_in, exclude)
    return sent


def parse_max_array_size(config: str) -> int:
    """MaxArraySize from `scontrol show config` output."""
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
    if m is None:
        raise RuntimeError("scontrol show config did not report MaxArraySize")
    return int(m.group(1))


def checked_ids(job_ids: Sequence[str]) -> list[str]:
    """Distinct Slurm job ids (`<id>` or `<array>_<i>`); ValueError for anything else, never an option."""
    ids = list(dict.fromkeys(job_ids))
    for i in ids:
        if not JOB_ID.fullmatch(i):
            raise ValueError(f"job id {i!r} is not a Slurm job id (<id> or <array>_<index>)")
    return ids


SAFE_PATH = re.compile(r"/[A-Za-z0-9_.,:@%+=/-]{0,4000}")


def code_setup(code_dir: str | None) -> list[str]:
    """sbatch script lines that make every task (and its requeues) import the project from the submission's code
    snapshot: before Python starts, since submitit unpickles the stage call with whatever it finds first."""
    if code_dir is None:
        return []
    if not SAFE_PATH.fullmatch(code_dir) or ".." in code_dir.split("/"):
        raise ValueError(f"code snapshot directory {code_dir!r} cannot go into an sbatch script")
    env = code_env(code_dir, None)
    return [
        f"export PYTHONPATH={shlex.quote(env['PYTHONPATH'])}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export PYTHONSAFEPATH={env['PYTHONSAFEPATH']}",
    ]


def local_path(url: str) -> str | None:
    """The path of a local (`file://` or plain) location, else None."""
    return url.split("://", 1)[-1] if roots.is_local(url) else None


def store_root(run_dir: str) -> str | None:
    """The run store's root directory of a run directory `<root>/<sweep>/<run_id>` when it is a local path."""
    path = local_path(run_dir.rstrip("/"))
    if path is None:
        return None
    return path.rsplit("/", 2)[0] or "/" if path.count("/") >= 2 else None


def container_mounts(container: ContainerSpec, folder: Path, jobs: Sequence[Job]) -> list[tuple[str, str]]:
    """(source, target) of every mount a task's container gets: the log folder, the code snapshot and a local run
    store at the same path (one already inside another is left out), then `container.mounts`. ValueError naming
    the path when one cannot go into an sbatch script."""
    same = [("log folder", str(folder))]
    same += [("code snapshot directory", j.code_dir) for j in jobs if j.code_dir]
    same += [("run store", root) for j in jobs if (root := store_root(j.run_dir))]
    paths: list[str] = []
    for what, path in same:
        try:
            mount_pair(path)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        paths.append(path.rstrip("/") or "/")
    kept = sorted(set(paths))
    kept = [p for p in kept if not any(p != q and (q == "/" or p.startswith(q + "/")) for q in kept)]
    extra = []
    for m in container.mounts:
        try:
            extra.append(mount_pair(m))
        except ValueError as e:
            raise ValueError(f"launcher.container.mounts: {e}") from None
    return [(p, p) for p in kept] + [m for m in extra if m not in [(p, p) for p in kept]]


def checked_container(container: ContainerSpec) -> str:
    """The image, checked again (a spec may be built without validation); ValueError naming the field."""
    reason = image_problem(container.image)
    if reason:
        raise ValueError(f"launcher.container.image: {reason}")
    return container.image


def pyxis_args(container: ContainerSpec | None, mounts: Sequence[tuple[str, str]]) -> list[str]:
    """srun's pyxis options: the task starts in the image with the mounts (none without a pyxis container)."""
    if container is None or container.runtime != "pyxis":
        return []
    args = [f"--container-image={checked_container(container)}"]
    if mounts:
        args.append("--container-mounts=" + ",".join(f"{s}:{t}" for s, t in mounts))
    return args


def task_python(
    python: str | None, container: ContainerSpec | None, mounts: Sequence[tuple[str, str]], gpus: bool
) -> str:
    """The task's interpreter as a shell word list (submitit appends `-u -m submitit.core._submit FOLDER`): `python`
    (checked), else `python` in a container, else this interpreter; under apptainer, `apptainer exec` of the image
    with the mounts bound (and --nv for GPU jobs) runs it."""
    if python is not None:
        reason = python_problem(python)
        if reason:
            raise ValueError(f"launcher.python: {reason}")
    exe = shlex.quote(python or ("python" if container else sys.executable))
    if container is None or container.runtime != "apptainer":
        return exe
    words = ["apptainer", "exec", *(["--nv"] if gpus else [])]
    if mounts:
        words.append("--bind=" + ",".join(s if s == t else f"{s}:{t}" for s, t in mounts))
    return " ".join([*words, shlex.quote(checked_container(container)), exe])
