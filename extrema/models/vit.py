"""Vision Transformer with a fixed 2-D sin-cos position embedding and three class-token designs.

Shapes: B images, N = (H/p)*(W/p) patch tokens, K <= N visible tokens, D embedding width.
`cls_design` (the spec's `model.cls_token`): "cait" (class token only in late class-attention blocks), "vit" (class
token at the input), "avgpool" (mean of the output tokens); `cls_token` is the class token itself (a Parameter).
No distributed code lives here.

The model names its parts like timm, and nothing outside this file walks its insides: `forward_features` (images
-> pre-norm instance and patch tokens), `forward_head` (the final norm: the instance representation),
`forward_intermediates` (patch tokens after chosen blocks), `last_self_attention` and `cls_attention` (attention
probabilities of the last layers, recomputed opt-in beside the SDPA path). A new class-token design changes this
row in `extrema.models.designs` and its readout in `pool`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from extrema.models.attention import attend
from extrema.models.designs import ClsDesign, design
from extrema.spec import ModelSpec

# The pixel statistics every encoder takes its input normalised by (and the detector normalises raw pixels with).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sincos_pos_embed_1d(dim: int, positions: Tensor) -> Tensor:
    """(len(positions), dim) table: [sin | cos] with omega_i = 1 / 10000^(i / (dim/2))."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """(grid_h * grid_w, dim) fixed table in the MAE layout: first half encodes the column, second the row."""
    assert dim % 4 == 0, "embedding width must be divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, cols.flatten()), sincos_pos_embed_1d(dim // 2, rows.flatten())], 1)
    return emb.float()


def grid_of(num_tokens: int) -> int:
    """Side of a square grid of num_tokens patches; ValueError when it is not square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"position table of {num_tokens} patches is not a square grid")
    return side


def resize_pos_embed(table: Tensor, grid_h: int, grid_w: int | None = None) -> Tensor:
    """(1, n*n, D) patch position table -> (1, grid_h*grid_w, D), bicubic-interpolated when the grid differs."""
    grid_w = grid_h if grid_w is None else grid_w
    side = grid_of(table.shape[1])
    if side == grid_h == grid_w:
        return table
    d = table.shape[-1]
    img = table.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d).to(table.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (`extrema.models.attention.attend`)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        x = attend(q, k, v, dropout_p=drop)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))

    def probs(self, x: Tensor) -> Tensor:
        """softmax(q kᵀ / sqrt(d_head)) on the (normed) input (B, T, D) -> (B, heads, T, T)."""
        b, t, d = x.shape
        q, k, _ = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-2, -1) * (d // self.num_heads) ** -0.5).softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block without layer scale."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, attn_drop: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """CaiT class attention: the query is the class token only; keys and values come from class + patch tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, 1+K, D) -> updated class token (B, 1, D)."""
        b, n, d = u.shape
        h = self.num_heads
        q = self.q(u[:, :1]).reshape(b, 1, h, d // h).transpose(1, 2)
        k = self.k(u).reshape(b, n, h, d // h).transpose(1, 2)
        v = self.v(u).reshape(b, n, h, d // h).transpose(1, 2)
        x = attend(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, 1, d))

    def probs(self, u: Tensor) -> Tensor:
        """The class token's attention over [class, patches] (B, 1+K, D) -> (B, heads, 1, 1+K)."""
        b, n, d = u.shape
        h = self.num_heads
        q = self.q(u[:, :1]).reshape(b, 1, h, d // h).transpose(1, 2)
        k = self.k(u).reshape(b, n, h, d // h).transpose(1, 2)
        return (q @ k.transpose(-2, -1) * (d // h) ** -0.5).softmax(dim=-1)


class ClassAttentionBlock(nn.Module):
    """CaiT block updating only the class token, with layer scale and no dropout or drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, cls: Tensor, patches: Tensor) -> Tensor:
        u = torch.cat([cls, patches], dim=1)
        cls = cls + self.gamma_1 * self.attn(self.norm1(u))
        return cls + self.gamma_2 * self.mlp(self.norm2(cls))


class VisionTransformer(nn.Module):
    """ViT encoder whose output is the instance representation of the chosen class-token design."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        cls_design: ClsDesign = "cait",
        class_attention_layers: int = 2,
        layer_scale_init: float = 0.1,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.embed_dim, self.depth = img_size, patch_size, embed_dim, depth
        self.num_heads = num_heads
        self.cls_design: ClsDesign = cls_design
        self.design = design(cls_design)  # what this design asks of the encoder (extrema.models.designs)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        grid = img_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid, grid).unsqueeze(0), persistent=False)
        self.sincos_table = True  # False once a table from elsewhere replaces it (extrema.train.weights.use_pos_embed)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, dpr[i], attn_drop_rate) for i in range(depth)
        )
        self.cls_token: nn.Parameter | None = None
        self.blocks_token = nn.ModuleList()
        if self.design.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if self.design.late_blocks:
            self.blocks_token = nn.ModuleList(
                ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, layer_scale_init)
                for _ in range(class_attention_layers)
            )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: xavier-uniform Linear (bias 0), LayerNorm (1, 0), xavier patch embed, cls N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)  # type: ignore[arg-type]
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> Tensor:
        """Position table for a grid; for another grid than the built one, the sin-cos table is recomputed (a
        table loaded from elsewhere, `sincos_table` False, is interpolated instead)."""
        pe: Tensor = self.pos_embed  # type: ignore[assignment]
        if grid_h * grid_w == pe.shape[1] and grid_h == grid_w == self.img_size // self.patch_size:
            return pe
        if not self.sincos_table:
            return resize_pos_embed(pe, grid_h, grid_w)
        return sincos_pos_embed_2d(self.embed_dim, grid_h, grid_w).unsqueeze(0).to(pe.device)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches in the self-attention blocks (timm's name): 1 for `vit`, else 0."""
        return self.design.prefix_tokens

    @property
    def has_cls_query(self) -> bool:
        """Whether a class token queries the patches (`vit`, `cait`); `avgpool` has none."""
        return self.design.class_token

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> patch tokens with position embedding (B, N, D)."""
        x = self.patch_embed(x)
        _, _, gh, gw = x.shape
        return x.flatten(2).transpose(1, 2) + self.pos_embed_for(gh, gw).to(x.dtype)

    def visible_tokens(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """Images -> embedded patch tokens (B, N, D), or the visible ones of M masks (M*B, K, D), mask-major."""
        tokens = self.embed(x)
        return tokens if visible is None else gather_visible(tokens, visible)

    def prefix(self, tokens: Tensor) -> Tensor:
        """Patch tokens (B, K, D) -> the sequence the self-attention blocks see (the `vit` class token first)."""
        if self.design.token_at_input:
            assert self.cls_token is not None
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        return tokens

    def forward_blocks(self, tokens: Tensor) -> Tensor:
        """Self-attention blocks over (B, K, D) tokens; the `vit` design prepends its class token first."""
        tokens = self.prefix(tokens)
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens

    def pool(self, tokens: Tensor) -> Tensor:
        """Distributed tokens from forward_blocks -> pre-norm instance representation (B, D)."""
        if self.design.token_at_input:
            return tokens[:, 0]
        if not self.design.class_token:
            return tokens.mean(dim=1)
        assert self.cls_token is not None
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        for blk in self.blocks_token:
            cls = blk(cls, tokens)
        return cls[:, 0]

    def forward_features(self, x: Tensor, visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images -> (pre-norm instance (B', D), patch tokens (B', K, D)).

        `visible` (M, B, K) holds the indices of the visible patches of M masks; the masked views are batched
        mask-major, so B' = M * B and rows [m*B, (m+1)*B) belong to mask m. Without it, B' = B and K = N.
        """
        return self._features(x, visible)

    def _features(self, x: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        # Shared by forward and forward_features: FSDP wraps each of those two entry points separately.
        out = self.forward_blocks(self.visible_tokens(x, visible))
        return self.pool(out), out[:, self.num_prefix_tokens :]

    def forward_head(self, instance: Tensor) -> Tensor:
        """Pre-norm instance (B, D) from forward_features -> the instance representation (the final norm)."""
        return self.norm(instance)

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """Images -> normalised instance representation (B', D)."""
        return self.forward_head(self._features(x, visible)[0])

    def forward_intermediates(self, x: Tensor, indices: Sequence[int], checkpointing: bool = False) -> list[Tensor]:
        """Images -> the patch tokens (B, N, D) after each block in `indices` (in that order; repeats allowed).

        Blocks past the deepest index are not run; `checkpointing` recomputes each block in the backward pass.
        """
        tokens = self.prefix(self.embed(x))
        wanted = set(indices)
        taken: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(indices) + 1]):
            tokens = checkpoint(blk, tokens, use_reentrant=False) if checkpointing else blk(tokens)
            if i in wanted:
                taken[i] = tokens[:, self.num_prefix_tokens :]
        return [taken[i] for i in indices]

    def last_self_attention(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """Head-wise attention probabilities of the last self-attention block (B, h, T, T), recomputed from its
        q/k weights; T = num_prefix_tokens + K (the `vit` class token first). `visible` (1, B, K) as in training."""
        tokens = self.prefix(self.visible_tokens(x, visible))
        *body, last = self.blocks
        assert isinstance(last, Block)
        for blk in body:
            tokens = blk(tokens)
        return last.attn.probs(last.norm1(tokens))

    def cls_attention(self, x: Tensor, visible: Tensor | None = None, class_key: bool = False) -> Tensor:
        """The class token's head-wise attention over the patches (B, h, K): its row in the last self-attention
        block (`vit`) or in the last class-attention block (`cait`). With `class_key`, the class token's own key
        leads (B, h, 1+K). ValueError for `avgpool`, which has no class token to query."""
        if not self.has_cls_query:
            raise ValueError("the avgpool design has no class token to query; give patch indices")
        if self.design.token_at_input:
            row = self.last_self_attention(x, visible)[:, :, 0]
        else:
            assert self.cls_token is not None
            patches = self.forward_blocks(self.visible_tokens(x, visible))
            cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
            *body, last = self.blocks_token
            assert isinstance(last, ClassAttentionBlock)
            for blk in body:
                cls = blk(cls, patches)
            row = last.attn.probs(last.norm1(torch.cat([cls, patches], dim=1)))[:, :, 0]
        return row if class_key else row[:, :, 1:]


def gather_visible(tokens: Tensor, visible: Tensor) -> Tensor:
    """(B, N, D) tokens and (M, B, K) indices -> (M*B, K, D) visible tokens, mask-major."""
    m, b, k = visible.shape
    n, d = tokens.shape[1], tokens.shape[2]
    flat = visible + torch.arange(b, device=visible.device).view(1, b, 1) * n
    return tokens.reshape(b * n, d)[flat.reshape(-1)].reshape(m * b, k, d)


def build_vit(
    spec: ModelSpec,
    drop_path_rate: float | None = None,
    cls_design: ClsDesign | None = None,
    img_size: int | None = None,
) -> VisionTransformer:
    """The encoder a ModelSpec describes; `drop_path_rate` overrides the spec's (the EMA target uses 0), `cls_design`
    its class-token design (a classifier's encoder, the detector's backbone) and `img_size` its resolution."""
    dim, depth, heads = spec.dims
    return VisionTransformer(
        img_size=img_size or spec.resolved_img_size,
        patch_size=spec.resolved_patch_size,
        in_chans=spec.in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        cls_design=spec.cls_token if cls_design is None else cls_design,
        class_attention_layers=spec.class_attention_layers,
        layer_scale_init=spec.layer_scale_init,
        drop_path_rate=spec.drop_path_rate if drop_path_rate is None else drop_path_rate,
        attn_drop_rate=spec.attn_drop_rate,
    )


def count_params(module: nn.Module) -> int:
    """Number of trainable-or-frozen parameters (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())
