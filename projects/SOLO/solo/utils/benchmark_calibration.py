"""Make random-weight models do a trained model's post-processing work, for tools/benchmark.py.

Random weights leave post-processing idle: a SOLO model has a handful of confident cells (all of
a few classes, so that Matrix NMS leaves ~1 instance per class) and SOLO v1 / Decoupled masks
are blurred fields; Mask R-CNN's random box deltas collapse its proposals to ~10 degenerate
boxes. The functions below rescale a few output layers so that the benchmark times the work of
a real image, and say what they did.

* SOLO: per class, ``cate_pred``'s weight and bias are rescaled so that, after point NMS, about
  ``nms_pre`` (cell, class) candidates in all, spread evenly over the classes, score between the
  score threshold and :data:`CATE_SCORE_MAX`; SOLO v1 / Decoupled mask convs are rescaled so that
  every mask covers :data:`MASK_COVERAGE` of the image with sharp logits (SOLOv2's dynamic
  kernels need nothing). The candidate count is read from the ``solo/num_candidates`` scalar the
  post-processor writes into an active ``EventStorage``.
* Mask R-CNN: RPN and box-regression deltas zeroed (proposals = anchors), with
  ``ROI_HEADS.SCORE_THRESH_TEST 0`` set by the caller: the ROI heads see the full
  ``POST_NMS_TOPK_TEST`` proposals and ``TEST.DETECTIONS_PER_IMAGE`` detections come out.
"""

import logging
import math
from typing import List, Sequence, Tuple
import torch
from torch import nn

from detectron2.utils.events import EventStorage

from ..modeling.nms import points_nms

logger = logging.getLogger("benchmark")

MASK_COVERAGE = 0.3  # fraction of the image each calibrated SOLO v1 / Decoupled mask covers
MASK_LOGIT_STD = 3.0  # spread of those masks' logits: maskness ~0.9, as a trained model's
CATE_SCORE_MAX = 0.9  # calibrated candidates score from the score threshold up to this
ATTEMPTS = 5  # rounds of raising the candidate target until ~nms_pre pass the area filter too
CANDIDATES_SCALAR = "solo/num_candidates"


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def point_nms_survivors(cate_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, M) float64 logits of image 0's cells that survive point NMS, per class, sorted in
    descending order, -inf padded. Point NMS commutes with any increasing per-class map of the
    logits, so the survivors stay the same after :func:`class_calibration`."""
    columns = []
    for x in cate_logits:
        x = x[:1].double()  # (1, C, S, S)
        survives = points_nms(x.sigmoid()) > 0
        columns.append(torch.where(survives, x, torch.full_like(x, -math.inf))[0].flatten(1))
    return torch.cat(columns, dim=1).sort(dim=1, descending=True).values


def class_calibration(survivors: torch.Tensor, bias: torch.Tensor, thresh: float, target: int):
    """Per class c, (scale, new bias) of ``cate_pred`` mapping its k_c best point-NMS survivors
    to scores in (thresh, CATE_SCORE_MAX] and the others below ``thresh``.

    Args:
        survivors: (C, M) from :func:`point_nms_survivors`; bias: (C,) ``cate_pred``'s bias.
        target: sum(k_c), spread evenly over the classes (a real image's candidates come from
            many classes, not from the few a random-weight model favours).
    Returns:
        (scales, biases): two (C,) float64 tensors.
    """
    num_classes = survivors.shape[0]
    z = survivors - bias.double()[:, None]  # the conv output without its bias
    counts = [target // num_classes + (c < target % num_classes) for c in range(num_classes)]
    scales, biases = [], []
    for c, k in enumerate(counts):  # C classes, not candidates
        valid = z[c][torch.isfinite(z[c])]
        if k == 0 or len(valid) == 0:  # no candidate from this class
            scales.append(1.0)
            biases.append(_logit(thresh) - (float(valid[0]) if len(valid) else 0.0) - 1.0)
            continue
        k = min(k, len(valid))
        below = float(valid[k]) if k < len(valid) else float(valid[k - 1]) - 1.0
        cut, top = (float(valid[k - 1]) + below) / 2, float(valid[0])
        scale = (_logit(CATE_SCORE_MAX) - _logit(thresh)) / (top - cut) if top - cut > 1e-9 else 1.0
        scales.append(scale)
        biases.append(_logit(thresh) - scale * cut)
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(biases, dtype=torch.float64)


def _rescale_mask_conv(conv: nn.Conv2d, logits: torch.Tensor, coverage: float):
    """Each output channel of ``conv`` gets logits of spread MASK_LOGIT_STD over the image,
    positive on ``coverage`` of it."""
    z = (logits[:1] - conv.bias.view(1, -1, 1, 1)).transpose(0, 1).flatten(1).float()
    scale = MASK_LOGIT_STD / z.std(dim=1).clamp(min=1e-12)
    z = z * scale[:, None]
    k = min(max(int(round((1 - coverage) * z.shape[1])), 1), z.shape[1])
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight))
    conv.bias.copy_(-z.kthvalue(k, dim=1).values)


def calibrate_masks(head: nn.Module, outputs) -> bool:
    """SOLO v1 / Decoupled mask convs rescaled (see the module docstring); False when the head
    has no convs of mask logits (SOLOv2's dynamic kernels).

    ``outputs``: the head's ``HeadOutputs`` on the calibration image; each mask conv named by
    ``head.prediction_layers()`` gets its logits from ``head.mask_layer_logits(outputs)``. A mask
    that is the product of k maps (decoupled X * Y: k = 2) covers MASK_COVERAGE when each map
    covers its k-th root."""
    layers = head.prediction_layers()
    if not layers.masks:
        return False
    coverage = MASK_COVERAGE ** (1 / layers.mask_factors)
    for conv, logits in zip(layers.masks, head.mask_layer_logits(outputs, 0)):
        _rescale_mask_conv(conv, logits, coverage)
    return True


def count_candidates(model: nn.Module, batched: List[dict]) -> Tuple[int, int]:
    """(candidates before ``nms_pre`` in image 0, instances out) of one inference, the former
    read from the post-processor's ``solo/num_candidates`` event-storage scalar."""
    with EventStorage(0) as storage:
        results = model(batched[:1])
        history = storage.histories().get(CANDIDATES_SCALAR)
    if history is None:
        raise RuntimeError(
            f"The post-processor wrote no {CANDIDATES_SCALAR!r} scalar into the active "
            "EventStorage; tools/benchmark.py needs a solo package that records it."
        )
    return int(round(history.latest())), len(results[0]["instances"])


@torch.no_grad()
def calibrate_solo(model: nn.Module, batched: List[dict]) -> dict:
    """Calibrate a random-weight SOLO ``model`` (eval mode) on ``batched[0]`` so that about
    ``nms_pre`` candidates reach NMS and about ``max_per_image`` instances come out.

    Returns:
        what was done: ``candidates_before_nms`` (= min(candidates, nms_pre)),
        ``instances_out``, and the settings.
    Raises:
        RuntimeError: when the post-processor records no candidate count.
    """
    post, head = model.postprocessor, model.head
    images = model.preprocess_image(batched[:1])
    features = model.backbone(images.tensor)
    head_inputs = [features[f] for f in model.head_in_features]
    outputs = head(head_inputs)
    masks_calibrated = calibrate_masks(head, outputs)
    conv = head.prediction_layers().category
    base_weight, base_bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    survivors = point_nms_survivors(outputs.cate_logits)
    target = post.nms_pre
    for _ in range(ATTEMPTS):
        scales, biases = class_calibration(survivors, base_bias, post.score_thresh, target)
        conv.weight.copy_(base_weight * scales.view(-1, 1, 1, 1).to(base_weight))
        conv.bias.copy_(biases.to(base_bias))
        candidates, instances = count_candidates(model, batched)
        reached = min(candidates, post.nms_pre)
        if reached >= post.nms_pre * 0.98 or target >= survivors.isfinite().sum():
            break
        # Some candidates fail the mask-area filter: ask for proportionally more.
        target = int(target * post.nms_pre / max(reached, 1) * 1.05) + 1
    logger.info(f"Calibrated: {candidates} candidates, {reached} reach NMS, {instances} out.")
    return {
        "calibrated": True,
        "candidates": candidates,
        "candidates_before_nms": reached,
        "instances_out": instances,
        "nms_pre": post.nms_pre,
        "category": f"per class, cate_pred rescaled so that its best point-NMS survivors score "
        f"in ({post.score_thresh}, {CATE_SCORE_MAX}], {target} in all, spread over the "
        f"{conv.out_channels} classes",
        "masks": (
            {"mask_coverage": MASK_COVERAGE, "mask_logit_std": MASK_LOGIT_STD}
            if masks_calibrated
            else "unchanged (SOLOv2: dynamic kernels)"
        ),
    }


def zero_mask_rcnn_deltas(model: nn.Module):
    """Zero and freeze Mask R-CNN's RPN and box-regression delta layers: random deltas collapse
    the proposals to a few boxes clipped to the image."""
    for layer in (
        model.proposal_generator.rpn_head.anchor_deltas,
        model.roi_heads.box_predictor.bbox_pred,
    ):
        for param in layer.parameters():
            param.requires_grad_(False)
            param.zero_()


@torch.no_grad()
def calibrate_mask_rcnn(model: nn.Module, batched: List[dict]) -> dict:
    """Zero Mask R-CNN's deltas (see :func:`zero_mask_rcnn_deltas`); what came out."""
    zero_mask_rcnn_deltas(model)
    images = model.preprocess_image(batched[:1])
    proposals, _ = model.proposal_generator(images, model.backbone(images.tensor), None)
    instances = len(model(batched[:1])[0]["instances"])
    logger.info(f"Mask R-CNN: {len(proposals[0])} proposals, {instances} instances out.")
    return {
        "calibrated": True,
        "score_thresh_test": model.roi_heads.box_predictor.test_score_thresh,
        "proposals": len(proposals[0]),
        "instances_out": instances,
        "note": "RPN and box-regression deltas zeroed so that the ROI heads get the full "
        "proposals and TEST.DETECTIONS_PER_IMAGE detections come out",
    }
