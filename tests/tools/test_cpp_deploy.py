"""tools/deploy (solo_deploy, C++ with the torch wheel's libtorch) against ExportedModel: same
instances, scores, classes, boxes and masks on a real photo and on a shapes image."""

import json
import numpy as np
import os
import shutil
import subprocess
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, build, force_candidates, solo_cfg, tiny_cfg
from solo.export import ExportedModel, export_model

# Cached between runs (gitignored): a rebuild only recompiles what changed.
BUILD_DIR = REPO_ROOT / "build" / "deploy"


def tool(name):
    """``cmake``/``ninja`` of the PyPI packages (the deploy extra) if installed, else PATH's."""
    try:
        module = __import__(name)
        path = os.path.join(getattr(module, "CMAKE_BIN_DIR", getattr(module, "BIN_DIR", "")), name)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which(name)


@pytest.fixture(scope="module")
def solo_deploy():
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++/g++, or CXX) to build tools/deploy")
    cmake = tool("cmake")
    if cmake is None:
        pytest.skip('cmake not found: pip install -e .[deploy] "numpy<2"')
    if not (BUILD_DIR / "CMakeCache.txt").is_file():
        ninja = tool("ninja")
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        prefix = torch.utils.cmake_prefix_path
        subprocess.run(
            [cmake, "-S", str(REPO_ROOT / "tools/deploy"), "-B", str(BUILD_DIR), *generator,
             f"-DCMAKE_PREFIX_PATH={prefix}", f"-DCMAKE_CXX_COMPILER={compiler}",
             f"-DSOLO_TORCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"],
            check=True, capture_output=True,
        )  # fmt: skip
    result = subprocess.run([cmake, "--build", str(BUILD_DIR)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return BUILD_DIR / "solo_deploy"


def grace_hopper():
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.asarray(Image.open(path).convert("RGB"))


def shapes_image():
    """A rectangle and an ellipse on a dark background with noise, 131x157 (not a multiple of
    the size divisibility: the graph pads it)."""
    rng = np.random.default_rng(3)
    image = np.full((131, 157, 3), 40, dtype=np.uint8)
    image[20:70, 30:90] = (220, 60, 60)
    yy, xx = np.mgrid[:131, :157]
    image[((yy - 90) / 25) ** 2 + ((xx - 110) / 30) ** 2 <= 1] = (60, 200, 80)
    return (image + rng.integers(0, 12, image.shape)).astype(np.uint8)


def run_cpp(binary, model_path, rgb, tmp_path):
    ppm = tmp_path / "image.ppm"
    Image.fromarray(rgb).save(ppm)
    out = tmp_path / "instances.json"
    result = subprocess.run(
        # Python's thread count: the same reduction order, so bit-identical floats.
        [
            str(binary),
            str(model_path),
            str(ppm),
            str(out),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def python_instances(model_path, rgb, input_format):
    image = torch.from_numpy(rgb[:, :, ::-1].copy() if input_format == "BGR" else rgb)
    return ExportedModel(str(model_path))([{"image": image.permute(2, 0, 1)}])[0]["instances"]


def assert_same(cpp, expected):
    from pycocotools import mask as mask_util

    assert len(cpp["instances"]) == len(expected) > 0
    h, w = expected.image_size
    assert cpp["image_size"] == [h, w]
    scores = torch.tensor([i["score"] for i in cpp["instances"]])
    assert torch.equal(scores, expected.scores)  # printed with 9 digits: float32 round trip
    assert [i["class"] for i in cpp["instances"]] == expected.pred_classes.tolist()
    boxes = torch.tensor([i["box"] for i in cpp["instances"]], dtype=torch.float32)
    assert torch.equal(boxes, expected.pred_boxes.tensor)
    rles = mask_util.frPyObjects([i["mask"] for i in cpp["instances"]], h, w)
    masks = torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).bool()
    assert torch.equal(masks, expected.pred_masks)


@pytest.mark.parametrize("config", ["tiny_bgr", "shapes_rgb"])
def test_cpp_program_equals_exported_model(config, solo_deploy, tmp_path):
    if config == "tiny_bgr":  # a real photo, BGR input (the COCO configs' INPUT.FORMAT)
        cfg = tiny_cfg("SOLOv2Head", ["INPUT.FORMAT", "BGR"])
        rgb = grace_hopper()
    else:  # the shapes config (RGB), on a drawn scene of odd size
        cfg = solo_cfg(
            "Shapes/SOLOv2_R18.yaml",
            ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLO.HEAD_CHANNELS", "64"],
        )
        rgb = shapes_image()
    model = build(cfg)
    force_candidates(model)
    path = export_model(model.eval(), "torchscript", str(tmp_path), max_candidates=1500, config=cfg)
    expected = python_instances(path, rgb, cfg.INPUT.FORMAT)
    assert_same(run_cpp(solo_deploy, path, rgb, tmp_path), expected)


def test_cpp_program_names_a_file_without_metadata_and_a_bad_image(solo_deploy, tmp_path):
    plain = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(plain))
    Image.fromarray(shapes_image()).save(tmp_path / "image.ppm")
    result = subprocess.run(
        [str(solo_deploy), str(plain), str(tmp_path / "image.ppm"), str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "no SOLO export metadata" in result.stderr
    (tmp_path / "bad.ppm").write_bytes(b"P5\n2 2\n255\n0000")
    result = subprocess.run(
        [str(solo_deploy), str(plain), str(tmp_path / "bad.ppm"), str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    usage = subprocess.run([str(solo_deploy)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: solo_deploy" in usage.stderr
