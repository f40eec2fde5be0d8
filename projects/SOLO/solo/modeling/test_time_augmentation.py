"""Test-time augmentation for SOLO (``TEST.AUG.*``), which Detectron2 implements only for R-CNN.

Each image is run at every size of ``TEST.AUG.MIN_SIZES`` (short side, long side at most
``TEST.AUG.MAX_SIZE``) and, with ``TEST.AUG.FLIP``, mirrored too: Detectron2's
``DatasetMapperTTA`` makes the augmented copies from the image the test mapper produced (the
*reference* frame, ``INPUT.MIN_SIZE_TEST``). The augmentations then become one set of candidates
for the model's own post-processor:

* the category grids of all augmentations are its levels (``A x L`` levels, point NMS per grid);
* a candidate's stride-4 soft mask is brought back to the reference frame (un-flipped, rescaled,
  zero outside the image) before anything looks at it, so the area filter, the maskness rescoring,
  ``NMS_PRE``, ONE Matrix NMS over all augmentations' candidates, ``UPDATE_THRESH``,
  ``TEST.DETECTIONS_PER_IMAGE`` and the paste are the single-scale ones, unchanged;
* a level's minimum mask area is converted to reference pixels (an augmentation twice as large
  sees each object four times as large).

The soft masks are resampled bilinearly at the reference grid's pixel centres, separably along
each axis: an augmentation of the reference size gives its masks back exactly, and so does a
mirrored one when the image width is a multiple of 4 (the mirror is then a permutation of the
stride-4 pixels). ``NMS_PRE`` counts candidates of all augmentations together; raise
``MODEL.SOLO.NMS_PRE`` for many augmentations of crowded images.
"""

import copy
import numpy as np
from typing import Callable, Dict, List, Sequence, Tuple
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.data.transforms import HFlipTransform, NoOpTransform, ResizeTransform
from detectron2.modeling import DatasetMapperTTA

from ..data.image_io import read_image

__all__ = ["SOLOWithTTA"]

#: Transforms whose effect on a mask :class:`SOLOWithTTA` can undo (what DatasetMapperTTA makes).
INVERTIBLE_TRANSFORMS = (ResizeTransform, HFlipTransform, NoOpTransform)


class SOLOWithTTA(nn.Module):
    """A SOLO model that predicts with test-time augmentation; call it as the model itself.

    Args:
        cfg: the config (``TEST.AUG.MIN_SIZES``, ``MAX_SIZE``, ``FLIP``).
        model: a SOLO meta-architecture (a ``DistributedDataParallel`` wrapper is unwrapped).
        tta_mapper: ``dict -> list[dict]`` making the augmented inputs, each with ``image`` and
            ``transforms`` (resizes and horizontal flips only); default ``DatasetMapperTTA(cfg)``.

    ``forward(batched_inputs)`` takes and returns what the model's inference does:
    ``[{"instances": Instances((height, width))}]`` with bool ``pred_masks``, ``scores``, int64
    ``pred_classes`` and ``pred_boxes``.

    Raises (from ``forward``):
        ValueError: an augmentation with a transform other than resize or horizontal flip, or
            no augmentation at all (empty ``TEST.AUG.MIN_SIZES``).
    """

    def __init__(self, cfg, model, tta_mapper=None):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.tta_mapper = DatasetMapperTTA(cfg) if tta_mapper is None else tta_mapper

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [{"instances": self._predict(self._with_image(x))} for x in batched_inputs]

    def _with_image(self, inputs: Dict) -> Dict:
        """As ``GeneralizedRCNNWithTTA``: read the image if only ``file_name`` is given; the output
        size defaults to the image's."""
        inputs = copy.copy(inputs)
        if "image" not in inputs:
            image = read_image(inputs["file_name"], self.model.input_format)
            inputs["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        inputs.setdefault("height", inputs["image"].shape[1])
        inputs.setdefault("width", inputs["image"].shape[2])
        return inputs

    def _predict(self, inputs: Dict):
        model = self.model
        reference = tuple(inputs["image"].shape[-2:])
        padded = tuple(model.preprocess_image([inputs]).tensor.shape[-2:])
        cate_logits, mask_probs, min_areas = [], [], []
        augmentations = self.tta_mapper(inputs)
        if not augmentations:
            raise ValueError(
                "Test-time augmentation made no augmented image: TEST.AUG.MIN_SIZES is empty; "
                "give at least one short-side size, e.g. (INPUT.MIN_SIZE_TEST,)."
            )
        for augmented in augmentations:
            flipped = _is_flipped(augmented["transforms"])
            images = model.preprocess_image([augmented])
            features = model.backbone(images.tensor)
            outputs = model.head([features[f] for f in model.head_in_features])
            to_reference = _Resampler(
                images.image_sizes[0], tuple(images.tensor.shape[-2:]), flipped, reference, padded
            )
            mask_probs.append(
                _in_reference_frame(model.head.inference_mask_probs, outputs, to_reference)
            )
            cate_logits += list(outputs.cate_logits)
            min_areas += [a * to_reference.area_ratio for a in model.postprocessor.min_mask_areas]
        postprocessor = _with_min_mask_areas(model.postprocessor, min_areas)
        output_size = (inputs["height"], inputs["width"])
        return postprocessor(
            cate_logits,
            _dispatch(mask_probs, len(model.postprocessor.min_mask_areas)),
            padded,
            [reference],
            [output_size],
        )[0]


def _is_flipped(transforms) -> bool:
    flips = 0
    for t in getattr(transforms, "transforms", [transforms]):
        if not isinstance(t, INVERTIBLE_TRANSFORMS):
            raise ValueError(
                f"Test-time augmentation: {type(t).__name__} in an augmented input's transforms; "
                "SOLOWithTTA brings masks back through resizes and horizontal flips only "
                "(Detectron2's DatasetMapperTTA, TEST.AUG.MIN_SIZES / FLIP)."
            )
        flips += isinstance(t, HFlipTransform)
    return flips % 2 == 1


def _with_min_mask_areas(postprocessor, min_mask_areas: Sequence[float]):
    """The model's post-processor with one minimum mask area per augmented level (all its other
    settings as they are)."""
    replaced = copy.copy(postprocessor)
    replaced.min_mask_areas = list(min_mask_areas)
    return replaced


def _in_reference_frame(head_mask_probs: Callable, outputs, to_reference: "_Resampler"):
    """``(levels, cells) -> (K, *reference stride-4 size)`` soft masks of one augmentation."""

    def mask_probs(levels: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return to_reference(head_mask_probs(outputs, 0, levels, cells, to_reference.source_size))

    return mask_probs


def _dispatch(per_augmentation: Sequence[Callable], num_levels: int):
    """The post-processor's ``mask_probs(image, levels, cells, size)`` over the augmented levels
    (augmentation ``a`` holds levels ``a * num_levels ...``): each candidate's soft mask comes from
    its augmentation, in the reference frame."""

    def mask_probs(image: int, levels: torch.Tensor, cells: torch.Tensor, size, out=None):
        augmentation = levels // num_levels
        given = out is not None
        # Every row is written below: each candidate comes from exactly one augmentation.
        out = out if given else torch.empty((len(levels), *size), device=levels.device)
        for a in augmentation.unique().tolist():  # one call per augmentation
            index = (augmentation == a).nonzero()[:, 0]
            probs = per_augmentation[a](levels[index] - a * num_levels, cells[index])
            if not given:
                out = out.to(probs.dtype)
            out[index] = probs
        return out

    return mask_probs


class _Resampler:
    """Stride-4 soft masks of an augmented canvas -> the reference canvas at stride 4.

    A reference stride-4 pixel ``j`` has its centre at ``x = 4 (j + 0.5)`` reference pixels; it
    sees the augmented image at ``x * w_aug / w_ref`` (mirrored: ``w_aug -`` that), i.e. at
    stride-4 index ``x_aug / 4 - 0.5``, interpolated linearly between the two nearest pixels
    (clamped at the borders, as ``F.interpolate``). Pixels outside the reference image are 0.
    """

    def __init__(self, image_size, padded_size, flipped, reference_size, reference_padded):
        self.source_size = (padded_size[0] // 4, padded_size[1] // 4)
        self.area_ratio = (reference_size[0] * reference_size[1]) / (image_size[0] * image_size[1])
        target = (reference_padded[0] // 4, reference_padded[1] // 4)
        self._rows = _axis(target[0], reference_size[0], image_size[0], self.source_size[0], False)
        self._cols = _axis(
            target[1], reference_size[1], image_size[1], self.source_size[1], flipped
        )

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        (r0, r1, rw, r_in), (c0, c1, cw, c_in) = [
            [t.to(probs.device) for t in axis] for axis in (self._rows, self._cols)
        ]
        rw, cw = rw.to(probs.dtype), cw.to(probs.dtype)
        cols = probs[:, :, c0] * (1 - cw) + probs[:, :, c1] * cw
        out = cols[:, r0] * (1 - rw)[:, None] + cols[:, r1] * rw[:, None]
        return out * (r_in[:, None] & c_in[None, :])


def _axis(
    target_len: int, reference_len: int, source_image_len: int, source_len: int, flipped: bool
) -> Tuple[torch.Tensor, ...]:
    """Per target stride-4 index: the two source indices, the second one's weight, and whether
    the target pixel's centre lies inside the reference image."""
    centres = 4.0 * (np.arange(target_len, dtype=np.float64) + 0.5)
    source = centres * (source_image_len / reference_len)
    if flipped:
        source = source_image_len - source
    index = source / 4.0 - 0.5
    index = np.where(np.abs(index - np.round(index)) < 1e-9, np.round(index), index)
    index = np.clip(index, 0, source_len - 1)
    low = np.floor(index)
    high = np.minimum(low + 1, source_len - 1)
    return (
        torch.from_numpy(low.astype(np.int64)),
        torch.from_numpy(high.astype(np.int64)),
        torch.from_numpy((index - low).astype(np.float32)),
        torch.from_numpy(centres < reference_len),
    )
