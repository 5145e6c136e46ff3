"""Downstream heads: the linear probe on frozen features and the end-to-end finetuning classifier.

The finetuning model follows the reference (`finetune/modeling_finetune.py`): for the `cait` design the input
class token and the class-attention blocks are removed and the patch tokens are mean-pooled into a *new*
LayerNorm and head. The `vit` (input class token) and `avgpool` designs keep their own readout and final norm.
"""

from __future__ import annotations

from torch import Tensor, nn

from extrema.models.designs import DESIGNS, ClsDesign
from extrema.models.vit import build_vit
from extrema.spec import ModelSpec

HEAD_INIT_STD = 0.02
HEAD_INIT_SCALE = 0.001  # BEiT's init_scale: the head starts near zero


class LinearProbe(nn.Module):
    """BatchNorm without affine, then Linear (weight N(0, 0.01), bias 0): the MAE / reference probe head."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) features -> (B, num_classes) logits."""
        return self.linear(self.bn(features))


def finetune_design(design: ClsDesign) -> ClsDesign:
    """The encoder design the classifier is built with: `cait` becomes mean pooling over the patch tokens."""
    return DESIGNS[design].finetune_as  # type: ignore[return-value]


def discarded_keys(design: ClsDesign) -> tuple[str, ...]:
    """Pretrained encoder keys the classifier does not use: for `cait`, class token, CA blocks and instance norm."""
    return DESIGNS[design].finetune_discards


def fresh_keys(design: ClsDesign) -> tuple[str, ...]:
    """Classifier encoder keys that start from scratch: for `cait`, the new LayerNorm after the mean pooling."""
    return DESIGNS[design].finetune_fresh


class Classifier(nn.Module):
    """Encoder (drop path, no CA blocks for `cait`) -> design readout -> final norm -> linear head."""

    def __init__(
        self, spec: ModelSpec, num_classes: int, img_size: int | None = None, drop_path_rate: float = 0.1
    ) -> None:
        super().__init__()
        self.design: ClsDesign = spec.cls_token
        self.encoder = build_vit(spec, drop_path_rate, finetune_design(spec.cls_token), img_size)
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        self.head.weight.data.mul_(HEAD_INIT_SCALE)
        nn.init.zeros_(self.head.bias)

    @property
    def num_layers(self) -> int:
        """Transformer blocks of the encoder (the depth for layer-wise lr decay)."""
        return self.encoder.depth

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.encoder(x))
