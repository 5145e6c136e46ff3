"""Inpainting (Figure 4): a light pixel decoder on the frozen encoder's visible tokens, scored on held-out images.

    python -m extrema.entry <run-dir> inpaint     # decodes the run's pretrain encoder (or inpaint.checkpoint)

The encoder sees only the visible patches of a random mask, as in pretraining. The decoder puts its tokens back
at their positions, fills the missing ones with a learned mask token, adds a fixed sin-cos position table,
prepends the instance token and runs a few transformer blocks that predict every patch's (ImageNet-normalised)
pixels. It is trained for a short budget on the masked patches only, at a ratio drawn per batch from
`inpaint.ratios`. On held-out (val split) images its MSE on the masked patches is reported beside the mean-image
baseline (the mean training image's pixels at the same patches). Writes `decoder.pt`, `samples.pt` (original,
masked and reconstructed images per ratio) and, with matplotlib, `inpaint.png` / `inpaint.svg`. A run that
finds `decoder.pt` only evaluates; training itself is short and restarts from scratch if interrupted.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
from torch import Tensor, nn

from extrema.data import datasets
from extrema.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from extrema.eval.knn_monitor import eval_images
from extrema.models.extrema import random_masks
from extrema.models.vit import Block, VisionTransformer, sincos_pos_embed_2d
from extrema.run import rundir
from extrema.run.attempt import BARE, Attempt
from extrema.spec import InpaintSpec, RunSpec
from extrema.train import ckpt, weights
from extrema.train.dist import init_world
from extrema.train.optim import build_adamw, cosine_schedule, param_groups, set_hyperparams
from extrema.viz import attention

EVAL_BATCH = 256


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (row, col, channel) within a patch."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, p: int, channels: int = 3) -> Tensor:
    """Inverse of `patchify` for a square grid: (B, N, p*p*C) -> (B, C, H, W)."""
    b, n, _ = patches.shape
    g = math.isqrt(n)
    return patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * p, g * p)


def num_patches(encoder: VisionTransformer) -> int:
    """Patch tokens N of the encoder's own input size."""
    return (encoder.img_size // encoder.patch_size) ** 2


def hidden_mask(visible: Tensor, num_patches: int) -> Tensor:
    """(B, K) visible indices -> (B, N) bool, True at the masked (hidden) patches."""
    hidden = torch.ones(visible.shape[0], num_patches, dtype=torch.bool, device=visible.device)
    return hidden.scatter(1, visible, False)


class PixelDecoder(nn.Module):
    """Visible encoder tokens plus the instance token -> the pixels of every patch of the grid."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: int, patch_pixels: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(enc_dim, eps=1e-6), nn.Linear(enc_dim, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, instance: Tensor, tokens: Tensor, visible: Tensor) -> Tensor:
        """instance (B, E), visible tokens (B, K, E) at patch indices `visible` (B, K) -> pixels (B, N, P)."""
        pos: Tensor = self.pos_embed  # type: ignore[assignment]
        b, n, dim = tokens.shape[0], pos.shape[1], pos.shape[2]
        x = self.mask_token.expand(b, n, dim).scatter(1, visible.unsqueeze(-1).expand(-1, -1, dim), self.embed(tokens))
        x = torch.cat([self.embed(instance).unsqueeze(1), x + pos], dim=1)
        for blk in self.blocks:
            x = blk(x)
        out: Tensor = self.head(self.norm(x[:, 1:]))
        return out


def build_decoder(encoder: VisionTransformer, s: InpaintSpec) -> PixelDecoder:
    """The decoder for an encoder's grid and width."""
    grid = encoder.img_size // encoder.patch_size
    pixels = encoder.patch_size**2 * encoder.patch_embed.in_channels
    return PixelDecoder(encoder.embed_dim, s.decoder_dim, s.decoder_depth, s.decoder_heads, grid, pixels)


def decoder_optimizer(decoder: PixelDecoder, s: InpaintSpec) -> torch.optim.AdamW:
    """AdamW over the decoder (no decay on its mask token), betas (0.9, 0.95), at the stage's peak lr."""
    return build_adamw(param_groups(decoder, s.weight_decay, no_decay_names=("mask_token",)), s.lr, (0.9, 0.95))


def reconstruct(
    encoder: VisionTransformer, decoder: PixelDecoder, x: Tensor, visible: Tensor, amp: torch.dtype | None
) -> Tensor:
    """Normalised images (B, C, H, W) and visible indices (B, K) -> predicted patches (B, N, P), the encoder frozen."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        instance, tokens = encoder.forward_features(x, visible.unsqueeze(0))
    return decoder(encoder.norm(instance.float()), tokens.float(), visible)


def to_unit(x: Tensor) -> Tensor:
    """ImageNet-normalised images -> uint8."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().byte()


def batch_of(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images -> normalised float images on the device."""
    return normalize(images.to(device).float().div_(255))


def mean_image(images: Tensor, p: int) -> Tensor:
    """The mean normalised training image as patches (1, N, P), accumulated in float64."""
    total = torch.zeros(1, *images.shape[1:], dtype=torch.float64)
    for i in range(0, images.shape[0], EVAL_BATCH):
        total += normalize(images[i : i + EVAL_BATCH].double() / 255).sum(0, keepdim=True)
    return patchify((total / images.shape[0]).float(), p)


def train(
    encoder: VisionTransformer, decoder: PixelDecoder, images: Tensor, s: InpaintSpec, amp: torch.dtype | None
) -> list[float]:
    """Train the decoder on masked patches for `s.steps` steps; the per-step losses."""
    device = next(decoder.parameters()).device
    n, p = num_patches(encoder), encoder.patch_size
    optimizer = decoder_optimizer(decoder, s)
    g = torch.Generator().manual_seed(datasets.seed_of(s.seed, 1))
    losses = []
    decoder.train()
    for step in range(s.steps):
        set_hyperparams(optimizer, cosine_schedule(step, s.steps, s.lr, 0.0, s.warmup_steps), s.weight_decay)
        x = batch_of(images[torch.randint(images.shape[0], (s.batch_size,), generator=g)], device)
        ratio = s.ratios[int(torch.randint(len(s.ratios), (1,), generator=g))]
        visible = random_masks(s.batch_size, n, 1, ratio, "independent", generator=g)[0].to(device)
        pred = reconstruct(encoder, decoder, x, visible, amp)
        hidden = hidden_mask(visible, n)
        loss = (pred - patchify(x, p)).pow(2).mean(-1)[hidden].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def ratio_key(ratio: float) -> str:
    """`r75` for 0.75 (`r87.5` for 0.875)."""
    return f"r{ratio * 100:g}"


@torch.no_grad()
def evaluate(
    encoder: VisionTransformer,
    decoder: PixelDecoder,
    images: Tensor,
    mean: Tensor,
    ratio: float,
    seed: int,
    amp: torch.dtype | None,
) -> tuple[float, float]:
    """(decoder MSE, mean-image MSE) per pixel over the masked patches of held-out images, seeded masks."""
    device = next(decoder.parameters()).device
    decoder.eval()
    n, p = num_patches(encoder), encoder.patch_size
    g = torch.Generator().manual_seed(datasets.seed_of(seed, 2, round(ratio * 1000)))
    err = base = count = 0.0
    for i in range(0, images.shape[0], EVAL_BATCH):
        x = batch_of(images[i : i + EVAL_BATCH], device)
        visible = random_masks(x.shape[0], n, 1, ratio, "independent", generator=g)[0].to(device)
        hidden = hidden_mask(visible, n)
        target = patchify(x, p)[hidden]
        err += (reconstruct(encoder, decoder, x, visible, amp)[hidden] - target).pow(2).sum().item()
        base += (mean.to(device).expand(x.shape[0], -1, -1)[hidden] - target).pow(2).sum().item()
        count += target.numel()
    return err / count, base / count


@torch.no_grad()
def samples(
    encoder: VisionTransformer, decoder: PixelDecoder, images: Tensor, s: InpaintSpec, amp: torch.dtype | None
) -> dict[str, Any]:
    """The figure's images (uint8): originals, and per ratio the masked input and the reconstruction with the
    visible patches pasted back, plus which patches were hidden (R, B, N bool)."""
    device = next(decoder.parameters()).device
    decoder.eval()
    n, p = num_patches(encoder), encoder.patch_size
    x = batch_of(images, device)
    truth = patchify(x, p)
    gray = patchify(torch.zeros_like(x), p)  # the dataset mean colour, once unnormalised
    masked, recon, shown = [], [], []
    for ratio in s.ratios:
        g = torch.Generator().manual_seed(datasets.seed_of(s.seed, 3, round(ratio * 1000)))
        visible = random_masks(x.shape[0], n, 1, ratio, "independent", generator=g)[0].to(device)
        hidden = hidden_mask(visible, n).unsqueeze(-1)
        pred = reconstruct(encoder, decoder, x, visible, amp)
        shown.append(hidden.squeeze(-1).cpu())
        masked.append(to_unit(unpatchify(torch.where(hidden, gray, truth), p)).cpu())
        recon.append(to_unit(unpatchify(torch.where(hidden, pred, truth), p)).cpu())
    return {
        "original": images.cpu(),
        "ratios": list(s.ratios),
        "masked": torch.stack(masked),
        "reconstruction": torch.stack(recon),
        "hidden": torch.stack(shown),
    }


def run(spec: RunSpec, stage_dir: str, attempt: Attempt = BARE) -> dict[str, Any]:
    """Train (or reload) the decoder, score it against the mean image at each ratio, save the figure's samples.
    It keeps no metrics log and writes its decoder and samples as plain files, unfenced: `attempt` is not used."""
    exp, s = spec.experiment, spec.experiment.inpaint
    world = init_world()
    if world.size > 1:
        raise ValueError("inpaint runs in one process: set its resources to processes_per_node 1, nodes 1")
    torch.manual_seed(s.seed)
    amp = torch.bfloat16 if world.device.type == "cuda" else None
    source = weights.weights_source(s.checkpoint, stage_dir)
    encoder = attention.frozen_encoder(exp.model, source, s.encoder).to(world.device)
    size = exp.model.resolved_img_size
    train_x, _ = eval_images(exp.data, size, "train", s.train_size, s.seed, 0, 1)
    val_x, _ = eval_images(exp.data, size, "val", s.val_size, s.seed, 0, 1)
    decoder = build_decoder(encoder, s).to(world.device)

    saved = rundir.join(stage_dir, "decoder.pt")
    losses: list[float] = []
    if rundir.exists(saved):
        decoder.load_state_dict(ckpt.read_torch(saved))
    else:
        losses = train(encoder, decoder, train_x, s, amp)
        ckpt.write_torch(saved, {k: v.cpu() for k, v in decoder.state_dict().items()})

    mean = mean_image(train_x, encoder.patch_size)
    result: dict[str, Any] = {}
    for ratio in s.ratios:
        mse, baseline = evaluate(encoder, decoder, val_x, mean, ratio, s.seed, amp)
        key = ratio_key(ratio)
        result[f"inpaint_mse_{key}"] = mse
        result[f"inpaint_baseline_mse_{key}"] = baseline
        result[f"inpaint_relative_mse_{key}"] = mse / baseline
    if losses:
        tail = losses[-max(1, len(losses) // 10) :]
        result["inpaint_train_loss"] = sum(tail) / len(tail)

    figure = samples(encoder, decoder, val_x[: s.figure_images], s, amp)
    ckpt.write_torch(rundir.join(stage_dir, "samples.pt"), figure)
    files: list[str] = []
    if importlib.util.find_spec("matplotlib") is not None:
        title = (
            f"Inpainting with a {s.decoder_depth}-block decoder on the frozen {s.encoder} encoder "
            f"({exp.model.arch}, {exp.model.cls_token} design) · held-out {exp.data.dataset} images\n"
            f"sweep {spec.sweep}, run {spec.run_id} · masked-patch MSE vs mean image: "
            + ", ".join(f"{r:.0%} {result[f'inpaint_mse_{ratio_key(r)}']:.3f}/"
            f"{result[f'inpaint_baseline_mse_{ratio_key(r)}']:.3f}" for r in s.ratios)
        )  # fmt: skip
        files = attention.render_inpaint(figure, stage_dir, title)
    result["figure"] = files[0] if files else None
    result["checkpoint"] = source
    result["protocol"] = {
        **s.model_dump(mode="json", exclude={"checkpoint", "figure_images"}),
        "train_images": int(train_x.shape[0]),
        "val_images": int(val_x.shape[0]),
        "pixels": "ImageNet-normalised",
        "arch": exp.model.arch,
        "cls_token": exp.model.cls_token,
        "dataset": exp.data.dataset,
    }
    return result
