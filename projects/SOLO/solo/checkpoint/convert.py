"""Convert published SOLO / SOLOv2 weights into this project's Detectron2 parameter names.

The sources (``SOURCES``: official SOLO, AdelaiDet, mmdetection, torchvision, this project's own
wrapped checkpoints) are described in :mod:`.sources`. A conversion is: find the weights in the
file's wrappers (:func:`.files.unwrap_state_dict`: ``state_dict`` / ``model`` nesting, EMA copies,
``module.`` / ``model.`` / ``_orig_mod.`` prefixes), rename every key with the source's regex
rules (unknown keys are an error, never silently dropped, and the message says which layout the
keys look like), fold the source's input normalisation into the stem conv when the target config
normalises differently, and check the result key by key and shape by shape against the model
built from the target config (:mod:`.verify`).

This module also re-exports the public names of :mod:`.errors`, :mod:`.files`, :mod:`.sources`
and :mod:`.verify` that conversion code uses, so ``solo.checkpoint.convert`` is the one import.
"""

import logging
import os
from typing import Dict, Mapping, Optional, Sequence
import torch

from .errors import ConversionError, UnknownKeyError, listing
from .files import (
    EMA_ENTRIES,
    WEIGHT_ENTRIES,
    WRAPPER_PREFIXES,
    PickledObjectPlaceholder,
    load_checkpoint_file,
    save_checkpoint,
    unwrap_state_dict,
)
from .sources import (
    BGR_MSRA,
    KNOWN_SOURCES,
    RGB_IMAGENET,
    SOURCES,
    InputConvention,
    Source,
    get_source,
)
from .verify import (
    check_against_model,
    check_class_names,
    check_config,
    checkpoint_class_names,
    model_shapes,
)

__all__ = [
    "BGR_MSRA",
    "EMA_ENTRIES",
    "KNOWN_SOURCES",
    "RGB_IMAGENET",
    "SOURCES",
    "WEIGHT_ENTRIES",
    "WRAPPER_PREFIXES",
    "ConversionError",
    "InputConvention",
    "PickledObjectPlaceholder",
    "Source",
    "UnknownKeyError",
    "check_against_model",
    "check_class_names",
    "check_config",
    "checkpoint_class_names",
    "convert_checkpoint",
    "convert_loaded",
    "convert_state_dict",
    "fold_input_normalization",
    "get_source",
    "guess_layout",
    "input_convention_from_cfg",
    "load_checkpoint_file",
    "model_shapes",
    "rename_key",
    "save_checkpoint",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Input conventions: what the source's first conv expects to see.
# ------------------------------------------------------------------------------------------------


def input_convention_from_cfg(cfg) -> InputConvention:
    """The input convention of the model ``cfg`` builds (``INPUT.FORMAT``, ``MODEL.PIXEL_*``)."""
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
# Renaming.
# ------------------------------------------------------------------------------------------------


def rename_key(key: str, source: str) -> Optional[str]:
    """Our name for the source key ``key``; ``None`` if the key is dropped on purpose.

    Raises :class:`ConversionError` if no rule knows the key or the source is unknown.
    """
    for pattern, target in get_source(source).compiled_rules:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        if target is None:
            return None
        return m.expand(target) if isinstance(target, str) else target(m)
    raise UnknownKeyError(f"Unrecognised {source} key {key!r}.")


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
    candidates = [name for name, src in KNOWN_SOURCES.items() if src.recognisable]
    counts = {name: _known_keys(keys, name) for name in candidates}
    best = max(candidates, key=counts.get)  # ties: the first of SOURCES
    description = KNOWN_SOURCES[best].description
    if keys and counts[best] == len(keys):
        return f"keys look like a {description} checkpoint (--source {best}); {first}"
    if counts[best] * 2 > len(keys):
        return (
            f"keys look mostly like a {description} checkpoint ({counts[best]} of "
            f"{len(keys)} keys known to --source {best}); {first}"
        )
    return f"keys are in no known layout; {first}"


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str, origin: str = "the checkpoint"
) -> Dict[str, torch.Tensor]:
    """Rename every key of ``state_dict`` (already unwrapped) to our names; values are untouched.

    Fails, listing them, on keys no rule knows and on two keys that land on the same name.
    """
    get_source(source)  # an unknown source is named as such, not as unknown keys
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
        problems.append(listing(f"keys not in the known {source} layout", unknown))
        problems.append(f"The {guess_layout(list(state_dict))}.")
    if clashes:
        problems.append(listing("keys converted to the same name", clashes))
    if problems:
        raise ConversionError(f"Cannot convert {origin}:\n" + "\n".join(problems))
    return out


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

    Raises :class:`ConversionError` for anything that cannot be converted or does not fit.
    """
    src = get_source(source)
    converted = convert_state_dict(unwrap_state_dict(loaded, origin), source, origin)
    stem = next((k for k in src.stem_keys if k in converted), None)
    if stem is None:
        names = " or ".join(repr(k) for k in src.stem_keys)
        raise ConversionError(f"{origin}: has no stem conv ({names} after renaming).")
    if cfg is None:
        return converted

    check_config(cfg, source)
    names = checkpoint_class_names(loaded)
    if names is not None and not src.backbone_only:
        check_class_names(names, cfg, origin)
    dst_conv = input_convention_from_cfg(cfg)
    src_conv = src.input_convention or dst_conv
    if src_conv != dst_conv:
        logger.info("Folding input normalisation %s -> %s into %s.", src_conv, dst_conv, stem)
    converted[stem] = fold_input_normalization(converted[stem], src_conv, dst_conv)
    if model is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    else:
        expected = model_shapes(cfg)
    check_against_model(converted, expected, src.model_prefix, src.optional_model_keys, origin)
    return converted


def convert_checkpoint(
    src: str, dst: str, source: str, cfg=None, trust_pickle: bool = False
) -> Dict[str, torch.Tensor]:
    """Read ``src`` (a ``source`` checkpoint), convert and check it, write ``dst``.

    ``cfg`` is required except for backbone-only sources (``torchvision``), where it is optional
    (without it the ImageNet weights are renamed, but neither checked nor re-normalised).
    Returns the converted state dict.
    """
    description = get_source(source)
    if cfg is None and not description.backbone_only:
        raise ConversionError(f"--source {source} needs --config (the model to convert for).")
    if description.backbone_only and not dst.endswith(".pkl"):
        raise ConversionError(
            f"{dst}: ImageNet backbones are written as Detectron2 .pkl files (their names rely "
            "on the checkpointer's matching heuristics, which it applies to .pkl files only)."
        )
    name = os.path.basename(src)
    converted = convert_loaded(load_checkpoint_file(src, trust_pickle), source, cfg, name)
    extra = {"matching_heuristics": True} if description.backbone_only else {}
    save_checkpoint(dst, converted, f"{description.author} (converted from {name})", **extra)
    logger.info("Wrote %d tensors to %s.", len(converted), dst)
    return converted
