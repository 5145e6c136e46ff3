"""Weights in and out: one strict loader for every checkpoint kind, and one export per format.

In: `load_encoder` fills an encoder from any source `weights_source` names: one of our DCP steps (a step
directory, a ckpt directory's newest step, or the run's pretrain stage), an official ExtreMA `.pth`, a timm
VisionTransformer or Cait `.pth`/`.safetensors`, or our own export (`export/encoder_{student,ema}.pt`).
`load_extrema` fills a whole ExtreMA model (both encoders, both projectors, the predictor) from an official
checkpoint or a DCP step. Every source first becomes a plain dict in our key names (`VisionTransformer.state_dict()`:
`patch_embed.*`, `blocks.N.*`, `blocks_token.N.*`, `cls_token`, `norm.*`), plus `pos_embed` (1, N, D) when the source
stores a position table (ours is a fixed sin-cos buffer and is not stored); `load_strict` then refuses any
missing, unexpected or misshapen key, listing them.

Out: `to_timm` (timm's VisionTransformer for `vit`/`avgpool`, timm's Cait for `cait`; exact), `to_official` (the
release's layout, both branches). `save_weights` writes a `.pth` (torch.save) or `.safetensors` file.

Official release (`main.py` checkpoints): `state_dict` with `module.base_encoder.*` (student) and
`module.momentum_encoder.*` (EMA target): `patch_embed.proj.*`, `pos_embed` (1, 196, D), `cls_token`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `blocks_token.N.{norm1,attn.q,attn.k,attn.v,attn.proj,
norm2,mlp.fc1,mlp.fc2,gamma_1,gamma_2}`, `norm.*`, and `head.*` (the projector); `module.predictor.*`.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from extrema.models.extrema import ExtreMA
from extrema.models.vit import VisionTransformer, resize_pos_embed, sincos_pos_embed_2d
from extrema.run import contract, rundir
from extrema.train import ckpt
from extrema.train.safe_dcp import SafeFsspecReader
from extrema.train.timm_layout import TALKING_HEADS, build_timm, timm_config, to_timm

Branch = Literal["ema", "student"]
OFFICIAL_PREFIXES: dict[Branch, tuple[str, ...]] = {
    "student": ("module.base_encoder.", "base_encoder."),
    "ema": ("module.momentum_encoder.", "momentum_encoder."),
}
DCP_PREFIX: dict[Branch, str] = {"student": "model.online.encoder.", "ema": "model.target.encoder."}
# Our ExtreMA module's parts <- the official release's (`lib/builder.py`), projectors being the encoders' heads.
OFFICIAL_PARTS = (
    ("online.projector.", "module.base_encoder.head."),
    ("online.encoder.", "module.base_encoder."),
    ("target.projector.", "module.momentum_encoder.head."),
    ("target.encoder.", "module.momentum_encoder."),
    ("predictor.", "module.predictor."),
)
PTH_SUFFIXES = (".pth", ".pt", ".pth.tar")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_FILE_BYTES = 16 << 30  # a weights file larger than this is refused before it is read
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


def use_pos_embed(encoder: VisionTransformer, table: Tensor | None, learnable: bool) -> None:
    """Give the encoder the source's position table (resized to its grid), or keep its sin-cos one.

    learnable: the table becomes a trained Parameter (the reference finetune); otherwise it stays a fixed buffer.
    A table that is not the encoder's sin-cos one is interpolated at other resolutions rather than recomputed.
    """
    grid = encoder.img_size // encoder.patch_size
    current: Tensor = encoder.pos_embed  # type: ignore[assignment]
    new = current.detach().clone() if table is None else resize_pos_embed(table.detach(), grid).to(current)
    if new.shape != current.shape:
        raise ValueError(f"position table {tuple(new.shape)} does not fit the encoder's {tuple(current.shape)}")
    sincos = sincos_pos_embed_2d(encoder.embed_dim, grid, grid).unsqueeze(0).to(new)
    encoder.sincos_table = bool(torch.allclose(new, sincos, atol=1e-5))
    delattr(encoder, "pos_embed")
    if learnable:
        encoder.pos_embed = nn.Parameter(new)  # type: ignore[assignment]
    else:
        encoder.register_buffer("pos_embed", new, persistent=False)


# -------------------------------------------------------------------------------------------- source formats


def _strip_patch_proj(name: str) -> str:
    return "patch_embed." + name.removeprefix("patch_embed.proj.") if name.startswith("patch_embed.proj.") else name


def from_official(state: Mapping[str, Any], branch: Branch) -> dict[str, Tensor]:
    """Official ExtreMA checkpoint (or its `state_dict`) -> our encoder keys for one branch; projector dropped."""
    sd = state.get("state_dict", state)
    prefix = next((p for p in OFFICIAL_PREFIXES[branch] if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        raise ValueError(f"no {OFFICIAL_PREFIXES[branch][0]}* keys: not an official checkpoint with a {branch} encoder")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = key[len(prefix) :]
        if key.startswith(prefix) and not name.startswith("head."):
            out[_strip_patch_proj(name)] = value
    return out


def is_identity_talking_heads(key: str, value: Tensor) -> bool:
    """Whether a timm Cait talking-heads weight or bias (`proj_l`, `proj_w`) is the identity map."""
    if key.endswith(".weight"):
        return value.ndim == 2 and torch.equal(value, torch.eye(value.shape[0], dtype=value.dtype))
    return bool((value == 0).all())


def from_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm VisionTransformer or Cait state dict -> our encoder keys; the classifier head is dropped.

    A class-token slot of the position table is folded into `cls_token` (our `vit` design adds no position to
    the class token), `fc_norm` (average-pool readout) becomes `norm`, Cait's `blocks_token_only` become our
    class-attention blocks, and Cait's self-attention layer scale and talking heads are dropped when they are exactly
    one and the identity (ours have neither).
    """
    sd = {k.removeprefix("module."): v for k, v in state.items()}
    if "norm.weight" in sd and "fc_norm.weight" in sd:
        raise ValueError("timm state dict has both norm and fc_norm weights; export it with one final norm")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("head."):
            continue
        if key.startswith("blocks.") and key.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2"):
            if not bool((value == 1).all()):
                raise ValueError(f"{key}: layer scale in the self-attention blocks is not ours (it must be one)")
            continue
        if key.startswith("blocks.") and key.rsplit(".", 1)[0].endswith(TALKING_HEADS):
            if not is_identity_talking_heads(key, value):
                raise ValueError(f"{key}: talking heads in the self-attention blocks are not ours (identity only)")
            continue
        name = _strip_patch_proj(key)
        if key.startswith("fc_norm."):
            name = "norm." + key.removeprefix("fc_norm.")
        elif key.startswith("blocks_token_only."):
            name = "blocks_token." + key.removeprefix("blocks_token_only.")
        out[name] = value
    pos = out.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]:
        if "cls_token" not in out or math.isqrt(pos.shape[1] - 1) ** 2 != pos.shape[1] - 1:
            raise ValueError(f"timm pos_embed {tuple(pos.shape)} is neither a square grid nor a class slot + grid")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


# ------------------------------------------------------------------------------------------------- exports


def to_official(model: ExtreMA) -> dict[str, Any]:
    """The whole model in the official release's layout: {"state_dict": module.base_encoder.*, ...}.

    Position tables are stored as the release does (each encoder's (1, N, D) table).
    """
    sd: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        ours, theirs = next((o, t) for o, t in OFFICIAL_PARTS if key.startswith(o))
        name = key[len(ours) :]
        if ours.endswith("encoder.") and name.startswith("patch_embed."):
            name = "patch_embed.proj." + name.removeprefix("patch_embed.")
        sd[theirs + name] = value.detach().clone().contiguous()
    for branch, encoder in (("base_encoder", model.online.encoder), ("momentum_encoder", model.target.encoder)):
        sd[f"module.{branch}.pos_embed"] = encoder.pos_embed.detach().clone()  # type: ignore[operator]
    return {"state_dict": sd}


def save_weights(url: str, state: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write weights to a `.safetensors` file (a flat dict of tensors) or, for any other name, with torch.save."""
    if url.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in state.items()}, metadata=dict(metadata or {}))
        fs, path = rundir.filesystem(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(f"{path}.tmp", "wb") as f:
            f.write(blob)
        fs.mv(f"{path}.tmp", path)
        return
    ckpt.write_torch(url, dict(state))


# ----------------------------------------------------------------------------------------------- reading URLs


def _read_bytes(url: str) -> bytes:
    fs, path = rundir.filesystem(url)
    size = fs.size(path)
    if size is not None and size > MAX_FILE_BYTES:
        raise ValueError(f"{url}: {size} bytes is over the {MAX_FILE_BYTES} a weights file may have")
    data: bytes = rundir.read_stable(fs, path, "rb", lambda f: f.read(MAX_FILE_BYTES + 1))
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{url}: over the {MAX_FILE_BYTES} bytes a weights file may have")
    return data


def read_pth(url: str) -> dict[str, Any]:
    """torch.load(weights_only=True) of a .pth file on any fsspec URL, onto the CPU (size-bounded)."""
    import io

    obj = torch.load(io.BytesIO(_read_bytes(url)), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def read_safetensors(url: str) -> dict[str, Tensor]:
    """The tensors of a .safetensors file on any fsspec URL (size-bounded)."""
    from safetensors.torch import load

    try:
        return load(_read_bytes(url))
    except Exception as e:
        raise ValueError(f"{url}: not a readable safetensors file ({e})") from e


def unwrap(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside common wrappers (`state_dict`, `model`, `module`)."""
    sd: Mapping[str, Any] = obj
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    return sd


def is_official(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict has the official release's `module.base_encoder.*`/`module.momentum_encoder.*` keys."""
    return any(k.startswith(OFFICIAL_PREFIXES["student"] + OFFICIAL_PREFIXES["ema"]) for k in sd)


def pth_encoder(obj: Mapping[str, Any], branch: Branch, url: str) -> dict[str, Tensor]:
    """Encoder weights of a loaded file: official ExtreMA checkpoint, (wrapped) timm ViT/Cait, or our key names."""
    sd = unwrap(obj)
    if is_official(sd):
        return from_official(sd, branch)
    if any(k.removeprefix("module.") == "patch_embed.proj.weight" for k in sd):
        return from_timm(sd)
    if "patch_embed.weight" in sd:  # our own key names, e.g. pretrain's export/encoder_{student,ema}.pt
        return dict(sd)
    first = ", ".join(list(sd)[:5])
    raise ValueError(f"{url}: neither an official ExtreMA checkpoint nor a timm ViT state dict (keys: {first}, ...)")


def dcp_tensors(url: str, prefix: str) -> dict[str, Tensor]:
    """Every tensor under `prefix` of one of our DCP checkpoints (a complete `step-N`), keys without the prefix."""
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


def dcp_encoder(url: str, branch: Branch) -> dict[str, Tensor]:
    """One branch's encoder weights from one of our DCP training checkpoints (a complete `step-N` directory)."""
    return dcp_tensors(url, DCP_PREFIX[branch])


def is_file(url: str) -> bool:
    """Whether a weights URL names a file (.pth/.pt/.pth.tar or .safetensors) rather than a DCP directory."""
    return url.endswith((*PTH_SUFFIXES, SAFETENSORS_SUFFIX))


def resolve(url: str) -> str:
    """A weights URL made concrete: a weights file, a complete DCP step directory, or a ckpt dir's newest step."""
    if is_file(url):
        if not rundir.exists(url):
            raise FileNotFoundError(f"checkpoint file {url} does not exist")
        return url
    if rundir.exists(rundir.join(url, ".metadata")):
        return url
    step = ckpt.latest_step(url)
    if step is None:
        raise FileNotFoundError(
            f"{url} is neither a .pth or .safetensors file, a complete DCP step, nor a ckpt dir with one"
        )
    return ckpt.step_url(url, step)


def encoder_weights(url: str, branch: Branch) -> dict[str, Tensor]:
    """Encoder weights in our key names from a resolved URL (DCP step directory, .pth or .safetensors file)."""
    if url.endswith(SAFETENSORS_SUFFIX):
        return pth_encoder(read_safetensors(url), branch, url)
    if url.endswith(PTH_SUFFIXES):
        return pth_encoder(read_pth(url), branch, url)
    return dcp_encoder(url, branch)


def pretrain_checkpoint(stage_dir: str) -> str:
    """The newest complete step of the run's sibling `pretrain` stage."""
    pretrain_ckpt = contract.StageDir(stage_dir).sibling("pretrain").checkpoints
    step = ckpt.latest_step(pretrain_ckpt)
    if step is None:
        raise FileNotFoundError(f"no complete pretrain checkpoint under {pretrain_ckpt}; set a checkpoint URL")
    return ckpt.step_url(pretrain_ckpt, step)


def weights_source(checkpoint: str | None, stage_dir: str) -> str:
    """The concrete URL a downstream stage loads: its `checkpoint` setting, else the run's pretrain stage."""
    return resolve(checkpoint) if checkpoint else pretrain_checkpoint(stage_dir)


# --------------------------------------------------------------------------------------- the loaders stages call


def load_encoder(
    encoder: VisionTransformer,
    source: str,
    branch: Branch,
    *,
    discard: Iterable[str] = (),
    fresh: Iterable[str] = (),
    learnable_pos: bool = False,
) -> None:
    """Fill `encoder` strictly from a resolved source of any kind (see `weights_source`).

    The source's position table (if any, and not discarded) replaces the encoder's, resized to its grid, as a
    trained Parameter with `learnable_pos`; `discard` and `fresh` are `load_strict`'s glob patterns.
    """
    discard = tuple(discard)
    weights = encoder_weights(source, branch)
    table = weights.pop("pos_embed", None)
    if matches("pos_embed", discard):
        table = None
    use_pos_embed(encoder, table, learnable=learnable_pos)
    load_strict(encoder, weights, source, discard=discard, fresh=(*fresh, "pos_embed"))


def official_to_ours(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An official state dict -> (ExtreMA keys, {"online"/"target": position table}); unknown keys kept as given."""
    out: dict[str, Tensor] = {}
    tables: dict[str, Tensor] = {}
    for key, value in sd.items():
        found = next(((o, t) for o, t in OFFICIAL_PARTS if key.startswith(t)), None)
        if found is None:
            out[key] = value
            continue
        ours, theirs = found
        name = key[len(theirs) :]
        if name == "pos_embed" and ours.endswith("encoder."):
            tables[ours.split(".")[0]] = value
            continue
        out[ours + (_strip_patch_proj(name) if ours.endswith("encoder.") else name)] = value
    return out, tables


def load_extrema(model: ExtreMA, url: str) -> None:
    """Fill the whole model (both encoders, both projectors, the predictor) strictly from an official ExtreMA
    checkpoint or one of our DCP steps (resolved like `resolve`); ValueError listing every mismatch."""
    source = resolve(url)
    tables: dict[str, Tensor] = {}
    if source.endswith(SAFETENSORS_SUFFIX):
        sd: Mapping[str, Tensor] = read_safetensors(source)
    elif source.endswith(PTH_SUFFIXES):
        sd = unwrap(read_pth(source))
    else:
        sd = dcp_tensors(source, "model.")
    if is_official(sd):
        sd, tables = official_to_ours(sd)
    for name in ("online", "target"):
        use_pos_embed(getattr(model, name).encoder, tables.get(name), learnable=False)
    load_strict(model, sd, source)


# ------------------------------------------------------------------------------------------------- exporting

ExportFormat = Literal["timm", "official", "safetensors"]


def export_source(source: str) -> str:
    """The checkpoint an export reads: a weights file, a DCP step, a ckpt directory's newest step, or the newest
    step of a pretrain stage directory or of a run directory's pretrain stage."""
    if is_file(source) or rundir.exists(rundir.join(source, ".metadata")) or ckpt.latest_step(source) is not None:
        return resolve(source)
    for below in (("ckpt",), ("pretrain", "ckpt")):
        if ckpt.latest_step(rundir.join(source, *below)) is not None:
            return resolve(rundir.join(source, *below))
    return resolve(source)  # FileNotFoundError saying what it is not


def export(
    source: str, fmt: ExportFormat, out: str, branch: Branch = "ema", flags: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write any weights source in another format, its description beside it (`<out>.json`, and in a .safetensors
    file's metadata); returns the description. The model settings come from the run's spec, else the file's own
    description, else `flags` (ModelSpec fields); ValueError (one line) when none says enough or the format cannot
    hold the design.

    timm: one branch as a timm state dict (torch.save); safetensors: the same in a .safetensors file; official:
    the whole model (both branches, projectors, predictor) in the release's layout, for the designs it holds.
    """
    from extrema.models.designs import DESIGNS, design
    from extrema.models.vit import build_vit
    from extrema.train import export_description as card
    from extrema.train import model_settings
    from extrema.train.timm_layout import TIMM_CLASSES, create_model_args

    url = export_source(source)
    loaded = read_pth(url) if url.endswith(PTH_SUFFIXES) else None
    described = card.read_description(url, None if loaded is None else loaded.get(card.DESCRIPTION_KEY))
    stage = model_settings.stage_of(url)
    settings = model_settings.choose(
        model_settings.model_of_run(stage) if stage else None,
        model_settings.model_of_file(described, None if loaded is None else loaded.get("arch")),
        flags or {},
    )
    row = design(settings.model.cls_token)
    model_json = settings.model.model_dump(mode="json")  # every setting: the file outlives our defaults
    if fmt == "official":
        if not row.official:
            held = ", ".join(d.name for d in DESIGNS.values() if d.official)
            raise ValueError(
                f"--format official: the official code holds only the {held} design, and this model is {row.name!r}"
                " (it could not load the file); use --format timm or safetensors"
            )
        if is_file(url) and not (loaded is not None and is_official(unwrap(loaded))):
            raise ValueError(
                f"--format official needs both branches, projectors and predictor; {url} holds one encoder"
            )
        model = ExtreMA(settings.model)
        load_extrema(model, url)
        out_card = card.describe(fmt, url, model_json, row.name, official_loadable=True)
        save_weights(
            out, {"arch": settings.model.arch, card.DESCRIPTION_KEY: json.dumps(out_card), **to_official(model)}
        )
    else:
        if fmt == "safetensors" and not out.endswith(SAFETENSORS_SUFFIX):
            raise ValueError(f"--out {out}: a safetensors export needs a name ending in {SAFETENSORS_SUFFIX}")
        if is_file(url) and described is not None and "branch" in described:
            branch = described["branch"]  # a one-encoder export keeps the branch it was exported from
        encoder = build_vit(settings.model, drop_path_rate=0.0)
        load_encoder(encoder, url, branch)
        config = timm_config(encoder)
        timm = {"class": TIMM_CLASSES[config["model"]], **config, "create_model": create_model_args(config)}
        out_card = card.describe(fmt, url, model_json, row.name, branch=branch, timm=timm)
        meta = card.safetensors_metadata(out_card) if fmt == "safetensors" else None
        save_weights(out, to_timm(encoder), meta)
    card.write_sidecar(out, out_card)
    return {**out_card, "out": out, "settings_from": settings.origin}


def timm_model(url: str) -> nn.Module:
    """The exact timm model one of our timm or safetensors exports describes (its `<file>.json` or safetensors
    metadata), its weights loaded strictly, in eval mode."""
    from extrema.train import export_description as card

    described = card.read_description(url)
    if described is None or "timm" not in described:
        raise ValueError(f"{url}: describes no timm model (no {card.sidecar_url(url)}, no safetensors metadata)")
    model = build_timm(described["timm"])
    state = read_safetensors(url) if url.endswith(SAFETENSORS_SUFFIX) else read_pth(url)
    model.load_state_dict(state, strict=True)
    return model.eval()
