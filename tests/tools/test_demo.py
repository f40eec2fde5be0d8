"""demo/demo.py end to end on CPU: images (directory, glob, single file), video, errors.

The model is the shapes SOLOv2 config, narrowed and run on small images so that a forward pass
takes a fraction of a second. Its weights are random, but the category bias is raised so that
every grid cell is a confident candidate: SOLOv2's masks then come from random dynamic kernels,
which reliably gives a few large masks to draw.
"""

import importlib
import json
import numpy as np
import sys
import cv2
import pytest
import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from helpers import REPO_ROOT, capture_warnings, load_script, solo_cfg
from solo.checkpoint import CheckpointMismatchError

CONFIG = "configs/Shapes/SOLOv2_R18.yaml"
# Narrow model and small test size: the demo's code path is the same, only faster.
SMALL = [
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.SOLO.HEAD_CHANNELS", "64",
    "MODEL.SOLO.MASK_KERNEL_CHANNELS", "32",
    "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32",
    "MODEL.SOLO.NMS_PRE", "20",
    "TEST.DETECTIONS_PER_IMAGE", "3",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "80",
]  # fmt: skip
IMAGE_SIZE = (60, 76)  # (H, W); deliberately not the test size, so resizing back is exercised


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded inference: on a shared 2-core machine, 2 threads are often 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load_demo():
    return load_script("demo/demo.py", "solo_demo")


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A checkpoint of the small shapes model whose every cell is a confident candidate."""
    torch.manual_seed(0)
    model = build_model(solo_cfg(CONFIG.replace("configs/", "", 1), SMALL))
    with torch.no_grad():
        model.head.cate_pred.bias.fill_(4.0)  # sigmoid(4) ~ 0.98
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def synthetic_image(seed, size=IMAGE_SIZE):
    rng = np.random.default_rng(seed)
    h, w = size
    image = np.full((h, w, 3), rng.integers(0, 80), np.uint8)
    center = (int(rng.integers(20, w - 20)), int(rng.integers(20, h - 20)))
    cv2.circle(image, center, 15, tuple(int(c) for c in rng.integers(120, 256, 3)), -1)
    cv2.rectangle(image, (2, 2), (18, 14), (255, 255, 255), -1)
    return image


@pytest.fixture
def image_dir(tmp_path):
    directory = tmp_path / "images"
    directory.mkdir()
    for i in range(2):
        assert cv2.imwrite(str(directory / f"img{i}.png"), synthetic_image(i))
    (directory / "notes.txt").write_text("not an image")  # must be ignored
    return directory


def run_demo(demo, weights, *args):
    argv = ["--config-file", str(REPO_ROOT / CONFIG), *args]
    return demo.main(argv + ["MODEL.WEIGHTS", weights, *SMALL])


def enlarged(image):
    """What the demo draws on: small images enlarged by a whole factor (pixels repeated)."""
    scale = sys.modules[load_demo().VisualizationDemo.__module__].drawing_scale(*image.shape[:2])
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def changed_pixels(a, b):
    return int((a != b).any(axis=2).sum())


def test_directory_input_draws_instances(demo, weights, image_dir, tmp_path):
    out = tmp_path / "vis"
    written = run_demo(demo, weights, "--input", str(image_dir), "--output", str(out))
    assert sorted(written) == [str(out / "img0.png"), str(out / "img1.png")]
    for name in ("img0.png", "img1.png"):
        original, drawn = cv2.imread(str(image_dir / name)), cv2.imread(str(out / name))
        assert drawn is not None and drawn.shape == enlarged(original).shape
        assert changed_pixels(enlarged(original), drawn) > 0
    assert not (out / "notes.txt").exists()


def test_glob_input_above_every_score_draws_nothing(demo, weights, image_dir, tmp_path):
    out = tmp_path / "vis"
    pattern = str(image_dir / "img*.png")
    args = ["--input", pattern, "--output", str(out), "--confidence-threshold", "1.01"]
    written = run_demo(demo, weights, *args)
    assert len(written) == 2
    for name in ("img0.png", "img1.png"):
        # Images without instances are written unchanged (enlarged by whole pixels only).
        np.testing.assert_array_equal(
            cv2.imread(str(out / name)), enlarged(cv2.imread(str(image_dir / name)))
        )


def test_single_input_to_file(demo, weights, image_dir, tmp_path):
    target = tmp_path / "new" / "drawn.png"
    written = run_demo(
        demo, weights, "--input", str(image_dir / "img1.png"), "--output", str(target)
    )
    assert written == [str(target)]
    # 60x76 is drawn 8x larger (short side >= 480 pixels), so that labels are legible.
    assert cv2.imread(str(target)).shape == (IMAGE_SIZE[0] * 8, IMAGE_SIZE[1] * 8, 3)


def test_without_output_nothing_is_written(demo, weights, image_dir):
    before = sorted(image_dir.iterdir())
    assert run_demo(demo, weights, "--input", str(image_dir)) == []
    assert sorted(image_dir.iterdir()) == before


def write_video(path, frames, fps=5.0):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h), True)
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write 'mp4v' videos")
    for frame in frames:
        writer.write(frame)
    writer.release()


def read_video(path):
    video = cv2.VideoCapture(str(path))
    assert video.isOpened(), f"cannot open {path}"
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    video.release()
    return frames


def test_video_input(demo, weights, tmp_path):
    # Even sizes: mp4v (like most codecs) wants them.
    frames = [synthetic_image(i, size=(64, 80)) for i in range(5)]
    source = tmp_path / "clip.mp4"
    write_video(source, frames)
    out = tmp_path / "vis"
    written = run_demo(demo, weights, "--video-input", str(source), "--output", str(out))
    assert written == [str(out / "clip.mp4")]
    drawn = read_video(out / "clip.mp4")
    assert len(drawn) == 5
    assert all(f.shape == (64 * 8, 80 * 8, 3) for f in drawn)
    # Masks are drawn with alpha 0.55 over large areas: far above mp4v's compression noise.
    source_frames = [enlarged(f) for f in read_video(source)]
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(drawn, source_frames)) > 10


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.png", "does not exist"),
        (lambda d: d / "nothing*.png", "matches no files"),
        (lambda d: d, "contains no images"),
    ],
)
def test_bad_input_names_the_path(demo, tmp_path, capsys, make_input, message):
    path = str(make_input(tmp_path))
    with pytest.raises(SystemExit) as exc:
        demo.main(["--config-file", str(REPO_ROOT / CONFIG), "--input", path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert path in err and message in err


def test_missing_config_names_the_path(demo, image_dir, tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(SystemExit):
        demo.main(["--config-file", missing, "--input", str(image_dir)])
    assert missing in capsys.readouterr().err


def test_unreadable_image_names_the_file(demo, tmp_path):
    # Checked on the loader: going through main() would build a model for nothing.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(demo.DemoError, match="cannot read image") as exc:
        demo.load_image(str(broken))
    assert str(broken) in str(exc.value)


def test_missing_weights_fail_early(demo, image_dir, tmp_path, capsys):
    missing = str(tmp_path / "model_final.pth")
    with pytest.raises(SystemExit):
        run_demo(demo, missing, "--input", str(image_dir))
    assert missing in capsys.readouterr().err


def test_output_paths(demo, tmp_path):
    assert demo.output_paths(["a/x.png"], None) == {"a/x.png": None}
    assert demo.output_paths(["a/x.png"], "o.jpg") == {"a/x.png": "o.jpg"}
    for directory in ("o/", "o", str(tmp_path)):  # trailing '/', no extension, existing dir
        target = demo.output_paths(["a/x.png"], directory)["a/x.png"]
        assert target.endswith("x.png") and target.startswith(directory.rstrip("/"))
    # Several inputs always go into a directory, even one that looks like a file name.
    assert demo.output_paths(["a/x.png", "y.png"], "o.d")["y.png"].endswith("o.d/y.png")
    with pytest.raises(demo.DemoError, match="both be written"):
        demo.output_paths(["a/x.png", "b/x.png"], "o")


# ----------------------------------------------------------------------------------------------
# Weights always loaded, strictly; class names, not numbers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor_module():
    return importlib.import_module("solo.engine.predictor")


def small_cfg(opts=()):
    return solo_cfg(CONFIG.replace("configs/", "", 1), SMALL + list(opts))


def test_checkpoint_of_another_class_count_is_refused_naming_the_keys(
    demo, image_dir, tmp_path, capsys
):
    """DefaultPredictor would warn (fvcore) and draw a partly random model, exit 0."""
    other = build_model(small_cfg(["MODEL.SOLO.NUM_CLASSES", "5"]))
    path = str(tmp_path / "five_classes.pth")
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(SystemExit) as exc:
        run_demo(demo, path, "--input", str(image_dir), "--output", str(tmp_path / "vis"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "head.cate_pred.weight: checkpoint (5," in err and "MODEL.SOLO.NUM_CLASSES" in err
    assert not (tmp_path / "vis").exists()


def test_backbone_only_checkpoint_is_refused(demo, weights, predictor_module, tmp_path):
    state = torch.load(weights, weights_only=False)["model"]
    path = tmp_path / "backbone.pth"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}}, path)
    cfg = small_cfg(["MODEL.WEIGHTS", str(path)])
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint") as info:
        predictor_module.Predictor(cfg)
    assert "head.kernel_pred.weight" in str(info.value)


def test_predictor_without_weights_is_refused(predictor_module):
    with pytest.raises(CheckpointMismatchError, match="MODEL.WEIGHTS is empty"):
        predictor_module.Predictor(small_cfg())


def test_predictor_takes_gray_and_bgra_arrays_as_bgr(weights, predictor_module):
    predictor = predictor_module.Predictor(small_cfg(["MODEL.WEIGHTS", weights]))
    bgr = synthetic_image(3)
    gray = bgr[:, :, 1].copy()
    as_3 = predictor(np.repeat(gray[:, :, None], 3, axis=2))["instances"]
    for array in (gray, gray[:, :, None]):
        out = predictor(array)["instances"]
        assert len(out) == len(as_3) > 0
        assert torch.equal(out.pred_masks, as_3.pred_masks)
    bgra = np.concatenate([bgr, np.full(bgr.shape[:2] + (1,), 7, np.uint8)], axis=2)
    with_alpha, plain = predictor(bgra)["instances"], predictor(bgr)["instances"]
    assert torch.equal(with_alpha.pred_masks, plain.pred_masks)
    assert torch.equal(with_alpha.scores, plain.scores)
    with pytest.raises(ValueError, match=r"got shape \(60, 76, 2\)"):
        predictor(bgr[:, :, :2])


def test_predictor_scales_16_bit_arrays_by_their_range_and_refuses_bad_floats(
    weights, predictor_module
):
    """A uint16 array went to the model unscaled (values up to 65535): silent garbage."""
    predictor = predictor_module.Predictor(small_cfg(["MODEL.WEIGHTS", weights]))
    bgr = synthetic_image(4)
    low, high = int(bgr.min()), int(bgr.max())
    # The same picture in 16 bits, spread over another range: read back to the same 8 bits.
    deep = (bgr.astype(np.uint16) - low) * 200 + 1000
    stretched = np.round((bgr.astype(np.float64) - low) * 255 / (high - low)).astype(np.uint8)
    expected, actual = predictor(stretched)["instances"], predictor(deep)["instances"]
    assert len(actual) == len(expected) > 0
    assert torch.equal(actual.pred_masks, expected.pred_masks)
    with pytest.raises(ValueError, match=r"values 0\.\.1000; expected 0\.\.255"):
        predictor(np.linspace(0, 1000, bgr.size).reshape(bgr.shape).astype(np.float32))


def test_predictor_and_demo_run_an_exported_model(demo, weights, image_dir, tmp_path):
    """MODEL.WEIGHTS naming a TorchScript export runs it, with the eager model's predictions."""
    from solo.export import ExportError, export_model

    cfg = small_cfg(["MODEL.WEIGHTS", weights])
    # K0 above the candidate count (every cell is one here), so results equal eager inference.
    path = export_model(cfg, "torchscript", str(tmp_path / "exported"), max_candidates=4096)
    predictor_module = sys.modules[demo.VisualizationDemo.__module__]
    eager = predictor_module.Predictor(cfg)
    exported = predictor_module.Predictor(small_cfg(["MODEL.WEIGHTS", path]))
    image = synthetic_image(5)
    expected, actual = eager(image)["instances"], exported(image)["instances"]
    assert len(actual) == len(expected) > 0
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=1e-3)
    # Masks may differ at a few border pixels (resampling in and out of the graph).
    assert (actual.pred_masks != expected.pred_masks).sum() <= 0.01 * expected.pred_masks.numel()
    out = tmp_path / "vis"
    written = run_demo(demo, path, "--input", str(image_dir), "--output", str(out))
    assert len(written) == 2 and all(cv2.imread(w) is not None for w in written)
    # A setting the graph fixed was silently ignored (3 detections kept with a cap of 1).
    with pytest.raises(ExportError, match="TEST.DETECTIONS_PER_IMAGE: exported 3, config 1"):
        predictor_module.Predictor(
            small_cfg(["MODEL.WEIGHTS", path, "TEST.DETECTIONS_PER_IMAGE", "1"])
        )


def test_class_names_come_from_the_option_the_json_or_a_single_warning(
    predictor_module, tmp_path, caplog
):
    """A custom-dataset model whose test dataset has no thing_classes drew "0 97%"."""
    opts = ["DATASETS.TEST", "('custom_without_metadata',)", "MODEL.SOLO.NUM_CLASSES", "2"]
    cfg = small_cfg(opts)
    with capture_warnings(caplog, predictor_module.__name__):
        metadata = predictor_module.get_metadata(cfg)
    assert metadata.get("thing_classes") is None
    # One record (caplog's handler may see it twice: on the logger and, propagated, on root).
    said = {id(r) for r in caplog.records if "No class names" in r.getMessage()}
    assert len(said) == 1 and "--class-names" in caplog.text

    names = predictor_module.get_metadata(cfg, ["cat", "dog"]).thing_classes
    assert names == ["cat", "dog"]
    coco = tmp_path / "train.json"
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    assert predictor_module.get_metadata(cfg, [str(coco)]).thing_classes == ["cat", "dog"]
    with pytest.raises(ValueError, match="3 class names but MODEL.SOLO.NUM_CLASSES=2"):
        predictor_module.get_metadata(cfg, ["a", "b", "c"])
    # Registered COCO datasets whose JSON was not loaded yet: names from their json_file.
    MetadataCatalog.get("custom_with_json").set(json_file=str(coco))
    cfg.DATASETS.TEST = ("custom_with_json",)
    assert predictor_module.get_metadata(cfg).thing_classes == ["cat", "dog"]
