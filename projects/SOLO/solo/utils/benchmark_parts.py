"""What ``tools/benchmark.py`` times: the configs of ours and of Detectron2's Mask R-CNN R50-FPN,
a model's inference split into its parts, and Detectron2's ``DataLoaderBenchmark`` with its
per-call times kept."""

import functools
import logging
import numpy as np
import os
from typing import Callable, Dict, List, Sequence, Tuple
import torch

from .measure import count_gflops

__all__ = [
    "EXPORT_FORMATS",
    "benchmark_cfg",
    "benchmark_image",
    "candidate_mask_products",
    "data_loader_seconds",
    "describe_model",
    "export_for_runtime",
    "inference_parts",
    "train_dataset_names",
    "trained_weights",
]

logger = logging.getLogger("benchmark")

MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
# Runtimes of an exported model (tools/benchmark.py --runtime): file format, and ExportedModel's
# runtime and precision. *_int8: the ONNX file quantized by solo.export.quantize, calibrated on
# the timed image (latency only: its accuracy is tools/export_model.py --quantize int8
# --run-eval's); *_fp16: its float16 version (for --device cuda: ONNX Runtime's CUDA provider).
EXPORT_FORMATS = {
    "onnxruntime": "onnx",
    "torchscript": "torchscript",
    "openvino": "onnx",
    "openvino_bf16": "onnx",
    "onnxruntime_int8": "onnx",
    "openvino_int8": "onnx",
    "onnxruntime_fp16": "onnx",
}
RUNTIME_OPTIONS = {
    "openvino": dict(runtime="openvino"),
    "openvino_bf16": dict(runtime="openvino", precision="bf16"),
    "openvino_int8": dict(runtime="openvino"),
}


def benchmark_cfg(model: str, task: str, config_file: str, opts: Sequence[str], device: str):
    """The config of ``model`` "ours" (``config_file`` + ``opts``) or "mask_rcnn" (Detectron2's
    model zoo, every detection kept; for ``task`` "data" ours' input pipeline). Random weights,
    except ours' ``MODEL.WEIGHTS`` given in ``opts`` for inference (a trained model, timed as it
    is).

    Raises:
        ValueError: test-time augmentation; trained weights for training or data loading.
    """
    from detectron2.config import get_cfg

    cfg = get_cfg()
    if model == "mask_rcnn":
        from detectron2 import model_zoo

        cfg.merge_from_file(model_zoo.get_config_file(MASK_RCNN_CONFIG))
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: 100 detections out
        if task == "data":  # the same input pipeline: sizes, augmentation, masks, workers
            ours = benchmark_cfg("ours", task, config_file, opts, device)
            cfg.INPUT, cfg.DATALOADER = ours.INPUT.clone(), ours.DATALOADER.clone()
    else:
        from ..config import add_solo_config

        add_solo_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
        if cfg.TEST.AUG.ENABLED:
            raise ValueError(
                "TEST.AUG.ENABLED True: the benchmark times single-view inference (test-time "
                "augmentation is not timed); set TEST.AUG.ENABLED False."
            )
        weights = trained_weights(opts)
        if weights and task != "inference":
            raise ValueError(
                f"MODEL.WEIGHTS {weights}: trained weights are timed in inference only "
                "(training and data loading cost the same with random weights); use --task "
                "inference or drop MODEL.WEIGHTS."
            )
    # Random weights (calibrated, solo.utils.benchmark_calibration), also instead of a config
    # file's ImageNet initialisation; only MODEL.WEIGHTS given on the command line is loaded.
    cfg.MODEL.WEIGHTS = trained_weights(opts) if model != "mask_rcnn" else ""
    cfg.MODEL.DEVICE = device
    return cfg


def trained_weights(opts: Sequence[str]) -> str:
    """The last ``MODEL.WEIGHTS`` value of command-line ``opts`` (KEY VALUE pairs), or ""."""
    pairs = list(opts)
    values = [pairs[i + 1] for i in range(0, len(pairs) - 1, 2) if pairs[i] == "MODEL.WEIGHTS"]
    return str(values[-1]) if values else ""


def benchmark_image(path: str, image_format: str, size: Sequence[int]) -> torch.Tensor:
    """``path`` read as a (3, H, W) uint8 tensor in ``image_format`` (the model's
    ``INPUT.FORMAT``), resized to ``size`` (H, W) when it differs (bilinear, as OpenCV does).

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    import cv2

    from ..data.image_io import read_image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: no such file.")
    image = read_image(path, format=image_format)
    h, w = (int(v) for v in size)
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def describe_model(model: str, config_file: str, cfg, module) -> dict:
    """Config file, head, backbone and parameter count (millions) of a benchmarked model."""
    if model == "mask_rcnn":
        head = f"{cfg.MODEL.ROI_HEADS.NAME} (SCORE_THRESH_TEST 0)"
        config_file = f"detectron2 model zoo: {MASK_RCNN_CONFIG}"
    else:
        head = cfg.MODEL.SOLO.HEAD_NAME
        head += f" (TEST.MASK_FORMAT {cfg.TEST.MASK_FORMAT})" if "MASK_FORMAT" in cfg.TEST else ""
    params = sum(p.numel() for p in module.parameters()) / 1e6 if module else None
    backbone = cfg.MODEL.BACKBONE.NAME
    if "resnet" in backbone:  # MODEL.RESNETS applies to ResNet builders only
        backbone += f" R-{cfg.MODEL.RESNETS.DEPTH}"
    return {
        "config_file": config_file,
        "head": head,
        "backbone": backbone,
        "params_m": round(params, 2) if module else None,
    }


def inference_parts(
    model, batched: List[dict], mask_rcnn: bool
) -> Tuple[Dict[str, Callable], Callable]:
    """Each part of ``model(batched)`` (preprocess, backbone, head, postprocess, total) as a call
    on the previous part's output, in ``model.forward``'s order (ours also ``mask_products``:
    :func:`candidate_mask_products`, a piece of its postprocess), and a function returning the
    fvcore GFLOPs of the backbone and the head."""
    from detectron2.modeling.postprocessing import detector_postprocess

    images = model.preprocess_image(batched)
    features = model.backbone(images.tensor)
    sizes = [(x["height"], x["width"]) for x in batched]
    if mask_rcnn:

        def head(features):
            proposals, _ = model.proposal_generator(images, features, None)
            return model.roi_heads(images, features, proposals, None)[0]

        results = head(features)

        def postprocess():
            return [detector_postprocess(r, *s) for r, s in zip(results, sizes)]

    else:

        def head(features):
            return model.head([features[f] for f in model.head_in_features])

        outputs, padded = head(features), tuple(images.tensor.shape[-2:])
        mask_probs = functools.partial(model.head.inference_mask_probs, outputs)

        def postprocess():
            cate_logits, image_sizes = outputs.cate_logits, images.image_sizes
            return model.postprocessor(cate_logits, mask_probs, padded, image_sizes, sizes)

        mask_products = candidate_mask_products(model.postprocessor, outputs, mask_probs, padded)

    parts = {
        "preprocess": lambda: model.preprocess_image(batched),
        "backbone": lambda: model.backbone(images.tensor),
        "head": lambda: head(features),
        "postprocess": postprocess,
        "total": lambda: model(batched),
    }
    if not mask_rcnn:
        parts["mask_products"] = mask_products
    return parts, lambda: {
        "backbone": count_gflops(model, model.backbone, (images.tensor,)),
        "head": count_gflops(model, head, (features,)),
    }


def candidate_mask_products(post, outputs, mask_probs: Callable, padded) -> Callable:
    """The candidates' mask probabilities the post-processor ``post`` computes for image 0, as a
    call of their own returning how many cells it computed: the head's ``mask_probs`` of every
    distinct cell with a category score above ``post.score_thresh`` (after point NMS), at stride
    4 of ``padded``, in the post-processor's chunks (:func:`candidate_pool.cell_chunks` of
    ``post.rows_per_chunk`` cells) into one kept buffer (SOLOv2: the dynamic convolutions and
    their sigmoid). When there are several chunks the post-processor also recomputes its final
    instances' rows (at most ``max_per_image``), which this call leaves out.
    ``tools/benchmark.py`` times it next to both models' post-processing."""
    from ..modeling.candidate_pool import cell_chunks, consecutive_unique
    from ..modeling.postprocess import grid_scores, split_cells

    scores = grid_scores(outputs.cate_logits)[0]  # (sum S^2, C)
    cells_per_level = [x.shape[-2] * x.shape[-1] for x in outputs.cate_logits]
    flat_cells = (scores > post.score_thresh).nonzero()[:, 0]  # in cell order, as the post's
    size = (padded[0] // 4, padded[1] // 4)
    calls = []
    for start, end in cell_chunks(flat_cells, post.rows_per_chunk(size)):
        unique = consecutive_unique(flat_cells[start:end])[0]
        calls.append(split_cells(unique, cells_per_level))
    buffer = scores.new_empty((max([len(c[0]) for c in calls], default=0), *size))

    def products() -> int:
        for levels, cells in calls:
            mask_probs(0, levels, cells, size, out=buffer[: len(cells)])
        return sum(len(c[0]) for c in calls)

    return products


def export_for_runtime(
    model, runtime: str, directory: str, image, device: str, threads: int, max_candidates=None
):
    """``model`` exported (``solo.export``; K0 ``max_candidates``, default its NMS_PRE) into
    ``directory`` for ``runtime`` (a key of :data:`EXPORT_FORMATS`; sample ``image``) and loaded
    as an ``ExportedModel``; returns it and the file's size in MB."""
    from ..export import ExportedModel, export_model, quantize

    path = export_model(
        model, EXPORT_FORMATS[runtime], directory, image, max_candidates=max_candidates
    )
    if runtime.endswith("_int8"):
        sample = ExportedModel(path).graph_input(image)[0].numpy()
        path = quantize.quantize_int8(path, quantize.precision_path(path, "int8"), [sample])
    if runtime.endswith("_fp16"):
        path = quantize.convert_fp16(path, quantize.precision_path(path, "fp16"))
    options = RUNTIME_OPTIONS.get(runtime, {})
    exported = ExportedModel(path, device=device, num_threads=threads, **options)
    return exported, round(os.path.getsize(path) / 2**20, 1)


def train_dataset_names(cfg) -> List[str]:
    """The config's train datasets if they load here, else the built-in ``shapes_train``."""
    from detectron2.data import DatasetCatalog

    from ..data import register_builtin_datasets

    register_builtin_datasets()
    names = list(cfg.DATASETS.TRAIN)
    try:
        for name in names:
            DatasetCatalog.get(name)
        return names
    except Exception as e:  # noqa: B902 - any loading failure means "not available here"
        logger.info(f"DATASETS.TRAIN {names} not available ({type(e).__name__}): shapes_train")
        return ["shapes_train"]


def data_loader_seconds(
    dicts, mapper, batch_size: int, workers: int, repeats: int, warmup: int, start: Callable
) -> Tuple[List[float], List[float], List[float]]:
    """Detectron2's ``DataLoaderBenchmark`` over ``dicts``: seconds per call of reading raw
    records, of the mapper alone and of the train loader with ``workers`` workers (as in
    training); ``start()`` is called just before the first measurement."""
    from detectron2.data.benchmark import DataLoaderBenchmark

    seconds = []  # per call, of each benchmark that DataLoaderBenchmark only logs

    class Recording(DataLoaderBenchmark):
        def _benchmark(self, *args, **kwargs):
            avg, times = super()._benchmark(*args, **kwargs)
            seconds.append(times)
            return avg, times

    bench = Recording(dicts, mapper=mapper, total_batch_size=batch_size, num_workers=workers)
    start()
    bench.benchmark_dataset(repeats, warmup=warmup)
    bench.benchmark_mapper(repeats, warmup=warmup)
    bench.benchmark_distributed(repeats, warmup=warmup)
    dataset_s, mapper_s, loader_s = seconds
    return dataset_s, mapper_s, loader_s
