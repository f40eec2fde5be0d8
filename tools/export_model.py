#!/usr/bin/env python
r"""Export a SOLO / Decoupled SOLO / SOLOv2 model to ONNX, TorchScript or torch.export (.pt2).

Shaped like Detectron2's ``tools/deploy/export_model.py``; run from the repository root::

    python tools/export_model.py --config-file configs/SOLOv2/R50_3x.yaml --format onnx \
        --output exported/ --sample-image demo.jpg --verify \
        MODEL.WEIGHTS checkpoints/SOLOv2_R50_3x.pth
    python tools/export_model.py --config-file configs/Shapes/SOLOv2_R18.yaml --format onnx \
        --output exported/ --run-eval MODEL.WEIGHTS output/shapes/SOLOv2_R18/model_final.pth
    python tools/export_model.py --config-file configs/Shapes/SOLOv2_R18.yaml --format onnx \
        --quantize int8 --calibration-dataset shapes_train --calibration-images 100 \
        --output exported/ --run-eval MODEL.WEIGHTS output/shapes/SOLOv2_R18/model_final.pth

Writes ``OUTPUT/model.{onnx,ts,pt2}``, which ``solo.export.ExportedModel`` (and
``demo/demo.py``) runs. ``--verify`` compares the exported model with the eager one on the sample
image (default: the first image of ``DATASETS.TEST``) and on two other sizes and exits with
status 1 on a mismatch, or when the eager model finds no instance in them (nothing compared);
``--run-eval`` reports the exported model's COCO AP on ``DATASETS.TEST``. MODEL.WEIGHTS must
fit the config exactly; an empty MODEL.WEIGHTS is refused unless ``--allow-random-weights``
(for trying the tool out).

Reduced precision (ONNX only, ``solo.export.quantize``): ``--quantize int8`` also writes
``OUTPUT/model_int8.onnx``, calibrated on ``--calibration-images`` images of
``--calibration-dataset`` read through the test mapper; ``--precision fp16`` writes
``OUTPUT/model_fp16.onnx`` for the CUDA / TensorRT execution providers. ``--verify`` and
``--run-eval`` then run that file, and ``--run-eval`` prints its AP next to the float model's.
``--runtime openvino`` runs ONNX files with OpenVINO instead of ONNX Runtime.
"""

import solo  # noqa: F401  isort: skip  (first: it hides known start-up warnings, solo.utils.cli)
import argparse
import logging
import os
import sys
import torch

from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from solo import get_solo_cfg
from solo.checkpoint import build_inference_model
from solo.data import read_image, register_datasets
from solo.export import (
    EXPORT_FORMATS,
    ExportedModel,
    ExportError,
    compare_predictions,
    export_model,
    quantize,
)
from solo.utils.cli import add_opts_argument, parse_args

logger = logging.getLogger("solo.export_model")

# --runtime of an ONNX file: ExportedModel's runtime and precision.
RUNTIME_OPTIONS = {
    "onnxruntime": {},
    "openvino": dict(runtime="openvino"),
    "openvino_bf16": dict(runtime="openvino", precision="bf16"),
}
# --quantize int8 without --calibration-images: this many images (or all of a smaller dataset).
DEFAULT_CALIBRATION_IMAGES = 100
# --verify: the sample's size, then these scales of it.
VERIFY_SCALES = (0.75, 1.3)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a SOLO model for deployment.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="onnx")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image used for tracing and --verify, resized as at test time (default: a random "
        "320x320 image for tracing, the first image of DATASETS.TEST for --verify)",
    )
    parser.add_argument(
        "--max-candidates",
        type=int,
        default=None,
        help="K0: (cell, class) candidates the exported graph gives a mask (default "
        "MODEL.SOLO.NMS_PRE); exact whenever an image has at most K0 candidates",
    )
    parser.add_argument(
        "--dynamo", action="store_true", help="ONNX through torch.export instead of a trace"
    )
    parser.add_argument("--verify", action="store_true", help="compare with the eager model")
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write OUTPUT/model_int8.onnx (ONNX Runtime static QDQ, per-channel weights)",
    )
    parser.add_argument(
        "--calibration-dataset",
        metavar="NAME",
        help="registered dataset whose images calibrate --quantize (e.g. shapes_train)",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        metavar="N",
        help=f"images to calibrate on (default: {DEFAULT_CALIBRATION_IMAGES}, or all of a smaller "
        "dataset)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="fp16: also write OUTPUT/model_fp16.onnx (float16 network, float32 I/O and "
        "post-processing) for GPU execution providers",
    )
    parser.add_argument(
        "--runtime",
        choices=list(RUNTIME_OPTIONS),
        default="onnxruntime",
        help="runtime of an ONNX file for --verify and --run-eval (openvino_bf16: OpenVINO "
        "computing in bfloat16, where the CPU has it)",
    )
    parser.add_argument("--run-eval", action="store_true", help="COCO AP on DATASETS.TEST")
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="export even though MODEL.WEIGHTS is empty (randomly initialised model)",
    )
    add_opts_argument(parser)
    return parser


def setup_cfg(args):
    cfg = get_solo_cfg(args.config_file, args.opts)
    if cfg.TEST.AUG.ENABLED:
        raise SystemExit(
            "TEST.AUG.ENABLED True: test-time augmentation runs the eager model on several views "
            "and is not part of an exported graph (one view). Export with TEST.AUG.ENABLED False."
        )
    cfg.MODEL.DEVICE = "cpu"  # exported on CPU; ExportedModel(device="cuda") runs on GPU
    cfg.freeze()
    return cfg


def check_weights(cfg, allow_random: bool):
    """Refuse a missing MODEL.WEIGHTS file, and an empty one unless explicitly allowed."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if allow_random:
            logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights.")
            return
        raise SystemExit(
            "MODEL.WEIGHTS is empty: give the trained checkpoint (MODEL.WEIGHTS path.pth), or "
            "--allow-random-weights to export an untrained model."
        )
    if "://" not in weights and not PathManager.isfile(weights):
        raise SystemExit(f"MODEL.WEIGHTS={weights!r}: no such file.")


def check_precision_args(args) -> None:
    """Refuse flag combinations that would be ignored or cannot work."""
    if (args.quantize or args.precision != "fp32") and args.format != "onnx":
        raise SystemExit("--quantize and --precision fp16 write ONNX files: use --format onnx.")
    if args.quantize and args.precision != "fp32":
        raise SystemExit("--quantize int8 and --precision fp16 are two different files: pick one.")
    if args.quantize and not args.calibration_dataset:
        raise SystemExit(
            "--quantize int8 needs --calibration-dataset NAME (a registered dataset, e.g. "
            "shapes_train or the training set of DATASETS.TRAIN)."
        )
    if args.calibration_dataset and not args.quantize:
        raise SystemExit("--calibration-dataset calibrates --quantize int8; add --quantize int8.")
    if args.quantize and args.verify:
        raise SystemExit(
            "--verify checks exactness, which INT8 does not have by design: use --run-eval for "
            "the AP it costs."
        )
    if args.runtime != "onnxruntime" and args.format != "onnx":
        raise SystemExit(f"--runtime {args.runtime} runs ONNX files: use --format onnx.")
    if args.runtime == "openvino_bf16" and args.verify:
        raise SystemExit(
            "--verify checks exactness, which bfloat16 does not have by design: use --run-eval "
            "for the AP it costs, or --runtime openvino (f32, exact) with --verify."
        )
    if args.max_candidates is not None and args.max_candidates < 1:
        raise SystemExit(f"--max-candidates must be >= 1, got {args.max_candidates}.")


def reduce_precision(args, cfg, float_path: str) -> str:
    """Write the --quantize / --precision file next to the float one; returns its path."""
    if args.precision == "fp16":
        return quantize.convert_fp16(float_path, quantize.precision_path(float_path, "fp16"))
    from solo.data import register_builtin_datasets
    from solo.engine.trainer import Trainer

    register_builtin_datasets()
    quantize.check_registered(args.calibration_dataset)
    loader = Trainer.build_test_loader(cfg, args.calibration_dataset)
    float_model = ExportedModel(float_path)
    calibration = quantize.calibration_inputs(
        loader,
        DEFAULT_CALIBRATION_IMAGES if args.calibration_images is None else args.calibration_images,
        lambda image: float_model.graph_input(image)[0],
        allow_fewer=args.calibration_images is None,
    )
    return quantize.quantize_int8(
        float_path, quantize.precision_path(float_path, "int8"), calibration
    )


def load_sample_image(path: str, cfg) -> torch.Tensor:
    """The image as the model sees it at test time: (3, H, W) uint8 in INPUT.FORMAT, resized as
    ``DefaultPredictor`` does (no resizing when INPUT.MIN_SIZE_TEST is 0)."""
    if not PathManager.isfile(path):  # read_image's message is about dataset records
        raise SystemExit(f"--sample-image {path!r}: no such file.")
    image = read_image(path, format=cfg.INPUT.FORMAT)
    if cfg.INPUT.MIN_SIZE_TEST:
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("uint8").transpose(2, 0, 1).copy())


def first_test_image(cfg) -> torch.Tensor:
    """--verify's image without --sample-image: the first image of DATASETS.TEST (a random image
    would compare nothing: a trained model finds no object in it)."""
    from detectron2.data import DatasetCatalog

    from solo.data import register_builtin_datasets

    if not cfg.DATASETS.TEST:
        raise SystemExit(
            "--verify without --sample-image compares on the first image of DATASETS.TEST, which "
            "is empty: give --sample-image FILE, an image in which the model finds objects."
        )
    register_builtin_datasets()
    name = cfg.DATASETS.TEST[0]
    if name not in DatasetCatalog.list():
        raise SystemExit(
            f"--verify without --sample-image compares on the first image of DATASETS.TEST, but "
            f"{name!r} is not a registered dataset: give --sample-image FILE."
        )
    path = DatasetCatalog.get(name)[0]["file_name"]
    logger.info(f"--verify: comparing on {path}, the first image of {name}.")
    return load_sample_image(path, cfg)


def verify(model, exported: ExportedModel, sample: torch.Tensor, **tolerances) -> bool:
    """Eager vs exported on the sample and on it resized by ``VERIFY_SCALES``; logs each.

    Raises:
        SystemExit: the eager model found no instance in any of the images, so nothing was
            compared (a check that compared nothing is not a pass).
    """
    h, w = sample.shape[-2:]
    images = [sample] + [
        torch.nn.functional.interpolate(
            sample[None].float(), size=(round(h * s), round(w * s)), mode="bilinear"
        )[0]
        .round()
        .to(torch.uint8)
        for s in VERIFY_SCALES
    ]
    ok, compared = True, 0
    for image in images:
        inputs = [{"image": image, "height": image.shape[-2], "width": image.shape[-1]}]
        with torch.no_grad():
            expected = model(inputs)[0]["instances"]
        actual = exported(inputs)[0]["instances"]
        problems = compare_predictions(expected, actual, **tolerances)
        compared += len(expected)
        size = "x".join(map(str, image.shape[-2:]))
        if problems:
            ok = False
            logger.error(f"--verify {size}: exported model differs: " + "; ".join(problems))
        else:
            logger.info(f"--verify {size}: {len(actual)} instances, same as the eager model.")
    if ok and compared == 0:
        sizes = ", ".join("x".join(map(str, i.shape[-2:])) for i in images)
        raise SystemExit(
            f"--verify compared nothing: the eager model finds no instance in the sample at "
            f"{sizes}, so equal outputs prove nothing about the export. Give --sample-image "
            "FILE, an image in which the model finds objects (without it, the first image of "
            "DATASETS.TEST is used), and trained MODEL.WEIGHTS."
        )
    return ok


def run_eval(cfg, exported: ExportedModel):
    """COCO evaluation of the exported model on DATASETS.TEST, through the trainer's loaders and
    evaluators (``inference_on_dataset`` calls it like the model)."""
    from detectron2.utils.logger import setup_logger as _setup

    from solo.data import register_builtin_datasets
    from solo.engine.trainer import Trainer

    if not cfg.DATASETS.TEST:  # Trainer.test would return {}: an evaluation of nothing
        raise SystemExit("--run-eval evaluates on DATASETS.TEST, which is empty: set it.")
    _setup(name="detectron2")
    register_builtin_datasets()
    exported.candidate_counts.reset()
    # Predictions next to the evaluated file, one folder per file (not the config's OUTPUT_DIR,
    # where a float and an INT8 evaluation would overwrite each other and the training's own).
    cfg = cfg.clone()
    cfg.defrost()
    stem = os.path.splitext(os.path.basename(exported.path))[0]
    cfg.OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(exported.path)), f"eval_{stem}")
    results = Trainer.test(cfg, exported)
    # Images over K0 are warned about one by one; the count says whether the AP is the eager's.
    logger.info(f"{exported.path}: {exported.candidate_counts.summary(exported.max_candidates)}")
    return results


LAZY_CONFIG_HINT = (
    "is a LazyConfig (Python) file; this tool reads YAML configs. Export a LazyConfig model "
    "from Python: model = instantiate(LazyConfig.load(FILE).model), load its weights with "
    "DetectionCheckpointer(model).load(...), then solo.export.export_model(model.eval(), "
    "'onnx', OUTPUT_DIR) (docs/backbones_and_lazyconfig.md, 'Export per backbone')."
)


def main(argv=None) -> int:
    args = parse_args(get_parser(), argv)
    if args.config_file.endswith(".py"):
        raise SystemExit(f"--config-file {args.config_file} {LAZY_CONFIG_HINT}")
    setup_logger(name="solo")
    cfg = setup_cfg(args)
    register_datasets(cfg)  # the shapes splits and DATASETS.COCO_FORMAT, named by the config
    check_weights(cfg, args.allow_random_weights)
    check_precision_args(args)
    sample = load_sample_image(args.sample_image, cfg) if args.sample_image else None
    model = build_inference_model(cfg, allow_random_weights=args.allow_random_weights)
    try:
        path = export_model(
            model,
            args.format,
            args.output,
            sample_image=sample,
            max_candidates=args.max_candidates,
            dynamo=args.dynamo,
            config=cfg,
        )
    except ExportError as e:
        if args.quantize or args.precision != "fp32":
            raise SystemExit(
                f"--quantize / --precision reduce the precision of the ONNX export, which this "
                f"model cannot have ({e}); only full precision is available for it."
            ) from e
        raise
    logger.info(f"Exported to {path}")
    float_path = path
    if args.quantize or args.precision != "fp32":
        path = reduce_precision(args, cfg, float_path)
        logger.info(f"Wrote {path}")
    runtime = RUNTIME_OPTIONS[args.runtime] if args.format == "onnx" else {}
    exported = ExportedModel(path, **runtime)
    status = 0
    if args.verify:
        if sample is None:
            sample = first_test_image(cfg)
        tolerances = {}
        if args.precision == "fp16":
            tolerances = dict(score_atol=quantize.FP16_SCORE_ATOL, mask_tol=quantize.FP16_MASK_TOL)
        status = 0 if verify(model, exported, sample, **tolerances) else 1
    if args.run_eval:
        results = run_eval(cfg, exported)
        logger.info(f"COCO evaluation of {path}: {results}")
        if path != float_path:
            float_results = run_eval(cfg, ExportedModel(float_path, **runtime))
            precision = args.quantize or args.precision
            table = quantize.precision_report({"fp32": float_results, precision: results})
            print(f"COCO AP on {', '.join(cfg.DATASETS.TEST)} ({args.runtime}):\n{table}")
    return status


if __name__ == "__main__":
    sys.exit(main())
