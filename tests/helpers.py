"""The one helper module of the tests: configs, tiny and seeded models, random instance sets,
scripts loaded as modules, training steps, forced candidates and crafted head outputs."""

import functools
import importlib.util
import json
import logging
import numpy as np
import os
import sys
from contextlib import contextmanager
from pathlib import Path
import cv2
import pycocotools.mask as mask_util
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from solo import add_solo_config
from solo.modeling.heads import DecoupledSOLOHead, HeadOutputs, SOLOHead, SOLOv2Head

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def solo_cfg(config_file=None, opts=()):
    """A frozen-free SOLO config on CPU with no weights to load."""
    cfg = get_cfg()
    add_solo_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(CONFIG_DIR / config_file))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


def tiny_cfg(head_name="SOLOHead", opts=()):
    """A small but complete SOLO model (ResNet-18, 64-channel FPN and heads, small grids)."""
    base = "SOLOv2/Base-SOLOv2.yaml" if head_name == "SOLOv2Head" else "SOLO/Base-SOLO.yaml"
    cfg = solo_cfg(base)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.SOLO.HEAD_NAME = head_name
    cfg.MODEL.SOLO.NUM_CLASSES = 5
    cfg.MODEL.SOLO.NUM_GRIDS = [12, 10, 8, 6, 4]
    cfg.MODEL.SOLO.SCALE_RANGES = [[1, 24], [12, 48], [24, 96], [48, 192], [96, 2048]]
    cfg.MODEL.SOLO.NUM_STACKED_CONVS = 2
    cfg.MODEL.SOLO.HEAD_CHANNELS = 64
    cfg.MODEL.SOLO.MASK_KERNEL_CHANNELS = 32
    cfg.MODEL.SOLO.MASK_FEATURE_CHANNELS = 32
    cfg.merge_from_list(list(opts))
    return cfg


def random_instances(height, width, num_instances, num_classes, rng, min_size=6):
    """Random ellipses and rectangles with their masks, boxes (XYXY, x2 = x + w) and classes."""
    inst = Instances((height, width))
    masks = np.zeros((num_instances, height, width), dtype=bool)
    yy, xx = np.mgrid[:height, :width]
    for i in range(num_instances):
        w = rng.integers(min_size, max(min_size + 1, width // 2))
        h = rng.integers(min_size, max(min_size + 1, height // 2))
        x0 = rng.integers(0, width - w + 1)
        y0 = rng.integers(0, height - h + 1)
        if rng.random() < 0.5:
            masks[i, y0 : y0 + h, x0 : x0 + w] = True
        else:
            cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
            masks[i] = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
    boxes = np.zeros((num_instances, 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    inst.gt_boxes = Boxes(torch.from_numpy(boxes))
    inst.gt_classes = torch.from_numpy(rng.integers(0, num_classes, num_instances)).long()
    inst.gt_masks = BitMasks(torch.from_numpy(masks))
    return inst


def random_batch(sizes_and_counts, num_classes, seed=0):
    """Detectron2 training inputs: uint8 images with random instances."""
    rng = np.random.default_rng(seed)
    batch = []
    for (h, w), n in sizes_and_counts:
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        batch.append({"image": image, "instances": random_instances(h, w, n, num_classes, rng)})
    return batch


def load_script(relative_path, module_name):
    """Import a repository script (train_net.py, tools/*.py, demo/*.py) as a module, with its
    directory first on ``sys.path`` while it loads, as ``python <script>`` has it (demo.py
    imports predictor.py next to it)."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


# train_net.py on the shapes config, narrowed so that a few iterations take seconds.
SHAPES_CONFIG = "configs/Shapes/SOLOv2_R18.yaml"
SMALL_SHAPES_OPTS = [
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.SOLO.HEAD_CHANNELS", "64",
    "MODEL.SOLO.MASK_KERNEL_CHANNELS", "32",
    "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
    # Training runs skip the final evaluation unless a test sets DATASETS.TEST.
    "DATASETS.TEST", "()",
]  # fmt: skip


def load_train_net():
    return load_script("train_net.py", "train_net")


def run_main(train_net, argv):
    """``train_net.main`` with a parsed command line (``--config-file ... KEY VALUE ...``)."""
    from detectron2.engine import default_argument_parser

    return train_net.main(default_argument_parser().parse_args(argv))


def read_metrics(output_dir):
    """The records of ``OUTPUT_DIR/metrics.json``."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def shapes_cache(root):
    """Point the built-in shapes datasets (SOLO_SHAPES_ROOT) at ``root`` for a while."""
    old = os.environ.get("SOLO_SHAPES_ROOT")
    os.environ["SOLO_SHAPES_ROOT"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("SOLO_SHAPES_ROOT")
        else:
            os.environ["SOLO_SHAPES_ROOT"] = old


@contextmanager
def capture_warnings(caplog, name):
    """caplog for a logger that Detectron2's setup_logger (run by earlier train_net tests in the
    same session) stopped from propagating to the root logger."""
    logger = logging.getLogger(name)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=name):
            yield
    finally:
        logger.removeHandler(caplog.handler)


HEADS = ["SOLOHead", "DecoupledSOLOHead", "DecoupledSOLOLightHead", "SOLOv2Head"]


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def train_step(model, batch):
    model.train()
    with EventStorage():
        losses = model(batch)
        total = sum(losses.values())
        model.zero_grad()
        total.backward()
    return losses


def force_candidates(model, logit=4.0):
    """Random weights give no confident cell; a high category bias makes every cell a
    candidate, and mask biases make masks cover part of the image, so that inference exercises
    the full post-processing."""
    layers = model.head.prediction_layers()
    with torch.no_grad():
        layers.category.bias.fill_(logit)
        # sigmoid(1) for a mask of one map, sigmoid(2)^2 for the product of X and Y maps.
        for conv in layers.masks:
            conv.bias.fill_(float(layers.mask_factors))


def tied_scores_model(head_name):
    """A tiny model whose every (cell, class) pair scores sigmoid(20) = 1.0 in float32: the
    classes of a cell share its mask and maskness, so their scores tie exactly."""
    model = build(tiny_cfg(head_name, ()))
    force_candidates(model, logit=20.0)
    with torch.no_grad():
        model.head.prediction_layers().category.weight.zero_()
    return model.eval()


# Crafted head outputs (three levels, one or two images) for the post-processing tests.
NUM_CLASSES = 3
GRIDS = [12, 8, 6]
LEVEL_STRIDES = [8, 16, 32]  # SOLO mask strides 4, 8, 16
PADDED = (64, 96)
STRIDE4 = (16, 24)
IMAGE_SIZES = [(60, 90), (64, 72)]
OUTPUT_SIZES = [(60, 90), (32, 36)]  # first at image size, second downscaled
EMBED = 8  # SOLOv2 kernel / mask feature channels

HEAD_ARGS = dict(in_channels=32, num_classes=NUM_CLASSES, num_grids=GRIDS, channels=32, num_convs=1)


def make_head(kind):
    if kind == "solo":
        # The crafted SOLO outputs are the S^2 mask logits themselves: identity 1x1 mask convs
        # make the head's per-cell kernels read them back channel by channel.
        head = SOLOHead(**HEAD_ARGS)
        head.mask_preds = torch.nn.ModuleList(identity_conv(s * s) for s in GRIDS)
        return head
    if kind == "decoupled":
        return DecoupledSOLOHead(**HEAD_ARGS)
    return SOLOv2Head(
        **HEAD_ARGS, mask_in_features_count=2, mask_kernel_channels=32, mask_feature_channels=32
    )


def mask_probs_of(kind, outputs):
    """The post-processor's mask-probability callable: the head's, bound to ``outputs``."""
    return functools.partial(make_head(kind).inference_mask_probs, outputs)


def identity_conv(channels):
    conv = torch.nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        conv.bias.zero_()
    return conv


def blob_logits(rng, n, size, centres, axis=None):
    """(n, h, w) logits of blobs around a few shared centres (so that masks overlap):
    ``amplitude * (1 - d^2 / r^2)``, d measured along ``axis`` only if given (decoupled X/Y)."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    yy, xx = (yy + 0.5) / h, (xx + 0.5) / w
    out = np.empty((n, h, w), dtype=np.float32)
    for k in range(n):
        cy, cx = centres[rng.integers(0, len(centres))] + rng.normal(0, 0.03, 2)
        r = rng.uniform(0.05, 0.35)
        d2 = {None: (yy - cy) ** 2 + (xx - cx) ** 2, "x": (xx - cx) ** 2, "y": (yy - cy) ** 2}[axis]
        out[k] = rng.uniform(2, 6) * (1 - d2 / r**2)
    return np.maximum(out, -8)


def random_outputs(kind, seed, batch=2, cate_mean=-3.0):
    """Head outputs whose masks are blobs around 4 object centres per image."""
    rng = np.random.default_rng(seed)
    cate = [
        torch.from_numpy(rng.normal(cate_mean, 1.5, (batch, NUM_CLASSES, s, s)).astype(np.float32))
        for s in GRIDS
    ]
    centres = [rng.uniform(0.15, 0.85, (4, 2)) for _ in range(batch)]
    if kind == "solo":
        masks = []
        for s, stride in zip(GRIDS, (4, 8, 16)):
            size = (PADDED[0] // stride, PADDED[1] // stride)
            masks.append(
                torch.from_numpy(np.stack([blob_logits(rng, s * s, size, c) for c in centres]))
            )
        return HeadOutputs(cate, masks)
    if kind == "decoupled":
        xy = []
        for s, stride in zip(GRIDS, (4, 8, 16)):
            size = (PADDED[0] // stride, PADDED[1] // stride)
            x = np.stack([blob_logits(rng, s, size, c, "x") for c in centres])
            y = np.stack([blob_logits(rng, s, size, c, "y") for c in centres])
            xy.append((torch.from_numpy(x), torch.from_numpy(y)))
        return HeadOutputs(cate, xy)
    # SOLOv2: mask feature channel e is a blob, each cell's kernel mostly picks one channel.
    features = torch.from_numpy(np.stack([blob_logits(rng, EMBED, STRIDE4, c) for c in centres]))
    kernels = []
    for s in GRIDS:
        k = rng.normal(0, 0.05, (batch, EMBED, s, s))
        pick = rng.integers(0, EMBED, (batch, s, s))
        np.put_along_axis(k, pick[:, None], rng.uniform(0.8, 1.2, (batch, 1, s, s)), axis=1)
        kernels.append(torch.from_numpy(k.astype(np.float32)))
    return HeadOutputs(cate, (kernels, features))


# Shapes images written in other datasets' formats, for their evaluators.
def _shapes_split(root, num_images, seed, image_size):
    from solo.data.shapes import ShapesSplit, generate_shapes_split

    spec = ShapesSplit("val", num_images=num_images, seed=seed, image_size=image_size)
    with open(generate_shapes_split(str(root), spec)) as f:
        coco = json.load(f)
    masks = {}  # image id -> [(category id, bool mask)]
    for ann in coco["annotations"]:
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        masks.setdefault(ann["image_id"], []).append((ann["category_id"], mask))
    return coco, masks


def write_shapes_as_lvis(root, num_images=4, seed=0, image_size=(128, 160)):
    """A shapes split as an LVIS v1 file: polygon masks (``load_lvis_json`` accepts only
    polygons), ``coco_url`` naming ``<root>/val/<file>``, every absent category verified absent
    (``neg_category_ids``), and the three classes rare, common and frequent. Returns
    ``(json_path, image_root)`` for ``load_lvis_json``."""
    coco, masks = _shapes_split(root, num_images, seed, image_size)
    categories = [
        {**c, "synonyms": [c["name"]], "frequency": f, "image_count": 1}
        for c, f in zip(coco["categories"], "rcf")
    ]
    annotations = []
    for image in coco["images"]:
        image["coco_url"] = f"http://example.org/val/{image['file_name']}"
        present = {category for category, _ in masks.get(image["id"], [])}
        image["neg_category_ids"] = [c["id"] for c in categories if c["id"] not in present]
        image["not_exhaustive_category_ids"] = []
        for category, mask in masks.get(image["id"], []):
            contours = cv2.findContours(
                mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
            )[-2]
            polygons = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
            rle = mask_util.merge(mask_util.frPyObjects(polygons, *mask.shape))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": category,
                    "segmentation": polygons,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                }
            )
    path = Path(root) / "lvis_v1_val.json"
    lvis = {"images": coco["images"], "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(lvis))
    return str(path), str(root) + os.sep


#: Cityscapes label of each shapes category; the background is "road" (evaluated, not void).
SHAPES_AS_CITYSCAPES = {1: "car", 2: "person", 3: "truck"}


def write_shapes_as_cityscapes(root, num_images=3, seed=0, image_size=(256, 320)):
    """A shapes split in Cityscapes' layout: ``leftImg8bit/val/shapes/*_leftImg8bit.png`` and
    ``gtFine/val/shapes/*_gtFine_{instanceIds,labelIds}.png`` (instance pixel = label id * 1000 +
    index) plus a ``*_gtFine_polygons.json`` with the polygons. Returns ``(image_dir, gt_dir)``
    for ``load_cityscapes_instances``."""
    from cityscapesscripts.helpers.labels import name2label

    coco, masks = _shapes_split(Path(root) / "shapes", num_images, seed, image_size)
    image_dir, gt_dir = Path(root) / "leftImg8bit" / "val", Path(root) / "gtFine" / "val"
    (image_dir / "shapes").mkdir(parents=True)
    (gt_dir / "shapes").mkdir(parents=True)
    for image in coco["images"]:
        stem = f"shapes_000000_{image['id']:06d}"
        source = Path(root) / "shapes" / "val" / image["file_name"]
        os.replace(source, image_dir / "shapes" / f"{stem}_leftImg8bit.png")
        road = name2label["road"].id
        instance_ids = np.full(image_size, road, dtype=np.uint16)
        objects = []
        for index, (category, mask) in enumerate(masks.get(image["id"], [])):
            label = name2label[SHAPES_AS_CITYSCAPES[category]]
            instance_ids[mask] = label.id * 1000 + index
            contour = max(
                cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[
                    -2
                ],
                key=len,
            )
            objects.append({"label": label.name, "polygon": contour.reshape(-1, 2).tolist()})
        cv2.imwrite(str(gt_dir / "shapes" / f"{stem}_gtFine_instanceIds.png"), instance_ids)
        label_ids = np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids)
        cv2.imwrite(
            str(gt_dir / "shapes" / f"{stem}_gtFine_labelIds.png"), label_ids.astype(np.uint8)
        )
        polygons = {"imgHeight": image_size[0], "imgWidth": image_size[1], "objects": objects}
        (gt_dir / "shapes" / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))
    return str(image_dir), str(gt_dir)


def random_image(size, seed):
    """A seeded (3, H, W) uint8 image of random pixels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=generator, dtype=torch.uint8)


def spread_scores_model(head_name):
    """A tiny model (``tiny_cfg``) whose every cell is a candidate, with spread-out category
    scores (``force_candidates`` alone ties them within 1e-4), so that runtimes whose kernels
    round differently (OpenVINO ~3e-4, float16) cannot reorder the best candidates."""
    model = build(tiny_cfg(head_name))
    force_candidates(model, logit=-3.0)
    with torch.no_grad():
        torch.manual_seed(1)
        model.head.cate_pred.weight.normal_(std=0.3)
    return model.eval()


def instances_as_annotations(instances):
    """Detectron2 dataset annotations (XYXY boxes, compressed RLE masks) of predicted
    ``Instances``: pseudo ground truth, so that a model scores high AP on it and any change of
    its predictions shows as a lower AP."""
    import pycocotools.mask as mask_util

    from detectron2.structures import BoxMode

    masks = instances.pred_masks.permute(1, 2, 0).numpy().astype("uint8")
    rles = mask_util.encode(masks.copy(order="F"))
    return [
        dict(
            bbox=box.tolist(),
            bbox_mode=BoxMode.XYXY_ABS,
            category_id=int(label),
            segmentation={"size": rle["size"], "counts": rle["counts"].decode()},
            iscrowd=0,
        )
        for box, label, rle in zip(instances.pred_boxes.tensor, instances.pred_classes, rles)
    ]


def assert_onnx_export_is_exact(model, directory, sample_size, sizes, seed=0):
    """Export ``model`` (eval mode) to ONNX with a seeded random sample image of
    ``sample_size`` and check that ``ExportedModel`` gives the eager predictions
    (``compare_predictions``) on seeded random images of each of ``sizes``; returns the
    ``ExportedModel``."""
    from solo.export import ExportedModel, compare_predictions, export_model

    generator = torch.Generator().manual_seed(seed)
    sample = torch.randint(0, 256, (3, *sample_size), generator=generator).to(torch.uint8)
    exported = ExportedModel(export_model(model, "onnx", str(directory), sample, 1500))
    for size in sizes:
        image = torch.randint(0, 256, (3, *size), generator=generator).to(torch.uint8)
        with torch.no_grad():
            (expected,) = [r["instances"] for r in model([{"image": image}])]
        (actual,) = [r["instances"] for r in exported([{"image": image}])]
        assert len(expected) > 0 and compare_predictions(expected, actual) == [], size
    return exported
