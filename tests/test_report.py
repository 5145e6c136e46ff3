"""`extrema-launch report`: one HTML file that needs no network, opened in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_image

from tests.cluster_sweeps import TINY, cli
from tests.clusters import unavailable

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[a-z]+:|<script|<link|@import|url\(\s*["']?http""", re.I)


def chromium() -> str:
    """The headless browser, or fail (under CI) / skip naming how to install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        unavailable("no chromium; install with apt-get install chromium (.ci/install.sh)")
    assert found is not None
    return found


def test_the_report_is_one_self_contained_page_with_every_run(tmp_path: Path) -> None:
    browser = chromium()
    root = tmp_path / "runs"
    code, out = cli("sweep", str(TINY), "--root", str(root), "--quiet")
    assert code == 0, out
    url = str(root / "tiny")
    run_ids = sorted(p.name for p in (root / "tiny").iterdir() if re.fullmatch(r"[0-9a-f]{10}", p.name))
    assert len(run_ids) == 2
    code, out = cli("viz", "attention", url, "--run", run_ids[0], "--images", "0", "1")
    assert code == 0, out
    page = tmp_path / "report.html"
    code, out = cli("report", url, "--out", str(page))
    assert code == 0 and "needs no network" in out, out
    text = page.read_text()
    assert not EXTERNAL.findall(text), EXTERNAL.findall(text)[:5]  # nothing fetched from elsewhere
    assert text.count("<svg") >= 1 and "data:image/png;base64," in text  # Figure 1 and the attention map inline
    for run_id in run_ids:
        assert run_id in text

    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000"]
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    image = decode_image(str(shot)).float()
    assert image.shape[-2:] == (2000, 1280)
    assert image.std() > 10 and (image < 128).float().mean() > 0.005  # drawn on: not a blank page
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    rendered = re.sub(r"<[^>]+>", " ", dom.stdout)
    for run_id in run_ids:
        assert run_id in rendered
    assert "Provenance" in rendered and "completed" in rendered
    assert torch.isfinite(image).all()


def test_a_report_of_an_unknown_sweep_is_refused(tmp_path: Path) -> None:
    code, out = cli("report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html"))
    assert code == 2 and not (tmp_path / "r.html").exists(), out


@pytest.mark.parametrize("bad", ["<script>alert(1)</script>", 'a"><img src=x onerror=alert(1)>'])
def test_cells_are_escaped(bad: str) -> None:
    from launch.views.report import table_html

    assert "<script>" not in table_html(["h"], [[bad]]) and "<img" not in table_html([bad], [["x"]])
