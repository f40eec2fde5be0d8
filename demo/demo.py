#!/usr/bin/env python
r"""Draw SOLO / Decoupled SOLO / SOLOv2 predictions on images or a video (Detectron2's demo).

    python demo/demo.py --config-file configs/Shapes/SOLOv2_R18.yaml \
        --input images/ "more/*.jpg" one.png --output vis/ \
        --opts MODEL.WEIGHTS output/shapes/SOLOv2_R18/model_final.pth
    python demo/demo.py --config-file CONFIG --video-input in.mp4 --output vis/ \
        --opts MODEL.WEIGHTS W

``--input`` takes files, globs and directories (their images, sorted by name). Without
``--output`` nothing is written or shown: each image's instance count and time are logged (use
``--show`` for an OpenCV window). ``MODEL.DEVICE`` falls back to ``cpu`` without CUDA unless it is
given in ``--opts``. ``--confidence-threshold`` only filters what is drawn; the model's own
thresholds (``MODEL.SOLO.*``) are used as configured.
"""

import argparse
import glob
import logging
import os
import time
from typing import Dict, List, Optional, Sequence
import cv2
import tqdm

from detectron2.utils.logger import setup_logger

from predictor import VisualizationDemo  # next to this script, as in Detectron2's demo
from solo import get_solo_cfg
from solo.checkpoint import CheckpointMismatchError
from solo.data import read_image, register_builtin_datasets

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINDOW_NAME = "SOLO detections"


class DemoError(Exception):
    """A user-facing problem (bad path, unreadable file); ``main`` reports it via argparse."""


# ----------------------------------------------------------------------------------------------
# Command line and config
# ----------------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw SOLO instance segmentation predictions on images or a video."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="image files, globs (quote them) or directories of images",
    )
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="where to write drawn results: a directory (created if needed; used when there are "
        "several inputs, when it exists, ends with '/' or has no extension), else a file path. "
        "Without it nothing is written.",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.3,
        help="draw only instances with at least this score (default: 0.3); the model's own "
        "thresholds are not changed",
    )
    parser.add_argument("--show", action="store_true", help="also show results in a window")
    parser.add_argument(
        "--class-names",
        nargs="+",
        metavar="NAME",
        help="class names to draw, in training order (MODEL.SOLO.NUM_CLASSES of them), or one "
        "COCO JSON file whose categories give them; default: the metadata of DATASETS.TEST[0]",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


def setup_cfg(args):
    # Same rule as train_net.py: a machine without CUDA runs on the CPU unless told otherwise.
    cfg = get_solo_cfg(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def check_weights(weights: str) -> None:
    """Fail with a hint, not a checkpointer assertion, when a local checkpoint is missing."""
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise DemoError(
            f"MODEL.WEIGHTS '{weights}' does not exist (for the shapes model, run `make demo` "
            "first)"
        )


# ----------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------


def _images_in_directory(directory: str) -> List[str]:
    names = sorted(os.listdir(directory))
    return [
        os.path.join(directory, n)
        for n in names
        if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, n))
    ]


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files, globs and directories -> image paths, in the given order, without duplicates."""
    paths: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            found = _images_in_directory(pattern)
            if not found:
                raise DemoError(f"directory '{pattern}' contains no images {IMAGE_EXTENSIONS}")
        elif os.path.isfile(pattern):
            found = [pattern]
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not found:
                raise DemoError(f"input pattern '{pattern}' matches no files")
        else:
            raise DemoError(f"input '{pattern}' does not exist")
        paths.extend(p for p in found if p not in paths)
    return paths


def output_is_directory(output: str, num_inputs: int) -> bool:
    """Whether ``--output`` names a directory to write ``<output>/<basename>`` into."""
    return (
        num_inputs > 1
        or os.path.isdir(output)
        or output.endswith(("/", os.sep))
        or not os.path.splitext(output)[1]
    )


def output_paths(inputs: Sequence[str], output: Optional[str]) -> Dict[str, Optional[str]]:
    """Map each input to the file its drawing goes to (``None`` without ``--output``)."""
    if not output:
        return {p: None for p in inputs}
    if not output_is_directory(output, len(inputs)):
        return {inputs[0]: output}
    targets = {p: os.path.join(output, os.path.basename(p)) for p in inputs}
    # Inputs from different directories may share a name; don't let one overwrite the other.
    seen: Dict[str, str] = {}
    for path, target in targets.items():
        if target in seen:
            raise DemoError(
                f"inputs '{seen[target]}' and '{path}' would both be written to {target}"
            )
        seen[target] = path
    return targets


def load_image(path: str):
    try:
        return read_image(path, format="BGR")
    except OSError as e:  # missing, not an image, truncated (solo.data.ImageReadError)
        raise DemoError(f"cannot read image '{path}': {e}") from e


def write_image(path: str, bgr_image) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not cv2.imwrite(path, bgr_image):  # OpenCV reports failures (e.g. bad extension) by value
        raise DemoError(f"cannot write image '{path}' (unsupported extension or unwritable path)")


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def run_on_images(demo: VisualizationDemo, targets: Dict[str, Optional[str]], show: bool):
    """Predict, draw and write/show every image; returns the paths written."""
    written = []
    for path in tqdm.tqdm(targets, disable=len(targets) < 2, desc="images"):
        image = load_image(path)
        start = time.perf_counter()
        instances = demo.predict(image)
        logger.info(
            f"{path}: detected {len(instances)} instances in {time.perf_counter() - start:.2f}s"
        )
        if targets[path] is None and not show:
            continue  # drawing can cost more than the model: skip it when nobody looks
        drawn = demo.draw(image, instances)
        if targets[path] is not None:
            write_image(targets[path], drawn)
            written.append(targets[path])
        if show:
            cv2.imshow(WINDOW_NAME, drawn)
            if cv2.waitKey(0) == 27:  # Esc stops early
                break
    return written


def video_output_path(video: str, output: Optional[str]) -> Optional[str]:
    if not output:
        return None
    if output_is_directory(output, 1):
        return os.path.join(output, os.path.splitext(os.path.basename(video))[0] + ".mp4")
    return output


def open_video_writer(path: str, fps: float, width: int, height: int) -> cv2.VideoWriter:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height), True)
    if not writer.isOpened():
        raise DemoError(f"cannot write video '{path}' (does this OpenCV build support 'mp4v'?)")
    return writer


def run_on_video(demo: VisualizationDemo, video_path: str, output: Optional[str], show: bool):
    """Predict and draw every frame; returns ``[output video]`` (or ``[]`` without ``--output``)."""
    if not os.path.isfile(video_path):
        raise DemoError(f"video input '{video_path}' does not exist")
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        raise DemoError(f"cannot open video '{video_path}'")
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else 30.0  # some containers do not store a frame rate
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # an estimate for tqdm only
    target = video_output_path(video_path, output)
    writer = open_video_writer(target, fps, width, height) if target else None
    num_frames_done, num_instances, start = 0, 0, time.perf_counter()
    try:
        for instances, frame in tqdm.tqdm(
            demo.run_on_video(video, draw=writer is not None or show),
            total=num_frames,
            desc="frames",
        ):
            num_frames_done += 1
            num_instances += len(instances)
            if writer is not None:
                writer.write(frame)
            if show:
                cv2.imshow(WINDOW_NAME, frame)
                if cv2.waitKey(1) == 27:
                    break
    finally:
        video.release()
        if writer is not None:
            writer.release()
    logger.info(
        f"{video_path}: {num_frames_done} frames, {num_instances} instances in "
        f"{time.perf_counter() - start:.2f}s" + (f", written to {target}" if target else "")
    )
    return [target] if target else []


def setup_logging() -> None:
    setup_logger(name="fvcore")
    setup_logger()  # "detectron2"
    setup_logger(name="solo")
    setup_logger(name=__name__)
    setup_logger(name=VisualizationDemo.__module__)


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Run the demo; returns the paths written. Errors exit through ``argparse`` (status 2)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        # Validate paths before building the model, so that mistakes fail in a second.
        if not os.path.isfile(args.config_file):
            raise DemoError(f"config file '{args.config_file}' does not exist")
        targets = output_paths(expand_inputs(args.input), args.output) if args.input else None
        cfg = setup_cfg(args)
        check_weights(cfg.MODEL.WEIGHTS)
        setup_logging()
        logger.info(f"Arguments: {args}")
        # Shapes metadata (class names); registration is cheap, nothing is generated here.
        register_builtin_datasets()
        demo = VisualizationDemo(
            cfg, confidence_threshold=args.confidence_threshold, class_names=args.class_names
        )
        if targets is not None:
            return run_on_images(demo, targets, args.show)
        return run_on_video(demo, args.video_input, args.output, args.show)
    except (DemoError, CheckpointMismatchError, ValueError) as e:
        parser.error(str(e))
    finally:
        if args.show:
            cv2.destroyAllWindows()


if __name__ == "__main__":
    main()
