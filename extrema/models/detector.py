"""Mask R-CNN (torchvision) on the ViT: the multi-scale backbone of the CAE detection recipe.

The ViT runs without any class token (the input token of the `vit` design and the class-attention blocks of
`cait` are dropped, as the reference requires for ExtreMA) and with the fixed sin-cos position table computed
for each input's grid. The outputs of four blocks become maps at strides 4/8/16/32 through transposed
convolutions (BatchNorm + GELU between them), identity or max pooling, then torchvision's FPN (with an extra
max-pooled level) feeds its RPN, a 4conv1fc box head and the 4-conv mask head. Shapes: B images, D embedding
width, p patch size, (H/p, W/p) token grid.

Which block feeds which stride follows CAE's ViT-B/16 table, read relative to the patch size: block 3 of 12 feeds
stride p/4, block 5 p/2, block 7 p and block 11 2p (and any coarser stride), at the same relative depth for
other depths. With p = 16 these are CAE's blocks (3, 5, 7, 11) for strides 4..32. With p = 4 the stride-4 map,
where RoIs of small objects are pooled, comes from the block at 2/3 depth rather than from the first block.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from extrema.models.designs import NO_CLASS_TOKEN
from extrema.models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, build_vit
from extrema.spec import DetectSpec, ModelSpec

STRIDES = (4, 8, 16, 32)
REFERENCE_BLOCKS = (3, 5, 7, 11)  # CAE's out_indices for a 12-block ViT
REFERENCE_DEPTH = 12
REFERENCE_PATCH = 16  # ... of patch size 16, for strides 4, 8, 16, 32
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# Pretrained encoder keys the detector does not use: every class token, the class-attention blocks, the final
# norm (the pyramid reads raw block outputs) and a stored position table (the sin-cos one is rebuilt per grid).
DISCARDED_KEYS = ("cls_token", "blocks_token.*", "norm.*", "pos_embed")


def feature_blocks(depth: int, patch_size: int = REFERENCE_PATCH) -> tuple[int, ...]:
    """Blocks feeding strides 4, 8, 16, 32: CAE's block for the same stride relative to the patch size (the last
    one past 2p), at the same relative depth; (3, 5, 7, 11) for a 12-block ViT of patch 16."""
    by_ratio = {s / REFERENCE_PATCH: b for s, b in zip(STRIDES, REFERENCE_BLOCKS)}
    ratios = sorted(by_ratio)
    blocks = []
    for stride in STRIDES:
        ratio = stride / patch_size
        ref = by_ratio[max([r for r in ratios if r <= ratio], default=ratios[0])]
        blocks.append(max(0, math.floor((ref + 1) * depth / REFERENCE_DEPTH + 0.5) - 1))
    return tuple(blocks)


def adapter(dim: int, patch_size: int, stride: int) -> nn.Module:
    """(B, D, H/p, W/p) -> (B, D, H/stride, W/stride); with p = 16 these are CAE's fpn1..fpn4.

    Transposed convolutions up (BatchNorm + GELU between them), identity, or max pooling down.
    """
    if stride == patch_size:
        return nn.Identity()
    ratio = max(stride, patch_size) // min(stride, patch_size)
    if ratio * min(stride, patch_size) != max(stride, patch_size) or ratio & (ratio - 1):
        raise ValueError(f"patch size {patch_size} and stride {stride} are not a power of two apart")
    if stride > patch_size:
        return nn.MaxPool2d(kernel_size=ratio, stride=ratio)
    layers: list[nn.Module] = []
    for i in range(int(math.log2(ratio))):
        if i:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class ViTPyramid(nn.Module):
    """ViT without class token -> four feature maps (B, D, H/s, W/s) for s in 4, 8, 16, 32."""

    def __init__(
        self,
        encoder: VisionTransformer,
        blocks: tuple[int, ...],
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if encoder.cls_token is not None:
            raise ValueError("the detection encoder must have no class token (build it with cls_design='avgpool')")
        if len(blocks) != len(STRIDES) or not all(0 <= b < encoder.depth for b in blocks):
            raise ValueError(f"blocks {blocks}: need {len(STRIDES)} indices below the depth {encoder.depth}")
        self.encoder = encoder
        self.blocks = blocks
        self.adapters = nn.ModuleList(adapter(encoder.embed_dim, encoder.patch_size, s) for s in STRIDES)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: Tensor) -> list[Tensor]:
        """Images (B, C, H, W), H and W multiples of the patch size -> maps at strides 4, 8, 16, 32."""
        p = self.encoder.patch_size
        b, _, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        taps = self.encoder.forward_intermediates(x, self.blocks, self.activation_checkpointing and self.training)
        return [adapt(t.transpose(1, 2).reshape(b, -1, h // p, w // p)) for adapt, t in zip(self.adapters, taps)]


class ViTFPN(nn.Module):
    """The Mask R-CNN backbone: the ViT pyramid, then an FPN -> {"0".."3": strides 4..32, "pool": stride 64}.

    With `autocast_dtype` both run in that autocast dtype; the outputs are fp32 either way, so the detection heads
    run in fp32 (torchvision's box coder casts proposals to the regression dtype, and bf16 coordinates are coarse).
    """

    def __init__(self, pyramid: ViTPyramid, out_channels: int, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.body = pyramid
        self.autocast_dtype = autocast_dtype
        dim = pyramid.encoder.embed_dim
        self.fpn = FeaturePyramidNetwork([dim] * len(STRIDES), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Images (B, C, H, W) -> five fp32 maps of out_channels channels."""
        dtype = self.autocast_dtype
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))
        return OrderedDict((k, v.float()) for k, v in out.items())


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalise and batch; training images arrive already resized by the v2 pipeline, test images are resized here."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Identity in training (the data pipeline did the multi-scale resize); the test resize otherwise."""
        if self.training:
            return image, target
        return super().resize(image, target)


def detection_encoder(model: ModelSpec, drop_path_rate: float) -> VisionTransformer:
    """The ViT of a ModelSpec without any class token or final norm, with drop path."""
    encoder = build_vit(model, drop_path_rate, cls_design=NO_CLASS_TOKEN)
    encoder.norm = nn.Identity()  # type: ignore[assignment]
    return encoder


def build_detector(
    model: ModelSpec, d: DetectSpec, num_classes: int, autocast_dtype: torch.dtype | None = None
) -> MaskRCNN:
    """torchvision Mask R-CNN on the ViT pyramid + FPN for `num_classes` object classes (background added)."""
    encoder = detection_encoder(model, d.drop_path_rate)
    pyramid = ViTPyramid(encoder, feature_blocks(encoder.depth, encoder.patch_size), d.activation_checkpointing)
    backbone = ViTFPN(pyramid, d.fpn_channels, autocast_dtype)
    c = d.fpn_channels
    detector = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in d.anchor_sizes), (ASPECT_RATIOS,) * 5),
        rpn_batch_size_per_image=d.rpn_batch_size,
        rpn_pre_nms_top_n_train=2 * d.rpn_proposals,
        rpn_post_nms_top_n_train=d.rpn_proposals,
        rpn_pre_nms_top_n_test=d.rpn_proposals,
        rpn_post_nms_top_n_test=d.rpn_proposals,
        box_head=FastRCNNConvFCHead((c, 7, 7), [c] * 4, [d.box_head_dim], norm_layer=nn.BatchNorm2d),
        box_predictor=FastRCNNPredictor(d.box_head_dim, num_classes + 1),
        box_batch_size_per_image=d.roi_batch_size,
        box_detections_per_img=d.detections_per_image,
        mask_head=MaskRCNNHeads(c, [c] * 4, 1),
        mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1),
    )
    detector.transform = DetectionTransform(
        d.test_size,
        d.max_size,
        list(IMAGENET_MEAN),
        list(IMAGENET_STD),
        size_divisible=math.lcm(max(STRIDES), encoder.patch_size),
    )
    return detector
