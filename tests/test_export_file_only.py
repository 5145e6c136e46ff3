"""Exports that rebuild their own model: every design's file, read by a python process that has only timm,
safetensors, torch and json (not this package), builds the exact timm model and loads it strictly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from extrema.models.vit import VisionTransformer, build_vit
from extrema.train import export_description, weights
from tests.weight_sources import PICO

DESIGNS = ("cait", "vit", "avgpool")
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# The README's recipe, as a user without extrema runs it: the safetensors metadata, or the sidecar JSON of a .pth.
FILE_ONLY = textwrap.dedent(
    """
    import json, sys
    import timm, torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder, designs = sys.argv[1], sys.argv[2].split(",")
    images = load_file(f"{folder}/images.safetensors")["images"]
    out = {}
    for design in designs:
        path = f"{folder}/{design}.safetensors"
        args = json.loads(safe_open(path, "pt").metadata()["timm_create_model"])
        model = timm.create_model(**args); model.load_state_dict(load_file(path))
        side = json.load(open(f"{folder}/{design}.pth.json"))
        other = timm.create_model(**side["timm"]["create_model"])
        other.load_state_dict(torch.load(f"{folder}/{design}.pth", weights_only=True))
        with torch.no_grad():
            out[design] = model.eval()(images)
            out[design + ".pth"] = other.eval()(images)
    assert not any(name.split(".")[0] == "extrema" for name in sys.modules), "the reader imported extrema"
    save_file({k: v.contiguous() for k, v in out.items()}, f"{folder}/timm_features.safetensors")
    """
)


def perturbed(design: str) -> VisionTransformer:
    """A pico encoder away from its initialisation, as after training."""
    torch.manual_seed(5)
    encoder = build_vit(PICO.model_copy(update={"cls_token": design}), drop_path_rate=0.0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


def export_each(folder: Path) -> dict[str, torch.Tensor]:
    """Every design exported (safetensors and .pth) from a plain encoder file given with flags; our features."""
    ours: dict[str, torch.Tensor] = {}
    for design in DESIGNS:
        encoder = perturbed(design)
        source = str(folder / f"{design}_encoder.pt")
        torch.save(encoder.state_dict(), source)  # our key names, as pretrain's export/encoder_ema.pt
        flags = {"arch": "vit_pico", "cls_token": design}
        for fmt, name in (("safetensors", f"{design}.safetensors"), ("timm", f"{design}.pth")):
            done = weights.export(source, fmt, str(folder / name), flags=flags)  # type: ignore[arg-type]
            assert done["settings_from"] == "the flags" and done["design"] == design
        with torch.no_grad():
            ours[design] = encoder(IMAGES)
    return ours


def test_each_design_rebuilds_from_the_file_alone_in_a_process_without_extrema(tmp_path: Path) -> None:
    ours = export_each(tmp_path)
    save_file({"images": IMAGES}, str(tmp_path / "images.safetensors"))
    run = subprocess.run(
        [sys.executable, "-c", FILE_ONLY, str(tmp_path), ",".join(DESIGNS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the checkout: `import extrema` would fail there
    )
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = weights.read_safetensors(str(tmp_path / "timm_features.safetensors"))
    for design in DESIGNS:
        torch.testing.assert_close(theirs[design], ours[design], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[design + ".pth"], ours[design], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("design", DESIGNS)
def test_timm_model_builds_the_exact_model_from_the_file(design: str, tmp_path: Path) -> None:
    encoder = perturbed(design)
    source = str(tmp_path / "encoder.pt")
    torch.save(encoder.state_dict(), source)
    out = str(tmp_path / "export.safetensors")
    described = weights.export(source, "safetensors", out, flags={"arch": "vit_pico", "cls_token": design})
    side = json.loads(Path(export_description.sidecar_url(out)).read_text())
    assert side == {k: v for k, v in described.items() if k not in ("out", "settings_from")}
    assert (side["model"]["arch"], side["model"]["cls_token"], side["branch"]) == ("vit_pico", design, "ema")
    for path in (out, str(tmp_path / "export.pth")):
        if path.endswith(".pth"):
            weights.export(out, "timm", path)  # from our own export: its metadata says what model it is
        model = weights.timm_model(path)
        with torch.no_grad():
            torch.testing.assert_close(model(IMAGES), encoder(IMAGES), rtol=1e-5, atol=1e-5)
    Path(export_description.sidecar_url(str(tmp_path / "export.pth"))).unlink()
    with pytest.raises(ValueError, match="describes no timm model"):
        weights.timm_model(str(tmp_path / "export.pth"))
