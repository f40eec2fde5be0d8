"""Reading and writing checkpoint files: what kind of file a weights path names, ``torch.load``
without running pickled code (numpy-only and placeholder unpicklers), finding the weights in any
codebase's wrappers (:func:`unwrap_state_dict`) and writing Detectron2 checkpoints."""

import collections
import logging
import numpy as np
import os
import pickle
from typing import Dict, Mapping, Sequence
import torch

from .errors import ConversionError

__all__ = [
    "EMA_ENTRIES",
    "EXPORTED_SUFFIXES",
    "PLACEHOLDER_PACKAGES",
    "PickledObjectPlaceholder",
    "WEIGHT_ENTRIES",
    "WRAPPER_PREFIXES",
    "is_exported_model_file",
    "load_checkpoint_file",
    "save_checkpoint",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)

#: Suffixes of the files written by :func:`solo.export.export_model` (ONNX, TorchScript, pt2).
EXPORTED_SUFFIXES = (".onnx", ".ts", ".pt2")


def is_exported_model_file(path: str) -> bool:
    """Whether ``path`` names an exported model (by its suffix) rather than a checkpoint, e.g. for
    a ``MODEL.WEIGHTS`` that may be either; :class:`solo.export.ExportedModel` runs such files."""
    return os.path.splitext(str(path))[1] in EXPORTED_SUFFIXES


# ------------------------------------------------------------------------------------------------
# Reading.
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


# ------------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------------


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
