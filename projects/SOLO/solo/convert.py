"""Convert published SOLO / SOLOv2 weights into this project's Detectron2 parameter names.

Three sources (``SOURCES``):

* ``official``: WXinlong/SOLO model-zoo checkpoints (mmdetection v1, ``{"state_dict", "meta"}``):
  ``backbone.*`` (torchvision-style ResNet / ResNeXt, optional DCN), ``neck.*`` (FPN),
  ``bbox_head.*`` (SOLO, Decoupled SOLO (light), SOLOv2 (light) heads) and, for SOLOv2,
  ``mask_feat_head.*``.
* ``adelaidet``: aim-uofa/AdelaiDet SOLOv2 checkpoints (Detectron2, ``{"model"}``): the backbone
  already has our names, ``ins_head.*`` / ``mask_head.*`` are plain ``nn.Sequential`` towers.
* ``torchvision``: ImageNet ResNet / ResNeXt state dicts (also the torchvision-named
  ``open-mmlab://resnext101_64x4d``) -> a Detectron2 ``.pkl`` for ``MODEL.WEIGHTS``.

A conversion is: rename every key with a per-source table of regex rules (unknown keys are an
error, never silently dropped), fold the source's input normalisation into the stem conv when the
target config normalises differently, and check the result key by key and shape by shape against
the model built from the target config.
"""

import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCES = ("official", "adelaidet", "torchvision")


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
    # ImageNet backbones keep Detectron2's prefix-free ImageNet names (``res2.0.conv1.weight``);
    # the checkpointer's matching heuristics put them under ``backbone.bottom_up``.
    "torchvision": _COMMON_RULES + resnet_rules("", "") + [(r"fc\.(?:weight|bias)", None)],
}

#: Where the stem conv ends up, per source (to fold input normalisation into it).
STEM_KEY = {
    "official": "backbone.bottom_up.stem.conv1.weight",
    "adelaidet": "backbone.bottom_up.stem.conv1.weight",
    "torchvision": "stem.conv1.weight",
}
INPUT_CONVENTION = {"official": RGB_IMAGENET, "adelaidet": BGR_MSRA, "torchvision": RGB_IMAGENET}
#: Whether the source's bottleneck ResNets stride in the 1x1 conv (MSRA / caffe) or the 3x3 one.
STRIDE_IN_1X1 = {"official": False, "adelaidet": True, "torchvision": False}
AUTHORS = {
    "official": "WXinlong/SOLO",
    "adelaidet": "aim-uofa/AdelaiDet",
    "torchvision": "torchvision",
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
    if clashes:
        problems.append(_listing("keys converted to the same name", clashes))
    if problems:
        raise ConversionError(f"Cannot convert {origin}:\n" + "\n".join(problems))
    return out


# ------------------------------------------------------------------------------------------------
# Reading and writing checkpoints.
# ------------------------------------------------------------------------------------------------


def load_checkpoint_file(path: str, trust_pickle: bool = False):
    """``torch.load`` on CPU; by default only tensors and plain containers (``weights_only``).

    ``trust_pickle`` allows arbitrary pickled objects: only for files from a trusted source.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ConversionError(f"{path}: cannot be read by torch.load: {e}") from e
        raise ConversionError(
            f"{path}: holds objects other than tensors and plain containers, which are not "
            f"loaded by default ({str(e).splitlines()[0]}). If the file comes from a source "
            "you trust, pass --trust-pickle (trust_pickle=True)."
        ) from e
    except Exception as e:  # zip/pickle format errors: not a torch checkpoint at all
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e}).") from e


#: The container entry holding the weights, per source (``None``: the file is the state dict).
_WRAPPER = {
    "official": ("state_dict",),  # mmcv save_checkpoint: state_dict, meta (, optimizer)
    "adelaidet": ("model",),  # detectron2 Checkpointer: model (, optimizer, scheduler, iteration)
    "torchvision": (None, "state_dict"),  # torchvision: bare; open-mmlab ImageNet: either
}


def unwrap_state_dict(loaded, source: str, origin: str) -> Dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint, as ``{name: tensor}``; fails on any other layout."""
    _check_source(source)
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{origin}: expected a dict, got {type(loaded).__name__}.")
    expected = _WRAPPER[source]
    state = None
    for entry in expected:
        if entry is not None and isinstance(loaded.get(entry), Mapping):
            state = loaded[entry]
            break
    if state is None and None in expected and all(torch.is_tensor(v) for v in loaded.values()):
        state = loaded
    if state is None:
        wanted = " or ".join(
            "a bare state dict" if e is None else f"a {e!r} entry" for e in expected
        )
        keys = sorted(map(str, loaded))
        if loaded and all(torch.is_tensor(v) for v in loaded.values()):
            found = f"a bare state dict (first keys: {keys[:5]})"
        else:
            found = f"top-level keys {keys[:10]}"
        raise ConversionError(
            f"{origin}: not in the {source} checkpoint layout: expected {wanted}, found {found}."
        )
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not torch.is_tensor(value):
            raise ConversionError(
                f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor."
            )
        out[key] = value
    if not out:
        raise ConversionError(f"{origin}: the state dict is empty.")
    return out


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
    r, wanted = cfg.MODEL.RESNETS, STRIDE_IN_1X1[source]
    # Shapes do not tell where a bottleneck strides, so a wrong setting would load silently.
    if r.DEPTH >= 50 and bool(r.STRIDE_IN_1X1) != wanted:
        style = "MSRA/caffe-style (stride in the 1x1 conv)" if wanted else "pytorch-style"
        raise ConversionError(
            f"{source} ResNets are {style}: the target config needs "
            f"MODEL.RESNETS.STRIDE_IN_1X1 {wanted} (e.g. --opts MODEL.RESNETS.STRIDE_IN_1X1 "
            f"{wanted}). Shapes would match, outputs would not."
        )


# ------------------------------------------------------------------------------------------------
# Whole conversion.
# ------------------------------------------------------------------------------------------------


def convert_loaded(
    loaded, source: str, cfg=None, origin: str = "the checkpoint", model=None
) -> Dict[str, torch.Tensor]:
    """Convert an already loaded checkpoint (``torch.load`` output) of layout ``source``.

    With ``cfg``: checks the config against the source's conventions, folds the source's input
    normalisation into the stem conv, and checks the result against ``cfg``'s model (``model``,
    if given, saves building it). Values are not copied except the folded stem.
    """
    _check_source(source)
    converted = convert_state_dict(unwrap_state_dict(loaded, source, origin), source, origin)
    stem = STEM_KEY[source]
    if stem not in converted:
        raise ConversionError(f"{origin}: has no stem conv ({stem!r} after renaming).")
    if cfg is None:
        return converted

    check_config(cfg, source)
    src_conv, dst_conv = INPUT_CONVENTION[source], input_convention_from_cfg(cfg)
    if src_conv != dst_conv:
        logger.info("Folding input normalisation %s -> %s into %s.", src_conv, dst_conv, stem)
    converted[stem] = fold_input_normalization(converted[stem], src_conv, dst_conv)
    if model is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    else:
        expected = model_shapes(cfg)
    if source == "torchvision":
        # Only the ResNet body comes from ImageNet; DCN offset convs start at zero by design.
        check_against_model(converted, expected, "backbone.bottom_up.", r"\.conv2_offset\.", origin)
    else:
        check_against_model(converted, expected, origin=origin)
    return converted


def convert_checkpoint(
    src: str, dst: str, source: str, cfg=None, trust_pickle: bool = False
) -> Dict[str, torch.Tensor]:
    """Read ``src`` (a ``source`` checkpoint), convert and check it, write ``dst``.

    ``cfg`` is required for ``official`` and ``adelaidet``; for ``torchvision`` it is optional
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
