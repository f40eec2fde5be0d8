"""The exportable module: padding, normalisation, backbone, head and the post-processor's
fixed-size path, for one image inside an exported graph (see :mod:`solo.export`)."""

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.meta_arch import MIN_BLOCKS, pad_to_divisibility, padded_size
from .formats import ExportError


def square_canvas(backbone: nn.Module) -> int:
    """The side of the square every image is padded to before ``backbone``, 0 for none.

    A backbone with a ``square_size`` padding constraint (ViTDet's ``SimpleFeaturePyramid``
    ``square_pad``) gets images padded to that square by the eager model (Detectron2's
    ``ImageList.from_tensors``), rounded up to the size divisibility (the constraints' own, if
    they give one) and to at least :data:`~solo.modeling.meta_arch.MIN_BLOCKS` blocks. Larger
    images would be cropped to it: exported models refuse them.
    """
    constraints = getattr(backbone, "padding_constraints", None) or {}
    square = int(constraints.get("square_size", 0) or 0)
    if square <= 0:
        return 0
    d = max(int(backbone.size_divisibility), 1)
    divisibility = constraints.get("size_divisibility", d)
    return padded_size(square, square, divisibility, MIN_BLOCKS * d)[0]


class SOLOExportModule(nn.Module):
    """One image through the eager model's own steps, with shapes fixed by the config only.

    ``forward(image)``: image (1, 3, H, W) float32 pixels in INPUT.FORMAT, any H and W (>= 1):
    normalised, then padded bottom/right with 0 to the backbone's size divisibility and to at
    least ``min_blocks`` times it (:func:`solo.modeling.meta_arch.pad_to_divisibility`, as the
    eager model pads; a backbone with square padding gets every image padded to
    :func:`square_canvas`, where all its shapes are constants), backbone, head, and
    :meth:`solo.modeling.postprocess.SOLOPostProcessor.fixed_size` with the head's
    ``fixed_size_mask_probs``. Returns that method's outputs; the masks are (D, Hp/4, Wp/4) at
    stride 4 of the padded size Hp x Wp (:func:`solo.modeling.meta_arch.padded_size`).

    Args:
        model: a built SOLO model (its backbone, head, pixel mean/std and post-processor).
        max_candidates: K0, the (cell, class) pairs given a mask.
        min_blocks: minimum padded side in size-divisibility blocks (the eager model's 2;
            ``torch.export`` needs more, see :data:`solo.export.formats.MIN_BLOCKS`).

    Raises:
        ExportError: greedy mask NMS, or K0 < 1.
    """

    def __init__(self, model: nn.Module, max_candidates: int, min_blocks: int = MIN_BLOCKS):
        super().__init__()
        try:
            model.postprocessor.check_fixed_size(max_candidates)
        except ValueError as e:
            raise ExportError(f"Cannot export this model: {e}") from e
        self.backbone = model.backbone
        self.head = model.head
        self.postprocessor = model.postprocessor
        self.in_features = list(model.head_in_features)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), False)
        self.max_candidates = int(max_candidates)
        self.size_divisibility = max(int(model.backbone.size_divisibility), 1)
        self.min_blocks = int(min_blocks)
        self.square_side = square_canvas(model.backbone)
        # PanopticSOLOv2: its semantic logits leave the graph as a sixth output; the merge
        # with the instances runs outside (solo.modeling.panoptic.panoptic_outputs).
        self.sem_seg_head = getattr(model, "sem_seg_head", None)

    def forward(self, image: torch.Tensor):
        x = (image - self.pixel_mean) / self.pixel_std
        d = self.size_divisibility
        if self.square_side:  # one canvas for every image: constant shapes in the backbone
            h, w = x.shape[-2:]
            x = F.pad(x, (0, self.square_side - w, 0, self.square_side - h))
        else:
            x = pad_to_divisibility(x, d, self.min_blocks * d)
        features = self.backbone(x)
        outputs = self.head([features[f] for f in self.in_features])
        size = (x.shape[-2] // 4, x.shape[-1] // 4)
        mask_probs = self.head.fixed_size_mask_probs(outputs, size)
        results = self.postprocessor.fixed_size(
            outputs.cate_logits, mask_probs, self.max_candidates
        )
        if self.sem_seg_head is not None:
            results = (*results, self.sem_seg_head.layers(features))
        return results
