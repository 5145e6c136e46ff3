"""The optimised ExtreMA step (batched masks, SDPA, foreach EMA) agrees with the straightforward reference.

Both run in float64 (unit roundoff u = 1.1e-16), so they differ only in the order of their floating-point
sums, which the tolerances below bound on any CPU; a wrong mask or EMA momentum (0.99 -> 0.9901) moves the
parameters by more than 1e-4. In float32 the same comparison measured one CPU's rounding (u = 6e-8, which
Adam amplifies), not the code.
"""

import copy
from collections.abc import Iterator

import pytest
import torch

from extrema.models.extrema import ExtreMA, random_masks
from extrema.models.reference import reference_loss, reference_step, unfused_adamw
from extrema.spec import ModelSpec

LR, EPS, STEPS = 1e-3, 1e-8, 3  # AdamW's learning rate and (default) eps; training steps compared
# A sum of n terms is off by at most n*u times their magnitudes: n <= 1e4 here, gradients of order one.
ROUNDING = 1e4 * 1.1e-16
GRAD_TOL = 100 * ROUNDING  # measured: <= 1e-15
# Adam's step lr*g/(|g|+eps) moves by at most lr/eps times a change of g (at g = 0), once per step.
PARAM_TOL = STEPS * LR / EPS * ROUNDING  # 3.3e-7; measured: 1e-12
# The BYOL head normalises in float32 on both sides (byol_loss upcasts with .float()); the two sum the
# per-mask losses in different orders: a few float32 ulps (6e-8 each).
LOSS_RTOL = 1e-6


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    """Build models and draw inputs in float64 for the test, then restore the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("design", ["cait", "vit", "avgpool"])
def test_loss_and_gradients_agree(design: str) -> None:
    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch="vit_pico", cls_token=design, mlp_dim=128, proj_dim=32, drop_path_rate=0.0))
    model.train()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    visible = random_masks(4, 64, 8, 0.9, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    loss = model(x1, x2, visible)
    loss.backward()
    ref_loss = reference_loss(ref, x1, x2, visible)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=0.0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float64, name
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=GRAD_TOL, atol=GRAD_TOL, msg=name)


def test_training_steps_agree() -> None:
    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch="vit_pico", mlp_dim=128, proj_dim=32, drop_path_rate=0.0)).train()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=EPS, foreach=True)
    ref_opt = unfused_adamw(ref, LR)
    for step in range(STEPS):
        x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
        visible = random_masks(4, 64, 4, 0.75, generator=torch.Generator().manual_seed(step))
        model.update_target(0.99)
        loss = model(x1, x2, visible)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_l = reference_step(ref, ref_opt, x1, x2, visible, 0.99)
        torch.testing.assert_close(loss.detach(), ref_l, rtol=LOSS_RTOL, atol=0.0)
    # Every parameter, attention key biases included: their exact gradient is zero, and float64 noise
    # (~1e-17) stays far below Adam's eps, so no step is made of rounding alone.
    for (name, p), q in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q[1], rtol=PARAM_TOL, atol=PARAM_TOL, msg=name)
