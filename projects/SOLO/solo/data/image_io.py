"""One image reader for training, evaluation, the demo, the predictor and export.

    read_image(file_name, format="BGR", *, expected_size=None) -> np.ndarray  # HxWx3 uint8

Detectron2's ``detection_utils.read_image`` converts with ``PIL.Image.convert``, which clips
16-bit and 32-bit gray pixels to 255 (a microscopy or depth image becomes one flat white plane)
and keeps only the high byte of 16-bit colour. Here every file PIL (or OpenCV: for 16-bit
colour, and for layouts PIL has no mode for, such as floating-point colour TIFF) decodes
becomes an 8-bit image as follows:

* 8-bit gray, colour, CMYK, YCbCr, 1-bit and palette images: converted by PIL, as in Detectron2;
  an alpha channel (RGBA, LA, palette transparency) is dropped, as Detectron2 and OpenCV's
  ``imread`` (the official SOLO's mmcv reader) drop it.
* More than 8 bits per channel (16-bit gray or colour PNG/TIFF, 32-bit integer or float TIFF,
  gray or colour):
  scaled linearly so that the image's own smallest value becomes 0 and its largest 255 (all
  colour channels together, so the colour balance is kept). Such files store measurements
  (12-bit sensors, depth in millimetres, temperatures) whose range is rarely the type's full
  range. Non-finite float values become 0. One warning per process names the first such file.
* The EXIF orientation written by cameras and phones is applied (as Detectron2 does), unless
  ``expected_size`` says that the annotations were drawn on the raw pixels (see below).

Errors name the file, the cause and the fix: :class:`ImageReadError` (an ``OSError``) for
unreadable, truncated or unsupported files, ``FileNotFoundError`` for a missing one and
Detectron2's ``SizeMismatchError`` when ``expected_size`` cannot be met.
"""

import io
import logging
import numpy as np
from typing import Optional, Tuple
import cv2
from PIL import ExifTags, Image, UnidentifiedImageError

from detectron2.data.detection_utils import SizeMismatchError, convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager

__all__ = ["ImageReadError", "read_image"]

logger = logging.getLogger(__name__)

# EXIF orientation -> the transpose that shows the image upright (the table of
# PIL.ImageOps.exif_transpose; applied here to already converted 8-bit images).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}

# ISO base media "ftyp" brands of HEIF still images (HEIC photos of phones).
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}

# Warnings given once per process (data-loader workers are processes: once per worker).
_warned = set()


class ImageReadError(OSError):
    """An image file that exists but cannot be decoded; the message names the file and the fix."""


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def read_image(
    file_name: str,
    format: Optional[str] = "BGR",
    *,
    expected_size: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
    """Read an image file as an 8-bit array the model can take (see the module docstring).

    Args:
        file_name: path or URL understood by Detectron2's ``PathManager``.
        format: ``INPUT.FORMAT``: "BGR" or "RGB" (HxWx3), "L" (HxWx1), or any other format of
            Detectron2's ``read_image`` ("YUV-BT.601": float). ``None`` keeps the file's own
            8-bit mode ("L" as HxW, "RGB" as HxWx3).
        expected_size: ``(height, width)`` recorded for the image in its dataset. When the
            EXIF-rotated image does not have this size but the raw pixels do, the annotations
            were drawn on the raw pixels: they are returned without rotation, with a warning
            (once per file). Any other mismatch raises ``SizeMismatchError``.

    Returns:
        np.ndarray: HxWxC uint8 (C=3 for "BGR"/"RGB", 1 for "L").

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: not an image, truncated, or a mode that cannot be converted.
        SizeMismatchError: the image size differs from ``expected_size``.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Image file '{file_name}' does not exist. Fix the record's file_name or the "
            "dataset's image root (the image_root of register_coco_instances)."
        ) from e
    opencv_image = None
    try:
        image = Image.open(io.BytesIO(data))
        sixteen_bit_colour = image.mode in ("RGB", "RGBA") and _raw_bits(image) == 16
        image.load()
    except UnidentifiedImageError as e:
        # Layouts PIL has no mode for (floating-point colour TIFF, ...): OpenCV's decoder.
        opencv_image = _decode_with_opencv(data, file_name)
        if opencv_image is None:
            raise _undecodable(data, file_name) from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"Image file '{file_name}' is larger than PIL's decompression-bomb limit ({e}). If "
            "the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS (None disables the limit) "
            "before training, or split it into tiles."
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncation as "image file is truncated" / "Truncated File Read" and
        # broken chunks as SyntaxError. Loading such files anyway (ImageFile.LOAD_TRUNCATED_IMAGES)
        # would silently train on grey pixels.
        raise ImageReadError(
            f"Image file '{file_name}' is truncated or corrupt ({type(e).__name__}: {e}). "
            "Copy or export it again (an interrupted download or copy leaves such files), or "
            "remove it from the dataset."
        ) from e

    if opencv_image is not None:
        orientation, image8 = 1, opencv_image  # OpenCV's IMREAD_UNCHANGED ignores EXIF
    else:
        orientation = _exif_orientation(image)
        if sixteen_bit_colour:
            image8 = _decode_16bit_colour(data, file_name, image.mode)
        else:
            image8 = _to_8bit(image, file_name)
    raw_hw = (image8.height, image8.width)
    upright = image8
    if orientation in _EXIF_TRANSPOSE:
        upright = image8.transpose(_EXIF_TRANSPOSE[orientation])
    if expected_size is not None:
        expected_size = tuple(int(v) for v in expected_size)
        upright_hw = (upright.height, upright.width)
        if upright_hw != expected_size:
            if orientation in _SWAPS_AXES and raw_hw == expected_size:
                _warn_once(
                    ("exif", file_name),
                    f"Image '{file_name}' has EXIF orientation {orientation} (rotated by 90 "
                    f"degrees when shown), but its dataset records height x width {raw_hw}, the "
                    "size of the raw, unrotated pixels: it is read unrotated, as its annotations "
                    "were drawn. If they were drawn on the upright photo, record height x width "
                    f"{upright_hw} for it instead.",
                )
                upright = image8
            else:
                raise SizeMismatchError(
                    _size_mismatch_message(file_name, upright_hw, expected_size, orientation)
                )
    return convert_PIL_to_numpy(upright, format)


def _undecodable(data: bytes, file_name: str) -> ImageReadError:
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return ImageReadError(
            f"Image file '{file_name}' is a HEIF/HEIC photo ({data[8:12].decode()}, the "
            "format of iPhones and many phones), which PIL cannot decode by itself. Convert "
            "it to JPEG, or `pip install pillow-heif` and call "
            "pillow_heif.register_heif_opener() before reading images."
        )
    what = "is empty" if not data else f"starts with {data[:8]!r}"
    return ImageReadError(
        f"Image file '{file_name}' is not an image PIL or OpenCV can decode (it {what}). "
        "Replace it with a JPEG/PNG/TIFF/BMP/WebP file or remove it from the dataset."
    )


def _decode_with_opencv(data: bytes, file_name: str) -> Optional[Image.Image]:
    """Gray, BGR or BGRA pixels of any depth that OpenCV decodes, as 8-bit "L"/"RGB"; None if
    OpenCV cannot decode them either."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if pixels is None or pixels.ndim not in (2, 3) or pixels.ndim == 3 and pixels.shape[2] < 3:
        return None
    if pixels.ndim == 3:
        pixels = pixels[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    if pixels.dtype != np.uint8:
        kind = f"{pixels.dtype} {'colour' if pixels.ndim == 3 else 'gray'}"
        pixels = stretch_to_8bit(pixels, file_name, kind)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB" if pixels.ndim == 3 else "L")


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF (detectron2 issue 1885): show the pixels as stored
        return 1


def _size_mismatch_message(file_name, read_hw, expected_hw, orientation) -> str:
    if orientation in _EXIF_TRANSPOSE:
        how = f"after applying its EXIF orientation {orientation}"
    else:
        how = "without EXIF orientation"
    return (
        f"Image '{file_name}' is height x width {read_hw} ({how}), but its dataset record says "
        f"{expected_hw}. The record belongs to another image or its size is wrong: fix the "
        "'height'/'width' (or 'file_name') of this image in the annotation file."
    )


def _raw_bits(image: Image.Image) -> int:
    """Bits per channel as stored in the file (PIL's mode for 16-bit colour says 8)."""
    if not image.tile:
        return 8
    args = image.tile[0].args
    raw_mode = args if isinstance(args, str) else args[0]
    return 16 if ";16" in str(raw_mode) else 8


def _decode_16bit_colour(data: bytes, file_name: str, mode: str) -> Image.Image:
    # PIL keeps only the high byte of 16-bit colour; OpenCV decodes all 16 bits (as BGR).
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.ndim != 3 or pixels.dtype != np.uint16:
        raise ImageReadError(
            f"Image file '{file_name}' has 16-bit colour ({mode}) that OpenCV cannot decode; "
            "save it as an 8-bit or 16-bit PNG."
        )
    pixels = pixels[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    return Image.fromarray(stretch_to_8bit(pixels, file_name, f"16-bit colour ({mode})"), "RGB")


def _to_8bit(image: Image.Image, file_name: str) -> Image.Image:
    """``image`` (at most 8 bits per channel, or one channel of more) as 8-bit "L"/"RGB"."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    if mode in ("P", "PA"):
        # Palette transparency goes through RGBA, as PIL asks (convert("RGB") warns).
        return image.convert("RGBA").convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(stretch_to_8bit(np.asarray(image), file_name, f"mode {mode}"), "L")
    try:
        return image.convert("RGB")  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV
    except ValueError as e:
        raise ImageReadError(
            f"Image file '{file_name}' has PIL mode {mode}, which cannot be converted to RGB "
            f"({e}); save it as 8-bit RGB or gray."
        ) from e


def stretch_to_8bit(pixels: np.ndarray, file_name: str, kind: str) -> np.ndarray:
    """Map ``[min, max]`` of the finite values of ``pixels`` (any shape and dtype) linearly to
    ``[0, 255]`` (uint8, same shape), non-finite values to 0; warns once per process, naming
    ``file_name`` (or whatever the pixels came from) and ``kind`` (e.g. "16-bit gray")."""
    values = pixels.astype(np.float64)
    finite = np.isfinite(values)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.where(finite, (values - low) * scale, 0.0)
    _warn_once(
        "high_bit_depth",
        f"Image '{file_name}' has {kind} pixels (values {low:g}..{high:g}): scaled to 8 bits by "
        "its own range (smallest value -> 0, largest -> 255"
        + (", non-finite -> 0" if not finite.all() else "")
        + "). Every image with more than 8 bits per channel is read this way; this warning is "
        "given once.",
    )
    return np.round(out).astype(np.uint8)
