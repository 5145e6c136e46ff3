"""Figures of one run: last-layer attention maps (Figure 3) and inpainting rows (Figure 4), PNG and SVG.

Attention probabilities come from the model's own `last_self_attention` and `cls_attention`, recomputed opt-in
from the last layers' q/k weights, so the SDPA path used in training stays as it is. Query "cls" is the instance
token: the class token's class-attention map in the last class-attention block for `cait`, the input class
token's row in the last self-attention block for `vit` (`avgpool` has none). An integer query is a patch index
(row-major) whose row of the last self-attention block is shown. matplotlib is imported on first use and renders
with Agg.

    python -c "from extrema.viz.attention import render_attention; print(render_attention('runs/demo/<run-id>'))"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from extrema.data import datasets, transforms
from extrema.data.augment import normalize
from extrema.models.designs import design
from extrema.models.vit import VisionTransformer, build_vit
from extrema.run import contract, rundir
from extrema.spec import ModelSpec, RunSpec
from extrema.train import weights
from extrema.viz import figures

Query = int | Literal["cls"]


# ------------------------------------------------------------------------------------------ the probabilities


@torch.no_grad()
def last_attention(encoder: VisionTransformer, images: Tensor, visible: Tensor | None = None) -> dict[str, Tensor]:
    """Head-wise probabilities of the last layers: "self" (B, h, T, T) of the last self-attention block (T = N, or
    1 + N with the `vit` class token first) and, for `cait`, "class" (B, h, 1, 1 + N) of the last class-attention
    block (keys: class token, then patches). `visible` (1, B, K) restricts the patches as in training."""
    out = {"self": encoder.last_self_attention(images, visible)}
    if encoder.has_cls_query and encoder.num_prefix_tokens == 0:  # the class token lives outside the blocks
        out["class"] = encoder.cls_attention(images, visible, class_key=True).unsqueeze(2)
    return out


def default_queries(encoder: VisionTransformer, grid: int) -> list[Query]:
    """The instance token (when the design has one) and three patches on the diagonal."""
    head: list[Query] = ["cls"] if encoder.has_cls_query else []
    return head + [(grid * i // 4) * grid + grid * i // 4 for i in (1, 2, 3)]


def attention_maps(encoder: VisionTransformer, images: Tensor, queries: Sequence[Query]) -> Tensor:
    """(B, len(queries), gh, gw): each query's head-averaged attention over the patch keys (the class key left out).

    A map sums to one over all keys, so to one minus the class token's share over the patches shown.
    """
    grid_h, grid_w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    offset = encoder.num_prefix_tokens
    with torch.no_grad():
        rows = encoder.last_self_attention(images) if any(q != "cls" for q in queries) else None
        cls = encoder.cls_attention(images) if "cls" in queries else None
    maps = []
    for q in queries:
        if q == "cls":
            assert cls is not None
            row = cls
        else:
            if not 0 <= int(q) < grid_h * grid_w:
                raise ValueError(f"query patch {q} is outside the {grid_h}x{grid_w} grid")
            assert rows is not None
            row = rows[:, :, offset + int(q), offset:]
        maps.append(row.mean(dim=1).reshape(-1, grid_h, grid_w))
    return torch.stack(maps, dim=1)


# ------------------------------------------------------------------------------------------------- a run's data


def run_spec(run_dir: str, stage: str = "pretrain") -> RunSpec:
    """The RunSpec of one stage of a run directory."""
    raw = rundir.read_json(contract.StageDir.of(run_dir, stage).spec)
    if raw is None:
        raise FileNotFoundError(f"no {stage}/spec.json in {run_dir}")
    return RunSpec.model_validate(raw)


def frozen_encoder(model: ModelSpec, source: str, branch: weights.Branch) -> VisionTransformer:
    """The encoder a ModelSpec describes, strictly loaded from a resolved weights URL, in eval mode, frozen."""
    encoder = build_vit(model, drop_path_rate=0.0)
    weights.load_encoder(encoder, source, branch)
    return encoder.requires_grad_(False).eval()


def load_encoder(run_dir: str, branch: weights.Branch = "ema", checkpoint: str | None = None) -> VisionTransformer:
    """The run's encoder: `checkpoint` (any kind) if given, else the pretrain export, else the newest pretrain step."""
    export = rundir.join(run_dir, "pretrain", "export", f"encoder_{branch}.pt")
    if checkpoint:
        source = weights.resolve(checkpoint)
    elif rundir.exists(export):
        source = export
    else:
        source = weights.weights_source(None, rundir.join(run_dir, "viz"))
    return frozen_encoder(run_spec(run_dir).experiment.model, source, branch)


def split_images(run_dir: str, indices: Sequence[int], split: Literal["train", "val"] = "val") -> Tensor:
    """Images of the run's dataset at the model's input size, centre-cropped as for evaluation (uint8 B x 3 x S x S)."""
    exp = run_spec(run_dir).experiment
    ds = datasets.build_dataset(exp.data, split, seed=exp.pretrain.seed)
    size = exp.model.resolved_img_size
    geometry = transforms.eval_geometry(size, 1.0 if size <= 64 else 0.875)
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
    branch: weights.Branch = "ema",
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
    layer = design(spec.experiment.model.cls_token).attention_source or "none in this design"
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
