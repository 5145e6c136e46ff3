"""`python -m extrema.check SPEC`: one stage configuration's memory per rank, FLOPs and time, predicted here.

    python -m extrema.check runs/x/<run>/pretrain/spec.json --nodes 1 --processes-per-node 8 --gpu-type H100
    extrema-launch sweep-expanded experiment JSON on standard input:  ... | python -m extrema.check - --json

SPEC is a stage's `spec.json` (a RunSpec) or an experiment's JSON (`-`: standard input); with --many, standard
input holds several configurations (`extrema.check.many`). Every stage is estimated (`estimate`, `downstream`: each
stage's own step; `knn`: its forward pass, bank and search; `detect`: Mask R-CNN's step at the configuration's
caps; `inpaint`: the decoder's training step and an evaluation batch; `locality`: the attention of a batch); an
experiment's JSON as --stage says (default pretrain), a stage's spec.json as its stage. Exit codes: 0 estimated
(whether or not it fits: `fits` says), 2 unreadable or invalid input. Run one configuration per process: the
estimate joins a fake process group of the job's world size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import ValidationError

from extrema.check.devices import DEFAULT_UTILIZATION, DEVICES, GpuType, limit_bytes, step_seconds
from extrema.spec import Experiment, RunSpec

# every stage: a step (knn and locality: their passes) the check runs
ESTIMATED = ("pretrain", "knn", "finetune", "probe", "detect", "inpaint", "locality")
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's train split: the assumed size of a folder or shard set
FASHION_MNIST_TRAIN = 60_000
IMAGENET_VAL = 50_000  # the validation split's images (folders and shards: ImageNet-1k's)
FASHION_MNIST_VAL = 10_000
COCO_TRAIN = 117_266  # COCO train2017's images with an annotation (the detect stage drops the empty ones)


class InputError(ValueError):
    """A SPEC or an option this command cannot use (exit 2, one line)."""


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m extrema.check", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="a stage's spec.json or an experiment's JSON; - reads standard input")
    p.add_argument("--stage", choices=ESTIMATED, default="pretrain", help="the stage of an experiment's JSON")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    p.add_argument("--processes-per-node", type=int, default=1, help="ranks per node (default 1)")
    p.add_argument("--rank", type=int, default=0, help="the rank this process plays (default 0)")
    p.add_argument("--target", choices=("cuda", "cpu"), default="cuda", help="what the job runs on (default cuda)")
    p.add_argument(
        "--fake-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the fake tensors live: cpu (default; CUDA autocast followed) or cuda (needs a GPU here)",
    )
    p.add_argument("--gpu-type", choices=get_args(GpuType), help="a GPU of the device table: time and its memory")
    p.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU in GB (default: the GPU type's)")
    p.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION, help="share of peak bf16 FLOP/s")
    p.add_argument("--train-images", type=int, help="training images (default: the dataset's, ImageNet-1k's for "
                   "folders and shards)")  # fmt: skip
    p.add_argument("--plan", action="store_true", help="also plan the checkpoint at this world size (DCP)")
    p.add_argument("--plan-only", action="store_true", help="only wrap and plan the checkpoint (no step, no budget)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--many", action="store_true", help="a JSON list of jobs on standard input (extrema.check.many)")
    p.add_argument("--jobs", type=int, default=1, help="with --many: estimates at once (default 1)")
    return p.parse_args(argv)


def load_experiment(source: str, stage: str = "pretrain") -> tuple[Experiment, str]:
    """The experiment and stage of a RunSpec (its own stage) or of an experiment's JSON (`stage`); InputError
    naming the field."""
    try:
        text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()  # noqa: SIM115
        data = json.loads(text)
    except OSError as e:
        raise InputError(f"{source}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{source}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: not a JSON object (a stage's spec.json or an experiment)")
    try:
        if "experiment" in data:
            spec = RunSpec.model_validate(data)
            return spec.experiment, spec.stage
        return Experiment.model_validate(data), stage
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise InputError(f"{source}: not a stage spec or an experiment: {where}: {first['msg']}") from None


def train_images(exp: Experiment, given: int | None, stage: str = "pretrain") -> int:
    """Training images an epoch of `stage` has: given, or the dataset's (folders and shards: ImageNet-1k's train
    split; detect: COCO train2017's annotated images, or the canvases built)."""
    if given is not None:
        return given
    if stage == "detect":
        return COCO_TRAIN if exp.detect.dataset == "coco" else exp.detect.canvas_train_images
    if exp.data.dataset == "synthetic":
        return exp.data.synthetic_size
    if exp.data.dataset == "fashion_mnist":
        return FASHION_MNIST_TRAIN
    return IMAGENET_TRAIN


def val_images(exp: Experiment) -> int:
    """Validation images of the dataset (folders and shards: ImageNet-1k's validation split)."""
    if exp.data.dataset == "synthetic":
        return exp.data.synthetic_size
    if exp.data.dataset == "fashion_mnist":
        return FASHION_MNIST_VAL
    return IMAGENET_VAL


def stage_steps(exp: Experiment, stage: str, images: int) -> int:
    """Optimizer steps of `stage` over epochs of `images` (a downstream stage's train_size or val_fraction
    holdout taken off first; knn: one, its whole evaluation); InputError when its batch is larger than what is
    left."""
    if stage == "pretrain":
        return exp.total_steps(images)
    if stage in ("knn", "locality"):
        return 1
    if stage == "inpaint":
        return exp.inpaint.steps
    from extrema.eval.supervised import step_counts

    if stage == "detect":
        images = min(images, exp.detect.train_size or images)
        try:
            return step_counts(images, exp.detect.batch_size, exp.detect.epochs)[1]
        except ValueError as e:
            raise InputError(f"detect: {e} (--train-images)") from None
    s = getattr(exp, stage)
    if s.val_fraction is not None:
        images -= min(images - 1, max(1, math.ceil(s.val_fraction * images)))
    try:
        return step_counts(min(images, s.train_size or images), s.batch_size, s.epochs)[1]
    except ValueError as e:
        raise InputError(f"{stage}: {e} (--train-images)") from None


def budget(result: dict[str, Any], args: argparse.Namespace, exp: Experiment) -> dict[str, Any]:
    """Steps, and with a GPU type or memory: the limit, whether the peak fits, the largest batch per rank that
    does, seconds per step, hours of the stage and its GPU-hours."""
    images = train_images(exp, args.train_images, result["stage"])
    out: dict[str, Any] = {"train_images": images, "steps": stage_steps(exp, result["stage"], images)}
    device = DEVICES.get(args.gpu_type) if args.gpu_type else None
    memory_gb = args.gpu_memory_gb or (device.memory_gb if device else None)
    if memory_gb:
        from extrema.check.estimate import max_batch_per_rank

        limit = limit_bytes(memory_gb)
        out.update(memory_gb=memory_gb, limit_bytes=limit, fits=result["memory"]["peak"] <= limit)
        out["max_batch_per_rank"] = max_batch_per_rank(result, limit)
    if device:
        seconds = step_seconds(result["flops_per_rank"], device, args.utilization)
        hours = seconds * out["steps"] / 3600
        out.update(gpu_type=device.name, utilization=args.utilization, step_seconds=seconds, stage_hours=hours)
        out["gpu_hours"] = hours * result["world_size"]
    return out


def summary(result: dict[str, Any]) -> str:
    """A few human lines of the result."""
    gib = 2**30
    lines = [
        f"{result['stage']} at {result['world_size']} ranks ({result['strategy']}, {result['precision']}, "
        f"{result['batch_per_rank']} images per rank)"
    ]
    if "memory" in result:
        lines[0] += ", per rank: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in result["memory"].items())
        flops = result["flops_per_step"], result["flops_per_rank"], result["steps"]
        lines.append("FLOPs per step: {:.3e} ({:.3e} per rank); {} steps".format(*flops))
    if "caps" in result:
        c = result["caps"]
        lines.append(
            "bounded at {0[0]} x {0[1]} px images, {1} objects, {2} proposals, {3} RoIs ({4} with masks) per "
            "image".format(c["image"], *(c[k] for k in ("objects_per_image", "proposals_per_image",
                                                        "rois_per_image", "mask_rois_per_image")))
        )  # fmt: skip
    if "limit_bytes" in result:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(
            f"{verdict}: peak {result['memory']['peak'] / gib:.1f} GiB, limit {result['limit_bytes'] / gib:.1f} GiB; "
            f"up to {result['max_batch_per_rank']} images per rank fit"
        )
    if "step_seconds" in result:
        lines.append(
            f"{result['gpu_type']} at {result['utilization']:.0%} of peak: {result['step_seconds']:.3f} s per step, "
            f"{result['stage_hours']:.1f} h, {result['gpu_hours']:.0f} GPU-hours"
        )
    if "checkpoint" in result:
        c = result["checkpoint"]
        lines.append(f"checkpoint plan of rank {c['rank']}: {c['items']} items, {c['bytes'] / gib:.2f} GiB, "
                     f"{len(c['mismatches'])} mismatches")  # fmt: skip
        lines += [f"  {m}" for m in c["mismatches"]]
    return "\n".join(lines)


def checked_numbers(args: argparse.Namespace) -> None:
    """InputError for a world, rank, memory or utilisation that cannot be."""
    if args.nodes < 1 or args.processes_per_node < 1:
        raise InputError("--nodes and --processes-per-node must be at least 1")
    if not 0 <= args.rank < args.nodes * args.processes_per_node:
        raise InputError(f"--rank {args.rank} is outside a world of {args.nodes * args.processes_per_node}")
    if args.gpu_memory_gb is not None and not (math.isfinite(args.gpu_memory_gb) and args.gpu_memory_gb > 0):
        raise InputError("--gpu-memory-gb must be a positive number")
    if not 0 < args.utilization <= 1:
        raise InputError("--utilization must lie in (0, 1]")
    if args.train_images is not None and args.train_images < 1:
        raise InputError("--train-images must be at least 1")
    if args.fake_device == "cuda" and args.target != "cuda":
        raise InputError("--fake-device cuda estimates a GPU job: give --target cuda")


def estimate_one(args: argparse.Namespace, exp: Experiment, stage: str = "pretrain") -> dict[str, Any]:
    """One configuration's result (with its budget after a step); InputError for what cannot be estimated."""
    from extrema.check.detect import estimate_detect  # torch, after the input is known to be usable
    from extrema.check.downstream import estimate_downstream
    from extrema.check.estimate import estimate_pretrain
    from extrema.check.inpaint import estimate_inpaint
    from extrema.check.knn import estimate_knn
    from extrema.check.locality import estimate_locality

    checked_numbers(args)
    plan, step = args.plan or args.plan_only, not args.plan_only
    if stage != "pretrain" and (plan or args.fake_device != "cpu"):
        raise InputError(f"{stage}: the checkpoint plan and fake CUDA tensors are for pretraining only")
    try:
        world = (args.nodes, args.processes_per_node)
        if stage == "pretrain":
            result = estimate_pretrain(exp, *world, args.target, args.rank, plan, step, args.fake_device)
        elif stage == "detect":
            result = estimate_detect(exp, *world, args.target, args.rank)
        elif stage == "inpaint":
            result = estimate_inpaint(exp, *world, args.target)
        elif stage == "locality":
            result = estimate_locality(exp, *world, args.target)
        elif stage == "knn":
            images = train_images(exp, args.train_images), val_images(exp)
            result = estimate_knn(exp, *world, args.target, *images, args.rank)
        else:
            result = estimate_downstream(exp, stage, *world, args.target, args.rank)
    except ValueError as e:
        raise InputError(str(e)) from None
    except RuntimeError as e:  # torch refusing the configuration's shapes: the stage could not run it either
        raise InputError(
            f"{stage}: the stage's step cannot run this configuration: {(str(e).splitlines() or [repr(e)])[0]}"
        ) from None
    if step:
        result.update(budget(result, args, exp))
    return result


def job_estimate(job: dict[str, Any]) -> dict[str, Any]:
    """One job of --many: its experiment and its own command line (the options above, without SPEC)."""
    if not isinstance(job, dict) or not isinstance(job.get("argv"), list):
        raise InputError('each job of --many is {"experiment": {...}, "argv": [...]}')
    try:
        exp = Experiment.model_validate(job.get("experiment"))
    except ValidationError as e:
        raise InputError(f"not an experiment: {e.errors()[0]['msg']}") from None
    args = parse(["-", *map(str, job["argv"])])
    return estimate_one(args, exp, args.stage)


def many(args: argparse.Namespace) -> int:
    """--many: the JSON list of jobs on standard input, each estimated in a forked child; a JSON list out."""
    from extrema.check import detect, downstream, estimate, inpaint, knn, locality  # noqa: F401 (imported once, before the children are forked)
    from extrema.check.many import estimate_many

    try:
        jobs = json.loads(sys.stdin.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--many: standard input is not JSON ({e})") from None
    if not isinstance(jobs, list):
        raise InputError("--many: standard input is not a JSON list of jobs")
    print(json.dumps(estimate_many(jobs, job_estimate, args.jobs)), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Estimate one configuration (or --many); print JSON (--json) or a summary. 0 estimated, 2 unusable input."""
    args = parse(argv)
    try:
        if args.many:
            return many(args)
        result = estimate_one(args, *load_experiment(args.spec, args.stage))
    except InputError as e:
        print(f"extrema.check: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
