"""Know before you queue: every stage configuration of a sweep (pretraining, kNN, finetuning, linear probe,
detection, inpainting, locality), estimated by `python -m extrema.check` (torch and its fake process groups stay
out of the launcher), and the ones that do not fit.

One estimator process serves every configuration: it imports torch once and forks a fresh child per configuration
(`extrema.check.many`), so each fake process group still lives in a process of its own. A configuration is what
the estimate depends on: the stage, the experiment less that stage's seed and the other stages' settings, and the
stage's resources (nodes, ranks per node, GPUs, GPU type and memory); the runs sharing one are estimated once. The
estimator prints JSON (memory per rank, FLOPs per step, time and GPU-hours on the GPU type); this module runs it,
reads it and words what does not fit, one line per configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extrema.check.devices import DEFAULT_UTILIZATION, GIB, USABLE_FRACTION
from extrema.spec import Experiment
from launch.backends.resources import ResourcesSpec
from launch.sweepfile.model import STAGE_ORDER, LauncherSpec, Run, canonical_json

# every stage: a step (knn and locality: their passes) the estimator runs
CHECKED = ("pretrain", "knn", "finetune", "probe", "detect", "inpaint", "locality")
# a stage's settings that change no shape: its seed, and where its encoder's weights come from (a random init,
# a checkpoint, the student or the EMA branch: the same encoder either way)
UNSHAPED = ("seed", "init", "checkpoint", "encoder")
PARALLEL = 4  # estimates at once (each child holds ~1 GB while it steps a fake ViT-B)
TIMEOUT_S = 1800.0  # for every configuration of a sweep together
TAIL = 400  # characters of an estimator's standard error quoted when it fails


@dataclass(frozen=True)
class Configuration:
    """One distinct stage configuration of a sweep: the stage, an experiment standing for its runs (`run_ids`,
    those differing from it only in the stage's seed or weights' source or in the other stages' settings) and the
    stage's resources."""

    experiment: Experiment
    run_ids: tuple[str, ...]
    resources: ResourcesSpec
    stage: str = "pretrain"

    @property
    def target(self) -> str:
        """What the job runs on: GPUs (gpus_per_node, a GPU type or a GPU memory given) or CPUs."""
        on_gpus = any((self.resources.gpus_per_node, self.resources.gpu_type, self.resources.gpu_memory_gb))
        return "cuda" if on_gpus else "cpu"

    @property
    def label(self) -> str:
        """A short name: the stage, the runs it stands for and its world."""
        ids = ", ".join(self.run_ids[:3]) + (f" and {len(self.run_ids) - 3} more" if len(self.run_ids) > 3 else "")
        r, runs = self.resources, "runs" if len(self.run_ids) > 1 else "run"
        return f"{self.stage} of {runs} {ids} ({r.nodes} x {r.processes_per_node} ranks)"

    @property
    def model(self) -> str:
        """The model and what sets the stage's step apart, in a few words."""
        m, e = self.experiment.model, self.experiment
        if self.stage == "finetune":
            size = e.finetune.img_size or m.resolved_img_size
            return f"{m.arch} {m.cls_token}, {size} px, batch {e.finetune.batch_size}"
        if self.stage == "probe":
            return f"{m.arch} {m.cls_token}, {e.probe.optimizer}, batch {e.probe.batch_size}"
        if self.stage == "inpaint":
            i = e.inpaint
            return f"{m.arch} {m.cls_token}, decoder {i.decoder_depth} x {i.decoder_dim}, batch {i.batch_size}"
        if self.stage == "locality":
            return f"{m.arch} {m.cls_token}, {e.locality.dataset}, batch {e.locality.batch_size}"
        if self.stage == "detect":
            d = e.detect
            return f"{m.arch} Mask R-CNN, {d.dataset}, <= {d.max_size} px, batch {d.batch_size}"
        if self.stage == "knn":
            bank = f"{e.knn.bank_size:,}" if e.knn.bank_size else "all"
            return f"{m.arch} {m.cls_token}, bank {bank}, batch {e.knn.batch_size}"
        p = e.pretrain
        return f"{m.arch} {m.cls_token}, {p.masking.ratio:.0%} x {p.masking.num_masks}, batch {p.batch_size}"


def size(n: float) -> str:
    """Bytes as GiB (MiB below one GiB), one decimal."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def configuration_key(experiment: Experiment, resources: ResourcesSpec, stage: str = "pretrain") -> str:
    """What a stage's estimate depends on, as text: the experiment less the settings of the other stages and the
    stage's seed and weights' source (`UNSHAPED`), and the resources that shape the job's world and its limit."""
    shown = experiment.model_dump(mode="json", exclude={"stages", *(set(STAGE_ORDER) - {stage})})
    for name in UNSHAPED:
        shown[stage].pop(name, None)
    fields = ("nodes", "processes_per_node", "gpus_per_node", "gpu_type", "gpu_memory_gb")
    return canonical_json({"experiment": shown, "resources": resources.model_dump(mode="json", include=set(fields))})


def configurations(runs: Sequence[Run], launcher: LauncherSpec) -> list[Configuration]:
    """The distinct configurations of the estimated stages of these runs, stage by stage in pipeline order, each
    stage's in the order their first run comes."""
    found: list[Configuration] = []
    for stage in (s for s in STAGE_ORDER if s in CHECKED):
        resources = launcher.resources_for(stage)
        grouped: dict[str, tuple[Experiment, list[str]]] = {}
        for run in runs:
            if stage in run.stages:
                key = configuration_key(run.experiment, resources, stage)
                grouped.setdefault(key, (run.experiment, []))[1].append(run.run_id)
        found += [Configuration(exp, tuple(ids), resources, stage) for exp, ids in grouped.values()]
    return found


def wanted(launcher: LauncherSpec) -> bool:
    """Whether `sweep` checks before it submits: an estimated stage's resources name a GPU type or a GPU memory."""
    limits = (launcher.resources_for(stage) for stage in CHECKED)
    return any(r.gpu_type is not None or r.gpu_memory_gb is not None for r in limits)


@dataclass(frozen=True)
class Options:
    """What the estimator is asked besides the configuration: the utilisation of peak FLOP/s and the training
    images of an epoch (None: the dataset's)."""

    utilization: float = DEFAULT_UTILIZATION
    train_images: int | None = None


@dataclass(frozen=True)
class Estimate:
    """A configuration and the estimator's result (or why there is none)."""

    configuration: Configuration
    result: dict[str, Any] | None
    error: str | None = None

    @property
    def refusal(self) -> str | None:
        """One line when the configuration cannot be submitted (it does not fit, or could not be estimated)."""
        c, r = self.configuration, self.result
        if r is None:
            return f"{c.label}: could not be estimated: {self.error}"
        if r.get("fits", True):
            return None
        device = f"{c.resources.gpu_type}, " if c.resources.gpu_type else ""
        return (
            f"{c.label}: predicted peak {size(r['memory']['peak'])} per GPU exceeds the limit "
            f"{size(r['limit_bytes'])} ({device}{r['memory_gb']:g} GB x {USABLE_FRACTION:g}); "
            f"{r['max_batch_per_rank']} images per GPU would fit, the batch gives {r['batch_per_rank']}"
        )

    @property
    def gpu_hours(self) -> float | None:
        """GPU-hours of every run this configuration stands for (None without a GPU type)."""
        if self.result is None or "gpu_hours" not in self.result:
            return None
        return float(self.result["gpu_hours"]) * len(self.configuration.run_ids)


def arguments(c: Configuration, options: Options) -> list[str]:
    """The estimator's options for one configuration (its experiment travels beside them)."""
    r = c.resources
    argv = ["--stage", c.stage, "--target", c.target]
    argv += ["--nodes", str(r.nodes), "--processes-per-node", str(r.processes_per_node)]
    argv += ["--utilization", repr(options.utilization)]
    if r.gpu_type:
        argv += ["--gpu-type", r.gpu_type]
    if r.gpu_memory_gb:
        argv += ["--gpu-memory-gb", repr(r.gpu_memory_gb)]
    if options.train_images:
        argv += ["--train-images", str(options.train_images)]
    return argv


def failure(stderr: str) -> str:
    """Why the estimator failed, in one line: its own message, or the end of what it printed."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines and lines[-1].startswith("extrema.check: "):
        return lines[-1].removeprefix("extrema.check: ")
    if any("No module named 'torch'" in line for line in lines):
        return "torch is not installed here (the check runs the model under fake tensors); sweep --no-check skips it"
    return " | ".join(lines)[-TAIL:] or "the estimator ended without a word"


def estimate_all(configs: Sequence[Configuration], options: Options) -> list[Estimate]:
    """Every configuration estimated by one estimator process (`python -m extrema.check - --many`), which imports
    torch once and forks a fresh child per configuration, a few at once; in the configurations' order."""
    if not configs:
        return []
    jobs = [{"experiment": c.experiment.model_dump(mode="json"), "argv": arguments(c, options)} for c in configs]
    parallel = min(PARALLEL, len(configs), os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "extrema.check", "-", "--many", "--jobs", str(parallel)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the estimator's work is Python dispatch, not arithmetic
    try:
        proc = subprocess.run(cmd, input=json.dumps(jobs), capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return [Estimate(c, None, f"the estimator took more than {TIMEOUT_S:.0f} s") for c in configs]
    try:
        outcomes = json.loads(proc.stdout) if proc.returncode == 0 else None
    except json.JSONDecodeError:
        outcomes = None
    if not isinstance(outcomes, list) or len(outcomes) != len(configs):
        why = failure(proc.stderr) if proc.returncode else f"the estimator printed no results: {proc.stdout[-TAIL:]!r}"
        return [Estimate(c, None, why) for c in configs]
    return [Estimate(c, o.get("result"), o.get("error")) for c, o in zip(configs, outcomes)]
