"""Weights out of a real sweep (`extrema-launch export`, timm / safetensors / official) and pretraining that
starts from an official checkpoint."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console

from extrema import entry
from extrema.models.extrema import ExtreMA
from extrema.models.vit import build_vit
from extrema.spec import Experiment
from extrema.train import weights
from launch.cli import export as export_command
from launch.inputs.errors import UsageError
from launch.runstore import store
from tests.stage_runs import checkpointed_model, make_run
from tests.test_cli import TINY, cli
from tests.weight_sources import PICO, save_pretrain_checkpoint

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Experiment]:
    """A finished one-run sweep (cait, 4 pretrain steps): (run store URL, run id, its experiment)."""
    root = tmp_path_factory.mktemp("export")
    sweep: dict[str, Any] = yaml.safe_load(TINY.read_text())
    sweep |= {"name": "export", "root": str(root / "runs"), "sweep": {"grid": {"model.cls_token": ["cait"]}}}
    sweep["base"]["stages"] = ["pretrain"]
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code, out, err = cli("sweep", str(path))
    assert code == 0, out + err
    url = store.sweep_url(str(root / "runs"), "export")
    manifest = store.read_manifest(url)
    assert manifest is not None
    run_id = manifest["runs"][0]["run_id"]
    spec = yaml.safe_load((Path(url) / run_id / "pretrain" / "spec.json").read_text())
    return url, run_id, Experiment.model_validate(spec["experiment"])


def export(*argv: str) -> str:
    """Run `extrema-launch export ARGV` through the command's own parser; its output."""
    parser = argparse.ArgumentParser(prog="extrema-launch")
    export_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    text = io.StringIO()
    assert args.fn(args, Console(file=text, width=200)) == 0
    return text.getvalue()


def test_timm_and_safetensors_exports_of_a_run_load_into_real_timm(
    swept: tuple[str, str, Experiment], tmp_path: Path
) -> None:
    url, run_id, exp = swept
    ours = build_vit(exp.model, drop_path_rate=0.0).eval()
    weights.load_encoder(ours, weights.resolve(f"{url}/{run_id}/pretrain/ckpt"), "ema")
    for fmt, name in (("timm", "ema.pth"), ("safetensors", "ema.safetensors")):
        out = export(url, "--run", run_id, "--format", fmt, "--out", str(tmp_path / name))
        assert f"wrote {tmp_path / name} ({fmt})" in out and "model settings from the run's spec" in out
        assert '"model_name": "cait_xxs24_224"' in out
        file = str(tmp_path / name)
        state = weights.read_safetensors(file) if fmt == "safetensors" else weights.read_pth(file)
        model = weights.build_timm(weights.timm_config(ours)).eval()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(IMAGES), ours(IMAGES), rtol=1e-5, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ema.safetensors"), "pt") as f:
        assert '"depth_token_only": 2' in f.metadata()["timm_create_model"]


def test_official_export_of_a_run_reloads_into_extrema(swept: tuple[str, str, Experiment], tmp_path: Path) -> None:
    url, run_id, exp = swept
    file = str(tmp_path / "official.pth")
    export(url, "--run", run_id, "--format", "official", "--out", file)
    from_export, from_checkpoint = ExtreMA(exp.model), ExtreMA(exp.model)
    weights.load_extrema(from_export, file)
    weights.load_extrema(from_checkpoint, f"{url}/{run_id}/pretrain/ckpt")
    for (name, a), b in zip(from_checkpoint.state_dict().items(), from_export.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UsageError, match="run 'nope' is not part of"):
        export(url, "--run", "nope", "--format", "official", "--out", file)
    with pytest.raises(UsageError, match=r"needs a name ending in \.safetensors"):
        export(url, "--run", run_id, "--format", "safetensors", "--out", str(tmp_path / "x.pth"))


def test_pretrain_starts_from_an_official_checkpoint(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    exp = make_run(run_dir, {"stages": ["pretrain"], "pretrain": {"steps": 2, "ckpt_every": 2}})
    torch.manual_seed(7)
    start = ExtreMA(exp.model)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.1 * torch.randn_like(p))
    official = str(tmp_path / "release.pth")
    weights.save_weights(official, weights.to_official(start))
    make_run(run_dir, {"stages": ["pretrain"], "pretrain": {"steps": 2, "ckpt_every": 2, "init_from": official}})
    entry.run_stage(run_dir, "pretrain")
    trained = checkpointed_model(Path(run_dir) / "pretrain")
    # Two warmup steps move every part, both branches included, by far less than the distance to any fresh init.
    for key, value in start.state_dict().items():
        assert (trained[f"model.{key}"] - value).abs().max() < 0.01, key


def test_export_from_a_checkpoint_without_a_run(swept: tuple[str, str, Experiment], tmp_path: Path) -> None:
    """A DCP step (its run's spec found above it), the same step copied out of the run (flags), an official .pth
    (its arch) and one of our exports (its description) are each a SOURCE; --json prints the description."""
    url, run_id, exp = swept
    step = weights.resolve(f"{url}/{run_id}/pretrain/ckpt")
    ours = build_vit(exp.model, drop_path_rate=0.0).eval()
    weights.load_encoder(ours, step, "ema")
    with torch.no_grad():
        expected = ours(IMAGES)

    def features(file: str) -> torch.Tensor:
        with torch.no_grad():
            return weights.timm_model(file)(IMAGES)

    described = json.loads(export(step, "--format", "timm", "--out", str(tmp_path / "a.pth"), "--json"))
    assert described == json.loads(Path(tmp_path / "a.pth.json").read_text())
    assert described["model"]["arch"] == "vit_pico" and described["timm"]["class"] == "timm.models.cait.Cait"
    torch.testing.assert_close(features(str(tmp_path / "a.pth")), expected, rtol=1e-5, atol=1e-5)
    loose = tmp_path / "loose" / "step-4"
    shutil.copytree(step, loose)
    with pytest.raises(UsageError, match=r"^no model settings: .* give --arch") as err:
        export(str(loose), "--format", "timm", "--out", str(tmp_path / "b.pth"))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"the run's spec contradicts --arch vit_nano \(it says vit_pico\)"):
        export(step, "--format", "timm", "--out", str(tmp_path / "b.pth"), "--arch", "vit_nano")
    flags = ("--arch", "vit_pico", "--mlp-dim", str(exp.model.mlp_dim), "--proj-dim", str(exp.model.proj_dim))
    out = export(str(loose), "--format", "official", "--out", str(tmp_path / "release.pth"), *flags)
    assert "model settings from the flags" in out
    out = export(str(tmp_path / "release.pth"), "--format", "safetensors", "--out", str(tmp_path / "c.safetensors"))
    assert "model settings from the file's description" in out
    torch.testing.assert_close(features(str(tmp_path / "c.safetensors")), expected, rtol=1e-5, atol=1e-5)
    official = {k: v for k, v in weights.read_pth(str(tmp_path / "release.pth")).items() if k != "extrema_export"}
    torch.save({**official, "epoch": 300}, tmp_path / "as_released.pth")  # the release's keys: arch, state_dict
    out = export(str(tmp_path / "as_released.pth"), "--format", "timm", "--out", str(tmp_path / "d.pth"))
    assert "model settings from the file's description" in out
    torch.testing.assert_close(features(str(tmp_path / "d.pth")), expected, rtol=1e-5, atol=1e-5)
    out = export(str(tmp_path / "c.safetensors"), "--format", "timm", "--out", str(tmp_path / "e.pth"))
    torch.testing.assert_close(features(str(tmp_path / "e.pth")), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("design", ["vit", "avgpool"])
def test_official_format_refuses_a_design_the_official_code_cannot_hold(design: str, tmp_path: Path) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    save_pretrain_checkpoint(ckpt_dir, PICO.model_copy(update={"cls_token": design}))
    flags = ("--arch", "vit_pico", "--cls-token", design, "--mlp-dim", "32", "--proj-dim", "16")
    with pytest.raises(
        UsageError, match=rf"^--format official: the official code holds only the cait design.*'{design}'"
    ):
        export(ckpt_dir, "--format", "official", "--out", str(tmp_path / "x.pth"), *flags)
    assert not (tmp_path / "x.pth").exists()
    assert "wrote" in export(ckpt_dir, "--format", "timm", "--out", str(tmp_path / "x.pth"), *flags)
