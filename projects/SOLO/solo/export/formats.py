"""Export formats, file suffixes and the metadata layout shared by writers and runtimes."""

from ..checkpoint.files import EXPORTED_SUFFIXES, is_exported_model_file

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "METADATA_KEY",
    "METADATA_VERSION",
    "MIN_BLOCKS",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "is_exported_model_file",
]

#: Export format -> file suffix.
EXPORT_FORMATS = dict(zip(("onnx", "torchscript", "pt2"), EXPORTED_SUFFIXES))
OUTPUT_NAMES = ["scores", "labels", "masks", "num_detections", "num_candidates"]
# Key of the export metadata inside each file (ONNX metadata_props, TorchScript/pt2 extra file).
METADATA_KEY = "solo_export.json"
METADATA_VERSION = 1
# torch.export (the pt2 and ONNX routes) specialises dimensions of size 1, so a 64-pixel side,
# whose P6 is 1x1, would break its guards: those formats pad every side to at least 3 blocks of
# the size divisibility (96 pixels) instead of the eager model's 2.
MIN_BLOCKS = 3
ONNX_OPSET = 18


class ExportError(RuntimeError):
    """A model, config or file that cannot be exported or loaded as an exported SOLO model."""
