"""The inpainting stage under fake tensors: its frozen encoder and the decoder it trains, one training step at the
ratio that shows the encoder the most patches, and one evaluation batch; memory by kind, the peak, and FLOPs.

The encoder and decoder are the stage's own (`build_vit`, `build_decoder`) on the meta device, then given fake
storage, the decoder's AdamW (`decoder_optimizer`) after one step; the step is the
stage's: `reconstruct` (the encoder under no_grad, in bf16 autocast on a GPU), the hidden patches' squared error,
the backward pass and the optimizer's step. Apart from it, a no_grad evaluation batch of up to 256 held-out images:
the peak is the larger of the two; FLOPs and time are the training step's (evaluation passes forward only, over
`val_size` images per ratio). The loss averages the hidden patches' errors by weighting instead of selecting them
(a boolean selection's size is a value, which fake tensors do not hold): a (batch, patches) tensor either way. One
process, as the stage runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from extrema.check.downstream import applies, first_step, measure
from extrema.check.estimate import Setting, Target, fake_storage, fake_world, heading
from extrema.check.knn import tracked_peak
from extrema.models.vit import build_vit
from extrema.spec import Experiment, visible_count
from extrema.stages.inpaint import (
    EVAL_BATCH,
    build_decoder,
    decoder_optimizer,
    hidden_mask,
    num_patches,
    patchify,
    reconstruct,
)


def squared_error(pred: Tensor, x: Tensor, visible: Tensor, p: int) -> Tensor:
    """The mean squared error over the hidden patches, as the stage's loss, by weighting (sizes fixed)."""
    hidden = hidden_mask(visible, pred.shape[1]).float()
    return ((pred - patchify(x, p)).pow(2).mean(-1) * hidden).sum() / hidden.sum()


def estimate_inpaint(exp: Experiment, nodes: int, processes_per_node: int, target: Target) -> dict[str, Any]:
    """Memory of the inpainting stage's training step and evaluation batch, by kind and at the peak, and the
    training step's FLOPs. Call in a fresh process; ValueError for more than one process (the stage refuses it)."""
    if nodes * processes_per_node > 1:
        raise ValueError("inpaint runs in one process: set its resources to processes_per_node 1, nodes 1")
    s = exp.inpaint
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    world = fake_world(1)
    amp = torch.bfloat16 if target == "cuda" else None  # the stage: bf16 autocast on a GPU, fp32 on a CPU
    setting = Setting(amp, False, False, amp is not None)
    fake = FakeTensorMode()
    with torch.device("meta"):
        encoder = build_vit(exp.model, drop_path_rate=0.0)
        decoder = build_decoder(encoder, s)
    encoder = fake_storage(encoder, fake, world.device).requires_grad_(False).eval()
    decoder = fake_storage(decoder, fake, world.device)
    n, p, size = num_patches(encoder), encoder.patch_size, encoder.img_size
    shown = visible_count(n, min(s.ratios))
    evaluated = min(EVAL_BATCH, s.val_size or EVAL_BATCH)
    with fake:
        optimizer = decoder_optimizer(decoder, s)
        first_step(list(decoder.parameters()), optimizer)
        x = torch.zeros(s.batch_size, exp.model.in_chans, size, size)
        visible = torch.zeros(s.batch_size, shown, dtype=torch.long)
        held_out = torch.zeros(evaluated, exp.model.in_chans, size, size)
        held_visible = torch.zeros(evaluated, shown, dtype=torch.long)
    apply = applies(optimizer, list(decoder.parameters()), None)

    def step() -> None:
        loss = squared_error(reconstruct(encoder, decoder, x, visible, amp), x, visible, p)
        loss.backward()
        apply(loss)

    @torch.no_grad()
    def evaluation() -> None:
        squared_error(reconstruct(encoder, decoder, held_out, held_visible, amp), held_out, held_visible, p)

    result = heading("inpaint", world, "none", target, amp, s.batch_size, s.batch_size)
    result["visible_patches"] = shown
    with fake:
        result.update(measure([encoder, decoder], optimizer, (x, visible), step, setting, world))
        decoder.eval()  # the stage evaluates after `train` returned: its optimizer is gone
        evaluation_peak, _ = tracked_peak([encoder, decoder, held_out, held_visible], evaluation, setting.cuda_autocast)
    training_peak = result["memory"]["peak"]
    result["phases"] = {"training step": training_peak, "evaluation batch": evaluation_peak}
    result["memory"]["peak"] = max(training_peak, evaluation_peak)
    # the training batch sets the activations; the evaluation batch is the stage's own (`batch_size` leaves it)
    result |= {"forward_peak": training_peak, "batch_free_peak": evaluation_peak}
    return result
