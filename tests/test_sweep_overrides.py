"""`extrema-launch sweep FILE key=value ...`: overrides validated like the file, every problem in one round, and
recorded in the manifest so that `status FILE` finds the same sweep."""

from __future__ import annotations

import contextlib
import io
import uuid
from pathlib import Path

import yaml

from launch.cli import main
from launch.runstore import store
from launch.sweepfile import overrides
from launch.sweepfile.expand import load_runs

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "tiny.yaml"


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def dry(*args: str) -> tuple[int, str, str]:
    return cli("sweep", str(TINY), *args, "--dry-run", "--snapshot", "off", "--root", f"memory://{uuid.uuid4().hex}")


def problems(err: str) -> list[str]:
    return err.splitlines()[1:]  # below "invalid sweep (nothing submitted, nothing written):"


def test_overrides_change_the_runs_and_the_launcher() -> None:
    _, plain = load_runs(TINY)
    _, changed = load_runs(TINY, overrides=["pretrain.base_lr=1e-3", "launcher.resources.time_min=7"])
    assert [r.experiment.pretrain.base_lr for r in changed] == [1e-3, 1e-3]
    assert {r.run_id for r in plain}.isdisjoint(r.run_id for r in changed)
    sweep, same = load_runs(TINY, overrides=["launcher.resources.time_min=7", "base.knn.k=5"])
    assert sweep.launcher.resources.time_min == 7 and [r.run_id for r in same] == [r.run_id for r in plain]
    code, out, _ = dry("pretrain.masking={ratio: 0.5, num_masks: 2}", "launcher.max_parallel=1")
    assert code == 0 and "would submit 4 of 4 jobs" in out


def test_a_bad_override_names_the_argument_and_the_field_path() -> None:
    code, out, err = dry("pretrain.base_lr=abc")
    assert code == 2 and out == ""
    assert problems(err) == [
        "argument pretrain.base_lr=abc: base.pretrain.base_lr: Input should be a valid number, unable to parse string "
        "as a number (got 'abc')"
    ]
    code, _, err = dry("pretrain.nope=1", "launcher.bogus=2", "model.cls_token=vit", "knn", "pretrain.steps=[1")
    lines = problems(err)
    assert code == 2 and len(lines) == 5, err
    assert lines[0] == "argument knn: knn: not an override: give KEY=VALUE with KEY a dotted path (a.b.c)"
    assert lines[1].startswith("argument pretrain.steps=[1: base.pretrain.steps: YAML syntax: ")
    assert lines[2] == (
        "argument model.cls_token=vit: base.model.cls_token: model.cls_token is swept by the file's sweep axes: the "
        "axis would replace this value in every run"
    )
    assert any(x.startswith("argument launcher.bogus=2: launcher.bogus: unknown key 'bogus' (known: ") for x in lines)
    assert any(x.startswith("argument pretrain.nope=1: base.pretrain.nope: unknown key 'nope' (known: ") for x in lines)


def test_override_values_have_the_file_bounds() -> None:
    code, _, err = dry("pretrain.steps=" + "[" * 100 + "]" * 100)
    assert code == 2 and "base.pretrain.steps: the document nests more than 64 levels deep" in err
    code, _, err = dry("pretrain.steps=" + "x" * (1 << 20))
    assert code == 2 and "overrides may have 1,048,576 bytes in all" in err


def test_every_problem_comes_in_one_round(tmp_path: Path) -> None:
    """The launcher, the axes, the base and the overrides: all reported together."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "base": {"data": {"dataset": "synthetic"}, "pretrain": {"steps": -3}},
                "sweep": {"grid": {"model.nonsense": [1, 2]}},
                "launcher": {"resources": {"nodes": 0}},
            }
        )
    )
    code, _, err = cli("sweep", str(bad), "knn.k=abc", "--dry-run", "--root", str(tmp_path / "runs"))
    lines = problems(err)
    assert code == 2 and not (tmp_path / "runs").exists()
    assert sorted(x.split(": ")[1] for x in lines) == [
        "base.knn.k",
        "base.pretrain.steps",
        "launcher.resources.nodes",
        "sweep.grid.model.nonsense",
    ], err
    bad.write_text(
        yaml.safe_dump(
            {"name": "bad", "base": {"data": {"dataset": "synthetic"}, "pretrain": {"steps": -3}}, "sweep": {"grid": 3}}
        )
    )
    code, _, err = cli("sweep", str(bad), "--dry-run", "--root", str(tmp_path / "runs"))
    assert code == 2 and {x.split(": ")[1] for x in problems(err)} == {"sweep.grid", "base.pretrain.steps"}, err


def test_status_of_the_file_finds_the_overridden_sweep(tmp_path: Path) -> None:
    root = str(tmp_path / "runs")
    given = ["knn.k=3", "launcher.resources.time_min=9"]
    sweep, runs = load_runs(TINY, root=root, overrides=given)
    url = store.sweep_url(root, sweep.name)
    source = overrides.source(str(TINY.resolve()), given)
    assert overrides.recorded(source, str(TINY.resolve())) == given
    store.write_manifest(
        url,
        store.sweep_manifest(
            sweep.name, root, source, sweep.launcher.model_dump(mode="json"), "", [r.stored() for r in runs]
        ),
    )
    code, out, _ = cli("status", str(TINY), "--root", root)
    assert code == 0 and "with the overrides of its last submission: knn.k=3 launcher.resources.time_min=9" in out
    assert all(r.run_id in out for r in runs)
    code, out, _ = cli("status", str(TINY), "knn.k=3", "launcher.resources.time_min=9", "--root", root)
    assert code == 0 and all(r.run_id in out for r in runs) and "last submission" not in out
