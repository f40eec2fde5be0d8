"""A ``DetectionCheckpointer`` that never loses the last good checkpoint and can load strictly.

* Atomic saves: Detectron2 writes ``model_0004999.pth`` and ``last_checkpoint`` in place, so a
  job killed (or a disk filling up) mid-write leaves a truncated file that ``--resume`` then
  fails to load, possibly after overwriting the previous good checkpoint of the same name. Here
  both are written to a temporary file in the same directory, flushed to disk and renamed over
  the target with ``os.replace`` (atomic on POSIX and Windows): readers see the old file or the
  complete new one, never a partial one.
* Strict loading (``strict=True``, used for ``--eval-only``): Detectron2 only *warns* about
  parameters whose shapes differ (and skips them) and about parameters the checkpoint lacks, so
  evaluating e.g. an 80-class checkpoint with ``NUM_CLASSES 3`` silently runs a partly random
  model; checkpoint keys the model lacks (e.g. the offsets of a DCN checkpoint in a model
  built without DCN) are dropped. Strict mode raises :class:`CheckpointMismatchError` listing
  those keys instead, and
  refuses to load nothing (an empty path, or ``resume=True`` on a ``save_dir`` without a
  checkpoint), which Detectron2 only logs before predicting with random weights.
  Fine-tuning from ``MODEL.WEIGHTS`` keeps Detectron2's warn-and-skip behaviour (``strict=False``).
"""

import logging
import os
import pickle
import uuid
from typing import Any, Sequence
import torch

from detectron2.checkpoint import DetectionCheckpointer

from .files import is_exported_model_file

__all__ = ["CheckpointMismatchError", "SOLOCheckpointer", "atomic_write"]

logger = logging.getLogger(__name__)

# Keys listed in a mismatch error before the rest is summarised.
MAX_LISTED_KEYS = 30


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not fit the model built from the config (strict loading)."""


def atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    On any error (including KeyboardInterrupt) the temporary file is removed and ``path`` keeps
    its previous content.
    """
    directory, basename = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{basename}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask, so the checkpoint gets the usual permissions
    # (tempfile.mkstemp would make it private to the user).
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


class SOLOCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and an optional strict load (see module doc).

    Args: those of ``DetectionCheckpointer``, plus ``strict`` (bool, default False).
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict

    def _is_local(self) -> bool:
        # Remote storage (PathManager URLs) has no rename; keep Detectron2's behaviour there.
        return "://" not in self.save_dir

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        os.makedirs(self.save_dir, exist_ok=True)
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path: str, checkpointables=None):
        if self.strict and not path:
            raise CheckpointMismatchError(
                "No checkpoint to load (MODEL.WEIGHTS is empty): the model would predict with "
                "randomly initialised weights. Set MODEL.WEIGHTS to a trained checkpoint."
            )
        return super().load(path, checkpointables)

    def _load_file(self, filename: str):
        # torch.load would fail on it with an unpickling error that names no cause.
        if is_exported_model_file(filename):
            raise CheckpointMismatchError(
                f"'{filename}' is an exported model (tools/export_model.py), not a checkpoint: "
                "it holds no weights to load into a model. Evaluate it with "
                "tools/export_model.py --run-eval, or run it with solo.export.ExportedModel "
                "(demo/demo.py and Predictor accept it as MODEL.WEIGHTS); train, fine-tune or "
                "evaluate with train_net.py from the .pth checkpoint it was exported from."
            )
        try:
            loaded = super()._load_file(filename)
        except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError) as e:
            # torch.load of a file that is not a checkpoint: "KeyError: 101", "invalid load key".
            raise CheckpointMismatchError(
                f"'{filename}' is not a checkpoint that torch.load or Detectron2 can read "
                f"({type(e).__name__}: {e}): give a .pth written by train_net.py or "
                "tools/convert_checkpoint.py, or a Detectron2 .pkl."
            ) from e
        nested = [
            k
            for k, v in loaded.get("model", {}).items()
            if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())
        ]
        if nested:  # fvcore: "Unsupported type found in checkpoint! state_dict: OrderedDict"
            raise CheckpointMismatchError(
                f"'{filename}' keeps its weights under {nested}, not under 'model' as Detectron2 "
                "checkpoints do: it comes from another framework (e.g. mmdetection or the "
                "official SOLO code). Convert it with tools/convert_checkpoint.py."
            )
        return loaded

    def resume_or_load(self, path: str, *, resume: bool = True):
        if self.strict and resume and not self.has_checkpoint():
            raise CheckpointMismatchError(
                f"--resume: OUTPUT_DIR '{self.save_dir}' has no checkpoint (no last_checkpoint "
                "file), so there is nothing to resume from. Fix OUTPUT_DIR, or pass "
                "MODEL.WEIGHTS <checkpoint> without --resume."
            )
        if resume and self.has_checkpoint() and self._is_local():
            last = self.get_checkpoint_file()
            if not os.path.isfile(last):  # fvcore would fail with a bare assertion
                present = sorted(f for f in os.listdir(self.save_dir) if f.endswith(".pth"))
                raise CheckpointMismatchError(
                    f"--resume: '{os.path.join(self.save_dir, 'last_checkpoint')}' names "
                    f"'{last}', which does not exist (deleted or moved?). Checkpoints in "
                    f"OUTPUT_DIR: {present or 'none'}. Restore the file, or write the name of "
                    "one of them into last_checkpoint, or pass MODEL.WEIGHTS <checkpoint> "
                    "without --resume."
                )
        return super().resume_or_load(path, resume=resume)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        not_loaded = set(incompatible.missing_keys) | {
            k for k, _, _ in incompatible.incorrect_shapes
        }
        if not any(k not in not_loaded for k in self.model.state_dict()):
            # Also when fine-tuning: e.g. an mmdetection file ('state_dict', not 'model') or keys
            # under another prefix load nothing, and training would start from scratch.
            raise CheckpointMismatchError(
                "None of the checkpoint's parameters fit the model: nothing would be loaded.\n  "
                + _mismatch_report(incompatible)
            )
        # Unexpected keys too: e.g. a DCN checkpoint (conv_offset layers) in a model built
        # without DCN loads every other weight and predicts without the learned offsets.
        if self.strict and any(incompatible):
            raise CheckpointMismatchError(_mismatch_report(incompatible))
        return incompatible


def _listing(title: str, items: Sequence[str]) -> str:
    shown = list(items[:MAX_LISTED_KEYS])
    if len(items) > MAX_LISTED_KEYS:
        shown.append(f"... and {len(items) - MAX_LISTED_KEYS} more")
    return f"{title} ({len(items)}):\n    " + "\n    ".join(shown)


def _mismatch_report(incompatible) -> str:
    parts = ["The checkpoint does not fit the model built from the config (strict loading)."]
    if incompatible.incorrect_shapes:
        shapes = [
            f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(model)}"
            for key, ckpt, model in incompatible.incorrect_shapes
        ]
        parts.append(_listing("Parameters with different shapes", shapes))
    if incompatible.missing_keys:
        parts.append(
            _listing("Model parameters missing from the checkpoint", incompatible.missing_keys)
        )
    if incompatible.unexpected_keys:
        parts.append(
            _listing("Checkpoint keys the model does not have", incompatible.unexpected_keys)
        )
    parts.append(
        "Use the config the checkpoint was trained with (e.g. the same MODEL.SOLO.NUM_CLASSES, "
        "HEAD_NAME, NUM_GRIDS, channels, *_DCN and backbone depth), or convert the checkpoint with "
        "tools/convert_checkpoint.py."
    )
    return "\n  ".join(parts)
