"""The finetuning stage: classifier designs, layer-decay groups, MixUp/CutMix labels, weights, end to end, resume."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from extrema import entry
from extrema.models.classifier import Classifier
from extrema.models.vit import resize_pos_embed, sincos_pos_embed_2d
from extrema.run import rundir
from extrema.spec import FinetuneSpec, ModelSpec
from extrema.stages.finetune import build_classifier, mix_batch, train_transform
from extrema.train import weights
from extrema.train.optim import param_groups
from tests.stage_runs import checkpointed_model, make_run
from tests.weight_sources import official_checkpoint, save_pretrain_checkpoint

FINETUNE: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 32,
    "train_size": 128,
    "warmup_epochs": 0.5,
    "base_lr": 2e-2,
    "val_size": 64,
    "eval_batch_size": 64,
}
PICO = ModelSpec(arch="vit_pico")


def finetune_run(run: Path, finetune: dict[str, Any] | None = None) -> Any:
    """A run directory whose pretrain stage holds a complete checkpoint at step 5, and a finetune spec."""
    exp = make_run(str(run), {"stages": ["pretrain", "finetune"], "finetune": {**FINETUNE, **(finetune or {})}})
    return exp, save_pretrain_checkpoint(str(run / "pretrain" / "ckpt"), exp.model)


def test_layer_decay_groups_of_the_classifier() -> None:
    model = Classifier(PICO, num_classes=10)
    weights.use_pos_embed(model.encoder, None, learnable=True)
    depth, decay = model.num_layers, 0.75
    groups = param_groups(model, 0.05, ("pos_embed", "cls_token"), layer_decay=decay, num_layers=depth)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.patch_embed.weight"])] == pytest.approx(decay ** (depth + 1))
    assert scale[id(named["encoder.pos_embed"])] == pytest.approx(decay ** (depth + 1))
    for i in range(depth):  # block i (1-based layer i+1) gets decay^(depth + 1 - (i + 1))
        assert scale[id(named[f"encoder.blocks.{i}.attn.qkv.weight"])] == pytest.approx(decay ** (depth - i))
    for name in ("encoder.norm.weight", "head.weight", "head.bias"):
        assert scale[id(named[name])] == 1.0
    assert wd[id(named["head.weight"])] == 0.05 and wd[id(named["head.bias"])] == 0.0
    assert wd[id(named["encoder.pos_embed"])] == 0.0 and wd[id(named["encoder.blocks.0.norm1.weight"])] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_mixup_cutmix_labels_sum_to_one_and_depend_on_the_seed_only() -> None:
    x = torch.rand(16, 3, 32, 32)
    y = torch.arange(16) % 10
    mixed, soft = mix_batch(x, y, 10, 0.8, 1.0, seed=3)
    assert soft.shape == (16, 10) and mixed.shape == x.shape
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(16))
    assert (soft.max(dim=1).values < 1).all()  # every row mixes two labels
    torch.manual_seed(123)
    again = mix_batch(x, y, 10, 0.8, 1.0, seed=3)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)
    outcomes = {round(mix_batch(x, y, 10, 0.8, 1.0, seed=s)[1].max().item(), 4) for s in range(6)}
    assert len(outcomes) > 1
    _, plain = mix_batch(x, y, 10, 0.0, 0.0, seed=3)
    assert torch.equal(plain, torch.nn.functional.one_hot(y, 10).float())
    boxed, cut = mix_batch(x, y, 10, 0.0, 1.0, seed=3)
    torch.testing.assert_close(cut.sum(dim=1), torch.ones(16))
    changed = (boxed != x).any(dim=1)  # CutMix pastes one box: a pixel is either changed or kept
    area = changed.float().mean(dim=(1, 2))
    own = cut.gather(1, y.unsqueeze(1)).squeeze(1)  # the kept part's label weight is the kept area
    torch.testing.assert_close(own, 1 - area, atol=1e-6, rtol=0)


def test_train_transform_gives_normalized_crops() -> None:
    img = (torch.rand(3, 28, 28) * 255).to(torch.uint8)
    out = train_transform(32, FinetuneSpec())(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_cait_classifier_drops_class_token_and_gets_a_fresh_norm(tmp_path: Path) -> None:
    exp, pretrained = finetune_run(tmp_path)
    url = weights.resolve(str(tmp_path / "pretrain" / "ckpt"))
    model = build_classifier(exp, exp.finetune, 10, url)
    names = dict(model.named_parameters())
    assert not any("cls_token" in n or "blocks_token" in n for n in names)
    student = pretrained.online.encoder.state_dict()
    assert torch.equal(names["encoder.blocks.1.mlp.fc2.weight"], student["blocks.1.mlp.fc2.weight"])
    assert not torch.equal(names["encoder.blocks.1.mlp.fc2.weight"], pretrained.target.encoder.blocks[1].mlp.fc2.weight)
    assert torch.equal(names["encoder.norm.weight"], torch.ones(64))  # new LayerNorm after the mean pooling
    torch.testing.assert_close(names["encoder.pos_embed"].data, sincos_pos_embed_2d(64, 8, 8).unsqueeze(0))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    ema = build_classifier(exp, exp.finetune.model_copy(update={"encoder": "ema"}), 10, url)
    assert torch.equal(ema.encoder.blocks[1].mlp.fc2.weight, pretrained.target.encoder.blocks[1].mlp.fc2.weight)
    # A `vit`-design classifier cannot take a cait checkpoint: its CA blocks are unexpected there.
    vit_exp = exp.model_copy(update={"model": exp.model.model_copy(update={"cls_token": "vit"})})
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): blocks_token\.0\."):
        build_classifier(vit_exp, exp.finetune, 10, url)


def test_official_table_is_interpolated_to_a_new_resolution(tmp_path: Path) -> None:
    exp = make_run(str(tmp_path), {"stages": ["finetune"]})
    url = str(tmp_path / "official.pth")
    torch.save(official_checkpoint(), url)
    model = build_classifier(exp, FinetuneSpec(img_size=48, checkpoint=url), 10, url)
    assert model.encoder.pos_embed.shape == (1, 144, 64)
    expected = resize_pos_embed(sincos_pos_embed_2d(64, 8, 8).unsqueeze(0), 12)
    torch.testing.assert_close(model.encoder.pos_embed.data, expected)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        build_classifier(exp, FinetuneSpec(img_size=50), 10, None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finetune")
    finetune_run(run)
    assert entry.main([str(run), "finetune"]) == 0
    return run


def test_finetune_learns_and_reports_best_and_last(reference: Path) -> None:
    out = json.loads((reference / "finetune" / "result.json").read_text())
    assert out["finetune_best_top1"] > 30.0  # 10 classes: chance is 10%
    assert out["finetune_best_top1"] >= out["finetune_top1"] and out["finetune_best_top5"] >= out["finetune_top5"]
    assert out["steps"] == 8 and out["checkpoint"].endswith("pretrain/ckpt/step-5")
    proto = out["protocol"]
    assert proto["lr"] == pytest.approx(2e-2 * 32 / 256) and proto["layer_decay"] == 0.75
    assert proto["mixup"] == 0.8 and proto["cutmix"] == 1.0 and proto["label_smoothing"] == 0.1
    assert proto["drop_path_rate"] == 0.1 and proto["encoder"] == "student" and proto["img_size"] == 32
    records = rundir.read_jsonl(str(reference / "finetune" / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1.0, 2.0] and records[-1]["top1"] == out["finetune_top1"]


def test_finetune_resumes_to_the_same_result(reference: Path, tmp_path: Path) -> None:
    finetune_run(tmp_path)
    stage = tmp_path / "finetune"
    shutil.copytree(reference / "finetune" / "ckpt" / "step-4", stage / "ckpt" / "step-4")
    first = rundir.read_jsonl(str(reference / "finetune" / "metrics.jsonl"))[:1]
    rundir.write_text_atomic(str(stage / "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in first))
    copied = (stage / "ckpt" / "step-4" / ".metadata").stat().st_mtime_ns
    assert entry.main([str(tmp_path), "finetune"]) == 0
    assert (stage / "ckpt" / "step-4" / ".metadata").stat().st_mtime_ns == copied
    ref = json.loads((reference / "finetune" / "result.json").read_text())
    resumed = json.loads((stage / "result.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "checkpoint"} == {
        k: v for k, v in ref.items() if k != "checkpoint"
    }
    a, b = checkpointed_model(reference / "finetune"), checkpointed_model(stage)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_spec_defaults_are_table_2() -> None:
    f = FinetuneSpec()
    assert (f.base_lr, f.weight_decay, f.layer_decay, f.batch_size, f.warmup_epochs) == (1e-3, 0.05, 0.75, 1024, 5)
    assert (f.betas, f.drop_path_rate, f.label_smoothing, f.mixup, f.cutmix) == ((0.9, 0.999), 0.1, 0.1, 0.8, 1.0)
    assert (f.randaugment_ops, f.randaugment_magnitude, f.encoder, f.epochs) == (2, 9, "student", 100)
