"""The check's table: one row per stage configuration of a sweep (every stage), its memory per GPU by kind, the
peak against the limit, FLOPs per step, and time and GPU-hours on the GPU type; the sweep's total below."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.check.devices import DEVICES, GIB
from launch.estimates import Estimate, Options
from launch.views import tables

COLUMNS = (
    "stage",
    "configuration",
    "runs",
    "ranks",
    "batch/GPU",
    "params",
    "grads",
    "optim",
    "held",
    "activ.",
    "peak GiB",
    "limit",
    "fits up to",
    "TFLOP/step",
    "s/step",
    "hours",
    "GPU-hours",
)
MEMORY = ("parameters", "gradients", "optimizer", "ema_target", "activations", "peak")
HELD = ("ema_target", "bank")  # the column "held": pretraining's EMA target, or knn's gathered feature bank


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def row(e: Estimate) -> list[str]:
    """One configuration's cells ('-' where the estimate says nothing)."""
    c, r = e.configuration, e.result or {}
    memory = r.get("memory", {})
    cells = [c.stage, c.model, str(len(c.run_ids)), f"{c.resources.nodes} x {c.resources.processes_per_node}"]
    cells.append(tables.cell(r.get("batch_per_rank")))
    held = next((memory[k] for k in HELD if k in memory), None)
    cells += [gib(held if k == "ema_target" else memory.get(k)) for k in MEMORY]
    cells.append(gib(r.get("limit_bytes")))
    cells.append(tables.cell(r.get("max_batch_per_rank")))
    cells.append(number(r["flops_per_step"] / 1e12 if "flops_per_step" in r else None))
    cells += [number(r.get("step_seconds")), number(r.get("stage_hours")), number(e.gpu_hours)]
    return cells


def number(value: float | None) -> str:
    """Three significant digits, whole numbers past 1,000 ('-' for none)."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def show(out: Console, title: str, estimates: Sequence[Estimate], options: Options) -> None:
    """The table, what its numbers assume and the total GPU-hours."""
    rows = [row(e) for e in estimates]
    styles = [{"peak GiB": "bold red" if e.refusal else "green"} for e in estimates]
    tables.show(out, title, COLUMNS, rows, styles)
    types = sorted({e.configuration.resources.gpu_type for e in estimates if e.configuration.resources.gpu_type})
    devices = "; ".join(f"{t}: {DEVICES[t].bf16_flops / 1e12:,.0f} TFLOP/s bf16" for t in types)
    images = {e.result.get("train_images") for e in estimates if e.result}
    notes = [
        "Predictions, not measurements: memory per rank from one step of the stage under fake tensors and a fake "
        "process group, as the job runs it (on GPUs: bf16 autocast where the stage asks for it; params include a "
        "probe's frozen encoder; held: pretraining's EMA target, knn's feature bank, which it gathers on every GPU "
        "before it searches its queries; knn's forward passes and search are one step; detect: at its caps, "
        "the largest padded batch, 100 objects per COCO image, every proposal and RoI the samplers may keep; "
        "inpaint: the decoder's step or an evaluation batch; locality: a batch's attention, its images one step), "
        "the limit 90% of the GPU's "
        "memory; time = FLOPs / (peak x "
        f"{options.utilization:.0%})"
        + (f" ({devices})" if devices else "")
        + "; epochs of "
        + ", ".join(f"{n:,}" for n in sorted(i for i in images if i))
        + " training images (--train-images).",
    ]
    hours = [e.gpu_hours for e in estimates if e.gpu_hours is not None]
    if hours:
        runs = len({r for e in estimates for r in e.configuration.run_ids})
        stages = ", ".join(dict.fromkeys(e.configuration.stage for e in estimates if e.gpu_hours is not None))
        notes.append(f"Total: {number(sum(hours))} GPU-hours of {stages} for {runs} run{'s' if runs != 1 else ''}.")
    for note in notes:
        out.print(Text(note, style="dim"), soft_wrap=True)


def records(estimates: Sequence[Estimate]) -> list[dict[str, Any]]:
    """The estimates as JSON records (check --json)."""
    return [
        {
            "stage": e.configuration.stage,
            "runs": list(e.configuration.run_ids),
            "resources": e.configuration.resources.model_dump(
                mode="json", include={"nodes", "processes_per_node", "gpus_per_node", "gpu_type", "gpu_memory_gb"}
            ),
            "estimate": e.result,
            "error": e.error,
            "refused": e.refusal,
            "gpu_hours": e.gpu_hours,
        }
        for e in estimates
    ]
