"""Convert published SOLO / SOLOv2 weights into this project's Detectron2 parameter names.

Five sources (``SOURCES``):

* ``official``: WXinlong/SOLO model-zoo checkpoints (mmdetection v1, ``{"state_dict", "meta"}``):
  ``backbone.*`` (torchvision-style ResNet / ResNeXt, optional DCN), ``neck.*`` (FPN),
  ``bbox_head.*`` (SOLO, Decoupled SOLO (light), SOLOv2 (light) heads) and, for SOLOv2,
  ``mask_feat_head.*``.
* ``adelaidet``: aim-uofa/AdelaiDet SOLOv2 checkpoints (Detectron2, ``{"model"}``): the backbone
  already has our names, ``ins_head.*`` / ``mask_head.*`` are plain ``nn.Sequential`` towers.
* ``mmdet``: open-mmlab/mmdetection 2.x / 3.x SOLO-family checkpoints (``{"state_dict", "meta"}``):
  same ``backbone.*`` / ``neck.*`` as the official ones, the whole head under ``mask_head.*``
  (``SOLOHead``, ``DecoupledSOLOHead``, ``DecoupledSOLOLightHead``, ``SOLOV2Head`` with its
  ``mask_feature_head``), mmcv ``ConvModule`` towers (``conv``, ``gn``, DCN ``conv_offset``).
* ``torchvision``: ImageNet ResNet / ResNeXt state dicts (also the torchvision-named
  ``open-mmlab://resnext101_64x4d``) and MobileNetV3-Large (``features.*`` kept for
  :class:`solo.modeling.bottom_up.MobileNetV3`) -> a Detectron2 ``.pkl`` for ``MODEL.WEIGHTS``.
* ``solo``: this project's own models saved by other code than Detectron2's checkpointer
  (``torch.save`` of a DDP / ``torch.compile`` / Lightning-wrapped model, EMA copies): names are
  kept, the wrappers removed, the result checked and written as a plain Detectron2 checkpoint.

A conversion is: find the weights in the file's wrappers (:func:`unwrap_state_dict`:
``state_dict`` / ``model`` nesting, EMA copies, ``module.`` / ``model.`` / ``_orig_mod.``
prefixes), rename every key with a per-source table of regex rules (unknown keys are an error,
never silently dropped, and the message says which layout the keys look like), fold the source's
input normalisation into the stem conv when the target config normalises differently, and check
the result key by key and shape by shape against the model built from the target config.
"""

import collections
import logging
import numpy as np
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union
import torch

logger = logging.getLogger(__name__)

SOURCES = ("official", "adelaidet", "mmdet", "torchvision", "solo")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, or whose conversion does not fit the model."""


class UnknownKeyError(ConversionError):
    """A key that no renaming rule of the source knows."""


# ------------------------------------------------------------------------------------------------
# Input conventions: what the source's first conv expects to see.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputConvention:
    """Channel order and per-channel normalisation ``(pixel - mean) / std`` of network inputs."""

    format: str
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]


#: torchvision ImageNet models and the official SOLO models (mmdet ``img_norm_cfg``, to_rgb).
RGB_IMAGENET = InputConvention("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
#: Detectron2 defaults, used by AdelaiDet with the MSRA (caffe-style) ImageNet ResNets.
BGR_MSRA = InputConvention("BGR", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0))


def input_convention_from_cfg(cfg) -> InputConvention:
    return InputConvention(
        cfg.INPUT.FORMAT, tuple(cfg.MODEL.PIXEL_MEAN), tuple(cfg.MODEL.PIXEL_STD)
    )


def fold_input_normalization(
    weight: torch.Tensor, src: InputConvention, dst: InputConvention
) -> torch.Tensor:
    """Stem conv weights that see ``dst``-normalised inputs as the source saw ``src`` ones.

    Per source channel k read from target channel c: ``x_src[k] = x_dst[c] * std_dst[c] /
    std_src[k]`` provided the means agree, so the fold is a per-input-channel scale (and a channel
    permutation for RGB <-> BGR). A mean difference would need a bias, which the bias-free stem
    conv cannot take exactly at zero-padded borders, so it is refused.
    """
    if src == dst:
        return weight
    for conv in (src, dst):
        if (
            conv.format not in ("RGB", "BGR")
            or len(conv.pixel_mean) != 3
            or len(conv.pixel_std) != 3
        ):
            raise ConversionError(
                f"Cannot fold input normalisation {conv}: need INPUT.FORMAT RGB or BGR and "
                "3-channel MODEL.PIXEL_MEAN / MODEL.PIXEL_STD."
            )
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ConversionError(
            f"Stem conv weight has shape {tuple(weight.shape)}, expected (C, 3, k, k)."
        )
    perm = [0, 1, 2] if src.format == dst.format else [2, 1, 0]  # source channel k <- dst perm[k]
    for k, c in enumerate(perm):
        if abs(src.pixel_mean[k] - dst.pixel_mean[c]) > 1e-3:
            raise ConversionError(
                f"The source expects {src.format} inputs with PIXEL_MEAN {list(src.pixel_mean)}; "
                f"the target config has {dst.format} with PIXEL_MEAN {list(dst.pixel_mean)}. Means "
                "must agree (in channel order); only the std and channel order can be folded in."
            )
    folded = torch.empty_like(weight)
    for k, c in enumerate(perm):
        folded[:, c] = weight[:, k] * (dst.pixel_std[c] / src.pixel_std[k])
    return folded


# ------------------------------------------------------------------------------------------------
# Renaming rules.
# ------------------------------------------------------------------------------------------------

#: A rule: full-match regex -> new name (``re`` template), ``None`` (drop the key) or a callable
#: of the match returning the new name.
Rule = Tuple[str, Union[None, str, Callable[["re.Match"], str]]]

_BN = r"(?P<p>weight|bias|running_mean|running_var)"
_WB = r"(?P<w>weight|bias)"
# Suffix of an mmdet ConvModule: conv (plain or DCN pack, current or pre-v2 offset naming) + GN.
_CONV_MODULE = (
    r"(?P<sfx>conv\.(?:weight|bias)|(?:conv\.)?conv_offset\.(?:weight|bias)|gn\.(?:weight|bias))"
)


def _conv_module_suffix(sfx: str) -> str:
    """mmdet ConvModule parameter suffix -> our ConvGNReLU suffix (``gn`` is ``norm``; DCN packs
    saved before mmdet v1.0 name their offset conv ``conv_offset`` next to ``conv``)."""
    if sfx.startswith("gn."):
        return "norm." + sfx[3:]
    if sfx.startswith("conv_offset."):
        return "conv." + sfx
    return sfx


def _stage(m) -> str:
    return f"res{int(m['layer']) + 1}.{m['block']}"


def resnet_rules(src: str, dst: str) -> List[Rule]:
    """torchvision / mmdet ResNet(-Xt) names under ``src`` -> Detectron2 ResNet names under ``dst``.

    ``layer{1-4}`` are ``res{2-5}``, ``bn{i}`` is ``conv{i}.norm``, ``downsample.{0,1}`` is
    ``shortcut`` (+ ``.norm``), and a DCN block's offset conv ``conv2.conv_offset`` (mmdet >= 1.0)
    or ``conv2_offset`` (older) is Detectron2's ``conv2_offset``.
    """
    s, block = re.escape(src), rf"{re.escape(src)}layer(?P<layer>[1-4])\.(?P<block>\d+)\."
    return [
        (rf"{s}conv1\.weight", f"{dst}stem.conv1.weight"),
        (rf"{s}bn1\.{_BN}", lambda m: f"{dst}stem.conv1.norm.{m['p']}"),
        (rf"{block}conv(?P<i>[1-3])\.weight", lambda m: f"{dst}{_stage(m)}.conv{m['i']}.weight"),
        (
            rf"{block}bn(?P<i>[1-3])\.{_BN}",
            lambda m: f"{dst}{_stage(m)}.conv{m['i']}.norm.{m['p']}",
        ),
        (
            rf"{block}conv2(?:\.conv_offset|_offset)\.{_WB}",
            lambda m: f"{dst}{_stage(m)}.conv2_offset.{m['w']}",
        ),
        (rf"{block}downsample\.0\.weight", lambda m: f"{dst}{_stage(m)}.shortcut.weight"),
        (rf"{block}downsample\.1\.{_BN}", lambda m: f"{dst}{_stage(m)}.shortcut.norm.{m['p']}"),
    ]


# BatchNorm's step counter has no counterpart in FrozenBN (nor any use at inference).
_COMMON_RULES: List[Rule] = [(r".*\.num_batches_tracked", None)]

# mmdet FPN (start_level=0, inputs C2..C5): lateral_convs.i / fpn_convs.i are level i + 2.
_FPN_RULES: List[Rule] = [
    (
        rf"neck\.lateral_convs\.(?P<i>[0-3])\.conv\.{_WB}",
        lambda m: f"backbone.fpn_lateral{int(m['i']) + 2}.{m['w']}",
    ),
    (
        rf"neck\.fpn_convs\.(?P<i>[0-3])\.conv\.{_WB}",
        lambda m: f"backbone.fpn_output{int(m['i']) + 2}.{m['w']}",
    ),
]

#: Official head towers (lists of ConvModule) -> our towers (Sequential of ConvGNReLU).
OFFICIAL_TOWERS = {
    "cate_convs": "cate_tower",
    "ins_convs": "mask_tower",  # SOLOHead, DecoupledSOLOLightHead
    "ins_convs_x": "mask_tower_x",  # DecoupledSOLOHead
    "ins_convs_y": "mask_tower_y",
    "kernel_convs": "kernel_tower",  # SOLOv2Head, SOLOv2LightHead
}
#: Official per-level mask prediction convs -> ours.
OFFICIAL_LEVEL_PREDS = {
    "solo_ins_list": "mask_preds",
    "dsolo_ins_list_x": "mask_preds_x",
    "dsolo_ins_list_y": "mask_preds_y",
}
#: Official single prediction convs -> ours. The category conv has num_classes - 1 = 80 outputs,
#: channel c = mmdet label c + 1 = the c-th sorted COCO category = Detectron2's contiguous id c,
#: so no channel permutation is needed.
OFFICIAL_PREDS = {"solo_cate": "cate_pred", "dsolo_cate": "cate_pred", "solo_kernel": "kernel_pred"}


def _alternation(names) -> str:
    return "|".join(sorted(map(re.escape, names), key=len, reverse=True))


_OFFICIAL_HEAD_RULES: List[Rule] = [
    (
        rf"bbox_head\.(?P<t>{_alternation(OFFICIAL_TOWERS)})\.(?P<i>\d+)\.{_CONV_MODULE}",
        lambda m: f"head.{OFFICIAL_TOWERS[m['t']]}.{m['i']}.{_conv_module_suffix(m['sfx'])}",
    ),
    (
        rf"bbox_head\.(?P<t>{_alternation(OFFICIAL_LEVEL_PREDS)})\.(?P<l>\d+)\.{_WB}",
        lambda m: f"head.{OFFICIAL_LEVEL_PREDS[m['t']]}.{m['l']}.{m['w']}",
    ),
    (
        rf"bbox_head\.(?P<t>{_alternation(OFFICIAL_PREDS)})\.{_WB}",
        lambda m: f"head.{OFFICIAL_PREDS[m['t']]}.{m['w']}",
    ),
    # MaskFeatHead: level l is Sequential(conv0, upsample0, conv1, upsample1, ...) (level 0: conv0
    # only); ours is the same Sequential with integer names, so conv j sits at index 2 j.
    (
        rf"mask_feat_head\.convs_all_levels\.(?P<l>\d+)\.conv(?P<j>\d+)\.{_CONV_MODULE}",
        lambda m: f"head.mask_features.levels.{m['l']}.{2 * int(m['j'])}."
        + _conv_module_suffix(m["sfx"]),
    ),
    (
        rf"mask_feat_head\.conv_pred\.0\.{_CONV_MODULE}",
        lambda m: f"head.mask_features.pred.{_conv_module_suffix(m['sfx'])}",
    ),
]


#: mmdetection 2.x / 3.x heads (``mmdet/models/dense_heads/solo_head.py``, ``solov2_head.py``),
#: all under ``mask_head.``: ModuleLists of ConvModule towers -> ours.
MMDET_TOWERS = {
    "cls_convs": "cate_tower",
    "mask_convs": "mask_tower",  # SOLOHead, DecoupledSOLOLightHead
    "mask_convs_x": "mask_tower_x",  # DecoupledSOLOHead
    "mask_convs_y": "mask_tower_y",
    "kernel_convs": "kernel_tower",  # SOLOV2Head
}
MMDET_LEVEL_PREDS = {
    "conv_mask_list": "mask_preds",
    "conv_mask_list_x": "mask_preds_x",
    "conv_mask_list_y": "mask_preds_y",
}
#: ``conv_cls`` has num_classes = 80 outputs; mmdet label c is the c-th class of
#: ``CocoDataset.CLASSES`` = the c-th sorted COCO category = Detectron2's contiguous id c.
MMDET_PREDS = {"conv_cls": "cate_pred", "conv_kernel": "kernel_pred"}

_MMDET_HEAD_RULES: List[Rule] = [
    (
        rf"mask_head\.(?P<t>{_alternation(MMDET_TOWERS)})\.(?P<i>\d+)\.{_CONV_MODULE}",
        lambda m: f"head.{MMDET_TOWERS[m['t']]}.{m['i']}.{_conv_module_suffix(m['sfx'])}",
    ),
    (
        rf"mask_head\.(?P<t>{_alternation(MMDET_LEVEL_PREDS)})\.(?P<l>\d+)\.{_WB}",
        lambda m: f"head.{MMDET_LEVEL_PREDS[m['t']]}.{m['l']}.{m['w']}",
    ),
    (
        rf"mask_head\.(?P<t>{_alternation(MMDET_PREDS)})\.{_WB}",
        lambda m: f"head.{MMDET_PREDS[m['t']]}.{m['w']}",
    ),
    # MaskFeatModule: the official MaskFeatHead's Sequentials (conv j at index 2 j), but inside
    # the head, and conv_pred is a ConvModule itself rather than Sequential(ConvModule).
    (
        r"mask_head\.mask_feature_head\.convs_all_levels\.(?P<l>\d+)\.conv(?P<j>\d+)\."
        + _CONV_MODULE,
        lambda m: f"head.mask_features.levels.{m['l']}.{2 * int(m['j'])}."
        + _conv_module_suffix(m["sfx"]),
    ),
    (
        rf"mask_head\.mask_feature_head\.conv_pred\.{_CONV_MODULE}",
        lambda m: f"head.mask_features.pred.{_conv_module_suffix(m['sfx'])}",
    ),
]


def _sequential_unit(k: str, w: str, key: str) -> str:
    """AdelaiDet towers are flat Sequentials of (Conv2d, GroupNorm, ReLU): index 3 i is conv i,
    3 i + 1 its GN. A parameter anywhere else means the checkpoint was not trained with
    ``MODEL.SOLOV2.NORM "GN"``, which our heads always use."""
    unit, part = divmod(int(k), 3)
    if part == 2:
        raise ConversionError(
            f"{key}: a parameter at a ReLU position; only AdelaiDet models with "
            "MODEL.SOLOV2.NORM 'GN' (the default) can be converted."
        )
    return f"{unit}.{'conv' if part == 0 else 'norm'}.{w}"


_ADELAIDET_RULES: List[Rule] = [
    # Same Detectron2 ResNet + FPN (LastLevelMaxPool P6) as ours.
    (
        r"backbone\.(?P<rest>bottom_up\..+|fpn_(?:lateral|output)[2-5]\.(?:weight|bias))",
        r"backbone.\g<rest>",
    ),
    (
        rf"ins_head\.(?P<t>cate|kernel)_tower\.(?P<k>\d+)\.{_WB}",
        lambda m: f"head.{m['t']}_tower.{_sequential_unit(m['k'], m['w'], m.string)}",
    ),
    (rf"ins_head\.(?P<t>cate_pred|kernel_pred)\.{_WB}", r"head.\g<t>.\g<w>"),
    # SOLOv2MaskHead: convs_all_levels.l.conv{j} = Sequential(Conv2d, GroupNorm, ReLU).
    (
        rf"mask_head\.convs_all_levels\.(?P<l>\d+)\.conv(?P<j>\d+)\.(?P<k>[01])\.{_WB}",
        lambda m: f"head.mask_features.levels.{m['l']}.{2 * int(m['j'])}."
        f"{'conv' if m['k'] == '0' else 'norm'}.{m['w']}",
    ),
    (
        rf"mask_head\.conv_pred\.(?P<k>[01])\.{_WB}",
        lambda m: f"head.mask_features.pred.{'conv' if m['k'] == '0' else 'norm'}.{m['w']}",
    ),
]

RULES: Dict[str, List[Rule]] = {
    "official": _COMMON_RULES
    + resnet_rules("backbone.", "backbone.bottom_up.")
    + _FPN_RULES
    + _OFFICIAL_HEAD_RULES,
    "adelaidet": _COMMON_RULES + _ADELAIDET_RULES,
    "mmdet": _COMMON_RULES
    + resnet_rules("backbone.", "backbone.bottom_up.")
    + _FPN_RULES
    + _MMDET_HEAD_RULES,
    # ImageNet backbones keep Detectron2's prefix-free ImageNet names (``res2.0.conv1.weight``);
    # the checkpointer's matching heuristics put them under ``backbone.bottom_up``.
    # MobileNetV3 keeps torchvision's names (``features.N.*``); its classifier is dropped.
    "torchvision": _COMMON_RULES
    + resnet_rules("", "")
    + [(r"fc\.(?:weight|bias)", None)]
    + [(r"features\.\d+\..+", r"\g<0>"), (r"classifier\.\d+\.(?:weight|bias)", None)],
    # Our own names, kept (BatchNorm counters included: a BN backbone of ours has them).
    "solo": [(r"(?:backbone|head)\..+", r"\g<0>")],
}

#: Where the stem conv ends up, per source (to fold input normalisation into it): the first of
#: the names that the converted checkpoint has (torchvision: ResNet, then MobileNetV3).
STEM_KEY = {
    "official": ("backbone.bottom_up.stem.conv1.weight",),
    "adelaidet": ("backbone.bottom_up.stem.conv1.weight",),
    "mmdet": ("backbone.bottom_up.stem.conv1.weight",),
    "torchvision": ("stem.conv1.weight", "features.0.0.weight"),
    "solo": ("backbone.bottom_up.stem.conv1.weight",),
}
#: mmdet's SOLO configs normalise like the official ones: RGB (``to_rgb`` / ``bgr_to_rgb``),
#: ImageNet mean and std.
INPUT_CONVENTION = {
    "official": RGB_IMAGENET,
    "adelaidet": BGR_MSRA,
    "mmdet": RGB_IMAGENET,
    "torchvision": RGB_IMAGENET,
    "solo": None,  # the target config's own (no folding)
}
#: Whether the source's bottleneck ResNets stride in the 1x1 conv (MSRA / caffe) or the 3x3 one
#: (mmdet: ``style='pytorch'`` in every SOLO config).
#: ``None``: the target config decides (our own checkpoints).
STRIDE_IN_1X1 = {
    "official": False,
    "adelaidet": True,
    "mmdet": False,
    "torchvision": False,
    "solo": None,
}
AUTHORS = {
    "official": "WXinlong/SOLO",
    "adelaidet": "aim-uofa/AdelaiDet",
    "mmdet": "open-mmlab/mmdetection",
    "torchvision": "torchvision",
    "solo": "SOLO for Detectron2",
}

_COMPILED: Dict[str, List[Tuple["re.Pattern", object]]] = {
    src: [(re.compile(p), r) for p, r in rules] for src, rules in RULES.items()
}


def _check_source(source: str):
    if source not in SOURCES:
        raise ConversionError(f"Unknown source {source!r}; expected one of {SOURCES}.")


def rename_key(key: str, source: str) -> Optional[str]:
    """Our name for the source key ``key``; ``None`` if the key is dropped on purpose.

    Raises :class:`ConversionError` if no rule knows the key.
    """
    _check_source(source)
    for pattern, target in _COMPILED[source]:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        if target is None:
            return None
        return m.expand(target) if isinstance(target, str) else target(m)
    raise UnknownKeyError(f"Unrecognised {source} key {key!r}.")


def _listing(title: str, items: Sequence[str], limit: int = 40) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


#: What each source's checkpoints are, for messages.
DESCRIPTIONS = {
    "official": "WXinlong/SOLO (mmdetection v1)",
    "adelaidet": "AdelaiDet (Detectron2) SOLOv2",
    "mmdet": "mmdetection 2.x/3.x SOLO-family",
    "torchvision": "torchvision ImageNet (ResNet, MobileNetV3)",
    "solo": "SOLO for Detectron2 (this project)",
}


def _known_keys(keys: Sequence[str], source: str) -> int:
    count = 0
    for key in keys:
        try:
            rename_key(key, source)
            count += 1
        except ConversionError:
            pass
    return count


def guess_layout(keys: Sequence[str]) -> str:
    """What state-dict keys look like, for messages: "keys look like ... (fix); first keys: ..."."""
    keys = list(keys)
    first = f"first keys: {keys[:5]}"
    if any(k.startswith("head.") for k in keys) and any(
        k.startswith("backbone.bottom_up.") for k in keys
    ):
        # MODEL.WEIGHTS reads the file's "model" entry (or the bare dict) and strips only
        # "module.": other wrappers would leave every weight unloaded.
        return (
            "keys look like a checkpoint of this project (Detectron2 SOLO names): no conversion "
            "needed, use it with MODEL.WEIGHTS if it is a plain Detectron2 checkpoint; if it was "
            "saved with other wrappers (a 'state_dict' entry, 'model.' or '_orig_mod.' prefixes, "
            f"an EMA copy), --source solo removes them; {first}"
        )
    foreign = [src for src in SOURCES if src != "solo"]  # "solo" keeps any backbone/head key
    counts = {src: _known_keys(keys, src) for src in foreign}
    best = max(foreign, key=counts.get)  # ties: the first of SOURCES
    if keys and counts[best] == len(keys):
        return f"keys look like a {DESCRIPTIONS[best]} checkpoint (--source {best}); {first}"
    if counts[best] * 2 > len(keys):
        return (
            f"keys look mostly like a {DESCRIPTIONS[best]} checkpoint ({counts[best]} of "
            f"{len(keys)} keys known to --source {best}); {first}"
        )
    return f"keys are in no known layout; {first}"


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str, origin: str = "the checkpoint"
) -> Dict[str, torch.Tensor]:
    """Rename every key of ``state_dict`` (already unwrapped) to our names; values are untouched.

    Fails, listing them, on keys no rule knows and on two keys that land on the same name.
    """
    _check_source(source)
    out: Dict[str, torch.Tensor] = {}
    came_from: Dict[str, str] = {}
    unknown, clashes = [], []
    for key, value in state_dict.items():
        try:
            new = rename_key(key, source)
        except UnknownKeyError:
            unknown.append(key)
            continue
        except ConversionError as e:  # a known key in an unsupported variant: say why
            unknown.append(str(e))
            continue
        if new is None:
            continue
        if new in out:
            clashes.append(f"{came_from[new]} and {key} -> {new}")
            continue
        out[new], came_from[new] = value, key
    problems = []
    if unknown:
        problems.append(_listing(f"keys not in the known {source} layout", unknown))
        problems.append(f"The {guess_layout(list(state_dict))}.")
    if clashes:
        problems.append(_listing("keys converted to the same name", clashes))
    if problems:
        raise ConversionError(f"Cannot convert {origin}:\n" + "\n".join(problems))
    return out


# ------------------------------------------------------------------------------------------------
# Reading and writing checkpoints.
# ------------------------------------------------------------------------------------------------


#: Packages whose pickled objects training checkpoints of mmdetection 3.x carry next to the
#: weights (mmengine's ``message_hub`` HistoryBuffers, ...), read as placeholders.
PLACEHOLDER_PACKAGES = ("mmengine", "mmcv", "mmdet")


class PickledObjectPlaceholder:
    """Stands in for an object whose class (``qualname``) is not loaded: it keeps the pickled
    arguments and state as plain data and runs none of the original class's code."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for {self.qualname}>"


def _is_placeholder(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, PickledObjectPlaceholder)


def _numpy_globals() -> Dict[str, object]:
    """numpy's array / scalar / dtype constructors under their pickled names (numpy 1 and 2):
    they build arrays from bytes and call nothing else."""
    reconstruct, scalar = np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0]
    out = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for package in ("numpy.core", "numpy._core"):
        out[f"{package}.multiarray._reconstruct"] = reconstruct
        out[f"{package}.multiarray.scalar"] = scalar
    for code in "?bBhHiIlLqQefdgFDGSUVOMm":  # dtype instances are of these classes
        cls = type(np.dtype(code))
        out[f"{cls.__module__}.{cls.__name__}"] = cls
    return out


def _restricted_globals(unsafe: Sequence[str]):
    """``torch.serialization.safe_globals`` entries for the globals ``unsafe`` that
    ``weights_only`` loading rejects: a placeholder class per mmengine / mmcv / mmdet name, numpy's
    constructors; ``None`` if any other global is needed."""
    numpy_globals, allowed = _numpy_globals(), []
    for name in unsafe:
        if name.split(".")[0] in PLACEHOLDER_PACKAGES:
            cls = type(name.rsplit(".", 1)[-1], (PickledObjectPlaceholder,), {"qualname": name})
            allowed.append((cls, name))
        elif name not in numpy_globals:
            return None
    if any(name in numpy_globals for name in unsafe):
        # All of them: a dtype is rebuilt as numpy.dtype but is an instance of its DType class.
        allowed += [(obj, name) for name, obj in numpy_globals.items()]
    return allowed


def _unpickling_reason(error: Exception) -> str:
    """The line of torch's ``weights_only`` message that names the rejected object."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("WeightsUnpickler error"):
            return lines[i + 1]
    return lines[0] if lines else type(error).__name__


def load_checkpoint_file(path: str, trust_pickle: bool = False):
    """``torch.load`` on CPU; by default only tensors and plain containers (``weights_only``).

    Zip-format files (``torch.save``'s default since torch 1.6) that also hold pickled objects
    of mmengine / mmcv / mmdet classes (mmdetection 3.x training checkpoints: ``message_hub``)
    load with those objects replaced by :class:`PickledObjectPlaceholder`: the classes are
    neither imported nor run, so mmengine need not be installed and the file cannot execute code
    through them (the rest of the file is still read by torch's ``weights_only`` unpickler).
    ``trust_pickle`` allows arbitrary pickled objects: only for files from a trusted source.
    ``.pkl`` files are plain pickles of numpy arrays (Detectron2's model-zoo format, which
    ``torch.load`` cannot read): read with an unpickler that builds numpy arrays and nothing else.

    Raises :class:`ConversionError` for a missing or unreadable file, or other pickled objects.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file.")
    if path.endswith(".pkl"):
        return _load_pickle(path, trust_pickle)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ConversionError(f"{path}: cannot be read by torch.load: {e}") from e
        first_error = e
    except Exception as e:  # zip/pickle format errors: not a torch checkpoint at all
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e}).") from e
    try:  # statically lists the pickle's globals; zip format only (mmengine writes zip files)
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError):
        unsafe = []
    allowed = _restricted_globals(unsafe) if unsafe else None
    if allowed is not None:
        try:
            with torch.serialization.safe_globals(allowed):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first_error = e
        else:
            placeholders = [n for c, n in allowed if _is_placeholder(c)]
            logger.info("%s: read objects of %s as placeholders.", path, ", ".join(placeholders))
            return loaded
    found = f" (pickled classes/functions: {', '.join(unsafe)})" if unsafe else ""
    raise ConversionError(
        f"{path}: holds objects other than tensors and plain containers{found}, which are not "
        f"loaded by default ({_unpickling_reason(first_error)}). If the file comes from a "
        "source you trust, pass --trust-pickle (trust_pickle=True)."
    ) from first_error


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    allowed = {**_numpy_globals(), "collections.OrderedDict": collections.OrderedDict}

    def find_class(self, module, name):
        if f"{module}.{name}" not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return self.allowed[f"{module}.{name}"]


def _load_pickle(path: str, trust_pickle: bool):
    try:
        with open(path, "rb") as f:
            # latin1: Detectron2's model zoo has Python 2 pickles of numpy arrays.
            unpickler = pickle.Unpickler if trust_pickle else _NumpyUnpickler
            return unpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if trust_pickle or not str(e):
            raise ConversionError(f"{path}: not a readable pickle file ({e}).") from e
        raise ConversionError(
            f"{path}: a .pkl file holding objects other than numpy arrays and plain containers "
            f"(pickled class/function: {e}), which are not loaded by default. If the file comes "
            "from a source you trust, pass --trust-pickle (trust_pickle=True)."
        ) from e
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise ConversionError(f"{path}: not a readable pickle file ({e}).") from e


#: Entries holding a separate averaged (EMA) copy of the weights next to the raw ones; the copy
#: is used: timm (``state_dict_ema``), d2go (``ema_state``), ``model_ema``. mmengine's
#: ``ema_state_dict`` is not one of them: its EMAHook swaps the averaged weights into
#: ``state_dict`` before saving, leaving the raw ones in ``ema_state_dict``.
EMA_ENTRIES = ("state_dict_ema", "ema_state", "model_ema")
#: Entries holding the weights: mmcv / mmengine / Lightning ``state_dict``, Detectron2 ``model``.
WEIGHT_ENTRIES = ("state_dict", "model")
#: Prefixes that wrappers put on every key: DDP / DataParallel, Lightning-style ``self.model``,
#: ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def _is_weights(value) -> bool:
    return torch.is_tensor(value) or isinstance(value, np.ndarray)


def unwrap_state_dict(loaded, origin: str = "the checkpoint") -> Dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint, as ``{name: tensor}``, in any source's wrappers.

    Descends into ``EMA_ENTRIES`` (preferred) and ``WEIGHT_ENTRIES`` until a mapping of tensors
    (or numpy arrays) is found, strips ``WRAPPER_PREFIXES`` shared by every key, and drops the
    ``ema_<name with _ for .>`` buffers of mmcv's EMA hooks (which swap the averaged weights into
    the model's own keys at the end of every epoch, when they save). Each step is logged.

    Raises :class:`ConversionError` naming the layout found when there are no weights.
    """
    node, path = loaded, []
    while isinstance(node, Mapping):
        entry = next((e for e in EMA_ENTRIES if isinstance(node.get(e), Mapping)), None)
        entry = entry or next((e for e in WEIGHT_ENTRIES if isinstance(node.get(e), Mapping)), None)
        if entry is None:
            break
        if entry in EMA_ENTRIES:
            logger.info("%s: using the EMA copy of the weights, %r.", origin, entry)
        node, path = node[entry], path + [entry]
    where = "".join(f"[{p!r}]" for p in path) or "the file"
    if not isinstance(node, Mapping):
        raise ConversionError(f"{origin}: expected a dict in {where}, got {type(node).__name__}.")
    if not node:
        raise ConversionError(f"{origin}: the state dict in {where} is empty.")
    if not all(_is_weights(v) for v in node.values()):
        bad = [k for k, v in node.items() if not _is_weights(v)]
        if any(_is_weights(v) for v in node.values()):
            raise ConversionError(
                f"{origin}: entry {bad[0]!r} of {where} is a {type(node[bad[0]]).__name__}, "
                "not a tensor."
            )
        wanted = ", ".join(map(repr, EMA_ENTRIES + WEIGHT_ENTRIES))
        raise ConversionError(
            f"{origin}: no weights found in {where}: expected a state dict, bare or under one "
            f"of {wanted}; found the keys {sorted(map(str, node))[:10]}."
        )
    state = {str(k): torch.as_tensor(v) for k, v in node.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                logger.info("%s: removing the prefix %r of every key.", origin, prefix)
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    flat = {k.replace(".", "_") for k in state}
    ema_buffers = {k for k in state if k.startswith("ema_") and k[4:] in flat}
    if ema_buffers:
        logger.info(
            "%s: dropping %d ema_* buffers of mmcv's EMA hook (the weights hold the averages).",
            origin,
            len(ema_buffers),
        )
        state = {k: v for k, v in state.items() if k not in ema_buffers}
    return state


def save_checkpoint(path: str, model: Dict[str, torch.Tensor], author: str, **extra):
    """Write a Detectron2 checkpoint: ``.pkl`` = pickled numpy arrays (Detectron2 model-zoo
    format), anything else = ``torch.save``. Both load with ``MODEL.WEIGHTS``."""
    data = {"__author__": author, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".pkl"):
        data["model"] = {k: v.detach().cpu().numpy() for k, v in model.items()}
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        data["model"] = {k: v.detach().cpu().contiguous() for k, v in model.items()}
        torch.save(data, path)


# ------------------------------------------------------------------------------------------------
# Checking against the model.
# ------------------------------------------------------------------------------------------------


def model_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
    """Shapes of every parameter and persistent buffer of the model ``cfg`` builds (on CPU)."""
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against_model(
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, Tuple[int, ...]],
    prefix: str = "",
    optional: Optional[str] = None,
    origin: str = "the checkpoint",
):
    """Every converted key ``prefix + key`` must be a model key with the same shape, and every
    model key under ``prefix`` must be converted (except those matching ``optional``).

    Raises :class:`ConversionError` listing missing, unexpected and mismatched keys.
    """
    optional_re = re.compile(optional) if optional else None
    unexpected, mismatched = [], []
    for key, value in converted.items():
        name = prefix + key
        if name not in expected:
            unexpected.append(name)
        elif tuple(value.shape) != tuple(expected[name]):
            mismatched.append(
                f"{name}: converted {tuple(value.shape)}, model {tuple(expected[name])}"
            )
    have = {prefix + k for k in converted}
    missing = [
        k
        for k in expected
        if k.startswith(prefix) and k not in have and not (optional_re and optional_re.search(k))
    ]
    if missing or unexpected or mismatched:
        parts = [
            _listing(title, items)
            for title, items in (
                ("model keys missing from the conversion", missing),
                ("converted keys the model does not have", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise ConversionError(
            f"{origin} does not fit the model of the given config (wrong config for this "
            "checkpoint?):\n" + "\n".join(parts)
        )


def check_config(cfg, source: str):
    """Settings of the target config that must match how the source network was built."""
    if "resnet" not in cfg.MODEL.BACKBONE.NAME:
        return  # the ResNet keys below do not describe another bottom-up network
    r, wanted = cfg.MODEL.RESNETS, STRIDE_IN_1X1[source]
    # Shapes do not tell where a bottleneck strides, so a wrong setting would load silently.
    if wanted is not None and r.DEPTH >= 50 and bool(r.STRIDE_IN_1X1) != wanted:
        style = "MSRA/caffe-style (stride in the 1x1 conv)" if wanted else "pytorch-style"
        raise ConversionError(
            f"{source} ResNets are {style}: the target config needs "
            f"MODEL.RESNETS.STRIDE_IN_1X1 {wanted} (e.g. --opts MODEL.RESNETS.STRIDE_IN_1X1 "
            f"{wanted}). Shapes would match, outputs would not."
        )


def checkpoint_class_names(loaded) -> Optional[Tuple[str, ...]]:
    """Class names the checkpoint's meta data give, in label order, or ``None``: mmdetection
    v1 / 2.x ``meta["CLASSES"]``, mmdetection 3.x (mmengine) ``meta["dataset_meta"]["classes"]``."""
    meta = loaded.get("meta") if isinstance(loaded, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, str):  # a single-class dataset may store the bare name
        names = (names,)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return None
    return tuple(names)


def check_class_names(names: Sequence[str], cfg, origin: str = "the checkpoint"):
    """The checkpoint's class count must be the config's ``MODEL.SOLO.NUM_CLASSES``; names that
    differ from the test dataset's ``thing_classes`` (same count) are logged as a warning.

    Raises :class:`ConversionError` naming both counts.
    """
    from detectron2.data import MetadataCatalog

    num_classes = cfg.MODEL.SOLO.NUM_CLASSES
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    if len(names) != num_classes:
        raise ConversionError(
            f"{origin} was trained on {len(names)} classes ({shown}) but the config has "
            f"MODEL.SOLO.NUM_CLASSES {num_classes}: use a config for {len(names)} classes "
            f"(e.g. --opts MODEL.SOLO.NUM_CLASSES {len(names)} with a matching DATASETS.TEST)."
        )
    logger.info("%s: %d classes: %s.", origin, len(names), shown)
    if not cfg.DATASETS.TEST:
        return
    dataset = cfg.DATASETS.TEST[0]
    ours = MetadataCatalog.get(dataset).get("thing_classes", None)
    if ours is not None and len(ours) == len(names):
        differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, ours)) if a != b]
        if differ:
            logger.warning(
                "%s: %d class names differ from %s's thing_classes (label: checkpoint vs "
                "dataset): %s. Labels are converted by index; check the order.",
                origin,
                len(differ),
                dataset,
                "; ".join(differ[:5]) + ("; ..." if len(differ) > 5 else ""),
            )


# ------------------------------------------------------------------------------------------------
# Whole conversion.
# ------------------------------------------------------------------------------------------------


def convert_loaded(
    loaded, source: str, cfg=None, origin: str = "the checkpoint", model=None
) -> Dict[str, torch.Tensor]:
    """Convert an already loaded checkpoint (``torch.load`` output) of layout ``source``.

    With ``cfg``: checks the config against the source's conventions and the checkpoint's class
    names (if its meta data has them) against ``MODEL.SOLO.NUM_CLASSES``, folds the source's input
    normalisation into the stem conv, and checks the result against ``cfg``'s model (``model``,
    if given, saves building it). Values are not copied except the folded stem.
    """
    _check_source(source)
    converted = convert_state_dict(unwrap_state_dict(loaded, origin), source, origin)
    stem = next((k for k in STEM_KEY[source] if k in converted), None)
    if stem is None:
        names = " or ".join(repr(k) for k in STEM_KEY[source])
        raise ConversionError(f"{origin}: has no stem conv ({names} after renaming).")
    if cfg is None:
        return converted

    check_config(cfg, source)
    names = checkpoint_class_names(loaded)
    if names is not None and source != "torchvision":
        check_class_names(names, cfg, origin)
    dst_conv = input_convention_from_cfg(cfg)
    src_conv = INPUT_CONVENTION[source] or dst_conv
    if src_conv != dst_conv:
        logger.info("Folding input normalisation %s -> %s into %s.", src_conv, dst_conv, stem)
    converted[stem] = fold_input_normalization(converted[stem], src_conv, dst_conv)
    if model is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    else:
        expected = model_shapes(cfg)
    if source == "torchvision":
        # Only the bottom-up network comes from ImageNet; DCN offset convs start at zero by
        # design, and BatchNorm step counters (BN MobileNetV3) at zero.
        optional = r"\.conv2_offset\.|\.num_batches_tracked$"
        check_against_model(converted, expected, "backbone.bottom_up.", optional, origin)
    else:
        check_against_model(converted, expected, origin=origin)
    return converted


def convert_checkpoint(
    src: str, dst: str, source: str, cfg=None, trust_pickle: bool = False
) -> Dict[str, torch.Tensor]:
    """Read ``src`` (a ``source`` checkpoint), convert and check it, write ``dst``.

    ``cfg`` is required except for ``torchvision``, where it is optional
    (without it the ImageNet weights are renamed, but neither checked nor re-normalised).
    Returns the converted state dict.
    """
    _check_source(source)
    if cfg is None and source != "torchvision":
        raise ConversionError(f"--source {source} needs --config (the model to convert for).")
    if source == "torchvision" and not dst.endswith(".pkl"):
        raise ConversionError(
            f"{dst}: ImageNet backbones are written as Detectron2 .pkl files (their names rely "
            "on the checkpointer's matching heuristics, which it applies to .pkl files only)."
        )
    name = os.path.basename(src)
    converted = convert_loaded(load_checkpoint_file(src, trust_pickle), source, cfg, name)
    extra = {"matching_heuristics": True} if source == "torchvision" else {}
    save_checkpoint(dst, converted, f"{AUTHORS[source]} (converted from {name})", **extra)
    logger.info("Wrote %d tensors to %s.", len(converted), dst)
    return converted
