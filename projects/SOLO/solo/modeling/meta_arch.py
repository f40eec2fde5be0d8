"""The SOLO meta-architecture: backbone -> SOLO instance head -> targets/losses or instances."""

import functools
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..config import check_solo_config
from .heads import SOLOHeadBase, build_solo_head
from .heads.base import split_strides
from .losses import category_loss, mask_loss
from .postprocess import SOLOPostProcessor
from .targets import SOLOTargetAssigner, gather_ground_truth

#: Images are padded to at least this many times the backbone's size divisibility. Otherwise P5
#: is 1x1 for tiny images (e.g. 20x20), and a GroupNorm with one channel per group (e.g. 32
#: channels) then sees a single value per group, which PyTorch rejects. Extra bottom/right
#: padding is what batching with a larger image does anyway; outputs are cropped to the images.
MIN_BLOCKS = 2

EXPORT_ROUTE = (
    "export it with tools/export_model.py or solo.export.export_model(model, fmt, output_dir), "
    "which trace solo.export.SOLOExportModule (backbone, head and the fixed-size "
    "post-processing), and run the file with solo.export.ExportedModel"
)


def is_exporting() -> bool:
    """Whether the code runs under ``torch.jit.trace``/``script``, ``torch.onnx.export`` or
    ``torch.export``: Python control flow and data-dependent shapes are then frozen or refused."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
    )


def padded_size(height, width, size_divisibility: int, min_size: int = 0):
    """(H, W): ``height`` and ``width`` rounded up to a multiple of ``size_divisibility`` (0 or
    1: unchanged) and to at least ``min_size``. Ints, or the symbolic sizes of a trace or an
    export (0-dim tensors under ``torch.onnx.export``, SymInts under ``torch.export``)."""
    d = max(int(size_divisibility), 1)

    def one(size):
        rounded = (size + d - 1) // d * d
        if isinstance(rounded, torch.Tensor):
            return rounded.clamp(min=min_size)
        return torch.sym_max(rounded, min_size)

    return one(height), one(width)


def pad_to_divisibility(
    images: torch.Tensor, size_divisibility: int, min_size: int = 0, value: float = 0.0
) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W) padded bottom/right with ``value`` to :func:`padded_size`.

    The one padding of SOLO's inputs: the eager model pads normalised images with 0, and an
    exported graph runs this same function on its input, so that any H and W are padded as the
    eager model pads them (the sizes stay symbolic under tracing and export).
    """
    h, w = images.shape[-2:]
    hp, wp = padded_size(h, w, size_divisibility, min_size)
    if not is_exporting() and (hp, wp) == (h, w):
        return images
    return F.pad(images, (0, wp - w, 0, hp - h), value=value)


@META_ARCH_REGISTRY.register()
class SOLO(nn.Module):
    """SOLO, Decoupled SOLO and SOLOv2: segmenting objects by locations, without boxes or ROIs.

    The head (``MODEL.SOLO.HEAD_NAME``) predicts, for every cell of an S x S grid on each level,
    a category score and a mask; training assigns instances to cells by their centres, inference
    keeps confident cells and removes duplicate masks with Matrix NMS.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: SOLOHeadBase,
        head_in_features: Sequence[str],
        target_assigner: SOLOTargetAssigner,
        postprocessor: SOLOPostProcessor,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_classes: int,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cate_loss_weight: float = 1.0,
        dice_loss_weight: float = 3.0,
        input_format: str = "RGB",
        channels_last: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_in_features = list(head_in_features)
        self.target_assigner = target_assigner
        self.postprocessor = postprocessor
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cate_loss_weight = cate_loss_weight
        self.dice_loss_weight = dice_loss_weight
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Channels-last on CPU: weights now, images in preprocess_image (see config.py).
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        check_solo_config(cfg)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in cfg.MODEL.SOLO.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.SOLO.IN_FEATURES {missing} are not produced by the backbone, which "
                f"outputs {sorted(shapes)}."
            )
        head_shapes = [shapes[f] for f in cfg.MODEL.SOLO.IN_FEATURES]
        head = build_solo_head(cfg, head_shapes)
        level_strides = split_strides([s.stride for s in head_shapes])
        c = cfg.MODEL.SOLO
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": c.IN_FEATURES,
            "target_assigner": SOLOTargetAssigner(
                cfg,
                mask_strides=head.mask_strides(level_strides),
                keep_overlapping_masks=head.keep_overlapping_masks,
            ),
            "postprocessor": SOLOPostProcessor(cfg, level_strides=level_strides),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": c.NUM_CLASSES,
            "focal_alpha": c.FOCAL_ALPHA,
            "focal_gamma": c.FOCAL_GAMMA,
            "cate_loss_weight": c.CATE_LOSS_WEIGHT,
            "dice_loss_weight": c.DICE_LOSS_WEIGHT,
            "input_format": cfg.INPUT.FORMAT,
            "channels_last": cfg.CHANNELS_LAST_ON_CPU and cfg.MODEL.DEVICE == "cpu",
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict[str, torch.Tensor]]) -> ImageList:
        """Normalise the images and pad them (bottom/right) to one canvas for the whole batch."""
        images = [self._normalize(self._checked_image(x, i)) for i, x in enumerate(batched_inputs)]
        return self._pad(images)

    def _pad(self, images: List[torch.Tensor]) -> ImageList:
        d = self.backbone.size_divisibility
        min_size = MIN_BLOCKS * max(d, 1)
        if len(images) == 1 and not self.backbone.padding_constraints:
            # Inference's path (each image alone), the one an exported graph holds.
            tensor = pad_to_divisibility(images[0][None], d, min_size)
            images = ImageList(tensor, [tuple(images[0].shape[-2:])])
        else:
            images = ImageList.from_tensors(
                images, d, padding_constraints=self.backbone.padding_constraints
            )
            images = ImageList(pad_to_divisibility(images.tensor, 1, min_size), images.image_sizes)
        if self.channels_last and images.tensor.device.type == "cpu":
            tensor = images.tensor.contiguous(memory_format=torch.channels_last)
            images = ImageList(tensor, images.image_sizes)
        return images

    def _checked_image(self, inputs: Dict[str, torch.Tensor], index: int) -> torch.Tensor:
        """``inputs["image"]``, which must be a (3, H, W) tensor (Detectron2's readers give one),
        no larger than the square of a backbone with square padding (ViTDet)."""
        image = inputs.get("image") if isinstance(inputs, dict) else None
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else None
        if shape is None or len(shape) != 3 or shape[0] != 3 or 0 in shape:
            got = f"shape {shape}" if shape is not None else f"type {type(image).__name__}"
            raise ValueError(
                f"batched_inputs[{index}]['image'] has {got}; expected a (3, H, W) tensor in "
                f"INPUT.FORMAT={self.input_format!r}. Permute an (H, W, C) image with "
                "torch.as_tensor(image.transpose(2, 0, 1)); read files with solo.data.read_image, "
                "which converts grayscale and RGBA images."
            )
        square = (self.backbone.padding_constraints or {}).get("square_size", 0)
        if square and max(shape[1:]) > square:
            # Detectron2's ImageList would crop a single image and fail on a batch.
            raise ValueError(
                f"batched_inputs[{index}]['image'] is {shape[1]}x{shape[2]}, larger than the "
                f"{square}x{square} square every image is padded to by this backbone (square_pad "
                "/ padding_constraints['square_size']). Resize it so that its longer side is at "
                f"most {square} (the config's test resize, e.g. ResizeShortestEdge with max_size "
                f"{square}, does)."
            )
        return image

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image.to(self.device, non_blocking=True) - self.pixel_mean) / self.pixel_std

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        Args:
            batched_inputs: Detectron2's list of dicts: ``image`` (C, H, W) in ``INPUT.FORMAT``,
                ``instances`` (training: ``gt_boxes``, ``gt_classes``, ``gt_masks``), and
                optionally ``height``/``width`` of the wanted output.
        Returns:
            training: dict of losses ``loss_cate`` and ``loss_mask``;
            inference: ``[{"instances": Instances}]`` with ``pred_masks`` (bool, output size),
            ``scores``, ``pred_classes`` and ``pred_boxes`` (tight boxes of the masks).
        """
        if is_exporting():
            raise RuntimeError(
                "The eager SOLO model cannot be traced or exported: its post-processing keeps "
                "a data-dependent number of candidates, so a trace records the sample image's "
                "count (0 instances on every image after a sample without detections) or fails "
                f"inside the tracer. Instead, {EXPORT_ROUTE}."
            )
        if not self.training:
            return self.forward_inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        outputs = self.head([features[f] for f in self.head_in_features])
        gt_instances = [x["instances"] for x in batched_inputs]
        return self.losses(outputs, gt_instances, tuple(images.tensor.shape[-2:]))

    def losses(self, outputs, gt_instances: List[Instances], padded_size: Tuple[int, int]):
        # Targets are exact float32 geometry, also under mixed precision.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            gt = gather_ground_truth(gt_instances, padded_size, self.device)
            targets = self.target_assigner(gt)
        mask_probs = [
            self.head.training_mask_probs(outputs, level, t.pos_images, t.pos_cells)
            for level, t in enumerate(targets)
        ]
        storage = get_event_storage()
        for name, t in zip(self.head_in_features, targets):
            positives = t.positive_cells.sum().item() / len(gt_instances)
            storage.put_scalar(f"solo/num_pos_{name}", positives)
        loss_cate = category_loss(
            outputs.cate_logits, targets, self.num_classes, self.focal_alpha, self.focal_gamma
        )
        return {
            "loss_cate": loss_cate * self.cate_loss_weight,
            "loss_mask": mask_loss(mask_probs, targets) * self.dice_loss_weight,
        }

    def forward_inference(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Predictions of each image as if it were alone in the batch.

        Each image is padded only to its own multiple of the backbone's size divisibility (the
        official single-image test), and images of equal padded size run together: the category
        grids (resized to S x S) and every GroupNorm (heads, GN backbones) would otherwise see
        the padding of a larger image in the batch.
        """
        images = [self._normalize(self._checked_image(x, i)) for i, x in enumerate(batched_inputs)]
        canvases = [self._pad([image]) for image in images]
        groups = defaultdict(list)
        for i, canvas in enumerate(canvases):
            groups[tuple(canvas.tensor.shape[-2:])].append(i)
        results = [None] * len(images)
        for padded_size, indices in groups.items():
            group = ImageList(
                torch.cat([canvases[i].tensor for i in indices]),
                [canvases[i].image_sizes[0] for i in indices],
            )
            features = self.backbone(group.tensor)
            output_sizes = [
                (batched_inputs[i].get("height", h), batched_inputs[i].get("width", w))
                for i, (h, w) in zip(indices, group.image_sizes)
            ]
            for i, r in zip(indices, self.predict_from_features(features, group, output_sizes)):
                results[i] = r
        return results

    def predict_from_features(
        self, features: Dict[str, torch.Tensor], images: ImageList, output_sizes
    ) -> List[dict]:
        """Per image ``{"instances": Instances}`` from the backbone ``features`` of ``images``
        (padded to one canvas); subclasses add outputs of the same features (PanopticSOLOv2)."""
        outputs = self.head([features[f] for f in self.head_in_features])
        instances = self.postprocessor(
            outputs.cate_logits,
            functools.partial(self.head.inference_mask_probs, outputs),
            tuple(images.tensor.shape[-2:]),
            images.image_sizes,
            output_sizes,
        )
        return [{"instances": r} for r in instances]
