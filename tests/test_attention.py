"""Attention in bf16 on a CPU by two bf16 products around an fp32 softmax (extrema.models.attention): as close to
the exact attention as bf16 allows, forward and backward; the check's GPU emulation keeps the fused kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from extrema.check.estimate import CudaAutocastFp32
from extrema.models import attention
from extrema.models.attention import attend

BF16_EPS = 2.0**-8  # bf16's unit roundoff is half of this


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b (b exact)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("batch", "queries", "tokens"), [(40, 39, 39), (8, 197, 197), (8, 1, 41)])
def test_bf16_attention_on_a_cpu_is_exact_to_bf16_precision(batch: int, queries: int, tokens: int) -> None:
    """Shapes of a ViT-S step: the masked online branch, the target's full view, a class-attention block."""
    torch.manual_seed(0)
    q = torch.randn(batch, 6, queries, 64, dtype=torch.float64)
    k, v = (torch.randn(batch, 6, tokens, 64, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(batch, 6, queries, 64, dtype=torch.float64)
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*exact).backward(grad)
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = attend(*low)
    out.backward(grad.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # inputs, scores, probabilities and output each rounded once to bf16: a few unit roundoffs, norm-wise
    assert relative(out, F.scaled_dot_product_attention(q, k, v)) < 4 * BF16_EPS
    for a, b in zip(low, exact):
        assert a.grad is not None and b.grad is not None
        assert relative(a.grad, b.grad) < 8 * BF16_EPS


def test_the_gpu_emulation_keeps_the_fused_kernel_and_restores_the_path() -> None:
    q = torch.randn(2, 3, 5, 8, dtype=torch.bfloat16)
    assert attention.BF16_ON_CPU_BY_PRODUCTS
    with CudaAutocastFp32():
        assert not attention.BF16_ON_CPU_BY_PRODUCTS
        with CudaAutocastFp32():
            fused = attend(q, q, q)
        assert not attention.BF16_ON_CPU_BY_PRODUCTS
    assert attention.BF16_ON_CPU_BY_PRODUCTS
    torch.testing.assert_close(fused, F.scaled_dot_product_attention(q, q, q))


def test_large_score_tensors_keep_the_fused_kernel() -> None:
    """A detector's thousands of tokens: the products' fp32 scores would take gigabytes, the fused kernel none."""
    small = torch.empty(8, 6, 197, 64, dtype=torch.bfloat16)
    large = torch.empty(1, 12, 4096, 64, dtype=torch.bfloat16)  # 1024-px images at patch 16: 805 MB of scores
    assert attention.by_products(small, small) and not attention.by_products(large, large)
    assert not attention.by_products(small.float(), small.float())
