"""Export formats, file suffixes and the metadata layout shared by writers and runtimes."""

from ..checkpoint.files import EXPORTED_SUFFIXES, is_exported_model_file
from ..modeling.postprocess import FIXED_SIZE_OUTPUTS

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "METADATA_KEY",
    "METADATA_VERSION",
    "MAX_SIDE",
    "MIN_BLOCKS",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "SEMANTIC_OUTPUT",
    "is_exported_model_file",
]

#: Export format -> file suffix.
EXPORT_FORMATS = dict(zip(("onnx", "torchscript", "pt2"), EXPORTED_SUFFIXES))
OUTPUT_NAMES = list(FIXED_SIZE_OUTPUTS)
#: The sixth output of a panoptic model's graph (PanopticSOLOv2).
SEMANTIC_OUTPUT = "semantic_logits"
# Key of the export metadata inside each file (ONNX metadata_props, TorchScript/pt2 extra file).
METADATA_KEY = "solo_export.json"
# 1: the graph expects an input padded outside it (with the pixel mean, to ``min_blocks``
#    blocks); ExportedModel still runs such files.
# 2: the graph pads its input itself (any H, W) and the metadata records the contract
#    (``input``, ``padding``, ``outputs``).
METADATA_VERSION = 2
# torch.export (the pt2 and dynamo-ONNX routes) specialises dimensions of size 1, and P6 is 1x1
# at the eager model's minimum padded side (2 blocks of the size divisibility, 64 pixels).
# Where torch can export sizes "obliviously" (torch.fx.experimental._config
# .backed_size_oblivious), programs pad as the eager model does; with an older torch (and in
# files of metadata version 1) they pad every side to at least MIN_BLOCKS blocks (96 pixels).
MIN_BLOCKS = 3
# Largest side (pixels) of a torch.export program's input, a bound its dynamic shapes need.
MAX_SIDE = 8192
ONNX_OPSET = 18


class ExportError(RuntimeError):
    """A model, config or file that cannot be exported or loaded as an exported SOLO model."""
