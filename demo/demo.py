#!/usr/bin/env python
r"""Draw SOLO / Decoupled SOLO / SOLOv2 predictions on images, a video or a webcam, and write
them as COCO results (Detectron2's demo).

    python demo/demo.py --config-file configs/Shapes/SOLOv2_R18.yaml \
        --input images/ "more/*.jpg" one.png --output vis/ --output-json predictions.json \
        MODEL.WEIGHTS output/shapes/SOLOv2_R18/model_final.pth
    python demo/demo.py --config-file CONFIG --video-input in.mp4 --output vis/ \
        --output-json tracks.json MODEL.WEIGHTS W

``--input`` takes files, globs and directories (their images, sorted by name). Config overrides
(``KEY VALUE``) come after the flags (``--opts KEY VALUE`` is also accepted). Without
``--output`` nothing is drawn: each image's instance count and time are logged (``--show`` opens
an OpenCV window). ``MODEL.DEVICE`` falls back to ``cpu`` without CUDA unless it is given.
``--confidence-threshold`` filters what is drawn and written; the model's own thresholds
(``MODEL.SOLO.*``) are used as configured.

``--output-json FILE`` writes COCO results (``pycocotools`` ``COCO.loadRes`` reads them): RLE
``segmentation``, XYWH ``bbox``, ``score``, ``category_id`` in the id space of the categories of
``DATASETS.TEST[0]`` (e.g. 1..90 for COCO), ``file_name``, and ``polygons`` with
``--polygons``. Images listed in that dataset's JSON keep their ``image_id``; otherwise images
are numbered 1..N in input order. For a video or webcam, ``image_id`` is the frame index (from
0) and ``track_id`` an instance id that persists across frames (drawn as ``#id``, one colour per
id). Datasets named in ``DATASETS.COCO_FORMAT`` are registered first (class names, ids).
"""

import solo  # noqa: F401  isort: skip  (first: it hides known start-up warnings, solo.utils.cli)
import argparse
import glob
import logging
import os
import time
from typing import Dict, List, Optional, Sequence
import cv2
import tqdm

from detectron2.utils.logger import setup_logger

from predictor import VisualizationDemo, drawing_scale  # next to this script, as in Detectron2
from solo import get_solo_cfg
from solo.checkpoint import CheckpointMismatchError
from solo.data import read_image, register_datasets
from solo.engine.results import (
    dataset_category_ids,
    image_ids_by_file,
    instances_to_coco_results,
    lookup_image_id,
    write_json,
)
from solo.utils.cli import add_opts_argument, parse_args

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
    source.add_argument("--webcam", action="store_true", help="the first webcam (Esc stops)")
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
        "--output-json",
        metavar="FILE",
        help="write the predictions as COCO results (RLE masks, boxes, scores, the dataset's "
        "category ids; track ids for videos)",
    )
    parser.add_argument(
        "--polygons",
        action="store_true",
        help="with --output-json: also give each result its mask's contours ('polygons')",
    )
    add_opts_argument(parser)
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


class ResultsFile:
    """Collects COCO results for ``--output-json`` (nothing when ``path`` is None)."""

    def __init__(self, path: Optional[str], metadata, num_classes: int, polygons: bool):
        self.path, self.polygons, self.results = path, polygons, []
        self.category_ids = dataset_category_ids(metadata, num_classes) if path else None
        self.known_ids = {}
        json_file, image_root = metadata.get("json_file"), metadata.get("image_root")
        if path and json_file and image_root and os.path.isfile(json_file):
            self.known_ids = image_ids_by_file(json_file, image_root)
            self.source = f"'{json_file}'"

    def image_ids(self, paths: Sequence[str]) -> Dict[str, int]:
        """The dataset JSON's ids when it lists every input, else 1..N in input order."""
        found = {p: lookup_image_id(self.known_ids, p) for p in paths}
        if self.known_ids and all(i is not None for i in found.values()):
            logger.info(f"--output-json: image ids of {self.source}")
            return found
        if self.known_ids and any(i is not None for i in found.values()):
            missing = [p for p, i in found.items() if i is None]
            logger.warning(
                f"--output-json: {len(missing)} inputs (e.g. '{missing[0]}') are not in "
                f"{self.source}: all images are numbered 1..{len(paths)} in input order instead."
            )
        return {p: i + 1 for i, p in enumerate(paths)}

    def add(self, instances, image_id: int, **extra) -> None:
        if self.path:
            self.results += instances_to_coco_results(
                instances, image_id, self.category_ids, self.polygons, extra
            )

    def write(self) -> List[str]:
        if not self.path:
            return []
        write_json(self.path, self.results)
        logger.info(f"{len(self.results)} results written to {self.path}")
        return [self.path]


def run_on_images(
    demo: VisualizationDemo, targets: Dict[str, Optional[str]], show: bool, results: ResultsFile
):
    """Predict, draw and write/show every image; returns the paths written."""
    written = []
    image_ids = results.image_ids(list(targets))
    for path in tqdm.tqdm(targets, disable=len(targets) < 2, desc="images"):
        image = load_image(path)
        start = time.perf_counter()
        instances = demo.predict(image)
        logger.info(
            f"{path}: detected {len(instances)} instances in {time.perf_counter() - start:.2f}s"
        )
        results.add(instances, image_ids[path], file_name=path)
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


def open_capture(video_path: Optional[str]) -> cv2.VideoCapture:
    """The video file, or the first webcam when ``video_path`` is None."""
    if video_path is not None and not os.path.isfile(video_path):
        raise DemoError(f"video input '{video_path}' does not exist")
    video = cv2.VideoCapture(video_path if video_path is not None else 0)
    if not video.isOpened():
        raise DemoError(f"cannot open {f'video {video_path!r}' if video_path else 'the webcam'}")
    return video


def run_on_video(
    demo: VisualizationDemo,
    video_path: Optional[str],
    output: Optional[str],
    show: bool,
    results: ResultsFile,
):
    """Predict, track and draw every frame of a video (or the webcam, ``video_path`` None);
    returns ``[output video]`` (or ``[]`` without ``--output``)."""
    video = open_capture(video_path)
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else 30.0  # some containers (and webcams) give no frame rate
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None  # an estimate for tqdm only
    name = video_path or "webcam.mp4"
    target = video_output_path(name, output)
    scale = drawing_scale(height, width)  # drawings of small frames are enlarged
    writer = open_video_writer(target, fps, width * scale, height * scale) if target else None
    num_frames_done, num_instances, start = 0, 0, time.perf_counter()
    try:
        for frame_index, (instances, frame) in enumerate(
            tqdm.tqdm(
                demo.run_on_video(video, draw=writer is not None or show),
                total=num_frames,
                desc="frames",
            )
        ):
            num_frames_done += 1
            num_instances += len(instances)
            results.add(instances, frame_index)
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
        f"{name}: {num_frames_done} frames, {num_instances} instances in "
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
    """Run the demo; returns the paths written (drawings, then the JSON). Errors exit through
    ``argparse`` (status 2)."""
    parser = get_parser()
    args = parse_args(parser, argv)
    if args.polygons and not args.output_json:
        parser.error("--polygons adds contours to the --output-json file: give --output-json.")
    try:
        # Validate paths before building the model, so that mistakes fail in a second.
        if not os.path.isfile(args.config_file):
            raise DemoError(f"config file '{args.config_file}' does not exist")
        targets = output_paths(expand_inputs(args.input), args.output) if args.input else None
        cfg = setup_cfg(args)
        check_weights(cfg.MODEL.WEIGHTS)
        setup_logging()
        logger.info(f"Arguments: {args}")
        # Class names and category ids; registration is cheap, nothing is loaded here.
        register_datasets(cfg)
        demo = VisualizationDemo(
            cfg, confidence_threshold=args.confidence_threshold, class_names=args.class_names
        )
        results = ResultsFile(
            args.output_json, demo.metadata, cfg.MODEL.SOLO.NUM_CLASSES, args.polygons
        )
        if targets is not None:
            written = run_on_images(demo, targets, args.show, results)
        else:
            written = run_on_video(demo, args.video_input, args.output, args.show, results)
        return written + results.write()
    except (DemoError, CheckpointMismatchError, ValueError) as e:
        parser.error(str(e))
    finally:
        if args.show:
            cv2.destroyAllWindows()


if __name__ == "__main__":
    main()
