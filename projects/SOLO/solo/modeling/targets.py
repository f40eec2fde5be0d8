"""Target assignment: which grid cells are positive, with which category and which mask.

Semantics follow the official SOLO code (``solo_target_single`` / ``solov2_target_single``),
vectorised over all instances of the batch (the official code loops over instances and cells):

* an instance belongs to every level whose inclusive scale range contains sqrt(w * h) of its box,
  where the box is the *inclusive* one (x2 - x1 = w - 1, mmdetection v1's convention);
* its centre is the centre of mass of its mask; the centre region is centre +- sigma * box half
  extents, converted to grid cells and clipped to the 3x3 cells around the centre cell;
* grid cells are computed as ``(c / size) // (1 / S)`` in float32, exactly as the official code
  (at exact cell boundaries this is one less than floor(c * S / size));
* overlapping centre regions: the later instance (annotation order) owns the category of a shared
  cell; SOLO / Decoupled SOLO also give it the cell's mask, SOLOv2 keeps every (instance, cell)
  pair for the mask loss;
* mask targets are the instance masks downscaled to the level's mask stride (bilinear, >= 0.5,
  as ``mmcv.imrescale`` on 0/1 masks).
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple
import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.structures import BitMasks, Instances, PolygonMasks


@dataclass
class LevelTargets:
    """Targets of one pyramid level for a batch of B images with S x S cells.

    ``cate_labels`` is (B, S*S), ``num_classes`` meaning background. The mask loss is computed on
    K entries: the cell ``pos_cells[k]`` of image ``pos_images[k]`` must predict
    ``mask_targets[pos_instances[k]]`` (an instance index into this level's mask targets).
    """

    cate_labels: torch.Tensor
    pos_images: torch.Tensor
    pos_cells: torch.Tensor
    pos_instances: torch.Tensor
    mask_targets: torch.Tensor
    positive_cells: torch.Tensor  # (B, S*S) bool


@dataclass
class BatchGroundTruth:
    """All instances of a batch, concatenated; masks padded to the batch's padded image size."""

    masks: torch.Tensor  # (N, Hp, Wp) bool
    boxes: torch.Tensor  # (N, 4) float, XYXY absolute (detectron2 convention, x2 = x + w)
    classes: torch.Tensor  # (N,) int64, 0-based
    image_ids: torch.Tensor  # (N,) int64, index of the image in the batch
    num_images: int


def gather_ground_truth(
    gt_instances: Sequence[Instances], padded_size: Tuple[int, int], device
) -> BatchGroundTruth:
    """Concatenate the instances of a batch and pad their masks to ``padded_size`` (top-left)."""
    hp, wp = padded_size
    counts = [len(x) for x in gt_instances]
    total = sum(counts)
    masks = torch.zeros((total, hp, wp), dtype=torch.bool, device=device)
    start = 0
    for inst, n in zip(gt_instances, counts):
        if n == 0:
            continue
        m = _bitmask_tensor(inst).to(device=device, dtype=torch.bool)
        h, w = min(m.shape[1], hp), min(m.shape[2], wp)
        masks[start : start + n, :h, :w] = m[:, :h, :w]
        start += n
    boxes = [x.gt_boxes.tensor for x in gt_instances if len(x)]
    classes = [x.gt_classes for x in gt_instances if len(x)]
    return BatchGroundTruth(
        masks=masks,
        boxes=torch.cat(boxes).to(device).float() if boxes else torch.zeros((0, 4), device=device),
        classes=(
            torch.cat(classes).to(device).long()
            if classes
            else torch.zeros((0,), dtype=torch.long, device=device)
        ),
        image_ids=torch.repeat_interleave(
            torch.arange(len(counts), device=device),
            torch.tensor(counts, dtype=torch.long, device=device),
        ),
        num_images=len(gt_instances),
    )


def _bitmask_tensor(inst: Instances) -> torch.Tensor:
    masks = inst.gt_masks
    if isinstance(masks, PolygonMasks):
        h, w = inst.image_size
        masks = BitMasks.from_polygon_masks(masks, h, w)
    if isinstance(masks, BitMasks):
        return masks.tensor
    if isinstance(masks, torch.Tensor) and masks.dim() == 3:
        return masks
    raise TypeError(
        f"gt_masks must be BitMasks, PolygonMasks or an (N, H, W) tensor, got {type(masks)}."
    )


def centers_of_mass(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) centre of mass of each (N, H, W) mask, in float32 pixels; (0, 0) for empty masks."""
    n, h, w = masks.shape
    col_counts = masks.sum(dim=1, dtype=torch.float64)  # (N, W)
    row_counts = masks.sum(dim=2, dtype=torch.float64)  # (N, H)
    area = col_counts.sum(dim=1).clamp(min=1e-6)
    xs = torch.arange(w, dtype=torch.float64, device=masks.device)
    ys = torch.arange(h, dtype=torch.float64, device=masks.device)
    cx = (col_counts * xs).sum(dim=1) / area
    cy = (row_counts * ys).sum(dim=1) / area
    return cx.float(), cy.float()


def grid_cell(coords: torch.Tensor, size: int, num_grid: int) -> torch.Tensor:
    """Cell index of float32 ``coords`` along an axis of ``size`` pixels cut into ``num_grid``.

    Mirrors the official ``int((c / size) // (1. / S))``, float32 floor division included.
    """
    normalised = coords.float() / size
    return torch.div(normalised, 1.0 / num_grid, rounding_mode="floor").long()


def downsample_masks(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """Downscale (N, H, W) 0/1 masks by an integer ``stride``: bilinear sampling, >= 0.5.

    For an even stride dividing H and W, bilinear sampling at the half-pixel centres averages a
    2x2 block, so the result is "at least two of those four pixels set", computed without any
    float copy of the full-resolution masks.
    """
    if stride == 1:
        return masks.bool()
    n, h, w = masks.shape
    if stride % 2 == 0 and h % stride == 0 and w % stride == 0:
        a = stride // 2 - 1
        m = masks.to(torch.uint8)
        votes = (
            m[:, a::stride, a::stride]
            + m[:, a::stride, a + 1 :: stride]
            + m[:, a + 1 :: stride, a::stride]
            + m[:, a + 1 :: stride, a + 1 :: stride]
        )
        return votes >= 2
    out_h, out_w = int(h / stride + 0.5), int(w / stride + 0.5)
    if n == 0:
        return masks.new_zeros((0, out_h, out_w), dtype=torch.bool)
    small = F.interpolate(masks[:, None].float(), size=(out_h, out_w), mode="bilinear")
    return small[:, 0] >= 0.5


class SOLOTargetAssigner:
    """Builds :class:`LevelTargets` for every level from a batch's ground truth."""

    @configurable
    def __init__(
        self,
        num_classes: int,
        num_grids: Sequence[int],
        scale_ranges: Sequence[Sequence[float]],
        mask_strides: Sequence[int],
        sigma: float,
        keep_overlapping_masks: bool,
    ):
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.mask_strides = list(mask_strides)
        self.sigma = sigma
        self.keep_overlapping_masks = keep_overlapping_masks

    @classmethod
    def from_config(cls, cfg, mask_strides: Sequence[int], keep_overlapping_masks: bool):
        """``mask_strides`` and ``keep_overlapping_masks`` come from the head."""
        c = cfg.MODEL.SOLO
        return {
            "num_classes": c.NUM_CLASSES,
            "num_grids": c.NUM_GRIDS,
            "scale_ranges": c.SCALE_RANGES,
            "mask_strides": mask_strides,
            "sigma": c.SIGMA,
            "keep_overlapping_masks": keep_overlapping_masks,
        }

    def __call__(self, gt: BatchGroundTruth) -> List[LevelTargets]:
        hp, wp = gt.masks.shape[-2:]
        # Inclusive box extents, as in mmdetection v1 (x2 = x1 + w - 1).
        box_w = (gt.boxes[:, 2] - gt.boxes[:, 0] - 1).clamp(min=0)
        box_h = (gt.boxes[:, 3] - gt.boxes[:, 1] - 1).clamp(min=0)
        scales = torch.sqrt(box_w * box_h)
        nonempty = gt.masks.flatten(1).any(dim=1)
        center_x, center_y = centers_of_mass(gt.masks)
        half_w = 0.5 * box_w * self.sigma
        half_h = 0.5 * box_h * self.sigma

        targets = []
        for num_grid, (low, high), stride in zip(
            self.num_grids, self.scale_ranges, self.mask_strides
        ):
            hit = ((scales >= low) & (scales <= high) & nonempty).nonzero().flatten()
            cells = self._centre_regions(
                center_x[hit], center_y[hit], half_w[hit], half_h[hit], num_grid, hp, wp
            )
            targets.append(self._level_targets(gt, hit, cells, num_grid, stride))
        return targets

    def _centre_regions(self, cx, cy, half_w, half_h, num_grid, hp, wp) -> torch.Tensor:
        """(n, S*S) bool: the cells of each instance's centre region."""
        col = grid_cell(cx, wp, num_grid)
        row = grid_cell(cy, hp, num_grid)
        top = torch.maximum(grid_cell(cy - half_h, hp, num_grid).clamp(min=0), row - 1)
        bottom = torch.minimum(
            grid_cell(cy + half_h, hp, num_grid).clamp(max=num_grid - 1), row + 1
        )
        left = torch.maximum(grid_cell(cx - half_w, wp, num_grid).clamp(min=0), col - 1)
        right = torch.minimum(grid_cell(cx + half_w, wp, num_grid).clamp(max=num_grid - 1), col + 1)
        idx = torch.arange(num_grid, device=cx.device)
        rows_in = (idx >= top[:, None]) & (idx <= bottom[:, None])  # (n, S)
        cols_in = (idx >= left[:, None]) & (idx <= right[:, None])  # (n, S)
        return (rows_in[:, :, None] & cols_in[:, None, :]).flatten(1)

    def _level_targets(self, gt, hit, cells, num_grid, stride) -> LevelTargets:
        device = gt.masks.device
        num_cells = num_grid * num_grid
        images = gt.image_ids[hit]
        # The owner of a cell is the last instance (in annotation order) whose region covers it.
        order = torch.arange(len(hit), device=device)
        claims = torch.where(cells, order[:, None], order.new_tensor(-1))
        owner = torch.full((gt.num_images, num_cells), -1, dtype=torch.long, device=device)
        owner.scatter_reduce_(0, images[:, None].expand_as(claims), claims, reduce="amax")
        # Owner -1 (no instance) picks the appended background label.
        labels = torch.cat([gt.classes[hit], owner.new_tensor([self.num_classes])])
        cate_labels = labels[owner]
        if self.keep_overlapping_masks:
            pos_instances, pos_cells = cells.nonzero(as_tuple=True)
            pos_images = images[pos_instances]
        else:
            pos_images, pos_cells = (owner >= 0).nonzero(as_tuple=True)
            pos_instances = owner[pos_images, pos_cells]
        return LevelTargets(
            cate_labels=cate_labels,
            pos_images=pos_images,
            pos_cells=pos_cells,
            pos_instances=pos_instances,
            mask_targets=downsample_masks(gt.masks[hit], stride),
            positive_cells=owner >= 0,
        )
