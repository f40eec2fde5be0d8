"""solo.data.read_image: every bit depth, colour mode and orientation read as its annotations
assume, and unreadable files refused naming the file, the cause and the fix.

Files are written per test (PIL, OpenCV); the photograph is matplotlib's public-domain sample
``grace_hopper.jpg`` (600x512 RGB, values 0..255 in every channel).
"""

import logging
import numpy as np
import warnings
import cv2
import matplotlib.cbook
import pytest
from PIL import ExifTags, Image

from detectron2.data import detection_utils
from detectron2.data.detection_utils import SizeMismatchError

from solo.data import ImageReadError, image_io, read_image

LOGGER = "solo.data.image_io"


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the once-per-process warnings afresh."""
    image_io._warned.clear()
    yield
    image_io._warned.clear()


@pytest.fixture(scope="module")
def photo():
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return str(path), np.asarray(Image.open(path).convert("RGB"))


def object_on_background(dtype, background, foreground, height=40, width=60):
    """A gray image with a bright rectangle: the object an annotation would outline."""
    pixels = np.full((height, width), background, dtype=dtype)
    pixels[10:30, 20:45] = foreground
    return pixels


EXPECTED_OBJECT = object_on_background(np.uint8, 0, 255)


# ----------------------------------------------------------------------------------------------
# Bit depths: the object stays visible
# ----------------------------------------------------------------------------------------------


def test_12_bit_microscopy_in_a_16_bit_png_keeps_its_object_where_detectron2_sees_white(tmp_path):
    path = str(tmp_path / "cells.png")
    cv2.imwrite(path, object_on_background(np.uint16, 900, 3100))
    flat = detection_utils.read_image(path, format="BGR")
    assert (flat == 255).all(), "Detectron2's reader clips every value above 255"

    image = read_image(path, format="BGR")
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat(EXPECTED_OBJECT[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "dtype, mode, background, foreground",
    [
        (np.int32, "I", -70000, 5_000_000),  # 32-bit integer TIFF
        (np.float32, "F", 21.5, 37.25),  # float TIFF (temperatures)
        (np.uint16, "I;16", 60000, 60100),  # thermal: a narrow band at the top of the range
    ],
)
def test_high_bit_depth_gray_tiff_is_scaled_by_its_own_range(
    tmp_path, dtype, mode, background, foreground
):
    path = str(tmp_path / f"{np.dtype(dtype).name}.tif")
    Image.fromarray(object_on_background(dtype, background, foreground), mode).save(path)
    np.testing.assert_array_equal(read_image(path, format="L")[..., 0], EXPECTED_OBJECT)


def test_float_image_with_nan_and_inf_maps_non_finite_pixels_to_zero(tmp_path):
    pixels = object_on_background(np.float32, 1.0, 3.0)
    pixels[0, 0], pixels[0, 1] = np.nan, np.inf
    path = str(tmp_path / "depth.tif")
    Image.fromarray(pixels, "F").save(path)
    np.testing.assert_array_equal(read_image(path, format="L")[..., 0], EXPECTED_OBJECT)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_colour_photo_is_read_with_all_its_bits(tmp_path, photo, suffix):
    """Full-range 16-bit export of the photo reads back exactly; a dim 12-bit capture (what PIL
    turns into values 0..15) is stretched to the full 8-bit range."""
    _, rgb = photo
    path = str(tmp_path / f"hopper16.{suffix}")
    cv2.imwrite(path, rgb[:, :, ::-1].astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image(path, format="RGB"), rgb)
    np.testing.assert_array_equal(read_image(path, format="BGR"), rgb[:, :, ::-1])

    dim = str(tmp_path / f"hopper12.{suffix}")
    cv2.imwrite(dim, rgb[:, :, ::-1].astype(np.uint16) * 16)  # 0..4080
    assert detection_utils.read_image(dim, format="RGB").max() <= 15
    image = read_image(dim, format="RGB")
    assert image.min() == 0 and image.max() == 255
    assert np.abs(image.astype(int) - rgb).max() <= 1


def test_16_bit_rgba_drops_alpha_and_keeps_colour(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3)).astype(np.uint16)
    rgb[0, 0] = (0, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    alpha = rng.integers(0, 65536, (20, 30, 1)).astype(np.uint16)
    path = str(tmp_path / "rgba16.png")
    cv2.imwrite(path, np.concatenate([rgb[:, :, ::-1] * 257, alpha], axis=2))
    np.testing.assert_array_equal(read_image(path, format="RGB"), rgb)


def test_one_warning_for_all_high_bit_depth_images_naming_the_first_file(tmp_path, caplog):
    paths = [str(tmp_path / f"frame{i}.png") for i in range(3)]
    for path in paths:
        cv2.imwrite(path, object_on_background(np.uint16, 100, 4000))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):  # two epochs
            for path in paths:
                read_image(path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "frame0.png" in warnings[0].getMessage()
    assert "values 100..4000" in warnings[0].getMessage()


# ----------------------------------------------------------------------------------------------
# Colour modes
# ----------------------------------------------------------------------------------------------


def test_one_bit_image_reads_as_black_and_white(tmp_path):
    path = str(tmp_path / "binary.png")
    Image.fromarray(EXPECTED_OBJECT > 0).save(path)
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(read_image(path, format="L")[..., 0], EXPECTED_OBJECT)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_image_reads_as_its_palette_colours_without_pil_warnings(
    tmp_path, photo, transparency
):
    _, rgb = photo
    palette = Image.fromarray(rgb).quantize(colors=64)
    path = str(tmp_path / "palette.png")
    palette.save(path, transparency=0) if transparency else palette.save(path)
    assert Image.open(path).mode == "P"
    assert ("transparency" in Image.open(path).info) == transparency
    expected = np.asarray(palette.convert("RGBA"))[:, :, :3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when palette transparency is mishandled
        image = read_image(path, format="RGB")
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_channel_is_dropped_keeping_the_stored_colours(tmp_path, mode):
    rng = np.random.default_rng(1)
    channels = 2 if mode == "LA" else 4
    pixels = rng.integers(0, 256, (20, 30, channels), dtype=np.uint8)
    path = str(tmp_path / f"{mode}.png")
    Image.fromarray(pixels, mode).save(path)
    colour = pixels[:, :, :-1]
    image = read_image(path, format="RGB")
    expected = np.repeat(colour, 3, axis=2) if mode == "LA" else colour
    np.testing.assert_array_equal(image, expected)


def test_cmyk_jpeg_reads_as_pil_converts_it_to_rgb(tmp_path, photo):
    _, rgb = photo
    path = str(tmp_path / "print.jpg")
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
        expected = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(read_image(path, format="RGB"), expected)
    assert np.abs(expected.astype(int) - rgb).mean() < 8  # and that is the photo


@pytest.mark.parametrize("channels", [1, 3])
def test_output_formats_bgr_rgb_and_l(tmp_path, channels):
    rng = np.random.default_rng(2)
    shape = (20, 30) if channels == 1 else (20, 30, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path = str(tmp_path / "plain.png")
    Image.fromarray(pixels).save(path)
    rgb = np.repeat(pixels[..., None], 3, axis=2) if channels == 1 else pixels
    np.testing.assert_array_equal(read_image(path, format="RGB"), rgb)
    np.testing.assert_array_equal(read_image(path, format="BGR"), rgb[:, :, ::-1])
    assert read_image(path, format="L").shape == (20, 30, 1)
    assert read_image(path).shape == (20, 30, 3)  # BGR, Detectron2's INPUT.FORMAT default


# ----------------------------------------------------------------------------------------------
# EXIF orientation
# ----------------------------------------------------------------------------------------------


# Raw pixels a camera stores for each orientation, given the upright image (EXIF 2.32 table).
def raw_for_orientation(upright, orientation):
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, 1),  # shown rotated 90 degrees clockwise
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, -1),
    }[orientation](upright)


def save_with_orientation(path, raw, orientation, **kwargs):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(np.ascontiguousarray(raw)).save(path, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_upright(tmp_path, orientation):
    upright = np.random.default_rng(orientation).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = str(tmp_path / f"o{orientation}.png")
    save_with_orientation(path, raw_for_orientation(upright, orientation), orientation)
    np.testing.assert_array_equal(read_image(path, format="RGB"), upright)
    np.testing.assert_array_equal(read_image(path, format="RGB", expected_size=(20, 30)), upright)


def test_phone_photo_with_exif_rotation_matches_annotations_drawn_either_way(
    tmp_path, photo, caplog
):
    """A portrait photo stored landscape with orientation 6: annotations drawn on the upright
    photo (600x512 recorded) get the upright image; annotations drawn on the raw pixels (a tool
    that ignores EXIF recorded 512x600) get the raw pixels and one warning saying which."""
    _, upright = photo
    raw = raw_for_orientation(upright, 6)
    path = str(tmp_path / "phone.jpg")
    save_with_orientation(path, raw, 6, quality=98)

    as_shown = read_image(path, format="RGB", expected_size=(600, 512))
    assert as_shown.shape == (600, 512, 3)
    assert np.abs(as_shown.astype(int) - upright).mean() < 3

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            as_stored = read_image(path, format="RGB", expected_size=(512, 600))
    assert as_stored.shape == (512, 600, 3)
    assert np.abs(as_stored.astype(int) - raw).mean() < 3
    (warning,) = caplog.records
    message = warning.getMessage()
    assert "phone.jpg" in message and "EXIF orientation 6" in message
    assert "record height x width (600, 512)" in message


def test_size_matching_neither_orientation_is_a_size_mismatch_naming_file_and_both_sizes(
    tmp_path, photo
):
    _, upright = photo
    path = str(tmp_path / "phone.jpg")
    save_with_orientation(path, raw_for_orientation(upright, 6), 6)
    with pytest.raises(SizeMismatchError) as info:
        read_image(path, expected_size=(480, 640))
    message = str(info.value)
    assert "phone.jpg" in message and "(600, 512)" in message and "(480, 640)" in message
    assert "after applying its EXIF orientation 6" in message


# ----------------------------------------------------------------------------------------------
# Files that cannot be read
# ----------------------------------------------------------------------------------------------


def test_truncated_photo_is_refused_as_truncated_naming_the_file(tmp_path, photo):
    path, _ = photo
    data = open(path, "rb").read()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"'.*cut.jpg' is truncated or corrupt") as info:
        read_image(str(cut))
    assert "Copy or export it again" in str(info.value)


def test_truncated_16_bit_png_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "cells.png"
    cv2.imwrite(str(path), object_on_background(np.uint16, 900, 3100))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cells.png' is truncated or corrupt"):
        read_image(str(path))


@pytest.mark.parametrize("content", [b"", b"label,x,y\n1,2,3\n"])
def test_file_that_is_not_an_image_is_refused_saying_so(tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="notes.png' is not an image PIL or OpenCV can decode"):
        read_image(str(path))


def test_float_colour_tiff_that_pil_cannot_open_is_read_by_its_own_range(tmp_path):
    """32-bit float RGB TIFF (HDR, remote sensing): PIL has no mode for it, OpenCV decodes it."""
    path = tmp_path / "radiance.tif"
    rgb = np.zeros((20, 30, 3), dtype=np.float32)
    rgb[..., 0] = 2.0  # red everywhere
    rgb[5:15, 10:20] = (-1.0, 6.0, 0.5)  # a green object
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])
    with pytest.raises(Exception):
        Image.open(path)
    # OpenCV stores float colour TIFF with (lossy) SGILOG compression: compare with its decoding.
    stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, ::-1].astype(np.float64)
    np.testing.assert_allclose(stored, rgb, atol=0.02)
    low, high = stored.min(), stored.max()
    expected = np.round((stored - low) * 255.0 / (high - low)).astype(np.uint8)
    read = read_image(str(path), format="RGB")
    np.testing.assert_array_equal(read, expected)
    assert read[10, 15, 0] == 0 and read[10, 15, 1] == 255  # the object holds the extremes


def test_heic_phone_photo_is_refused_naming_the_format_and_the_plugin(tmp_path):
    path = tmp_path / "IMG_0001.HEIC"
    # An ISO-BMFF "ftyp" box with the HEIC brand, as an iPhone photo starts, then other boxes.
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    with pytest.raises(ImageReadError, match="IMG_0001.HEIC' is a HEIF/HEIC photo") as info:
        read_image(str(path))
    assert "pillow_heif.register_heif_opener()" in str(info.value)


def test_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere.png' does not exist"):
        read_image(str(tmp_path / "nowhere.png"))


def test_image_over_pils_decompression_bomb_limit_names_the_file_and_the_setting(
    tmp_path, monkeypatch
):
    path = str(tmp_path / "aerial.png")
    Image.fromarray(np.zeros((40, 60), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2400 pixels: over twice the limit
    with pytest.raises(ImageReadError, match="aerial.png' is larger than PIL's") as info:
        read_image(path)
    assert "PIL.Image.MAX_IMAGE_PIXELS" in str(info.value)
