"""What the conversion knows about each codebase whose checkpoints it reads: one :class:`Source`
per codebase in :data:`KNOWN_SOURCES` (renaming rules, stem conv, input convention, ResNet style,
author), and the renaming rules they are built from.

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
"""

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from .errors import ConversionError

__all__ = [
    "BGR_MSRA",
    "KNOWN_SOURCES",
    "RGB_IMAGENET",
    "SOURCES",
    "InputConvention",
    "Rule",
    "Source",
    "get_source",
    "resnet_rules",
]


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


# ------------------------------------------------------------------------------------------------
# Renaming rules.
# ------------------------------------------------------------------------------------------------

#: What a rule makes of a matched key: a new name (``re`` template), ``None`` (drop the key) or a
#: callable of the match returning the new name.
Target = Union[None, str, Callable[["re.Match"], str]]
#: A rule: full-match regex -> :data:`Target`.
Rule = Tuple[str, Target]

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


# ------------------------------------------------------------------------------------------------
# The sources.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Everything the conversion needs to know about one codebase's checkpoints."""

    #: The ``--source`` value.
    name: str
    #: What its checkpoints are, for messages.
    description: str
    #: Written into the converted checkpoint's ``__author__``.
    author: str
    #: Renaming rules; the first whose regex matches the whole key decides.
    rules: Tuple[Rule, ...]
    #: Where the stem conv ends up after renaming (to fold input normalisation into it): the
    #: first of these names that the converted checkpoint has.
    stem_keys: Tuple[str, ...]
    #: What the source's stem conv expects to see; ``None``: the target config's own (no folding).
    input_convention: Optional[InputConvention]
    #: Whether the source's bottleneck ResNets stride in the 1x1 conv (MSRA / caffe) or the 3x3
    #: one; ``None``: the target config decides.
    stride_in_1x1: Optional[bool]
    #: Only a bottom-up network (ImageNet weights): the config is optional, class names in the
    #: meta data are not the model's, and the result is a prefix-free Detectron2 ``.pkl`` that the
    #: checkpointer's matching heuristics place under ``model_prefix``.
    backbone_only: bool = False
    #: Where in the model the converted keys belong when checked against it.
    model_prefix: str = ""
    #: Model keys (regex searched) under ``model_prefix`` that the checkpoint need not have.
    optional_model_keys: Optional[str] = None
    #: Whether a rule of this source knowing a key says anything about the layout (not so for
    #: ``solo``, which keeps any ``backbone.`` / ``head.`` key).
    recognisable: bool = True
    #: ``rules`` with compiled regexes.
    compiled_rules: Tuple[Tuple["re.Pattern", Target], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self):
        compiled = tuple((re.compile(pattern), target) for pattern, target in self.rules)
        object.__setattr__(self, "compiled_rules", compiled)


_D2_RESNET_STEM = ("backbone.bottom_up.stem.conv1.weight",)

#: Every source, by ``--source`` name.
KNOWN_SOURCES: Dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="official",
            description="WXinlong/SOLO (mmdetection v1)",
            author="WXinlong/SOLO",
            rules=tuple(
                _COMMON_RULES
                + resnet_rules("backbone.", "backbone.bottom_up.")
                + _FPN_RULES
                + _OFFICIAL_HEAD_RULES
            ),
            stem_keys=_D2_RESNET_STEM,
            input_convention=RGB_IMAGENET,
            stride_in_1x1=False,
        ),
        Source(
            name="adelaidet",
            description="AdelaiDet (Detectron2) SOLOv2",
            author="aim-uofa/AdelaiDet",
            rules=tuple(_COMMON_RULES + _ADELAIDET_RULES),
            stem_keys=_D2_RESNET_STEM,
            input_convention=BGR_MSRA,
            stride_in_1x1=True,
        ),
        Source(
            name="mmdet",
            description="mmdetection 2.x/3.x SOLO-family",
            author="open-mmlab/mmdetection",
            rules=tuple(
                _COMMON_RULES
                + resnet_rules("backbone.", "backbone.bottom_up.")
                + _FPN_RULES
                + _MMDET_HEAD_RULES
            ),
            stem_keys=_D2_RESNET_STEM,
            # mmdet's SOLO configs normalise like the official ones: RGB (``to_rgb`` /
            # ``bgr_to_rgb``), ImageNet mean and std; ResNets are ``style='pytorch'``.
            input_convention=RGB_IMAGENET,
            stride_in_1x1=False,
        ),
        Source(
            name="torchvision",
            description="torchvision ImageNet (ResNet, MobileNetV3)",
            author="torchvision",
            # ImageNet backbones keep Detectron2's prefix-free ImageNet names
            # (``res2.0.conv1.weight``); the checkpointer's matching heuristics put them under
            # ``backbone.bottom_up``. MobileNetV3 keeps torchvision's names (``features.N.*``);
            # the classifiers are dropped.
            rules=tuple(
                _COMMON_RULES
                + resnet_rules("", "")
                + [(r"fc\.(?:weight|bias)", None)]
                + [(r"features\.\d+\..+", r"\g<0>"), (r"classifier\.\d+\.(?:weight|bias)", None)]
            ),
            stem_keys=("stem.conv1.weight", "features.0.0.weight"),  # ResNet, MobileNetV3
            input_convention=RGB_IMAGENET,
            stride_in_1x1=False,
            backbone_only=True,
            model_prefix="backbone.bottom_up.",
            # DCN offset convs start at zero by design, BatchNorm step counters (BN MobileNetV3)
            # at zero.
            optional_model_keys=r"\.conv2_offset\.|\.num_batches_tracked$",
        ),
        Source(
            name="solo",
            description="SOLO for Detectron2 (this project)",
            author="SOLO for Detectron2",
            # Our own names, kept (BatchNorm counters included: a BN backbone of ours has them).
            rules=((r"(?:backbone|head)\..+", r"\g<0>"),),
            stem_keys=_D2_RESNET_STEM,
            input_convention=None,
            stride_in_1x1=None,
            recognisable=False,
        ),
    )
}
#: The ``--source`` names.
SOURCES = tuple(KNOWN_SOURCES)


def get_source(name: str) -> Source:
    """The :class:`Source` called ``name``; raises :class:`ConversionError` for unknown names."""
    if name not in KNOWN_SOURCES:
        raise ConversionError(f"Unknown source {name!r}; expected one of {SOURCES}.")
    return KNOWN_SOURCES[name]
