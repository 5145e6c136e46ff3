"""Resuming pretraining from an official ExtreMA checkpoint: its AdamW state, its epoch and with it the EMA momentum
position come across (`init_from_mode: resume`); a checkpoint that cannot resume is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from extrema.models.extrema import ExtreMA
from extrema.run import rundir
from extrema.spec import ModelSpec, RunSpec
from extrema.stages import pretrain
from extrema.train import resume_point, weights
from extrema.train.optim import build_adamw, ema_momentum, param_groups
from tests.stage_runs import TINY_EXPERIMENT, make_run

SPEC = ModelSpec.model_validate(TINY_EXPERIMENT["model"])
SKIP = {"base_encoder.pos_embed", "base_encoder.cls_token"}  # main.py's no-decay list


def release_checkpoint(model: ExtreMA, epoch: int, steps: int = 3) -> dict[str, Any]:
    """What the release's main.py saves after `steps` AdamW steps: its optimizer built as main.py builds it (timm
    `add_weight_decay` over the trained parameters, frozen target and position table left out), keyed by position."""
    sd = weights.to_official(model)["state_dict"]
    trained = [k for k in sd if k.startswith(("module.base_encoder.", "module.predictor.")) and "pos_embed" not in k]
    no_decay = [k for k in trained if sd[k].ndim <= 1 or k.endswith(".bias") or k[len("module.") :] in SKIP]
    decay = [k for k in trained if k not in no_decay]
    params = {k: nn.Parameter(sd[k].clone()) for k in trained}
    groups = [{"params": [params[k] for k in no_decay], "weight_decay": 0.0}]
    groups.append({"params": [params[k] for k in decay], "weight_decay": 0.1})
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    state = {k: p.detach() for k, p in params.items()}
    return {"epoch": epoch, "arch": "vit_pico", "state_dict": {**sd, **state}, "optimizer": optimizer.state_dict(),
            "scaler": {"scale": 65536.0, "_growth_tracker": 0}}  # fmt: skip


def ours(model: ExtreMA) -> torch.optim.AdamW:
    """The optimizer pretraining builds."""
    trainable = nn.ModuleDict({"online": model.online, "predictor": model.predictor})
    return build_adamw(param_groups(trainable, 0.1, no_decay_names=("pos_embed", "cls_token")), 1e-3, (0.9, 0.95))


def test_an_official_checkpoint_brings_its_optimizer_state_and_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    url = str(tmp_path / "checkpoint_0004.pth.tar")
    saved = release_checkpoint(ExtreMA(SPEC), epoch=2)
    torch.save(saved, url)
    model = ExtreMA(SPEC)
    weights.load_extrema(model, url)
    optimizer = ours(model)
    point = resume_point.resume_from(url, model, optimizer, steps_per_epoch=8, total_steps=40, base_momentum=0.99)
    assert (point.step, point.epoch, point.optimizer) == (16, 2.0, True)
    assert point.momentum == ema_momentum(16, 40, 0.99) > 0.99
    names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters()}
    got = {names[p]: s for p, s in optimizer.state.items()}
    theirs = saved["optimizer"]["state"]
    order = resume_point.official_order(saved["state_dict"])
    for official, mine in (
        ("module.base_encoder.blocks.1.attn.qkv.weight", "online.encoder.blocks.1.attn.qkv.weight"),
        ("module.base_encoder.patch_embed.proj.weight", "online.encoder.patch_embed.weight"),
        ("module.base_encoder.cls_token", "online.encoder.cls_token"),
        ("module.base_encoder.blocks_token.0.gamma_1", "online.encoder.blocks_token.0.gamma_1"),
        ("module.base_encoder.head.3.weight", "online.projector.3.weight"),
        ("module.predictor.0.bias", "predictor.0.bias"),
    ):
        entry = theirs[order.index(official)]
        assert torch.equal(got[mine]["exp_avg"], entry["exp_avg"]), mine
        assert torch.equal(got[mine]["exp_avg_sq"], entry["exp_avg_sq"]), mine
        assert float(got[mine]["step"]) == 3.0
    assert len(got) == len(theirs) == len(order)
    # ... and the weights the optimizer state belongs to are the ones loaded.
    loaded = saved["state_dict"]["module.base_encoder.blocks.1.attn.qkv.weight"]
    assert torch.equal(model.state_dict()["online.encoder.blocks.1.attn.qkv.weight"], loaded)


def test_checkpoints_that_cannot_resume_say_why(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = release_checkpoint(ExtreMA(SPEC), epoch=2, steps=1)
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "no_epoch.pth": ({k: v for k, v in saved.items() if k != "epoch"}, "no 'epoch' to resume at"),
        "at_end.pth": ({**saved, "epoch": 5}, "is at step 40, not before this run's last"),
        "short.pth": (
            {**saved, "optimizer": {**saved["optimizer"], "param_groups": saved["optimizer"]["param_groups"][:1]}},
            "its optimizer holds",
        ),
    }
    for name, (obj, why) in cases.items():
        torch.save(obj, tmp_path / name)
        model = ExtreMA(SPEC)
        weights.load_extrema(model, str(tmp_path / name))
        with pytest.raises(ValueError, match=why):
            resume_point.resume_from(str(tmp_path / name), model, ours(model), 8, 40, 0.99)
    torch.save({k: v for k, v in saved.items() if k != "optimizer"}, tmp_path / "weights_only.pth")
    model = ExtreMA(SPEC)
    point = resume_point.resume_from(str(tmp_path / "weights_only.pth"), model, ours(model), 8, 40, 0.99)
    assert (point.step, point.optimizer) == (16, False)


def test_pretraining_resumes_an_official_run_at_its_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    official = str(tmp_path / "current.pth.tar")
    torch.save(release_checkpoint(ExtreMA(SPEC), epoch=1), official)
    run_dir = str(tmp_path / "run")
    make_run(run_dir, {"stages": ["pretrain"], "pretrain": {"init_from": official}})  # 8 steps an epoch, 12 in all
    stage_dir = rundir.join(run_dir, "pretrain")
    spec = RunSpec.model_validate(rundir.read_json(rundir.join(stage_dir, "spec.json")))
    result = pretrain.run(spec, stage_dir, init_from_mode="resume")
    assert result["init_from_step"] == 8 and result["steps"] == 12
    lines = [json.loads(x) for x in Path(stage_dir, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == [9, 10, 11, 12]
    for r in steps:  # the EMA momentum (and lr) continue the schedule from the official epoch
        assert r["momentum"] == pytest.approx(ema_momentum(r["step"] - 1, 12, 0.99))
    plain = str(tmp_path / "plain")
    make_run(plain, {"stages": ["pretrain"]})
    spec = RunSpec.model_validate(rundir.read_json(rundir.join(plain, "pretrain", "spec.json")))
    with pytest.raises(ValueError, match=r"init_from_mode resume needs pretrain\.init_from"):
        pretrain.run(spec, rundir.join(plain, "pretrain"), init_from_mode="resume")


def test_the_spec_refuses_resume_without_a_source_and_keeps_run_ids() -> None:
    from pydantic import ValidationError

    from extrema.spec import PretrainSpec, identity

    with pytest.raises(ValidationError, match="init_from_mode: resume needs init_from"):
        PretrainSpec(init_from_mode="resume")
    assert PretrainSpec(init_from="file:///x.pth", init_from_mode="resume").init_from_mode == "resume"
    assert "init_from_mode" not in identity(PretrainSpec())  # unset, as in every run before it existed
