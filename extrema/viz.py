"""Figures of one run: last-layer attention maps (Figure 3) and inpainting rows (Figure 4), PNG and SVG.

Attention probabilities are recomputed, opt-in, from the last block's own q/k weights on the inputs that block
receives, so the SDPA path used in training stays as it is. Query "cls" is the instance token: the class token's
class-attention map in the last class-attention block for `cait`, the input class token's row in the last
self-attention block for `vit` (`avgpool` has none). An integer query is a patch index (row-major) whose row of
the last self-attention block is shown. matplotlib is imported on first use and renders with Agg.

    python -c "from extrema.viz import render_attention; print(render_attention('runs/demo/<run-id>'))"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from extrema import data, figures, interop, rundir
from extrema.augment import normalize
from extrema.models.vit import (
    Attention,
    Block,
    ClassAttention,
    ClassAttentionBlock,
    VisionTransformer,
    build_vit,
    gather_visible,
)
from extrema.spec import ModelSpec, RunSpec

Query = int | Literal["cls"]


# ------------------------------------------------------------------------------------------ the probabilities


def self_attention_probs(attn: Attention, x: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d_head)) of a self-attention layer on its (normed) input (B, T, D) -> (B, heads, T, T)."""
    b, t, d = x.shape
    h = attn.num_heads
    q, k, _ = attn.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1) * (d // h) ** -0.5).softmax(dim=-1)


def class_attention_probs(attn: ClassAttention, u: Tensor) -> Tensor:
    """The class token's attention over [class, patches] (B, 1+K, D) of a class-attention layer -> (B, h, 1, 1+K)."""
    b, n, d = u.shape
    h = attn.num_heads
    q = attn.q(u[:, :1]).reshape(b, 1, h, d // h).transpose(1, 2)
    k = attn.k(u).reshape(b, n, h, d // h).transpose(1, 2)
    return (q @ k.transpose(-2, -1) * (d // h) ** -0.5).softmax(dim=-1)


@torch.no_grad()
def last_attention(encoder: VisionTransformer, images: Tensor, visible: Tensor | None = None) -> dict[str, Tensor]:
    """Head-wise probabilities of the last layers: "self" (B, h, T, T) of the last self-attention block (T = N, or
    1 + N with the `vit` class token first) and, for `cait`, "class" (B, h, 1, 1 + N) of the last class-attention
    block (keys: class token, then patches). `visible` (1, B, K) restricts the patches as in training."""
    tokens = encoder.embed(images)
    if visible is not None:
        tokens = gather_visible(tokens, visible)
    if encoder.cls_design == "vit":
        assert encoder.cls_token is not None
        tokens = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    *body, last = encoder.blocks
    assert isinstance(last, Block)
    for blk in body:
        tokens = blk(tokens)
    out = {"self": self_attention_probs(last.attn, last.norm1(tokens))}
    if encoder.cls_design == "cait":
        patches = last(tokens)
        assert encoder.cls_token is not None
        cls = encoder.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        *ca_body, ca_last = encoder.blocks_token
        assert isinstance(ca_last, ClassAttentionBlock)
        for ca in ca_body:
            cls = ca(cls, patches)
        out["class"] = class_attention_probs(ca_last.attn, ca_last.norm1(torch.cat([cls, patches], dim=1)))
    return out


def default_queries(encoder: VisionTransformer, grid: int) -> list[Query]:
    """The instance token (when the design has one) and three patches on the diagonal."""
    head: list[Query] = ["cls"] if encoder.cls_design != "avgpool" else []
    return head + [(grid * i // 4) * grid + grid * i // 4 for i in (1, 2, 3)]


def attention_maps(encoder: VisionTransformer, images: Tensor, queries: Sequence[Query]) -> Tensor:
    """(B, len(queries), gh, gw): each query's head-averaged attention over the patch keys (the class key left out).

    A map sums to one over all keys, so to one minus the class token's share over the patches shown.
    """
    probs = last_attention(encoder, images)
    grid_h, grid_w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    offset = 1 if encoder.cls_design == "vit" else 0
    maps = []
    for q in queries:
        if q == "cls":
            if encoder.cls_design == "avgpool":
                raise ValueError("the avgpool design has no class token to query; give patch indices")
            row = probs["class"][:, :, 0, 1:] if encoder.cls_design == "cait" else probs["self"][:, :, 0, 1:]
        else:
            if not 0 <= int(q) < grid_h * grid_w:
                raise ValueError(f"query patch {q} is outside the {grid_h}x{grid_w} grid")
            row = probs["self"][:, :, offset + int(q), offset:]
        maps.append(row.mean(dim=1).reshape(-1, grid_h, grid_w))
    return torch.stack(maps, dim=1)


# ------------------------------------------------------------------------------------------------- a run's data


def run_spec(run_dir: str, stage: str = "pretrain") -> RunSpec:
    """The RunSpec of one stage of a run directory."""
    raw = rundir.read_json(rundir.join(run_dir, stage, "spec.json"))
    if raw is None:
        raise FileNotFoundError(f"no {stage}/spec.json in {run_dir}")
    return RunSpec.model_validate(raw)


def frozen_encoder(model: ModelSpec, source: str, branch: interop.Branch) -> VisionTransformer:
    """The encoder a ModelSpec describes, strictly loaded from a resolved weights URL, in eval mode, frozen."""
    encoder = build_vit(model, drop_path_rate=0.0)
    weights = interop.encoder_weights(source, branch)
    interop.use_pos_embed(encoder, weights.pop("pos_embed", None), learnable=False)
    interop.load_strict(encoder, weights, source)
    return encoder.requires_grad_(False).eval()


def load_encoder(run_dir: str, branch: interop.Branch = "ema", checkpoint: str | None = None) -> VisionTransformer:
    """The run's encoder: `checkpoint` if given, else the pretrain export, else the newest pretrain checkpoint."""
    export = rundir.join(run_dir, "pretrain", "export", f"encoder_{branch}.pt")
    if checkpoint:
        source = interop.resolve(checkpoint)
    elif rundir.exists(export):
        source = export
    else:
        source = interop.resolve(rundir.join(run_dir, "pretrain", "ckpt"))
    return frozen_encoder(run_spec(run_dir).experiment.model, source, branch)


def split_images(run_dir: str, indices: Sequence[int], split: Literal["train", "val"] = "val") -> Tensor:
    """Images of the run's dataset at the model's input size, centre-cropped as for evaluation (uint8 B x 3 x S x S)."""
    exp = run_spec(run_dir).experiment
    ds = data.build_dataset(exp.data, split, seed=exp.pretrain.seed)
    size = exp.model.resolved_img_size
    geometry = data.eval_geometry(size, 1.0 if size <= 64 else 0.875)
    bad = [i for i in indices if not 0 <= i < len(ds)]
    if bad:
        raise ValueError(f"image indices {bad} are outside the {split} split of {len(ds)} images")
    return torch.stack([geometry(ds[i][0]) for i in indices])


# -------------------------------------------------------------------------------------------------- drawing


def _show(ax: Any, image: Tensor) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def query_title(q: Query, grid: int) -> str:
    """A column title: `class token` or `patch (row, col)`."""
    return "class token" if q == "cls" else f"patch ({int(q) // grid}, {int(q) % grid})"


@dataclass(frozen=True)
class AttentionFigure:
    """What `render_attention` drew: the files, the queries, the images (uint8) and the maps (B, Q, gh, gw)."""

    files: list[str]
    queries: list[Query]
    images: Tensor
    maps: Tensor


def render_attention(
    run_dir: str,
    out_dir: str | None = None,
    images: Sequence[int] = (0, 1, 2, 3),
    queries: Sequence[Query] | None = None,
    branch: interop.Branch = "ema",
    split: Literal["train", "val"] = "val",
) -> AttentionFigure:
    """Figure 3 of a run: per image (rows) the input and each query's head-averaged last-layer attention map
    overlaid on it (columns), the query patch outlined. Written to `<out_dir or run_dir/viz>/attention.{png,svg}`."""
    from matplotlib.patches import Rectangle

    spec = run_spec(run_dir)
    encoder = load_encoder(run_dir, branch)
    pixels = split_images(run_dir, images, split)
    grid = pixels.shape[-1] // encoder.patch_size
    chosen = list(queries) if queries is not None else default_queries(encoder, grid)
    maps = attention_maps(encoder, normalize(pixels.float() / 255), chosen)
    up = torch.nn.functional.interpolate(maps, size=pixels.shape[-2:], mode="nearest")
    fig = figures.new_figure(1.8 * (len(chosen) + 1), 1.8 * len(images) + 0.6)
    axes = fig.subplots(len(images), len(chosen) + 1, squeeze=False)
    p = encoder.patch_size
    for i, idx in enumerate(images):
        _show(axes[i][0], pixels[i])
        axes[i][0].set_ylabel(f"{split} #{idx}", fontsize=8)
        for j, q in enumerate(chosen):
            ax = axes[i][j + 1]
            _show(ax, pixels[i].float().mean(0, keepdim=True).expand(3, -1, -1).byte())
            ax.imshow(up[i, j].numpy(), cmap="inferno", alpha=0.6, interpolation="nearest")
            if q != "cls":
                r, c = divmod(int(q), grid)
                ax.add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, ec="cyan", lw=1.2))
    axes[0][0].set_title("input", fontsize=8)
    for j, q in enumerate(chosen):
        axes[0][j + 1].set_title(query_title(q, grid), fontsize=8)
    layer = "last class-attention block" if spec.experiment.model.cls_token == "cait" else "last block"
    fig.suptitle(
        f"Attention of chosen queries, mean over heads · {spec.experiment.model.cls_token} design, {branch} encoder\n"
        f"class token: {layer}; patches: last self-attention block · sweep {spec.sweep}, run {spec.run_id}",
        fontsize=8,
    )
    files = figures.save(fig, out_dir or rundir.join(run_dir, "viz"), "attention")
    return AttentionFigure(files, chosen, pixels, maps)


def render_inpaint(samples: dict[str, Any], out_dir: str, title: str, name: str = "inpaint") -> list[str]:
    """Figure 4: images across; rows original, then per masking ratio the masked input and the reconstruction.

    `samples`: "original" (B, 3, S, S) uint8, "ratios" list, "masked" and "reconstruction" (R, B, 3, S, S) uint8.
    """
    original, ratios = samples["original"], list(samples["ratios"])
    rows = 1 + 2 * len(ratios)
    fig = figures.new_figure(1.3 * original.shape[0] + 0.8, 1.3 * rows + 0.5)
    axes = fig.subplots(rows, original.shape[0], squeeze=False)
    labels = ["original"] + [f"{kind} {r:.0%}" for r in ratios for kind in ("masked", "reconstructed")]
    images = [original] + [samples[k][i] for i in range(len(ratios)) for k in ("masked", "reconstruction")]
    for row, (text, batch) in enumerate(zip(labels, images)):
        for col in range(original.shape[0]):
            _show(axes[row][col], batch[col])
        axes[row][0].set_ylabel(text, fontsize=8)
    fig.suptitle(title, fontsize=8)
    return figures.save(fig, out_dir, name)
