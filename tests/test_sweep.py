"""Sweep files: loading, includes, expansion semantics, run ids (golden), validation messages, planning."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from extrema.spec import Experiment, StageName, identity
from launch.backends.base import Job
from launch.backends.resources import ResourcesSpec
from launch.inputs.errors import InvalidSweep
from launch.pipeline import plan, select
from launch.sweepfile.expand import expand, load_runs, load_sweep
from launch.sweepfile.model import STAGE_ORDER, run_id

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"

BASE = """\
name: t
base:
  model: {arch: vit_pico}
  data: {dataset: synthetic}
  pretrain: {steps: 2, batch_size: 8, masking: {ratio: 0.75, num_masks: 2}}
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(InvalidSweep) as info:
        load_runs(path)
    return [p.render() for p in info.value.problems]


def check_golden(sweep: Path, golden_file: Path) -> None:
    """Run ids must not change unless the experiment schema does; UPDATE_GOLDEN=1 rewrites the file on purpose."""
    _, runs = load_runs(sweep)
    got = [{"run_id": r.run_id, "overrides": r.overrides} for r in runs]
    if os.environ.get("UPDATE_GOLDEN"):
        golden_file.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(golden_file.read_text())


def test_tiny_run_ids_are_golden() -> None:
    check_golden(REPO / "jobs" / "tiny.yaml", GOLDEN / "tiny.json")


def test_combined_axes_run_ids_are_golden() -> None:
    check_golden(GOLDEN / "axes.yaml", GOLDEN / "axes.json")


def test_run_id_ignores_launcher_and_name_but_not_the_experiment(tmp_path: Path) -> None:
    a = write(tmp_path, BASE, "a.yaml")
    b = write(
        tmp_path, BASE.replace("name: t", "name: other") + "launcher: {resources: {cpus_per_task: 8}}\n", "b.yaml"
    )
    c = write(tmp_path, BASE.replace("steps: 2", "steps: 3"), "c.yaml")
    ids = [load_runs(p)[1][0].run_id for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]
    assert len(ids[0]) == 10 and int(ids[0], 16) >= 0


def test_grid_is_cartesian_with_the_last_axis_fastest(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "sweep:\n  grid:\n    model.cls_token: [cait, vit]\n    pretrain.seed: [0, 1, 2]\n")
    runs = load_runs(path)[1]
    assert [tuple(r.overrides.values()) for r in runs] == [
        ("cait", 0), ("cait", 1), ("cait", 2), ("vit", 0), ("vit", 1), ("vit", 2),
    ]  # fmt: skip
    assert [r.experiment.pretrain.seed for r in runs] == [0, 1, 2, 0, 1, 2]
    assert len({r.run_id for r in runs}) == 6


def test_zip_advances_together_and_combines_with_grid(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent("""\
        sweep:
          grid: {model.cls_token: [cait, avgpool]}
          zip:
            pretrain.masking.ratio: [0.75, 0.5]
            pretrain.masking.num_masks: [4, 2]
        """)
    runs = load_runs(write(tmp_path, text))[1]
    got = [
        (r.experiment.model.cls_token, r.experiment.pretrain.masking.ratio, r.experiment.pretrain.masking.num_masks)
        for r in runs
    ]
    assert got == [("cait", 0.75, 4), ("cait", 0.5, 2), ("avgpool", 0.75, 4), ("avgpool", 0.5, 2)]


def test_explicit_runs_combine_with_the_grid(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent("""\
        sweep:
          runs:
            - {model.arch: vit_pico}
            - {model: {arch: vit_nano}, pretrain.masking.num_masks: 3}
          grid: {pretrain.seed: [0, 1]}
        """)
    runs = load_runs(write(tmp_path, text))[1]
    got = [(r.experiment.model.arch, r.experiment.pretrain.masking.num_masks, r.experiment.pretrain.seed) for r in runs]
    assert got == [("vit_pico", 2, 0), ("vit_pico", 2, 1), ("vit_nano", 3, 0), ("vit_nano", 3, 1)]
    assert runs[2].overrides == {"model": {"arch": "vit_nano"}, "pretrain.masking.num_masks": 3, "pretrain.seed": 0}


def test_no_sweep_section_runs_base_once(tmp_path: Path) -> None:
    runs = load_runs(write(tmp_path, BASE))[1]
    assert len(runs) == 1 and runs[0].overrides == {} and runs[0].stages == ("pretrain", "knn")


def test_unequal_zip_lengths_are_an_error(tmp_path: Path) -> None:
    text = BASE + "sweep:\n  zip:\n    pretrain.seed: [0, 1, 2]\n    model.cls_token: [cait, vit]\n"
    (msg,) = problems(write(tmp_path, text))
    assert "sweep.yaml:7: sweep.zip: zip lists must have equal lengths" in msg
    assert "pretrain.seed has 3, model.cls_token has 2" in msg


def test_unknown_dotted_path_is_named_with_its_line(tmp_path: Path) -> None:
    text = BASE + "sweep:\n  grid:\n    model.cls_tokn: [cait]\n    pretrain.seed.value: [1]\n"
    msgs = problems(write(tmp_path, text))
    assert any(
        "sweep.yaml:8: sweep.grid.model.cls_tokn: unknown field 'cls_tokn' in model (known: arch," in m for m in msgs
    )
    assert any("sweep.grid.pretrain.seed.value: pretrain.seed is a value, not a section" in m for m in msgs)


def test_overrides_are_validated_per_run_and_blame_the_axis_value(tmp_path: Path) -> None:
    text = BASE + "sweep:\n  grid:\n    pretrain.masking.num_masks: [2, 9]\n    pretrain.masking.ratio: [0.75, 1.5]\n"
    msgs = problems(write(tmp_path, text))
    assert any("sweep.yaml:9: sweep.grid.pretrain.masking.ratio[1]: Input should be less than 1" in m for m in msgs)
    assert any(
        "sweep.grid.pretrain.masking.num_masks" in m and "9 disjoint masks of 16 visible tokens" in m for m in msgs
    )


def test_base_is_validated_only_after_overrides(tmp_path: Path) -> None:
    impossible = BASE.replace("num_masks: 2", "num_masks: 9")
    assert any("base.pretrain" in m or "base:" in m for m in problems(write(tmp_path, impossible, "a.yaml")))
    fixed = impossible + "sweep:\n  grid:\n    pretrain.masking.num_masks: [1, 4]\n"
    assert [r.experiment.pretrain.masking.num_masks for r in load_runs(write(tmp_path, fixed, "b.yaml"))[1]] == [1, 4]


def test_include_merges_underneath_and_nests(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    write(
        tmp_path,
        "base:\n  model: {arch: vit_nano, cls_token: vit}\n  data: {dataset: synthetic}\n",
        "recipes/model.yaml",
    )
    write(
        tmp_path,
        "include: model.yaml\nbase:\n  pretrain: {steps: 5, batch_size: 4}\n  knn: {k: 3}\n",
        "recipes/train.yaml",
    )
    path = write(
        tmp_path, "include: [recipes/train.yaml]\nname: inc\nbase:\n  model: {cls_token: avgpool}\n  knn: {k: 7}\n"
    )
    sweep, runs = load_runs(path)
    exp = runs[0].experiment
    assert (exp.model.arch, exp.model.cls_token, exp.pretrain.steps, exp.knn.k) == ("vit_nano", "avgpool", 5, 7)
    assert sweep.name == "inc"


def test_include_by_bare_name_finds_the_projects_recipe_and_a_file_beside_wins(tmp_path: Path) -> None:
    """`include: vit_small_in1k.yaml` in a sweep file anywhere reads jobs/recipes' recipe (which includes the ViT-B
    one beside it); a file of that name next to the sweep file is read instead; names with a folder are not looked
    up among the recipes."""
    path = write(
        tmp_path, "include: vit_small_in1k.yaml\nname: mine\nroot: /shared/runs\nbase:\n  data: {root: /data/in1k}\n"
    )
    sweep, runs = load_runs(path)
    assert (sweep.name, runs[0].experiment.model.arch, runs[0].experiment.finetune.epochs) == ("mine", "vit_small", 200)
    write(tmp_path, "base:\n  model: {arch: vit_pico}\n  data: {dataset: synthetic}\n", "vit_small_in1k.yaml")
    assert load_runs(path)[1][0].experiment.model.arch == "vit_pico"
    (msg,) = problems(write(tmp_path, "include: nowhere.yaml\n" + BASE, "a.yaml"))
    assert "not found" in msg and str(REPO / "jobs" / "recipes" / "nowhere.yaml") in msg
    (msg,) = problems(write(tmp_path, "include: sub/vit_small_in1k.yaml\n" + BASE, "b.yaml"))
    assert "not found" in msg and "jobs/recipes" not in msg


def test_include_problems_name_the_included_file(tmp_path: Path) -> None:
    write(tmp_path, "base:\n  model: {arch: vit_pico, depth: 3}\n", "recipe.yaml")
    path = write(tmp_path, "include: recipe.yaml\n" + BASE.replace("  model: {arch: vit_pico}\n", ""))
    (msg,) = problems(path)
    assert "recipe.yaml:2: base.model.depth: unknown key 'depth'" in msg
    write(tmp_path, "include: loop.yaml\n", "loop.yaml")
    assert "include cycle" in problems(write(tmp_path, "include: loop.yaml\n" + BASE, "c.yaml"))[0]
    assert (
        "d.yaml:1: include[0]: included file 'missing.yaml' not found"
        in problems(write(tmp_path, "include: missing.yaml\n" + BASE, "d.yaml"))[0]
    )


def test_yaml_details_duplicate_keys_and_exponent_floats(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, BASE + "name: again\n", "dup.yaml"))
    assert "dup.yaml:6: <file>: YAML syntax" in msg and "duplicate key 'name'" in msg
    runs = load_runs(write(tmp_path, BASE.replace("steps: 2", "steps: 2, base_lr: 1e-4"), "exp.yaml"))[1]
    assert runs[0].experiment.pretrain.base_lr == pytest.approx(1e-4)


def test_duplicate_experiments_are_refused(tmp_path: Path) -> None:
    text = BASE + "sweep:\n  grid:\n    model.cls_token: [cait, cait]\n"
    assert "runs 1 and 2 are the same experiment" in problems(write(tmp_path, text))[0]


def test_conflicting_axes_are_refused(tmp_path: Path) -> None:
    text = BASE + "sweep:\n  grid: {pretrain.masking: [{ratio: 0.5}]}\n  zip: {pretrain.masking.ratio: [0.75]}\n"
    assert "pretrain.masking.ratio is set by both sweep.grid and sweep.zip" in problems(write(tmp_path, text))[0]


@pytest.mark.parametrize(
    ("axes", "expected"),
    [
        ("sweep: {}\n", "sweep: no axes"),
        ("sweep: {grid: {}}\n", "sweep.grid: grid is empty"),
        ("sweep: {grid: {pretrain.seed: []}}\n", "sweep.grid.pretrain.seed: no values"),
        ("sweep: {runs: []}\n", "sweep.runs: runs is empty"),
    ],
)
def test_empty_sweeps_are_refused(tmp_path: Path, axes: str, expected: str) -> None:
    assert any(expected in m for m in problems(write(tmp_path, BASE + axes)))


@pytest.mark.parametrize("name", ["../up", "a/b", "a;rm -rf x", "$(id)", "bad\nname", "..", ".hidden", "", "x" * 101])
def test_unsafe_sweep_names_are_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, BASE.replace("name: t", f"name: {json.dumps(name)}"))
    (msg,) = problems(path)
    assert "sweep.yaml:1: name:" in msg and "is not allowed" in msg


def test_launcher_stage_resources_override_the_default(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent("""\
        launcher:
          backend: slurm
          resources: {partition: gpu, cpus_per_task: 4, sbatch_extra: {mail-type: END}}
          stages:
            knn: {cpus_per_task: 1, sbatch_extra: {exclusive: ""}}
        """)
    launcher = load_sweep(write(tmp_path, text))[0].launcher
    knn, pretrain = launcher.resources_for("knn"), launcher.resources_for("pretrain")
    assert (knn.partition, knn.cpus_per_task, pretrain.cpus_per_task) == ("gpu", 1, 4)
    assert knn.sbatch_extra == {"mail-type": "END", "exclusive": ""}


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        (
            '{backend: slurm, resources: {partition: "gpu\\n#SBATCH --uid=0"}}',
            "resources.partition: contains a control character",
        ),
        ('{backend: slurm, resources: {sbatch_extra: {"x; rm": "1"}}}', "is not a plain sbatch option name"),
        ("{resources: {nodes: 2}}", "the local backend runs on this machine only"),
        ("{backend: kubernetes}", "launcher.backend: Input should be 'local', 'slurm' or 'ray'"),
        ("{max_parallel: 0}", "launcher.max_parallel: Input should be greater than or equal to 1"),
        ("{stages: {knn: {gpus: 1}}}", "launcher.stages.knn.gpus: unknown key 'gpus' (known: nodes,"),
    ],
)
def test_launcher_problems(tmp_path: Path, launcher: str, expected: str) -> None:
    msgs = problems(write(tmp_path, BASE + f"launcher: {launcher}\n"))
    assert any(expected in m for m in msgs), msgs


def test_knn_needs_pretrain_or_a_checkpoint(tmp_path: Path) -> None:
    text = BASE.replace("  model:", "  stages: [knn]\n  model:")
    assert (
        "base.stages: knn needs pretrain in stages or a knn.checkpoint URL"
        in problems(write(tmp_path, text, "a.yaml"))[0]
    )
    runs = load_runs(
        write(tmp_path, text.replace("  model:", "  knn: {checkpoint: /ckpt/step-9}\n  model:"), "b.yaml")
    )[1]
    (job,) = plan(runs, load_sweep(tmp_path / "b.yaml")[0].launcher, "file:///r/t")
    assert job.after == () and job.stage == "knn"


def test_probe_and_finetune_wait_for_pretrain_unless_they_need_no_checkpoint(tmp_path: Path) -> None:
    orphan = BASE.replace("  model:", "  stages: [probe, finetune]\n  model:")
    assert problems(write(tmp_path, orphan, "a.yaml")) == [
        f"{tmp_path / 'a.yaml'}:3: base.stages: probe needs pretrain in stages or a probe.checkpoint URL",
        f"{tmp_path / 'a.yaml'}:3: base.stages: finetune needs pretrain in stages or a finetune.checkpoint URL",
    ]
    text = BASE.replace("  model:", "  stages: [pretrain, probe, finetune]\n  finetune: {init: random}\n  model:")
    sweep, runs = load_runs(write(tmp_path, text, "b.yaml"))
    jobs = plan(runs, sweep.launcher, "file:///r/t")
    rid = runs[0].run_id
    assert [(j.stage, j.after) for j in jobs] == [("pretrain", ()), ("probe", (f"{rid}/pretrain",)), ("finetune", ())]


def test_plan_is_stage_major_with_after_edges(tmp_path: Path) -> None:
    sweep, runs = load_runs(REPO / "jobs" / "tiny.yaml")
    jobs = plan(runs, sweep.launcher, "file:///r/tiny")
    a, b = (r.run_id for r in runs)
    assert [j.key for j in jobs] == [f"{a}/pretrain", f"{b}/pretrain", f"{a}/knn", f"{b}/knn"]
    assert [j.after for j in jobs] == [(), (), (f"{a}/pretrain",), (f"{b}/pretrain",)]
    assert jobs[0].run_dir == f"file:///r/tiny/{a}"
    assert jobs[0].command() == [sys.executable, "-m", "extrema.entry", f"file:///r/tiny/{a}", "pretrain"]


def test_select_submits_only_unfinished_work_whose_upstream_will_run() -> None:
    def job(key: str, after: tuple[str, ...] = ()) -> Job:
        return Job(key, "/r/s/" + key.split("/")[0], key.split("/")[1], after, ResourcesSpec())

    jobs = [job(f"{r}/pretrain") for r in "abcdef"] + [job(f"{r}/knn", (f"{r}/pretrain",)) for r in "abcdef"]
    states = {"a/pretrain": "completed", "a/knn": "completed", "b/pretrain": "running", "c/pretrain": "failed",
              "d/pretrain": "cancelled", "d/knn": "failed", "e/pretrain": "completed",
              "f/pretrain": "preempted"}  # fmt: skip
    decisions = select(jobs, states)
    chosen = {d.job.key: d.submit for d in decisions}
    assert [k for k, v in chosen.items() if v] == ["d/pretrain", "e/knn"]
    assert next(d.reason for d in decisions if d.job.key == "f/pretrain") == "already preempted"  # being requeued
    retried = [d.job.key for d in select(jobs, states, retry_failed=True) if d.submit]
    assert retried == ["c/pretrain", "d/pretrain", "c/knn", "d/knn", "e/knn"]
    assert all(not d.submit for d in select(jobs, {j.key: "completed" for j in jobs}))


def test_torchrun_command_for_several_local_ranks() -> None:
    job = Job("a/pretrain", "/r/s/a", "pretrain", (), ResourcesSpec(processes_per_node=2, gpus_per_node=2))
    assert job.command()[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert job.command()[5:] == ["-m", "extrema.entry", "/r/s/a", "pretrain"]


def test_expand_is_pure_and_stable(tmp_path: Path) -> None:
    sweep = load_sweep(REPO / "jobs" / "tiny.yaml")[0]
    before = json.dumps(sweep.base, sort_keys=True)
    first, second = expand(sweep), expand(sweep)
    assert [r.run_id for r in first] == [r.run_id for r in second]
    assert json.dumps(sweep.base, sort_keys=True) == before
    assert first[0].run_id == run_id(first[0].experiment)


def test_fast_run_ids_equal_the_definition_whatever_the_axes_touch(tmp_path: Path) -> None:
    text = BASE + textwrap.dedent("""\
        sweep:
          grid:
            model.cls_token: [cait, vit]
            pretrain.masking: [{ratio: 0.75, num_masks: 2}, {ratio: 0.5, num_masks: 2}]
          runs:
            - {data.synthetic_size: 64}
            - {stages: [pretrain], knn.k: 7}
            - {pretrain.seed: 3, model.arch: vit_pico}
        """)
    sweep = load_sweep(write(tmp_path, text))[0]
    runs = expand(sweep)
    assert len(runs) == 12
    for r in runs:
        raw = json.loads(json.dumps(sweep.base))
        for path, value in r.overrides.items():
            *parents, last = path.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        assert r.run_id == run_id(Experiment.model_validate(raw)) == run_id(r.experiment), r.overrides


def test_every_stage_name_is_planned_with_pretrain_first() -> None:
    assert STAGE_ORDER[0] == "pretrain" and set(STAGE_ORDER) == set(typing.get_args(StageName))


def test_a_one_process_stage_given_several_processes_is_refused_before_submission(tmp_path: Path) -> None:
    stages = "  data: {dataset: synthetic}\n  stages: [pretrain, locality]\n"
    text = BASE.replace("  data: {dataset: synthetic}\n", stages)
    text += "sweep:\n  grid:\n    pretrain.seed: [0, 1]\nlauncher:\n  resources: {processes_per_node: 2}\n"
    (msg,) = problems(write(tmp_path, text))  # once, not once per run
    assert "launcher.resources: locality runs in one process, not 1 x 2" in msg
    assert "launcher.stages.locality: {nodes: 1, processes_per_node: 1}" in msg
    ok = text + "  stages:\n    locality: {processes_per_node: 1}\n"
    assert len(load_runs(write(tmp_path, ok, "ok.yaml"))[1]) == 2
    bad = text + "  stages:\n    locality: {processes_per_node: 3}\n"
    (msg,) = problems(write(tmp_path, bad, "bad.yaml"))
    assert "launcher.stages.locality: locality runs in one process, not 1 x 3" in msg


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ("{processes_per_node: 1000000}", "launcher.resources.processes_per_node"),
        ("{nodes: 100001}", "launcher.resources.nodes"),
        ("{gpus_per_node: 5000}", "launcher.resources.gpus_per_node"),
        ("{cpus_per_task: 99999}", "launcher.resources.cpus_per_task"),
    ],
)
def test_resources_past_any_machine_are_refused_by_field(tmp_path: Path, resources: str, field: str) -> None:
    (msg,) = problems(write(tmp_path, BASE + f"launcher:\n  resources: {resources}\n"))
    assert f"sweep.yaml:7: {field}: Input should be less than or equal to" in msg, msg


def test_a_field_added_later_counts_in_the_run_id_only_when_set(tmp_path: Path) -> None:
    """`on_nonfinite` (WHEN_SET) at its default leaves every earlier run's id as it was; set, it makes a new run."""
    plain = load_runs(write(tmp_path, BASE, "a.yaml"))[1][0]
    default = BASE.replace("steps: 2,", "steps: 2, on_nonfinite: fail, max_skipped_steps: 10,")
    skip = BASE.replace("steps: 2,", "steps: 2, on_nonfinite: skip,")
    assert load_runs(write(tmp_path, default, "b.yaml"))[1][0].run_id == plain.run_id
    other = load_runs(write(tmp_path, skip, "c.yaml"))[1][0]
    assert other.run_id != plain.run_id and other.run_id == run_id(other.experiment)
    assert "on_nonfinite" not in json.dumps(identity(plain.experiment))
    assert identity(other.experiment)["pretrain"]["on_nonfinite"] == "skip"
