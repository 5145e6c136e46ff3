"""A straightforward ExtreMA loss for checking the optimised path: a Python loop over masks, self-attention written
out by hand (the design's readout is the model's own), in the parameters' dtype (the tests use float64). It reads
the parameters of an `ExtreMA` module, so both compute the same function."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from extrema.models.extrema import ExtreMA, byol_loss
from extrema.models.vit import Attention, Block, VisionTransformer


def attention(attn: Attention, x: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with the packed qkv projection, head by head."""
    d = x.shape[-1]
    h = attn.num_heads
    q, k, v = attn.qkv(x).split(d, dim=-1)
    heads = []
    for i in range(h):
        sl = slice(i * d // h, (i + 1) * d // h)
        w = (q[..., sl] @ k[..., sl].transpose(1, 2)) / (d // h) ** 0.5
        heads.append(w.softmax(dim=-1) @ v[..., sl])
    return attn.proj(torch.cat(heads, dim=-1))


def block(blk: Block, x: Tensor) -> Tensor:
    """Pre-norm block without drop path."""
    x = x + attention(blk.attn, blk.norm1(x))
    return x + blk.mlp(blk.norm2(x))


def encode(enc: VisionTransformer, x: Tensor, visible: Tensor | None) -> Tensor:
    """Normalised instance representation of images, keeping only `visible` (B, K) patches if given.

    The self-attention blocks are written out here; the design's readout (class token, class attention, pooling)
    and the final norm are the model's own (`prefix`, `pool`, `forward_head`).
    """
    tokens = enc.patch_embed(x).flatten(2).transpose(1, 2) + enc.pos_embed
    if visible is not None:
        tokens = torch.stack([tokens[i, visible[i]] for i in range(tokens.shape[0])])
    tokens = enc.prefix(tokens)
    for blk in enc.blocks:
        tokens = block(blk, tokens)  # type: ignore[arg-type]
    return enc.forward_head(enc.pool(tokens))


def reference_loss(model: ExtreMA, x1: Tensor, x2: Tensor, visible: Tensor) -> Tensor:
    """Mean over masks of the BYOL loss, one mask at a time."""
    with torch.no_grad():
        k = model.target.projector(encode(model.target.encoder, x2, None))
    losses = []
    for m in range(visible.shape[0]):
        z = model.online.projector(encode(model.online.encoder, x1, visible[m]))
        losses.append(byol_loss(model.predictor(z), k))
    return torch.stack(losses).mean()


def reference_step(model: ExtreMA, optimizer: torch.optim.Optimizer, x1: Tensor, x2: Tensor, visible: Tensor,
                   momentum: float) -> Tensor:  # fmt: skip
    """EMA update (a loop over parameters), loss, backward and optimizer step; returns the loss."""
    with torch.no_grad():
        for t, s in zip(model.target.parameters(), model.online.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    loss = reference_loss(model, x1, x2, visible)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def unfused_adamw(module: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with the plain per-parameter loop (no foreach, no fused kernel)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, foreach=False, fused=False)
