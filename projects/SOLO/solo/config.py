"""Configuration keys of the SOLO family (``cfg.MODEL.SOLO``).

Every default is the official one (WXinlong/SOLO, ``configs/solo/solo_r50_fpn_8gpu_1x.py``); the
paper symbol is given where the paper names the quantity. Variants (Decoupled SOLO, SOLOv2, light,
DCN) change only a few keys in their YAML files.
"""

import difflib
import re
import torch

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as get_detectron2_cfg


def add_solo_config(cfg):
    """Add the ``MODEL.SOLO`` keys (and the SOLO input/solver defaults) to a Detectron2 config."""
    use_cpu_without_cuda(cfg)
    cfg.MODEL.SOLO = CN()
    _C = cfg.MODEL.SOLO

    # Instance head, from SOLO_HEAD_REGISTRY: SOLOHead | DecoupledSOLOHead | DecoupledSOLOLightHead
    # | SOLOv2Head.
    _C.HEAD_NAME = "SOLOHead"
    # FPN levels the head reads, finest first. The first (P2) is resized x0.5 and the last (P6)
    # to the size of the one before it inside the head: level strides [8, 8, 16, 32, 32],
    # derived from the backbone's output strides.
    _C.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Number of foreground categories (no background channel).
    _C.NUM_CLASSES = 80
    # S, the number of grid cells per side, one per level.
    _C.NUM_GRIDS = [40, 36, 24, 16, 12]
    # Inclusive [low, high] ranges of sqrt(w * h) of an instance's box that each level is
    # responsible for. Ranges overlap on purpose: one instance may be positive on two levels.
    _C.SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    # epsilon, scale of the centre region: centre +- SIGMA * half box size, at most 3x3 cells.
    _C.SIGMA = 0.2
    # Number of conv + GN + ReLU units in each tower (7 for SOLO, 4 for SOLOv2 R50 / decoupled
    # light, 2 for SOLOv2 light-448, 3 for SOLOv2 light-512-DCN).
    _C.NUM_STACKED_CONVS = 7
    # Channels of the tower convolutions (256; 512 for the SOLOv2 kernel/category towers).
    _C.HEAD_CHANNELS = 256
    # Index of the category-tower conv before which features are resized to S x S (SOLO v1).
    _C.CATE_DOWN_POS = 0
    # Deformable convolutions in the towers: "none" | "DCN" (v1) | "DCNv2" (modulated).
    _C.TOWER_DCN = "none"
    # Where deformable convolutions go in the towers: "all" convs (SOLOv2) or only the "last"
    # (the official light heads).
    _C.TOWER_DCN_LAYERS = "all"
    # Prior probability used to initialise the category (and SOLO v1 mask) biases.
    _C.PRIOR_PROB = 0.01

    # SOLOv2 only.
    # E, channels of the unified mask features = input channels of the dynamic 1x1 mask kernels.
    _C.MASK_KERNEL_CHANNELS = 256
    # FPN levels fused into the stride-4 mask features (P2-P5).
    _C.MASK_FEATURE_IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # Hidden channels of the mask feature branch (128 for every official model).
    _C.MASK_FEATURE_CHANNELS = 128
    # Deformable convolutions in the mask feature branch: "none" | "DCN" | "DCNv2".
    _C.MASK_FEATURE_DCN = "none"

    # Losses: sigmoid focal loss on categories, dice loss on masks.
    _C.FOCAL_ALPHA = 0.25
    _C.FOCAL_GAMMA = 2.0
    _C.CATE_LOSS_WEIGHT = 1.0
    # lambda, weight of the mask (dice) loss.
    _C.DICE_LOSS_WEIGHT = 3.0

    # Inference.
    # Candidates kept (by rescored score) before mask NMS.
    _C.NMS_PRE = 500
    # Category score threshold (strict).
    _C.SCORE_THRESH = 0.1
    # Mask probability threshold (strict) used to binarise masks.
    _C.MASK_THRESH = 0.5
    # Per level, a candidate's binary mask must cover more than this many pixels of the mask
    # prediction (stride 4 for SOLOv2, half the level stride for SOLO) to be kept. Empty: the
    # level strides ([8, 8, 16, 32, 32]), as in the official code -- sized for COCO images (at
    # stride 4, 8 pixels are 128 input pixels), which drops every small object of a 128-pixel
    # image.
    _C.MIN_MASK_AREAS = []
    # Score threshold applied after NMS (inclusive).
    _C.UPDATE_THRESH = 0.05
    # "matrix" (Matrix NMS, SOLOv2) or "mask" (greedy mask-IoU NMS, the SOLO paper's baseline).
    _C.NMS_TYPE = "matrix"
    # Matrix NMS decay kernel: "gaussian" exp(-sigma * iou^2) or "linear" (1 - iou).
    _C.MATRIX_NMS_KERNEL = "gaussian"
    _C.MATRIX_NMS_SIGMA = 2.0
    # IoU above which a lower-scored mask of the same class is removed ("mask" NMS).
    _C.MASK_NMS_IOU_THRESH = 0.5
    # Runtime knobs: how inference runs, not which model it is (exported models, which fix
    # MODEL.*, do not compare them). Top level, as Detectron2's own CUDNN_BENCHMARK and
    # FLOAT32_PRECISION.
    # On CPU (MODEL.DEVICE "cpu"), keep weights and feature maps in channels-last (NHWC) memory
    # format: oneDNN then skips re-laying out every convolution's input and output (figures:
    # docs/benchmarks_notes.md). Same results up to float rounding.
    cfg.CHANNELS_LAST_ON_CPU = True
    # Predicted masks: "bitmask", Detectron2's (N, H, W) bool pred_masks; "cropped", a
    # solo.structures.CroppedMasks (each mask as its box's crop; the evaluator encodes RLE from
    # the crops), so that memory follows the objects' areas on large images.
    cfg.TEST.MASK_FORMAT = "bitmask"

    # Bottom-up networks other than ResNet (solo/modeling/bottom_up.py: MobileNetV3, RegNet),
    # for which Detectron2 has no YAML keys. Norm: "FrozenBN" (Detectron2's RegNet COCO
    # configs), "BN", "SyncBN" (RegNet also "GN").
    cfg.MODEL.BOTTOM_UP = CN()
    cfg.MODEL.BOTTOM_UP.NORM = "FrozenBN"
    # Outputs fed to the FPN: "s1"-"s4" at strides 4-32 (RegNet's names; MobileNetV3 too).
    cfg.MODEL.BOTTOM_UP.OUT_FEATURES = ["s1", "s2", "s3", "s4"]

    # "SGD" (Detectron2's, the official recipe) or "ADAMW" (see solo/solver.py).
    cfg.SOLVER.OPTIMIZER = "SGD"

    # COCO-format datasets to register before a run, in every process (solo.data.register):
    # [[name, json_file, image_root], ...]; name them in DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.COCO_FORMAT = []

    # Removed keys: a YAML file or command line still setting one fails at merge time, naming
    # what to do. Instances kept per image are Detectron2's TEST.DETECTIONS_PER_IMAGE (default
    # 100, the official max_per_img).
    removed = {
        "MODEL.SOLO.MAX_PER_IMAGE": (
            "TEST.DETECTIONS_PER_IMAGE",
            "SOLO reads Detectron2's TEST.DETECTIONS_PER_IMAGE (default 100), as RetinaNet does; "
            "rename the key in your YAML file or command line.",
        ),
        "MODEL.SOLO.CHANNELS_LAST_ON_CPU": (
            "CHANNELS_LAST_ON_CPU",
            "a runtime knob, not part of the model: it moved to the top level, as Detectron2's "
            "CUDNN_BENCHMARK; rename the key in your YAML file or command line (a config.yaml "
            "dumped by an older training run has it under MODEL.SOLO: move or delete the line).",
        ),
        "MODEL.SOLO.LEVEL_STRIDES": (
            "nothing (derived from the backbone's output strides)",
            "delete the key: the level strides follow from the backbone's strides (first level "
            "halved, last level resized to the one before it); set MODEL.SOLO.MIN_MASK_AREAS "
            "to change the minimum mask areas that defaulted to them.",
        ),
    }
    for old_key, (new_key, note) in removed.items():
        if not cfg.key_is_renamed(old_key):
            cfg.register_renamed_key(old_key, new_key, note)


def use_cpu_without_cuda(cfg):
    """Detectron2's default ``MODEL.DEVICE`` is "cuda": on a machine without CUDA, set "cpu", so
    that ``get_cfg()`` + ``add_solo_config()`` + ``merge_from_file()`` runs anywhere (a device set
    later by a config file or override still wins)."""
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"


def get_solo_cfg(config_file=None, opts=()):
    """Detectron2's default config + ``MODEL.SOLO``, a config file and ``KEY VALUE`` overrides.

    On a machine without CUDA, ``MODEL.DEVICE`` becomes ``cpu`` unless ``opts`` set it.
    """
    import torch

    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_solo_config(cfg)
    opts = list(opts)
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(opts)
    except (AssertionError, KeyError) as e:
        raise _unknown_key_error(cfg, e, config_file) from e
    if not torch.cuda.is_available() and "MODEL.DEVICE" not in opts[::2]:
        cfg.MODEL.DEVICE = "cpu"
    return cfg


class UnknownConfigKeyError(KeyError):
    """A config key that Detectron2 and SOLO do not have (yacs' "Non-existent key"), with the
    closest keys that exist."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


def _unknown_key_error(cfg, error: Exception, config_file) -> Exception:
    """yacs' ``Non-existent key: X`` (a misspelled key) with the closest existing keys; other
    errors (renamed keys, wrong types) unchanged."""
    message = str(error.args[0]) if error.args else str(error)
    match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", message)
    if match is None:
        return error
    key = match.group(1)

    def keys(node, prefix=""):
        for name, value in node.items():
            full = prefix + name
            yield from keys(value, full + ".") if isinstance(value, dict) else (full,)

    close = difflib.get_close_matches(key, list(keys(cfg)), n=3, cutoff=0.75)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    source = f"config file '{config_file}' or the overrides" if config_file else "the overrides"
    return UnknownConfigKeyError(f"Unknown config key {key} (in {source}).{hint}")


def check_solo_config(cfg):
    """Fail early, naming the key, on ``MODEL.SOLO`` settings the model cannot work with.

    Choice-type keys (head name, NMS type and kernel, DCN types) are checked where they are
    consumed (the head registry, the post-processor, the layers).
    """
    check_unread_detectron2_keys(cfg)
    c = cfg.MODEL.SOLO
    num_levels = len(c.IN_FEATURES)
    per_level = ["NUM_GRIDS", "SCALE_RANGES"]
    per_level += ["MIN_MASK_AREAS"] if c.MIN_MASK_AREAS else []  # empty: the level strides
    for key in per_level:
        if len(c[key]) != num_levels:
            raise ValueError(
                f"MODEL.SOLO.{key} has {len(c[key])} entries but MODEL.SOLO.IN_FEATURES names "
                f"{num_levels} levels ({list(c.IN_FEATURES)}); give one entry per level."
            )
    if num_levels < 2:
        raise ValueError("MODEL.SOLO.IN_FEATURES needs at least two FPN levels.")
    ranges = [tuple(r) for r in c.SCALE_RANGES]
    if any(len(r) != 2 or r[0] > r[1] for r in ranges):
        raise ValueError(f"MODEL.SOLO.SCALE_RANGES must be [low, high] pairs, got {ranges}.")
    for (lo0, hi0), (lo1, hi1) in zip(ranges, ranges[1:]):
        if not (lo1 > lo0 and hi1 > hi0):
            raise ValueError(
                f"MODEL.SOLO.SCALE_RANGES must increase from level to level, got {ranges}."
            )
    if c.NUM_CLASSES < 1:
        raise ValueError(f"MODEL.SOLO.NUM_CLASSES must be >= 1, got {c.NUM_CLASSES}.")
    if any(s < 1 for s in c.NUM_GRIDS):
        raise ValueError(f"MODEL.SOLO.NUM_GRIDS must be positive, got {list(c.NUM_GRIDS)}.")
    if c.SIGMA <= 0:
        raise ValueError(f"MODEL.SOLO.SIGMA must be > 0, got {c.SIGMA}.")
    if any(a < 0 for a in c.MIN_MASK_AREAS):
        raise ValueError(f"MODEL.SOLO.MIN_MASK_AREAS must be >= 0, got {list(c.MIN_MASK_AREAS)}.")
    _check_inference_keys(c)
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        raise ValueError(
            f"TEST.DETECTIONS_PER_IMAGE must be >= 1, got {cfg.TEST.DETECTIONS_PER_IMAGE}."
        )
    if c.HEAD_CHANNELS % 32 or c.MASK_FEATURE_CHANNELS % 32 or c.MASK_KERNEL_CHANNELS % 32:
        raise ValueError(
            "MODEL.SOLO.HEAD_CHANNELS, MASK_FEATURE_CHANNELS and MASK_KERNEL_CHANNELS must be "
            "multiples of 32 (GroupNorm with 32 groups)."
        )


def _check_inference_keys(c):
    """Thresholds are probabilities in [0, 1); candidate counts are positive."""
    for key in ("SCORE_THRESH", "MASK_THRESH", "UPDATE_THRESH"):
        if not 0 <= c[key] < 1:
            raise ValueError(f"MODEL.SOLO.{key} must be in [0, 1), got {c[key]}.")
    if c.NMS_PRE < 1:
        raise ValueError(f"MODEL.SOLO.NMS_PRE must be >= 1, got {c.NMS_PRE}.")


#: Detectron2's nodes of other architectures (R-CNN, RetinaNet, keypoints), which SOLO never
#: reads: a value changed from Detectron2's default would be silently ignored.
OTHER_ARCHITECTURES_NODES = (
    "ANCHOR_GENERATOR",
    "PROPOSAL_GENERATOR",
    "RPN",
    "ROI_HEADS",
    "ROI_BOX_HEAD",
    "ROI_BOX_CASCADE_HEAD",
    "ROI_MASK_HEAD",
    "ROI_KEYPOINT_HEAD",
    "RETINANET",
)
#: What SOLO reads instead, by key name (the same names recur in several nodes).
SOLO_COUNTERPARTS = {
    "NUM_CLASSES": "MODEL.SOLO.NUM_CLASSES",
    "SCORE_THRESH_TEST": "MODEL.SOLO.SCORE_THRESH (UPDATE_THRESH after Matrix NMS)",
    "NMS_THRESH_TEST": "MODEL.SOLO.NMS_TYPE, MATRIX_NMS_SIGMA or MASK_NMS_IOU_THRESH",
    "TOPK_CANDIDATES_TEST": "MODEL.SOLO.NMS_PRE",
    "IN_FEATURES": "MODEL.SOLO.IN_FEATURES",
    "FOCAL_LOSS_ALPHA": "MODEL.SOLO.FOCAL_ALPHA",
    "FOCAL_LOSS_GAMMA": "MODEL.SOLO.FOCAL_GAMMA",
    "PRIOR_PROB": "MODEL.SOLO.PRIOR_PROB",
}


def check_unread_detectron2_keys(cfg) -> None:
    """Refuse Detectron2 keys that a SOLO model would silently ignore.

    ``MODEL.KEYPOINT_ON`` True (SOLO predicts no keypoints), ``MODEL.MASK_ON`` False (SOLO
    predicts masks, always), ``MODEL.LOAD_PROPOSALS`` True (the data loader would load proposal
    files the model never reads), and any key of the R-CNN / RetinaNet nodes
    (:data:`OTHER_ARCHITECTURES_NODES`) changed from Detectron2's default, e.g.
    ``MODEL.ROI_HEADS.NUM_CLASSES`` set where SOLO reads ``MODEL.SOLO.NUM_CLASSES``.

    Raises:
        ValueError: naming every such key, its value and SOLO's counterpart.
    """
    problems = []
    if cfg.MODEL.KEYPOINT_ON:
        problems.append("MODEL.KEYPOINT_ON=True (SOLO predicts no keypoints; set it False)")
    if not cfg.MODEL.MASK_ON:
        problems.append("MODEL.MASK_ON=False (SOLO always segments masks; set it True)")
    if cfg.MODEL.LOAD_PROPOSALS:
        problems.append("MODEL.LOAD_PROPOSALS=True (SOLO uses no proposals; set it False)")
    defaults = get_detectron2_cfg().MODEL
    for node in OTHER_ARCHITECTURES_NODES:
        if node not in cfg.MODEL or node not in defaults:
            continue
        for key, value in _leaves(cfg.MODEL[node]):
            if _normalised(value) != _normalised(_lookup(defaults[node], key)):
                leaf = key.rsplit(".", 1)[-1]
                instead = SOLO_COUNTERPARTS.get(leaf, "no SOLO counterpart; remove it")
                problems.append(f"MODEL.{node}.{key}={value!r} (SOLO reads {instead})")
    if problems:
        raise ValueError(
            f"{len(problems)} Detectron2 key(s) that SOLO would ignore: "
            + "; ".join(problems)
            + ". (A _BASE_ of an R-CNN or RetinaNet config sets many: base SOLO configs on "
            "configs/*/Base-*.yaml.)"
        )


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _lookup(node, dotted_key):
    for part in dotted_key.split("."):
        if not isinstance(node, CN) or part not in node:
            return None
        node = node[part]
    return node


def _normalised(value):
    if isinstance(value, (list, tuple)):
        return tuple(_normalised(v) for v in value)
    return value
