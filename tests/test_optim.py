"""Schedules, parameter groups, layer-wise lr decay, LARS and AdamW, checked against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from extrema.train.optim import (
    LARS,
    build_adamw,
    cosine_schedule,
    ema_momentum,
    param_groups,
    scaled_lr,
    set_hyperparams,
    vit_layer_id,
)


class TinyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)


class TinyViT(nn.Module):
    """The parameter layout of a ViT, two blocks deep; the patch-embed bias is frozen."""

    def __init__(self, dim: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.patch_embed.bias.requires_grad_(False)  # type: ignore[union-attr]


def names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


# ---------------------------------------------------------------- schedules


def sched(step: float, warmup_start: float = 0.0) -> float:
    """Warmup over 10 steps to 1.0, then cosine to 0.1 at step 110."""
    return cosine_schedule(step, 110, base=1.0, final=0.1, warmup_steps=10, warmup_start=warmup_start)


def test_cosine_warmup_is_linear_from_warmup_start() -> None:
    assert sched(0) == 0.0
    assert sched(2.5) == pytest.approx(0.25)
    assert sched(5) == pytest.approx(0.5)
    assert sched(10) == pytest.approx(1.0)
    assert sched(0, warmup_start=0.2) == pytest.approx(0.2)
    assert sched(5, warmup_start=0.2) == pytest.approx(0.6)


def test_cosine_end_points_midpoint_and_clamping() -> None:
    assert sched(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert sched(35) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(2) / 2) / 2)
    assert sched(110) == pytest.approx(0.1)
    assert sched(10_000) == pytest.approx(0.1)
    assert sched(-3) == 0.0
    # no warmup: starts at base
    assert cosine_schedule(0, 100, base=2.0) == 2.0
    assert cosine_schedule(100, 100, base=2.0) == pytest.approx(0.0)


def test_cosine_decays_monotonically_after_warmup() -> None:
    values = [cosine_schedule(s, 50, base=1.0, final=0.01, warmup_steps=5) for s in range(5, 60)]
    assert all(a > b for a, b in itertools.pairwise(values[:46]))
    assert values[45:] == [pytest.approx(0.01)] * 10


def test_cosine_with_warmup_as_long_as_the_run_ends_at_final() -> None:
    assert cosine_schedule(5, 10, base=1.0, final=0.3, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(10, 10, base=1.0, final=0.3, warmup_steps=10) == 0.3
    with pytest.raises(ValueError, match="must be >= 0"):
        cosine_schedule(0, -1, base=1.0)


finite = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)


@given(
    base=finite,
    frac_final=st.floats(0.0, 1.0),
    frac_start=st.floats(0.0, 1.0),
    total=st.integers(1, 10_000),
    frac_warmup=st.floats(0.0, 1.0),
    frac_step=st.floats(-0.1, 1.5),
)
def test_cosine_stays_between_lowest_start_and_base(
    base: float, frac_final: float, frac_start: float, total: int, frac_warmup: float, frac_step: float
) -> None:
    final, warmup_start = base * frac_final, base * frac_start
    warmup, step = total * frac_warmup, total * frac_step
    value = cosine_schedule(step, total, base, final, warmup, warmup_start)
    tol = 1e-12 * max(1.0, base)
    assert min(final, warmup_start) - tol <= value <= base + tol


@given(
    a=st.floats(-10.0, 10.0),
    b=st.floats(-10.0, 10.0),
    c=st.floats(-10.0, 10.0),
    total=st.integers(1, 1000),
    frac_warmup=st.floats(0.0, 1.0),
    frac_step=st.floats(0.0, 2.0),
)
def test_cosine_stays_within_its_three_levels_in_any_order(
    a: float, b: float, c: float, total: int, frac_warmup: float, frac_step: float
) -> None:
    value = cosine_schedule(total * frac_step, total, base=a, final=b, warmup_steps=total * frac_warmup, warmup_start=c)
    assert min(a, b, c) - 1e-9 <= value <= max(a, b, c) + 1e-9


def test_ema_momentum_end_points_and_midpoint() -> None:
    assert ema_momentum(0, 1000) == pytest.approx(0.996)
    assert ema_momentum(500, 1000) == pytest.approx(1 - 0.004 * 0.5)
    assert ema_momentum(250, 1000) == pytest.approx(1 - 0.004 * (1 + math.sqrt(2) / 2) / 2)
    assert ema_momentum(1000, 1000) == 1.0
    assert ema_momentum(5000, 1000) == 1.0
    assert ema_momentum(0, 10, base=0.99) == pytest.approx(0.99)
    assert all(ema_momentum(t, 100) < ema_momentum(t + 1, 100) for t in range(100))


def test_scaled_lr() -> None:
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)
    assert scaled_lr(0.1, 4096) == pytest.approx(1.6)
    assert scaled_lr(1e-3, 256) == 1e-3


# ---------------------------------------------------------------- parameter groups


def test_param_groups_split_decay_from_no_decay_and_skip_frozen() -> None:
    model = TinyViT()
    groups = param_groups(model, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["no_decay", "decay"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]
    names = names_by_group(model, groups)
    assert names["decay"] == {"patch_embed.weight", "blocks.0.fc.weight", "blocks.1.fc.weight", "head.weight"}
    assert names["no_decay"] == {
        "pos_embed",
        "cls_token",
        "blocks.0.fc.bias",
        "blocks.0.norm.weight",
        "blocks.0.norm.bias",
        "blocks.1.fc.bias",
        "blocks.1.norm.weight",
        "blocks.1.norm.bias",
        "norm.weight",
        "norm.bias",
        "head.bias",
    }
    assert "patch_embed.bias" not in names["decay"] | names["no_decay"]


def test_no_decay_names_match_dotted_components_and_suffixes() -> None:
    wrapper = nn.Module()
    wrapper.base_encoder = TinyViT()
    names = names_by_group(wrapper, param_groups(wrapper, 0.1, no_decay_names=("base_encoder.pos_embed", "head")))
    assert "base_encoder.pos_embed" in names["no_decay"]
    assert "base_encoder.cls_token" in names["decay"]  # 3-D and not listed
    assert "base_encoder.head.weight" in names["no_decay"]  # "head" is a dotted component
    assert "base_encoder.blocks.0.fc.weight" in names["decay"]


def test_layer_decay_scales_by_depth() -> None:
    model = TinyViT(depth=2)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, num_layers=2)
    names = names_by_group(model, groups)
    assert [g["name"] for g in groups] == [
        "layer0_no_decay",
        "layer0_decay",
        "layer1_no_decay",
        "layer1_decay",
        "layer2_no_decay",
        "layer2_decay",
        "layer3_no_decay",
        "layer3_decay",
    ]
    scale = {g["name"]: g["lr_scale"] for g in groups}
    assert scale["layer0_decay"] == scale["layer0_no_decay"] == 0.5**3  # patch_embed: decay ** (num_layers + 1)
    assert scale["layer1_decay"] == 0.5**2  # blocks.0: decay ** (num_layers - 0)
    assert scale["layer2_decay"] == 0.5**1  # blocks.1
    assert scale["layer3_decay"] == scale["layer3_no_decay"] == 1.0  # norm and head
    assert names["layer0_decay"] == {"patch_embed.weight"}
    assert names["layer0_no_decay"] == {"pos_embed", "cls_token"}
    assert names["layer1_decay"] == {"blocks.0.fc.weight"}
    assert names["layer2_no_decay"] == {"blocks.1.fc.bias", "blocks.1.norm.weight", "blocks.1.norm.bias"}
    assert names["layer3_decay"] == {"head.weight"}
    assert names["layer3_no_decay"] == {"norm.weight", "norm.bias", "head.bias"}
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05] * 4


def test_layer_decay_with_custom_layer_id_and_missing_depth() -> None:
    model = TinyViT()
    groups = param_groups(
        model, 0.0, layer_decay=0.1, num_layers=1, layer_id=lambda n: 2 if n.startswith("head") else 1
    )
    assert {g["name"]: g["lr_scale"] for g in groups} == pytest.approx(
        {"layer1_no_decay": 0.1, "layer1_decay": 0.1, "layer2_no_decay": 1.0, "layer2_decay": 1.0}
    )
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(model, 0.0, layer_decay=0.5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("patch_embed.weight", 0),
        ("pos_embed", 0),
        ("cls_token", 0),
        ("mask_token", 0),
        ("blocks.0.attn.qkv.weight", 1),
        ("blocks.11.mlp.fc2.bias", 12),
        ("encoder.blocks.3.norm1.weight", 4),
        ("backbone.patch_embed.proj.weight", 0),
        ("module.base_encoder.cls_token", 0),
        ("_orig_mod.blocks.5.attn.proj.weight", 6),
        ("blocks_token.0.gamma_1", 13),
        ("norm.weight", 13),
        ("fc_norm.bias", 13),
        ("head.weight", 13),
        ("encoder.norm.weight", 13),
    ],
)
def test_vit_layer_id(name: str, expected: int) -> None:
    assert vit_layer_id(name, num_layers=12) == expected


def test_vit_layer_id_refuses_a_block_beyond_the_depth() -> None:
    with pytest.raises(ValueError, match="out of range"):
        vit_layer_id("blocks.12.attn.qkv.weight", num_layers=12)


# ---------------------------------------------------------------- hyperparameters and optimizers


def test_set_hyperparams_scales_lr_and_keeps_no_decay_groups_at_zero() -> None:
    model = TinyViT()
    opt = build_adamw(param_groups(model, 0.05, layer_decay=0.5, num_layers=2), lr=1.0, betas=(0.9, 0.999))
    set_hyperparams(opt, lr=0.1, weight_decay=0.3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_scale"])
        assert g["weight_decay"] == (0.3 if g["wd_enabled"] else 0.0)
        assert g["wd_enabled"] == (not g["name"].endswith("no_decay"))
    set_hyperparams(opt, lr=0.2, weight_decay=0.0)  # switching decay off must not forget which groups decay
    set_hyperparams(opt, lr=0.2, weight_decay=0.07)
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.07]
    set_hyperparams(opt, lr=0.4)
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.07]
    assert opt.param_groups[-1]["lr"] == 0.4  # head group, lr_scale 1


def test_set_hyperparams_on_plain_groups_uses_scale_one() -> None:
    opt = LARS([nn.Parameter(torch.ones(2, 2))], lr=0.0, weight_decay=0.0)
    set_hyperparams(opt, lr=1.6, weight_decay=0.5)
    assert opt.param_groups[0]["lr"] == 1.6
    assert opt.param_groups[0]["weight_decay"] == 0.0  # started without decay


def test_lars_two_steps_match_hand_computation() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=2.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.1)

    # step 1. w: g = [-0.3, 0.4] + 0.1*[3, 4] = [0, 0.8]; q = 0.1 * 5 / 0.8 = 0.625; mu = [0, 0.5]; w = [3, 4] - 2*mu
    #         b (1-D: no decay, no trust ratio): mu = [0.5, 0.25]; b = [1, -1] - 2*mu = [0, -1.5]
    w.grad = torch.tensor([[-0.3, 0.4]])
    b.grad = torch.tensor([0.5, 0.25])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 3.0]]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.0, -1.5]))
    torch.testing.assert_close(w.grad, torch.tensor([[-0.3, 0.4]]))  # the gradient itself is left alone

    # step 2. w: g = [0.3, -0.3] + 0.1*[3, 3] = [0.6, 0]; q = 0.1 * 3*sqrt(2) / 0.6 = sqrt(2)/2
    #         update = [0.3*sqrt(2), 0]; mu = 0.9*[0, 0.5] + update = [0.3*sqrt(2), 0.45]; w = [3, 3] - 2*mu
    #         b: mu = 0.9*[0.5, 0.25] + [0.1, -0.2] = [0.55, 0.025]; b = [0, -1.5] - 2*mu = [-1.1, -1.55]
    w.grad = torch.tensor([[0.3, -0.3]])
    b.grad = torch.tensor([0.1, -0.2])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0 - 0.6 * math.sqrt(2), 2.1]]))
    torch.testing.assert_close(b.detach(), torch.tensor([-1.1, -1.55]))


def test_lars_zero_param_uses_trust_ratio_one_and_skips_params_without_grad() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    untouched = nn.Parameter(torch.ones(3, 3))
    opt = LARS([w, untouched], lr=0.5, weight_decay=0.1, momentum=0.9)
    w.grad = torch.full((2, 2), 2.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -1.0))
    torch.testing.assert_close(untouched.detach(), torch.ones(3, 3))


def test_lars_state_round_trips_through_state_dict() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LARS([w], lr=1.0, momentum=0.9, trust_coefficient=0.1)
    w.grad = torch.tensor([[0.6, 0.8]])
    opt.step()
    fresh = LARS([w], lr=1.0, momentum=0.9, trust_coefficient=0.1)
    fresh.load_state_dict(opt.state_dict())
    torch.testing.assert_close(fresh.state[w]["mu"], torch.tensor([[0.3, 0.4]]))  # q = 0.1 * 5 / 1


def test_build_adamw_steps_with_per_group_decay_and_lr_scale() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    groups = param_groups(model, weight_decay=0.5, layer_decay=0.5, num_layers=2)
    opt = build_adamw(groups, lr=0.1, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True  # CPU parameters: the fused kernel
    assert build_adamw(groups, 0.1, (0.9, 0.95), fused=False).defaults["foreach"] is True
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * g["lr_scale"] for g in groups])
    assert "lr" not in groups[0]  # the caller's dicts are not modified

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: AdamW moves only by decoupled weight decay
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["head.weight"].detach(), before["head.weight"] * (1 - 0.1 * 1.0 * 0.5))
    torch.testing.assert_close(
        after["blocks.0.fc.weight"].detach(), before["blocks.0.fc.weight"] * (1 - 0.1 * 0.25 * 0.5)
    )
    torch.testing.assert_close(after["head.bias"].detach(), before["head.bias"])
    torch.testing.assert_close(after["pos_embed"].detach(), before["pos_embed"])


def test_build_adamw_trains_a_real_loss_down() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    opt = build_adamw(param_groups(model, 0.05), lr=0.05, betas=(0.9, 0.999))
    block = model.blocks[0]
    assert isinstance(block, TinyBlock)
    x = torch.randn(8, 4)
    y = torch.randint(0, 3, (8,))
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model.head(model.norm(block.fc(x))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_adamw_is_fused_on_cuda() -> None:
    model = TinyViT().cuda()
    opt = build_adamw(param_groups(model, 0.05), lr=0.1, betas=(0.9, 0.999))
    assert opt.defaults["fused"] is True
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = model.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.head.weight, before)
