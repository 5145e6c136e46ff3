"""Scaled dot-product attention as the encoders compute it: torch's fused kernel, except in bf16 on a CPU.

torch's fused CPU kernel is slower in bf16 than in fp32: forward and backward of a ViT-S/16 step's attention shapes
take 2.6-6.8x the time of two bf16 matrix products around an fp32 softmax (AMD EPYC with AVX-512 BF16,
BENCHMARKS.md, issue 32). So bf16 on a CPU takes that path, which is what the official code's attention computes
under autocast: the scores rounded to bf16, the softmax in fp32, the probabilities rounded to bf16 before they
weight the values (as GPU flash kernels round them too). The check, which runs a GPU's step on the CPU to predict
it, turns the path off while it does (`extrema.check.estimate.CudaAutocastFp32`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BF16_ON_CPU_BY_PRODUCTS = True
# The products hold every score in fp32, which the fused kernel never does: beyond this (a detector's thousands of
# tokens), the fused kernel's memory wins over its time.
MAX_SCORE_BYTES = 256 << 20


def by_products(q: Tensor, k: Tensor) -> bool:
    """Whether attention of these queries and keys takes the two products: bf16 on a CPU, its scores small enough."""
    if not (BF16_ON_CPU_BY_PRODUCTS and q.dtype == torch.bfloat16 and q.device.type == "cpu"):
        return False
    return q.numel() // max(q.shape[-1], 1) * k.shape[-2] * 4 <= MAX_SCORE_BYTES


def products(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v by two products in q's dtype around an fp32 softmax."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


def attend(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v over the last two dimensions of (..., heads, tokens, d) tensors."""
    if dropout_p == 0.0 and by_products(q, k):
        return products(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
