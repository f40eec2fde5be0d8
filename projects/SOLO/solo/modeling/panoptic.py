"""Panoptic SOLOv2: SOLOv2 plus a semantic branch, merged the Panoptic FPN way.

The SOLOv2 paper (Sec. "Extensions", panoptic segmentation) adds "a semantic segmentation
branch, analogous to the mask feature branch" and reports PQ 42.1 (R50) on COCO val. Here:

* :class:`SOLOv2SemSegHead` (in Detectron2's ``SEM_SEG_HEADS_REGISTRY``, chosen by
  ``MODEL.SEM_SEG_HEAD.NAME``): the mask feature branch's structure with its own weights (P2-P5
  brought to stride 4 and summed), then a 1x1 conv to ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` logits:
  the stuff classes plus one "things" class (id 0), as Panoptic FPN predicts them. Its loss is
  Panoptic FPN's: cross-entropy on logits upsampled to the input, ``IGNORE_VALUE`` ignored,
  times ``LOSS_WEIGHT``. Detectron2's ``SemSegFPNHead`` can be chosen instead.
* :class:`PanopticSOLOv2`: the ``SOLO`` meta-architecture with that head; instance losses times
  ``MODEL.PANOPTIC_FPN.INSTANCE_LOSS_WEIGHT``; inference outputs exactly what Detectron2's
  ``PanopticFPN`` does: ``{"instances", "sem_seg", "panoptic_seg"}``, the last from Detectron2's
  ``combine_semantic_and_instance_outputs`` with ``MODEL.PANOPTIC_FPN.COMBINE.*``.
* :func:`panoptic_outputs`: stride-4 semantic logits + instances -> ``sem_seg`` and
  ``panoptic_seg`` (upsampling, crop, resize, merge): shared by the eager model and the exported
  runtime, which computes the logits inside its graph and merges outside.

See docs/panoptic.md for where the paper is silent and what was chosen.
"""

from typing import Dict, List, Optional, Sequence, Tuple
import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, build_sem_seg_head
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList, Instances

from .heads.mask_feature_branch import MaskFeatureBranch
from .meta_arch import SOLO

__all__ = ["PanopticSOLOv2", "SOLOv2SemSegHead", "panoptic_outputs", "semantic_loss"]

#: The stride of the semantic logits (the unified mask features' stride).
SEMANTIC_STRIDE = 4


def semantic_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """Panoptic FPN's semantic loss: mean cross-entropy over the labelled pixels.

    Args:
        logits: (N, C, H/4, W/4) stride-4 logits of the padded batch.
        targets: (N, H, W) int64 labels of the padded batch; ``ignore_value`` where unlabelled
            (padding, void, images without stuff annotations).
    Returns:
        scalar float32: as ``F.cross_entropy(..., reduction="mean", ignore_index=ignore_value)``
        on the x4 bilinearly upsampled logits, except 0 (connected to the logits) instead of NaN
        when no pixel of the batch is labelled.
    """
    logits = F.interpolate(
        logits.float(), scale_factor=SEMANTIC_STRIDE, mode="bilinear", align_corners=False
    )
    total = F.cross_entropy(logits, targets, reduction="sum", ignore_index=ignore_value)
    return total / (targets != ignore_value).sum().clamp(min=1)


@SEM_SEG_HEADS_REGISTRY.register()
class SOLOv2SemSegHead(nn.Module):
    """The semantic branch, "analogous to the mask feature branch" (SOLOv2 paper).

    Same interface as Detectron2's ``SemSegFPNHead``: ``forward(features, targets=None)``
    returns ``(None, {"loss_sem_seg": ...})`` in training and ``((N, C, H, W) logits at the
    padded input size, {})`` in inference; :meth:`layers` gives the stride-4 logits.
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: Sequence[str],
        in_channels: int,
        num_classes: int,
        conv_dims: int = 128,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.common_stride = SEMANTIC_STRIDE  # of layers(), as SemSegFPNHead's attribute
        self.branch = MaskFeatureBranch(in_channels, conv_dims, conv_dims, len(self.in_features))
        self.predictor = nn.Conv2d(conv_dims, num_classes, 1)
        weight_init.c2_msra_fill(self.predictor)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        c = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in c.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not produced by the backbone, "
                f"which outputs {sorted(input_shape)}."
            )
        strides = [input_shape[f].stride for f in c.IN_FEATURES]
        expected = [SEMANTIC_STRIDE * 2**i for i in range(len(strides))]
        if strides != expected:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(c.IN_FEATURES)} have strides {strides}; "
                f"SOLOv2SemSegHead fuses levels of strides {expected} (e.g. p2-p5)."
            )
        # The branch is the mask feature branch: GroupNorm, output at stride 4.
        if c.COMMON_STRIDE != SEMANTIC_STRIDE or c.NORM != "GN":
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE={c.COMMON_STRIDE}, NORM={c.NORM!r}: "
                f"SOLOv2SemSegHead predicts at stride {SEMANTIC_STRIDE} with GroupNorm; set "
                "COMMON_STRIDE 4 and NORM 'GN', or MODEL.SEM_SEG_HEAD.NAME 'SemSegFPNHead'."
            )
        channels = {input_shape[f].channels for f in c.IN_FEATURES}
        if len(channels) != 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES have channels {sorted(channels)}.")
        return {
            "in_features": c.IN_FEATURES,
            "in_channels": channels.pop(),
            "num_classes": c.NUM_CLASSES,
            "conv_dims": c.CONVS_DIM,
            "ignore_value": c.IGNORE_VALUE,
            "loss_weight": c.LOSS_WEIGHT,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C, H/4, W/4) semantic logits of the padded batch."""
        return self.predictor(self.branch([features[f] for f in self.in_features]))

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        logits = self.layers(features)
        if self.training:
            loss = semantic_loss(logits, targets, self.ignore_value)
            return None, {"loss_sem_seg": loss * self.loss_weight}
        logits = F.interpolate(
            logits, scale_factor=SEMANTIC_STRIDE, mode="bilinear", align_corners=False
        )
        return logits, {}


def panoptic_outputs(
    semantic_logits: torch.Tensor,
    stride: int,
    instances: Instances,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    overlap_thresh: float,
    stuff_area_thresh: float,
    instances_score_thresh: float,
) -> dict:
    """``sem_seg`` and ``panoptic_seg`` of one image, as Detectron2's ``PanopticFPN`` gives them.

    Args:
        semantic_logits: (C, H / stride, W / stride) logits of the image's padded (H, W)
            canvas (the semantic head's ``layers``).
        stride: the logits' stride (the head's ``common_stride``; 4 for SOLOv2SemSegHead).
        instances: the image's ``Instances`` at ``output_size`` (bool ``pred_masks``, ``scores``,
            ``pred_classes``).
        image_size: (h, w) of the image inside the canvas (the rest is padding).
        output_size: (height, width) of the outputs.
        overlap_thresh, stuff_area_thresh, instances_score_thresh:
            ``MODEL.PANOPTIC_FPN.COMBINE.{OVERLAP_THRESH, STUFF_AREA_LIMIT,
            INSTANCES_CONFIDENCE_THRESH}``.
    Returns:
        ``{"sem_seg": (C, height, width) float32 logits, "panoptic_seg": (int32 (height, width)
        segment ids, list of segment dicts)}``.
    """
    logits = F.interpolate(
        semantic_logits[None].float(),
        scale_factor=stride,
        mode="bilinear",
        align_corners=False,
    )[0]
    sem_seg = sem_seg_postprocess(logits, image_size, *output_size)
    panoptic_seg = combine_semantic_and_instance_outputs(
        instances,
        sem_seg.argmax(dim=0),
        overlap_thresh,
        stuff_area_thresh,
        instances_score_thresh,
    )
    return {"sem_seg": sem_seg, "panoptic_seg": panoptic_seg}


@META_ARCH_REGISTRY.register()
class PanopticSOLOv2(SOLO):
    """SOLO(v2) + semantic head (``MODEL.SEM_SEG_HEAD``) + Panoptic FPN's merge.

    Training inputs also need ``sem_seg``: (H, W) int64 labels, stuff ids 1..C-1, 0 for things,
    ``IGNORE_VALUE`` for unlabelled pixels (``solo.data.panoptic_mapper.PanopticDatasetMapper``).
    Losses: ``loss_cate`` and ``loss_mask`` (times ``INSTANCE_LOSS_WEIGHT``) and ``loss_sem_seg``.
    """

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head: nn.Module,
        instance_loss_weight: float = 1.0,
        combine_overlap_thresh: float = 0.5,
        combine_stuff_area_thresh: float = 4096,
        combine_instances_score_thresh: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sem_seg_head = sem_seg_head
        self.instance_loss_weight = instance_loss_weight
        self.combine_overlap_thresh = combine_overlap_thresh
        self.combine_stuff_area_thresh = combine_stuff_area_thresh
        self.combine_instances_score_thresh = combine_instances_score_thresh
        if self.channels_last:
            self.sem_seg_head.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        combine = cfg.MODEL.PANOPTIC_FPN.COMBINE
        ret.update(
            sem_seg_head=build_sem_seg_head(cfg, ret["backbone"].output_shape()),
            instance_loss_weight=cfg.MODEL.PANOPTIC_FPN.INSTANCE_LOSS_WEIGHT,
            combine_overlap_thresh=combine.OVERLAP_THRESH,
            combine_stuff_area_thresh=combine.STUFF_AREA_LIMIT,
            combine_instances_score_thresh=combine.INSTANCES_CONFIDENCE_THRESH,
        )
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        Returns:
            training: ``loss_cate``, ``loss_mask`` and ``loss_sem_seg``;
            inference: per image ``{"instances", "sem_seg", "panoptic_seg"}`` (see
            :func:`panoptic_outputs`).
        """
        if not self.training:
            return self.forward_inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        outputs = self.head([features[f] for f in self.head_in_features])
        gt_instances = [x["instances"] for x in batched_inputs]
        losses = self.losses(outputs, gt_instances, tuple(images.tensor.shape[-2:]))
        losses = {name: loss * self.instance_loss_weight for name, loss in losses.items()}
        targets = self.semantic_targets(batched_inputs, images)
        losses.update(self.sem_seg_head(features, targets)[1])
        return losses

    def semantic_targets(self, batched_inputs, images: ImageList) -> torch.Tensor:
        """(N, H, W) int64 ``sem_seg`` of the inputs, padded with the ignore value to the
        batch canvas (as the images are)."""
        height, width = images.tensor.shape[-2:]
        ignore = self.sem_seg_head.ignore_value
        targets = []
        for i, x in enumerate(batched_inputs):
            target = x.get("sem_seg")
            if target is None:
                raise ValueError(
                    f"batched_inputs[{i}] has no 'sem_seg': PanopticSOLOv2 trains its semantic "
                    "head on (H, W) labels; map the dataset with solo.data.panoptic_mapper."
                    "PanopticDatasetMapper (the Trainer does for MODEL.META_ARCHITECTURE "
                    "'PanopticSOLOv2')."
                )
            h, w = target.shape[-2:]
            target = target.to(self.device, torch.long)
            targets.append(F.pad(target, (0, width - w, 0, height - h), value=ignore))
        return torch.stack(targets)

    def predict_from_features(self, features, images: ImageList, output_sizes) -> List[dict]:
        results = super().predict_from_features(features, images, output_sizes)
        semantic_logits = self.sem_seg_head.layers(features)
        for result, logits, image_size, output_size in zip(
            results, semantic_logits, images.image_sizes, output_sizes
        ):
            result.update(
                panoptic_outputs(
                    logits,
                    self.sem_seg_head.common_stride,
                    result["instances"],
                    image_size,
                    output_size,
                    self.combine_overlap_thresh,
                    self.combine_stuff_area_thresh,
                    self.combine_instances_score_thresh,
                )
            )
        return results
