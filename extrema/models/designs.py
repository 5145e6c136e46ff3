"""The class-token designs, one row each: what the encoder, the classifier, the figures, the detector and the weight
converters ask of a design. A new design is a row here plus its readout in `VisionTransformer.pool`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ClsDesign = Literal["cait", "vit", "avgpool"]  # the spec's `model.cls_token`


@dataclass(frozen=True)
class Design:
    """One class-token design."""

    name: str
    class_token: bool  # a learned class token (the `cls_token` Parameter)
    token_at_input: bool  # the class token enters with the patches and self-attends (prefix token)
    late_blocks: bool  # class-attention blocks after the self-attention blocks read the patches (CaiT)
    finetune_as: str  # the design a finetuned classifier is built with
    finetune_discards: tuple[str, ...]  # encoder keys the classifier does not use
    finetune_fresh: tuple[str, ...]  # classifier keys initialised fresh instead of loaded
    timm_model: Literal["cait", "vision_transformer"]  # the timm model that holds it exactly
    official: bool  # the official release's checkpoint layout can hold it

    @property
    def prefix_tokens(self) -> int:
        """Tokens in front of the patches in the self-attention blocks (timm's `num_prefix_tokens`)."""
        return 1 if self.token_at_input else 0

    @property
    def attention_source(self) -> str | None:
        """Where its class token's attention over the patches is read (figures, locality); None without one."""
        if not self.class_token:
            return None
        return "last class-attention block" if self.late_blocks else "last block"


DESIGNS: dict[str, Design] = {
    d.name: d
    for d in (
        Design(
            "cait",
            class_token=True,
            token_at_input=False,
            late_blocks=True,
            finetune_as="avgpool",  # the reference finetunes the mean of the patch tokens, with a fresh final norm
            finetune_discards=("cls_token", "blocks_token.*", "norm.*"),
            finetune_fresh=("norm.*",),
            timm_model="cait",
            official=True,
        ),
        Design(
            "vit",
            class_token=True,
            token_at_input=True,
            late_blocks=False,
            finetune_as="vit",
            finetune_discards=(),
            finetune_fresh=(),
            timm_model="vision_transformer",
            official=False,
        ),
        Design(
            "avgpool",
            class_token=False,
            token_at_input=False,
            late_blocks=False,
            finetune_as="avgpool",
            finetune_discards=(),
            finetune_fresh=(),
            timm_model="vision_transformer",
            official=False,
        ),
    )
}
NO_CLASS_TOKEN: ClsDesign = "avgpool"  # the design without any class token (the detector's backbone)


def design(name: str) -> Design:
    """The row of a design, or ValueError naming the known ones."""
    if name not in DESIGNS:
        raise ValueError(f"unknown class-token design {name!r}; known: {', '.join(DESIGNS)}")
    return DESIGNS[name]
