"""Encoder weights in and out: strict loading, our DCP checkpoints, the official ExtreMA release, timm ViTs.

Every source becomes a plain dict in our encoder's key names (`VisionTransformer.state_dict()`: `patch_embed.*`,
`blocks.N.*`, `blocks_token.N.*`, `cls_token`, `norm.*`), plus `pos_embed` (1, N, D) when the source stores a
position table (ours is a fixed sin-cos buffer and is not stored). `load_strict` then refuses any mismatch.

Official release (`main.py` checkpoints): `state_dict` with `module.base_encoder.*` (student) and
`module.momentum_encoder.*` (EMA target): `patch_embed.proj.*`, `pos_embed` (1, 196, D), `cls_token`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `blocks_token.N.{norm1,attn.q,attn.k,attn.v,attn.proj,
norm2,mlp.fc1,mlp.fc2,gamma_1,gamma_2}`, `norm.*`, and `head.*` (the projector, dropped here); `module.predictor.*`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from extrema import ckpt, rundir
from extrema.models.vit import VisionTransformer
from extrema.safe_dcp import SafeFsspecReader

Branch = Literal["ema", "student"]
OFFICIAL_PREFIXES: dict[Branch, tuple[str, ...]] = {
    "student": ("module.base_encoder.", "base_encoder."),
    "ema": ("module.momentum_encoder.", "momentum_encoder."),
}
DCP_PREFIX: dict[Branch, str] = {"student": "model.online.encoder.", "ema": "model.target.encoder."}
PTH_SUFFIXES = (".pth", ".pt", ".pth.tar")
SHOWN = 12  # keys listed per kind of mismatch in an error message


# ---------------------------------------------------------------------------------------------- strict loading


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a key matches any glob pattern ("norm.*", "blocks_token.*", "cls_token")."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _listing(title: str, items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"\n  {title} ({len(items)}): {', '.join(items[:SHOWN])}{more}"


def key_problems(expected: Mapping[str, torch.Size], given: Mapping[str, Tensor]) -> str:
    """Missing and unexpected keys and shape mismatches between a model and weights, as text ('' when none)."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    shapes = sorted(
        f"{k} (checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k])})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k])
    )
    out = ""
    if missing:
        out += _listing("missing keys", missing)
    if unexpected:
        out += _listing("unexpected keys", unexpected)
    if shapes:
        out += _listing("shape mismatches", shapes)
    return out


def load_strict(
    module: nn.Module,
    weights: Mapping[str, Tensor],
    source: str,
    discard: Iterable[str] = (),
    fresh: Iterable[str] = (),
) -> None:
    """Load every weight into the module or raise ValueError naming each missing, unexpected or misshapen key.

    `discard`: source keys the model does not use by design (dropped when present); `fresh`: model keys that
    keep their initialisation. Both are glob patterns.
    """
    discard, fresh = tuple(discard), tuple(fresh)
    expected = {k: v.shape for k, v in module.state_dict().items() if not matches(k, fresh)}
    given = {k: v for k, v in weights.items() if not matches(k, discard)}
    problems = key_problems(expected, given)
    if problems:
        raise ValueError(f"weights from {source} do not fit the {type(module).__name__}:{problems}")
    module.load_state_dict(given, strict=False)


# ------------------------------------------------------------------------------------------- position tables


def grid_of(num_tokens: int) -> int:
    """Side of a square grid of num_tokens patches; ValueError when it is not square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"position table of {num_tokens} patches is not a square grid")
    return side


def resize_pos_embed(table: Tensor, grid: int) -> Tensor:
    """(1, n*n, D) patch position table -> (1, grid*grid, D), bicubic-interpolated when the grid differs."""
    side = grid_of(table.shape[1])
    if side == grid:
        return table
    d = table.shape[-1]
    img = table.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(table.dtype)


def use_pos_embed(encoder: VisionTransformer, table: Tensor | None, learnable: bool) -> None:
    """Give the encoder the source's position table (resized to its grid), or keep its sin-cos one.

    learnable: the table becomes a trained Parameter (the reference finetune); otherwise it stays a fixed buffer.
    """
    grid = encoder.img_size // encoder.patch_size
    current: Tensor = encoder.pos_embed  # type: ignore[assignment]
    new = current.detach().clone() if table is None else resize_pos_embed(table.detach(), grid).to(current)
    if new.shape != current.shape:
        raise ValueError(f"position table {tuple(new.shape)} does not fit the encoder's {tuple(current.shape)}")
    delattr(encoder, "pos_embed")
    if learnable:
        encoder.pos_embed = nn.Parameter(new)  # type: ignore[assignment]
    else:
        encoder.register_buffer("pos_embed", new, persistent=False)


# -------------------------------------------------------------------------------------------- source formats


def from_official(state: Mapping[str, Any], branch: Branch) -> dict[str, Tensor]:
    """Official ExtreMA checkpoint (or its `state_dict`) -> our encoder keys for one branch; projector dropped."""
    sd = state.get("state_dict", state)
    prefix = next((p for p in OFFICIAL_PREFIXES[branch] if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        raise ValueError(f"no {OFFICIAL_PREFIXES[branch][0]}* keys: not an official checkpoint with a {branch} encoder")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("head."):
            continue
        if name.startswith("patch_embed.proj."):
            name = "patch_embed." + name.removeprefix("patch_embed.proj.")
        out[name] = value
    return out


def from_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm VisionTransformer state dict -> our encoder keys; the classifier head is dropped.

    A class-token slot of the position table is folded into `cls_token` (our `vit` design adds no position to
    the class token), and `fc_norm` (average-pool readout) becomes `norm`.
    """
    sd = {k.removeprefix("module."): v for k, v in state.items()}
    if "norm.weight" in sd and "fc_norm.weight" in sd:
        raise ValueError("timm state dict has both norm and fc_norm weights; export it with one final norm")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("head."):
            continue
        name = key
        if key.startswith("patch_embed.proj."):
            name = "patch_embed." + key.removeprefix("patch_embed.proj.")
        elif key.startswith("fc_norm."):
            name = "norm." + key.removeprefix("fc_norm.")
        out[name] = value
    pos = out.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]:
        if "cls_token" not in out or math.isqrt(pos.shape[1] - 1) ** 2 != pos.shape[1] - 1:
            raise ValueError(f"timm pos_embed {tuple(pos.shape)} is neither a square grid nor a class slot + grid")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def to_timm(encoder: VisionTransformer) -> dict[str, Tensor]:
    """Our encoder as a timm VisionTransformer state dict (load it into `timm.create_model(**timm_kwargs(...))`).

    `vit`: class token and a zero class slot in pos_embed (exact); `avgpool`: the final norm as `fc_norm`
    (exact); `cait`: the backbone and its final norm, without class token and class-attention blocks.
    """
    out: dict[str, Tensor] = {}
    design = encoder.cls_design
    for key, value in encoder.state_dict().items():
        if key.startswith(("blocks_token.", "pos_embed")) or (key == "cls_token" and design != "vit"):
            continue
        name = key
        if key.startswith("patch_embed."):
            name = "patch_embed.proj." + key.removeprefix("patch_embed.")
        elif key.startswith("norm.") and design == "avgpool":
            name = "fc_norm." + key.removeprefix("norm.")
        out[name] = value.detach().clone().contiguous()
    pos = encoder.pos_embed.detach().clone()  # type: ignore[operator]
    if design == "vit":
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    out["pos_embed"] = pos.contiguous()
    return out


def timm_kwargs(encoder: VisionTransformer) -> dict[str, Any]:
    """Arguments of `timm.models.vision_transformer.VisionTransformer` matching `to_timm(encoder)`."""
    design = encoder.cls_design
    hidden: int = encoder.blocks[0].mlp.fc1.out_features  # type: ignore[union-attr,assignment]
    return {
        "img_size": encoder.img_size,
        "patch_size": encoder.patch_size,
        "in_chans": encoder.patch_embed.in_channels,
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "num_heads": encoder.num_heads,
        "mlp_ratio": hidden / encoder.embed_dim,
        "qkv_bias": True,
        "class_token": design == "vit",
        "global_pool": "token" if design == "vit" else "avg",
        "fc_norm": design == "avgpool",
        "num_classes": 0,
    }


# ----------------------------------------------------------------------------------------------- reading URLs


def read_pth(url: str) -> dict[str, Any]:
    """torch.load(weights_only=True) of a .pth file on any fsspec URL, onto the CPU."""
    fs, path = rundir.filesystem(url)
    with fs.open(path, "rb") as f:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def pth_encoder(obj: Mapping[str, Any], branch: Branch, url: str) -> dict[str, Tensor]:
    """Encoder weights of a loaded .pth: official ExtreMA checkpoint, (wrapped) timm ViT, or our own key names."""
    sd: Mapping[str, Any] = obj
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if any(k.startswith(OFFICIAL_PREFIXES["student"] + OFFICIAL_PREFIXES["ema"]) for k in sd):
        return from_official(sd, branch)
    if any(k.removeprefix("module.") == "patch_embed.proj.weight" for k in sd):
        return from_timm(sd)
    if "patch_embed.weight" in sd:  # our own key names, e.g. pretrain's export/encoder_{student,ema}.pt
        return dict(sd)
    first = ", ".join(list(sd)[:5])
    raise ValueError(f"{url}: neither an official ExtreMA checkpoint nor a timm ViT state dict (keys: {first}, ...)")


def dcp_encoder(url: str, branch: Branch) -> dict[str, Tensor]:
    """One branch's encoder weights from one of our DCP training checkpoints (a complete `step-N` directory)."""
    prefix = DCP_PREFIX[branch]
    try:
        meta = SafeFsspecReader(url).read_metadata().state_dict_metadata
    except Exception as e:
        raise ckpt.CheckpointError(f"checkpoint {url} cannot be loaded: .metadata is unreadable ({e})") from e
    wanted = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not wanted:
        raise ValueError(f"{url}: no {prefix}* tensors; is it a pretrain checkpoint?")
    ckpt.load(url, wanted)
    return {k[len(prefix) :]: v for k, v in wanted.items()}


def resolve(url: str) -> str:
    """A weights URL made concrete: a .pth file, a complete DCP step directory, or a ckpt dir's newest step."""
    if url.endswith(PTH_SUFFIXES):
        if not rundir.exists(url):
            raise FileNotFoundError(f"checkpoint file {url} does not exist")
        return url
    if rundir.exists(rundir.join(url, ".metadata")):
        return url
    step = ckpt.latest_step(url)
    if step is None:
        raise FileNotFoundError(f"{url} is neither a .pth file, a complete DCP step, nor a ckpt dir with one")
    return ckpt.step_url(url, step)


def encoder_weights(url: str, branch: Branch) -> dict[str, Tensor]:
    """Encoder weights in our key names from a resolved URL (DCP step directory or .pth file)."""
    if url.endswith(PTH_SUFFIXES):
        return pth_encoder(read_pth(url), branch, url)
    return dcp_encoder(url, branch)


def pretrain_checkpoint(stage_dir: str) -> str:
    """The newest complete step of the run's sibling `pretrain` stage."""
    pretrain_ckpt = rundir.join(stage_dir.rstrip("/").rsplit("/", 1)[0], "pretrain", "ckpt")
    step = ckpt.latest_step(pretrain_ckpt)
    if step is None:
        raise FileNotFoundError(f"no complete pretrain checkpoint under {pretrain_ckpt}; set a checkpoint URL")
    return ckpt.step_url(pretrain_ckpt, step)


def weights_source(checkpoint: str | None, stage_dir: str) -> str:
    """The concrete URL a downstream stage loads: its `checkpoint` setting, else the run's pretrain stage."""
    return resolve(checkpoint) if checkpoint else pretrain_checkpoint(stage_dir)
