"""INT8 post-training quantization (``solo.export.quantize``, ``tools/export_model.py --quantize
int8``): what stays float, the flow end to end with its AP report, and the errors."""

import pytest
import torch

from helpers import (
    REPO_ROOT,
    build,
    force_candidates,
    instances_as_annotations,
    load_script,
    random_image,
    shapes_cache,
    tiny_cfg,
)
from solo.export import ExportedModel, ExportError, export_model
from solo.export.quantize import (
    calibration_inputs,
    check_registered,
    in_network,
    precision_path,
    prediction_convs,
    quantize_int8,
)

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e .[export])")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[export])")


@pytest.fixture(scope="module")
def export_tool():
    return load_script("tools/export_model.py", "export_model_tool_int8")


def test_int8_model_keeps_prediction_layers_and_post_processing_float(tmp_path):
    model = build(tiny_cfg("SOLOv2Head"))
    force_candidates(model)
    path = export_model(model.eval(), "onnx", str(tmp_path))
    float_graph = onnx.load(path).graph
    keep_float = prediction_convs(float_graph)
    # The category logits, the mask kernels and the mask features (all levels) are read by the
    # post-processing; backbone and tower convolutions are not.
    assert keep_float and all(in_network(name) for name in keep_float)
    assert any("cate_pred" in name for name in keep_float)
    assert not any(name.startswith("/backbone/") for name in keep_float)
    exported = ExportedModel(path)
    calibration = [
        exported.graph_input(random_image((96, 128), seed))[0].numpy() for seed in range(2)
    ]
    int8_path = quantize_int8(path, precision_path(path, "int8"), calibration)
    graph = onnx.load(int8_path).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    int8_weights = {n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized}
    assert len(int8_weights) > 10 and not int8_weights & keep_float
    # The post-processing reads no dequantized (int8-rounded) tensor.
    for node in graph.node:
        if not in_network(node.name) and node.op_type not in (
            "QuantizeLinear",
            "DequantizeLinear",
        ):
            assert not set(node.input) & dequantized, node.name
    int8 = ExportedModel(int8_path)
    assert int8.metadata["precision"] == "int8"
    instances = int8([{"image": random_image((96, 128), 5)}])[0]["instances"]
    assert len(instances) > 0 and instances.scores.dtype == torch.float32


def test_calibration_takes_n_images_and_names_a_dataset_too_small():
    batches = [[{"image": random_image((40, 50), i)}] for i in range(3)]
    pad = lambda im: im[None]  # noqa: E731
    assert [x.shape for x in calibration_inputs(batches, 2, pad)] == [(1, 3, 40, 50)] * 2
    with pytest.raises(ExportError, match="has only 3 images"):
        calibration_inputs(batches, 5, pad)
    with pytest.raises(ExportError, match="must be >= 1"):
        calibration_inputs(batches, 0, pad)


def test_default_calibration_count_uses_a_smaller_dataset_whole():
    """The export tool's default count (no --calibration-images) takes all images of a smaller
    dataset; a count the user gave is still refused when the dataset is smaller."""
    batches = [[{"image": random_image((40, 50), i)}] for i in range(3)]
    pad = lambda im: im[None]  # noqa: E731
    assert len(calibration_inputs(batches, 100, pad, allow_fewer=True)) == 3
    with pytest.raises(ExportError, match="has only 3 images"):
        calibration_inputs(batches, 100, pad)
    with pytest.raises(ExportError, match="has only 0 images"):
        calibration_inputs([], 100, pad, allow_fewer=True)


def test_unregistered_calibration_dataset_is_named_with_the_registered_ones():
    with pytest.raises(ExportError, match="'no_such_set' is not a registered dataset.*coco_2017"):
        check_registered("no_such_set")


def pseudo_labelled(dicts, model, per_image=10):
    """The images annotated with the float model's own best predictions, so that its AP is high
    and quantization errors show as a lower AP."""

    from detectron2.data.detection_utils import read_image

    records = []
    for d in dicts:
        img = torch.as_tensor(read_image(d["file_name"], "RGB").transpose(2, 0, 1).copy())
        with torch.no_grad():
            pred = model([{"image": img}])[0]["instances"][:per_image]
        annotations = instances_as_annotations(pred)
        keys = ("file_name", "height", "width", "image_id")
        records.append({**{k: d[k] for k in keys}, "annotations": annotations})
    return records


def test_export_tool_writes_int8_model_and_reports_its_ap_next_to_float(
    export_tool, tmp_path, capsys
):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from solo import get_solo_cfg
    from solo.data.shapes import register_shapes_datasets

    opts = ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLO.HEAD_CHANNELS", "64", "MODEL.DEVICE", "cpu"]
    cfg = get_solo_cfg(str(REPO_ROOT / "configs/Shapes/SOLOv2_R18.yaml"), opts)
    model = build(cfg)
    force_candidates(model)
    model.eval()
    split, labelled = "shapes_int8_calib", "shapes_int8_pseudo_gt"
    with shapes_cache(tmp_path / "shapes") as root:
        register_shapes_datasets(str(root), splits={split: dict(num_images=3, seed=5)})
        records = pseudo_labelled(DatasetCatalog.get(split), model)
    DatasetCatalog.register(labelled, lambda: records)
    MetadataCatalog.get(labelled).set(thing_classes=["a", "b", "c"], evaluator_type="coco")
    weights, config = tmp_path / "model.pth", tmp_path / "cfg.yaml"
    torch.save({"model": model.state_dict()}, weights)
    config.write_text(cfg.dump())
    argv = ["--config-file", str(config), "--format", "onnx", "--output", str(tmp_path / "out")]
    argv += ["--quantize", "int8", "--calibration-dataset", split, "--calibration-images", "2"]
    argv += ["--run-eval", "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", f"('{labelled}',)"]
    argv += ["OUTPUT_DIR", str(tmp_path / "eval"), "DATALOADER.NUM_WORKERS", "0"]
    try:
        with shapes_cache(tmp_path / "shapes"):
            assert export_tool.main(argv) == 0
    finally:
        DatasetCatalog.remove(labelled)
        MetadataCatalog.remove(labelled)
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert (tmp_path / "out" / "model_int8.onnx").is_file()
    # Each file's predictions next to it, not in OUTPUT_DIR (where INT8's were overwritten).
    for stem in ("model", "model_int8"):
        assert (tmp_path / "out" / f"eval_{stem}" / "inference").is_dir()
    assert not (tmp_path / "eval" / "inference").exists()
    report = capsys.readouterr().out
    assert "fp32" in report and "int8" in report and "change int8" in report
    rows = {
        line[:24].strip(): [float(v) for v in line[24:].split()]
        for line in report.splitlines()
        if line.startswith(("segm", "bbox"))
    }
    float_ap, int8_ap, change = rows["segm AP"]
    assert float_ap > 20  # the float model scores well on its own predictions
    # Relaxed bound: force_candidates ties hundreds of scores near 0.98, whose order int8
    # rounding shuffles (58 -> 24 AP here); the shapes model's bound, within 1.0 AP of float,
    # is measured by the command in docs/deploy.md.
    assert int8_ap > 10 and change == pytest.approx(int8_ap - float_ap, abs=0.02)


def test_export_tool_refuses_int8_without_dataset_for_other_formats_and_for_dcn(
    export_tool, tmp_path
):
    cfg = tiny_cfg("SOLOv2Head")
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    common = ["--config-file", str(config), "--output", str(tmp_path), "--allow-random-weights"]
    no_weights = ["MODEL.WEIGHTS", ""]
    with pytest.raises(SystemExit, match="needs --calibration-dataset"):
        export_tool.main(common + ["--quantize", "int8"] + no_weights)
    int8 = ["--quantize", "int8", "--calibration-dataset", "shapes_train"]
    with pytest.raises(SystemExit, match="use --format onnx"):
        export_tool.main(common + ["--format", "torchscript"] + int8 + no_weights)
    with pytest.raises(SystemExit, match="--verify checks exactness"):
        export_tool.main(common + int8 + ["--verify"] + no_weights)
    with pytest.raises(SystemExit, match="--verify checks exactness, which bfloat16"):
        export_tool.main(common + ["--runtime", "openvino_bf16", "--verify"] + no_weights)
    with pytest.raises(SystemExit, match="--max-candidates must be >= 1, got 0"):
        export_tool.main(common + int8 + ["--max-candidates", "0"] + no_weights)
    dcn = ["MODEL.SOLO.TOWER_DCN", "DCNv2", "MODEL.SOLO.TOWER_DCN_LAYERS", "last"]
    with pytest.raises(SystemExit, match="deformable convolutions.*pt2.*only full precision"):
        export_tool.main(common + int8 + no_weights + dcn)
    with pytest.raises(ExportError, match="'nope' is not a registered dataset"):
        export_tool.main(
            common + ["--quantize", "int8", "--calibration-dataset", "nope"] + no_weights
        )
