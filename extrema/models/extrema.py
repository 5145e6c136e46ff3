"""ExtreMA: a masked online ViT predicts the EMA target's representation of the full view.

Masking and losses are pure functions; `ExtreMA` holds the online encoder + projector + predictor and the
EMA target (encoder + projector, built without drop path, never trained by gradients).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extrema.models.vit import VisionTransformer, build_vit
from extrema.spec import ModelSpec, masks_fit_problem, visible_count

Sampling = Literal["disjoint", "independent"]


def check_masks_fit(num_patches: int, num_masks: int, ratio: float, sampling: Sampling) -> int:
    """Visible tokens per mask K; raises ValueError when the masks cannot be drawn."""
    problem = masks_fit_problem(num_patches, num_masks, ratio, sampling)
    if problem:
        raise ValueError(f"masks: {problem}")
    return visible_count(num_patches, ratio)


def random_masks(
    batch: int,
    num_patches: int,
    num_masks: int,
    ratio: float,
    sampling: Sampling = "disjoint",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Indices of visible patches, (num_masks, batch, K), a different draw for every image.

    disjoint: one permutation per image sliced into num_masks consecutive chunks (pairwise disjoint sets);
    independent: a fresh permutation per image and mask.
    """
    k = check_masks_fit(num_patches, num_masks, ratio, sampling)
    if sampling == "disjoint":
        perm = torch.rand(batch, num_patches, generator=generator, device=device).argsort(dim=1)
        return perm[:, : num_masks * k].reshape(batch, num_masks, k).transpose(0, 1).contiguous()
    noise = torch.rand(num_masks, batch, num_patches, generator=generator, device=device)
    return noise.argsort(dim=2)[:, :, :k].contiguous()


def byol_loss(q: Tensor, k: Tensor) -> Tensor:
    """Mean over rows of || q/|q| - k/|k| ||^2 = 2 - 2 cos(q, k)."""
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    return (2 - 2 * (q * k).sum(dim=-1)).mean()


def infonce_loss(q: Tensor, k: Tensor, temperature: float, k_all: Tensor | None = None, offset: int = 0) -> Tensor:
    """MoCo-v3 InfoNCE scaled by 2T: row i of q matches row offset+i of k_all (k gathered over ranks)."""
    q = F.normalize(q.float(), dim=-1)
    keys = F.normalize((k if k_all is None else k_all).float(), dim=-1)
    logits = q @ keys.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * 2 * temperature


def mlp_head(num_layers: int, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> (LayerNorm -> GELU -> Linear) * (num_layers - 1); no norm after the last layer."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers += [nn.LayerNorm(dims[i + 1]), nn.GELU()]
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class Branch(nn.Module):
    """An encoder followed by its 3-layer projector: images -> (B', proj_dim)."""

    def __init__(self, encoder: VisionTransformer, projector: nn.Sequential) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        return self.projector(self.encoder(x, visible))


class ExtreMA(nn.Module):
    """Online branch + predictor trained by gradients; EMA target branch updated by `update_target`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        dim = spec.dims[0]
        self.online = Branch(build_vit(spec), mlp_head(3, dim, spec.mlp_dim, spec.proj_dim))
        self.predictor = mlp_head(2, spec.proj_dim, spec.mlp_dim, spec.proj_dim)
        self.target = Branch(build_vit(spec, drop_path_rate=0.0), copy.deepcopy(self.online.projector))
        self.target.encoder.load_state_dict(self.online.encoder.state_dict())
        self.target.requires_grad_(False)

    def train(self, mode: bool = True) -> ExtreMA:
        """Train the online branch; the target always runs in eval mode."""
        super().train(mode)
        self.target.eval()
        return self

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """theta_t <- m * theta_t + (1 - m) * theta_s, one fused foreach over all parameters."""
        t: list[Tensor] = list(self.target.parameters())
        s: list[Tensor] = [p.detach() for p in self.online.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - momentum)

    def online_predictions(self, x: Tensor, visible: Tensor | None) -> Tensor:
        """Masked view (B, C, H, W) + masks (M, B, K) -> predictions (M, B, proj_dim), mask-major.

        Without masks the online branch sees the full view (M = 1): the BYOL baseline.
        """
        m = 1 if visible is None else visible.shape[0]
        return self.predictor(self.online(x, visible)).reshape(m, x.shape[0], -1)

    @torch.no_grad()
    def target_projections(self, x: Tensor) -> Tensor:
        """Full view (B, C, H, W) -> target projections (B, proj_dim)."""
        return self.target(x)

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        visible: Tensor | None,
        loss: Literal["byol", "infonce"] = "byol",
        temperature: float = 0.2,
        symmetric: bool = False,
        gather: Callable[[Tensor], tuple[Tensor, int]] | None = None,
    ) -> Tensor:
        """The ExtreMA loss: masked x1 predicts target(x2), averaged over masks (and both directions if symmetric).

        `gather`, when given, maps local keys (B, P) to (all keys, row offset of this rank) for InfoNCE.
        """
        pairs = [(x1, x2), (x2, x1)] if symmetric else [(x1, x2)]
        total = x1.new_zeros((), dtype=torch.float32)
        for online_in, target_in in pairs:
            q = self.online_predictions(online_in, visible)
            k = self.target_projections(target_in)
            if loss == "byol":
                total = total + sum(byol_loss(q[i], k) for i in range(q.shape[0])) / q.shape[0]
            else:
                k_all, offset = gather(k) if gather is not None else (k, 0)
                per_mask = [infonce_loss(q[i], k, temperature, k_all, offset) for i in range(q.shape[0])]
                total = total + sum(per_mask) / q.shape[0]
        return total / len(pairs)
