"""SOLO's compact mask output: each mask kept as the crop of its box (Detectron2's ``structures``
room; :class:`CroppedMasks` plays the part ``ROIMasks`` plays for Mask R-CNN).

A 4000x3000 photo with 100 instances holds 1.2 GB of (N, H, W) bool masks, though the objects
cover a small part of it. ``CroppedMasks`` keeps each mask as the bool crop of its tight box and
its position; ``tensor`` materialises the (N, H, W) masks on request, ``to_rle`` gives COCO RLE
without them (the evaluator's path), and iterating yields one full mask at a time (code written
for ``pred_masks`` tensors, such as Detectron2's ``instances_to_coco_json``, keeps working).
"""

import numpy as np
from typing import Iterator, List, Sequence, Tuple, Union
import pycocotools.mask as mask_util
import torch

from detectron2.structures import BitMasks, Boxes

__all__ = ["CroppedMasks"]


class CroppedMasks:
    """N bool masks of one (H, W) image, each stored as a crop placed at an integer position.

    Attributes:
        crops: list of N bool tensors (h_i, w_i); pixels outside a crop are False. (0, 0) for an
            empty mask.
        origins: (N, 2) int64 (x, y) of each crop's top-left pixel in the image.
        image_size: (H, W) of the image, pixels.
    """

    def __init__(self, crops: Sequence[torch.Tensor], origins: torch.Tensor, image_size):
        origins = torch.as_tensor(origins, dtype=torch.long).reshape(-1, 2)
        if len(crops) != len(origins):
            raise ValueError(f"{len(crops)} crops but {len(origins)} origins.")
        height, width = (int(s) for s in image_size)
        for i, (crop, (x, y)) in enumerate(zip(crops, origins.tolist())):
            if crop.dtype != torch.bool or crop.dim() != 2:
                raise ValueError(f"crops[{i}] must be a 2-d bool tensor, got {crop.dtype} "
                                 f"{tuple(crop.shape)}.")  # fmt: skip
            h, w = crop.shape
            if h * w and (x < 0 or y < 0 or x + w > width or y + h > height):
                raise ValueError(
                    f"crops[{i}] ({h}x{w} at x={x}, y={y}) lies outside the {height}x{width} "
                    "image."
                )
        self.crops: List[torch.Tensor] = list(crops)
        self.origins = origins
        self.image_size: Tuple[int, int] = (height, width)

    @classmethod
    def empty(cls, image_size, device=None) -> "CroppedMasks":
        """No masks, for an image of ``image_size`` (H, W), on ``device``."""
        return cls([], torch.zeros((0, 2), dtype=torch.long, device=device), image_size)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, item: Union[int, slice, torch.Tensor]) -> "CroppedMasks":
        """Masks selected as Instances select: an int, a slice, a bool or int64 index tensor."""
        if isinstance(item, int):
            indices = [range(len(self))[item]]
        elif isinstance(item, slice):
            indices = list(range(len(self)))[item]
        else:
            item = torch.as_tensor(item)
            if item.dtype == torch.bool:
                item = item.nonzero().flatten()
            indices = item.flatten().tolist()
        return CroppedMasks(
            [self.crops[i] for i in indices], self.origins[indices].reshape(-1, 2), self.image_size
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        """One materialised (H, W) bool mask at a time."""
        for i in range(len(self)):
            yield self[i].tensor[0]

    @property
    def device(self) -> torch.device:
        return self.origins.device if not self.crops else self.crops[0].device

    def to(self, device) -> "CroppedMasks":
        crops = [c.to(device) for c in self.crops]
        return CroppedMasks(crops, self.origins.to(device), self.image_size)

    @property
    def tensor(self) -> torch.Tensor:
        """The (N, H, W) bool masks, materialised."""
        out = torch.zeros((len(self), *self.image_size), dtype=torch.bool, device=self.device)
        for i, (crop, (x, y)) in enumerate(zip(self.crops, self.origins.tolist())):
            h, w = crop.shape
            out[i, y : y + h, x : x + w] = crop
        return out

    def to_bitmasks(self) -> BitMasks:
        return BitMasks(self.tensor)

    def area(self) -> torch.Tensor:
        """(N,) int64 pixel counts."""
        areas = [int(c.sum()) for c in self.crops]
        return torch.tensor(areas, dtype=torch.long)

    def get_bounding_boxes(self) -> Boxes:
        """Tight XYXY boxes (x2, y2 exclusive, as ``BitMasks``); all zero for an empty mask."""
        boxes = torch.zeros((len(self), 4), dtype=torch.float32)
        for i, (crop, (x, y)) in enumerate(zip(self.crops, self.origins.tolist())):
            rows, cols = crop.any(dim=1).nonzero(), crop.any(dim=0).nonzero()
            if len(rows):
                boxes[i] = torch.tensor(
                    [x + cols[0, 0], y + rows[0, 0], x + cols[-1, 0] + 1, y + rows[-1, 0] + 1]
                )
        return Boxes(boxes.to(self.device))

    def to_rle(self) -> List[dict]:
        """COCO RLE of each mask (``{"size": [H, W], "counts": bytes}``, as
        ``pycocotools.mask.encode`` gives for the full mask), computed from the crops: memory
        follows the crop's height x the image height, not H x W."""
        height, width = self.image_size
        rles = []
        for crop, (x, y) in zip(self.crops, self.origins.tolist()):
            h, w = crop.shape
            if h * w == 0:
                x, w = 0, 0
            strip = np.zeros((height, w), dtype=np.uint8)  # the crop's columns, full height
            strip[y : y + h] = crop.cpu().numpy()
            counts = _run_lengths(strip.ravel(order="F"))
            counts[0] += x * height  # COCO's column-major order: the columns left of the crop
            right = (width - x - w) * height  # the columns right of the crop
            if len(counts) % 2:  # ends with a run of zeros: extend it
                counts[-1] += right
            elif right:
                counts.append(right)
            rles.append(mask_util.frPyObjects({"counts": counts, "size": [height, width]},
                                              height, width))  # fmt: skip
        return rles

    @staticmethod
    def cat(masks_list: List["CroppedMasks"]) -> "CroppedMasks":
        """Concatenate masks of the same image size (as ``Instances.cat`` needs)."""
        sizes = {m.image_size for m in masks_list}
        if len(sizes) != 1:
            raise ValueError(f"CroppedMasks.cat: different image sizes {sorted(sizes)}.")
        crops = [c for m in masks_list for c in m.crops]
        origins = torch.cat([m.origins for m in masks_list])
        return CroppedMasks(crops, origins, sizes.pop())

    def __repr__(self) -> str:
        return f"CroppedMasks(num_instances={len(self)}, image_size={self.image_size})"


def _run_lengths(flat: np.ndarray) -> List[int]:
    """Alternating run lengths of a 0/1 vector, starting with a (possibly empty) run of 0s."""
    if len(flat) == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [len(flat)]])).tolist()
    return runs if flat[0] == 0 else [0] + runs
