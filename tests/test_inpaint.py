"""The inpaint stage: a decoder on a frozen pretrained encoder beats the mean image on held-out images."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from extrema import entry
from extrema.run import rundir
from extrema.spec import Experiment, InpaintSpec
from extrema.stages.inpaint import hidden_mask, patchify, unpatchify
from extrema.train import ckpt
from tests.stage_runs import TINY_EXPERIMENT, make_run, merge

INPAINT = {
    "steps": 60,
    "lr": 2e-3,
    "batch_size": 32,
    "warmup_steps": 10,
    "decoder_dim": 64,
    "decoder_depth": 1,
    "decoder_heads": 2,
    "train_size": 256,
    "val_size": 128,
    "figure_images": 5,
}


def test_patchify_round_trips_and_masks_mark_the_hidden_patches() -> None:
    x = torch.randn(2, 3, 32, 32)
    p = patchify(x, 4)
    assert p.shape == (2, 64, 48)
    torch.testing.assert_close(p[0, 9], x[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))  # row 1, column 1
    torch.testing.assert_close(unpatchify(p, 4), x)
    hidden = hidden_mask(torch.tensor([[0, 5], [63, 1]]), 64)
    assert hidden.sum().item() == 2 * 62 and not hidden[0, 5] and not hidden[1, 63] and hidden[0, 1]


def test_spec_refuses_ratios_that_leave_nothing_visible() -> None:
    with pytest.raises(ValidationError, match="each in"):
        InpaintSpec(ratios=(0.5, 1.0))
    with pytest.raises(ValidationError, match="divisible by 4 and by decoder_heads"):
        InpaintSpec(decoder_dim=66, decoder_heads=3)
    with pytest.raises(ValidationError, match=r"inpaint\.ratios: 0\.99 leaves no visible token of 64"):
        Experiment.model_validate(
            merge(TINY_EXPERIMENT, {"stages": ["pretrain", "inpaint"], "inpaint": {"ratios": [0.99]}})
        )


def test_decoder_beats_the_mean_image_on_held_out_images(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "r0")
    make_run(
        run_dir, {"stages": ["pretrain", "inpaint"], "pretrain": {"steps": 4, "ckpt_every": 4}, "inpaint": INPAINT}
    )
    entry.run_stage(run_dir, "pretrain")
    result = entry.run_stage(run_dir, "inpaint")
    for r in ("r50", "r75", "r90"):
        mse, baseline = result[f"inpaint_mse_{r}"], result[f"inpaint_baseline_mse_{r}"]
        assert mse < 0.85 * baseline, (r, mse, baseline)
        assert result[f"inpaint_relative_mse_{r}"] == pytest.approx(mse / baseline)
    assert result["protocol"]["val_images"] == 128 and result["protocol"]["train_images"] == 256
    assert result["checkpoint"].endswith("pretrain/ckpt/step-4")
    stage = tmp_path / "r0" / "inpaint"
    assert (stage / "result.json").exists() and (stage / "decoder.pt").exists()
    shown = ckpt.read_torch(str(stage / "samples.pt"))
    assert shown["original"].shape == (5, 3, 32, 32) and shown["ratios"] == [0.5, 0.75, 0.9]
    assert shown["masked"].shape == shown["reconstruction"].shape == (3, 5, 3, 32, 32)
    hidden = shown["hidden"][2]
    assert shown["hidden"].shape == (3, 5, 64) and hidden.sum().item() == 5 * (64 - 6)  # int(6.4) visible at 90%
    masked, recon = (patchify(shown[k][2].float(), 4) for k in ("masked", "reconstruction"))
    torch.testing.assert_close(recon[~hidden], masked[~hidden])  # visible patches pasted back as shown
    assert (masked[~hidden] - patchify(shown["original"].float(), 4)[~hidden]).abs().max() <= 1  # uint8 rounding
    assert masked[hidden].std(0).max() == 0  # every hidden pixel in one flat colour
    assert (recon[hidden] - masked[hidden]).abs().mean() > 10  # ... and predicted, not left flat
    head = Path(result["figure"]).read_bytes()[:24]
    w, h = struct.unpack(">II", head[16:24])
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and 600 < w < 2000 and 1000 < h < 3000
    assert (stage / "inpaint.svg").stat().st_size > 10000

    # A completed stage is not run again: the same result comes back and nothing is rewritten.
    assert entry.run_stage(run_dir, "inpaint") == json.loads((stage / "result.json").read_text())
    assert rundir.read_json(str(stage / "status.json"))["attempts"] == 1
    # An attempt that ended before its result was written reloads the trained decoder and scores it the same way.
    (stage / "result.json").unlink()
    again = entry.run_stage(run_dir, "inpaint")
    assert again["inpaint_mse_r75"] == result["inpaint_mse_r75"] and "inpaint_train_loss" not in again
    assert rundir.read_json(str(stage / "status.json"))["attempts"] == 2
