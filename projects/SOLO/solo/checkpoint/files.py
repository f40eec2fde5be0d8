"""What kind of file a weights path names, before anything is loaded."""

import os

__all__ = ["EXPORTED_SUFFIXES", "is_exported_model_file"]

#: Suffixes of the files written by :func:`solo.export.export_model` (ONNX, TorchScript, pt2).
EXPORTED_SUFFIXES = (".onnx", ".ts", ".pt2")


def is_exported_model_file(path: str) -> bool:
    """Whether ``path`` names an exported model (by its suffix) rather than a checkpoint, e.g. for
    a ``MODEL.WEIGHTS`` that may be either; :class:`solo.export.ExportedModel` runs such files."""
    return os.path.splitext(str(path))[1] in EXPORTED_SUFFIXES
