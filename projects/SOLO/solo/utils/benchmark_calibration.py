"""Make random-weight models do a trained model's post-processing work, for tools/benchmark.py.

Random weights leave post-processing idle: a SOLO model has a handful of confident cells (all of
a few classes, so that Matrix NMS leaves ~1 instance per class) and SOLO v1 / Decoupled masks
are blurred fields; Mask R-CNN's random box deltas collapse its proposals to ~10 degenerate
boxes. The functions below rescale a few output layers so that the benchmark times the work of
a real image, and say what they did.

* SOLO: per class, ``cate_pred``'s weight and bias are rescaled so that, after point NMS, about
  ``nms_pre`` (cell, class) candidates in all, spread evenly over the classes, score between the
  score threshold and :data:`CATE_SCORE_MAX`; SOLO v1 / Decoupled mask convs are rescaled so that
  every mask covers :data:`MASK_COVERAGE` of the image with sharp logits. SOLOv2's random
  dynamic kernels give masks that are noise fields over the whole image; with
  ``mask_extent="objects"`` (:class:`ObjectMasks`) a forward hook on the head rewrites its
  kernels and mask features in place, after the head has computed them, so that every cell's
  mask is an object-sized ellipse near the cell, as a trained model's are (the paste and the
  cropped masks then do a real image's work; the dynamic convolutions, Matrix NMS and the
  head's own computation cost the same). The candidate count is read from the
  ``solo/num_candidates`` scalar the post-processor writes into an active ``EventStorage``.
* Mask R-CNN: RPN and box-regression deltas zeroed (proposals = anchors), with
  ``ROI_HEADS.SCORE_THRESH_TEST 0`` set by the caller: the ROI heads see the full
  ``POST_NMS_TOPK_TEST`` proposals and ``TEST.DETECTIONS_PER_IMAGE`` detections come out.
"""

import logging
import math
from typing import Callable, List, Sequence, Tuple
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
MASK_EXTENTS = ("objects", "image")  # SOLOv2 calibrated masks: object-sized, or the random fields
OBJECT_SIDES = (0.05, 0.4)  # object ellipses' axes, fraction of the image's sides (log-uniform)
OBJECT_LOGIT = 5.0  # their mask logits: +5 inside (probability 0.993), -5 outside


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


class ObjectMasks:
    """Forward hook of a SOLOv2 head making every cell's mask an object-sized ellipse.

    Channel e of the mask features becomes an ellipse of logit +OBJECT_LOGIT (else
    -OBJECT_LOGIT) with a seeded random centre inside the image and axes in
    :data:`OBJECT_SIDES` of its sides; every cell's kernel becomes the one-hot vector (weight in
    [1, 2], which varies the maskness) of the ellipse whose centre is nearest to the cell's
    centre. Masks are then a real image's size and near their cell; cells sharing an ellipse have
    the same mask, as neighbouring cells of one object do. Both rewrites are in place (no extra
    memory) and cost one fill of the mask features.

    Args:
        image_size: (h, w) of the image inside the padded canvas, pixels.
        seed: seeds the ellipses and the kernel weights.
    """

    def __init__(self, image_size: Sequence[int], seed: int = 0):
        self.image_size = tuple(int(v) for v in image_size)
        self.seed = seed

    def __call__(self, module, inputs, outputs):
        kernels, features = outputs.mask_outputs
        gen = torch.Generator().manual_seed(self.seed)
        channels, (h4, w4) = features.shape[1], features.shape[-2:]
        h, w = self.image_size
        centres = torch.rand((channels, 2), generator=gen, dtype=torch.float64) * torch.tensor(
            [h, w], dtype=torch.float64
        )
        low, high = (math.log(v) for v in OBJECT_SIDES)
        axes = torch.exp(low + (high - low) * torch.rand((channels, 2), generator=gen))
        axes = axes.double() * torch.tensor([h, w], dtype=torch.float64) / 2
        features.fill_(-OBJECT_LOGIT)
        rows = (torch.arange(h4, dtype=torch.float64) + 0.5) * 4
        cols = (torch.arange(w4, dtype=torch.float64) + 0.5) * 4
        for e in range(channels):  # E small writes, each over its ellipse's box only
            (cy, cx), (ay, ax) = centres[e].tolist(), axes[e].tolist()
            r0, r1 = max(int((cy - ay) / 4), 0), min(int((cy + ay) / 4) + 2, h4)
            c0, c1 = max(int((cx - ax) / 4), 0), min(int((cx + ax) / 4) + 2, w4)
            dy = ((rows[r0:r1] - cy) / ay) ** 2
            dx = ((cols[c0:c1] - cx) / ax) ** 2
            inside = (dy[:, None] + dx[None, :]) <= 1
            patch = torch.where(inside, OBJECT_LOGIT, -OBJECT_LOGIT).to(features)
            features[:, e, r0:r1, c0:c1] = patch
        for k in kernels:
            s = k.shape[-1]
            grid = (torch.arange(s, dtype=torch.float64) + 0.5) / s
            cells = torch.stack(torch.meshgrid(grid * h, grid * w, indexing="ij"), dim=-1)
            nearest = torch.cdist(cells.view(-1, 2), centres).argmin(dim=1).view(1, 1, s, s)
            weights = 1 + torch.rand((1, 1, s, s), generator=gen)
            k.zero_().scatter_(
                1,
                nearest.expand(len(k), 1, s, s).to(k.device),
                weights.expand(len(k), 1, s, s).to(k),
            )
        return None


def add_object_masks(model: nn.Module, image_size: Sequence[int], seed: int = 0):
    """Register :class:`ObjectMasks` on ``model.head`` when its masks come from dynamic kernels
    (SOLOv2); returns the hook's handle, or None for heads with mask convs (calibrated by
    :func:`calibrate_masks`)."""
    if model.head.prediction_layers().masks:
        return None
    return model.head.register_forward_hook(ObjectMasks(image_size, seed))


def mask_extent_report(model: Callable[[List[dict]], List[dict]], batched: List[dict]) -> dict:
    """Mean, min and max fraction of the image covered by the output masks of one inference of
    ``model`` (a SOLO model or an ``ExportedModel``) on ``batched[0]``."""
    with torch.no_grad():
        instances = model(batched[:1])[0]["instances"]
    if not len(instances):
        return {"instances": 0}
    masks = instances.pred_masks
    masks = masks.tensor if hasattr(masks, "tensor") else masks
    covered = masks.flatten(1).float().mean(dim=1)
    return {
        "instances": len(instances),
        "mean_area_fraction": round(float(covered.mean()), 4),
        "min_area_fraction": round(float(covered.min()), 4),
        "max_area_fraction": round(float(covered.max()), 4),
    }


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
def calibrate_solo(model: nn.Module, batched: List[dict], mask_extent: str = "image") -> dict:
    """Calibrate a random-weight SOLO ``model`` (eval mode) on ``batched[0]`` so that about
    ``nms_pre`` candidates reach NMS and about ``max_per_image`` instances come out.

    ``mask_extent`` (:data:`MASK_EXTENTS`): SOLOv2's masks as object-sized ellipses
    (:class:`ObjectMasks`, a hook left on the head) or as its random kernels make them
    ("image": fields over the whole image). SOLO v1 / Decoupled masks cover
    :data:`MASK_COVERAGE` either way.

    Returns:
        what was done: ``candidates_before_nms`` (= min(candidates, nms_pre)),
        ``instances_out``, the output masks' area fractions and the settings.
    Raises:
        RuntimeError: when the post-processor records no candidate count.
        ValueError: an unknown ``mask_extent``; a score threshold outside
            (0, :data:`CATE_SCORE_MAX`).
    """
    if mask_extent not in MASK_EXTENTS:
        raise ValueError(f"mask_extent={mask_extent!r} is not one of {MASK_EXTENTS}.")
    post, head = model.postprocessor, model.head
    if not 0 < post.score_thresh < CATE_SCORE_MAX:
        # The calibrated scores span (score threshold, CATE_SCORE_MAX]: an empty or reversed
        # range would leave no candidate, or every (cell, class) pair, above the threshold.
        raise ValueError(
            f"MODEL.SOLO.SCORE_THRESH={post.score_thresh} cannot be calibrated: random weights "
            f"are calibrated to scores between it and {CATE_SCORE_MAX}, so it must lie in "
            f"(0, {CATE_SCORE_MAX}). Lower it, or time trained weights (MODEL.WEIGHTS)."
        )
    images = model.preprocess_image(batched[:1])
    hook = None
    if mask_extent == "objects":
        hook = add_object_masks(model, images.image_sizes[0])
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
            else (
                {"objects": "one ellipse per mask-feature channel", "sides": OBJECT_SIDES}
                if hook is not None
                else "unchanged (SOLOv2: random dynamic kernels, fields over the whole image)"
            )
        ),
        "mask_extent": mask_extent,
        "output_masks": mask_extent_report(model, batched),
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
