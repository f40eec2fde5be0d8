"""The evaluator follows the dataset's evaluator_type (as Detectron2's train_net): LVIS and
Cityscapes datasets are scored by their own rules, so perfect predictions score AP 100 (COCO's
evaluator scored a perfect model 0 AP on LVIS: 0-based classes against 1-based ids)."""

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from detectron2.data.datasets.lvis import load_lvis_json
from detectron2.evaluation import CityscapesInstanceEvaluator, LVISEvaluator

from helpers import (
    CONFIG_DIR,
    capture_warnings,
    load_train_net,
    read_metrics,
    run_main,
    solo_cfg,
    write_shapes_as_cityscapes,
    write_shapes_as_lvis,
)
from solo.engine.trainer import Trainer
from solo.evaluation import EVALUATORS, SOLOCOCOEvaluator, build_solo_evaluator

pytest.importorskip("lvis")
pytest.importorskip("cityscapesscripts")


@pytest.fixture
def registered():
    """Register datasets for one test: ``register(name, loader, **metadata)``; removed after."""
    names = []

    def register(name, loader, **metadata):
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**metadata)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def perfect_predictions(records):
    """Per record, the ground truth as predictions (classes as the loader mapped them)."""
    outputs = []
    for i, record in enumerate(records):
        size = (record["height"], record["width"])
        gt = utils.annotations_to_instances(record["annotations"], size, mask_format="bitmask")
        instances = utils.filter_empty_instances(gt)
        result = type(instances)(size)
        result.pred_masks = instances.gt_masks.tensor
        result.pred_boxes = instances.gt_masks.get_bounding_boxes()
        result.scores = torch.linspace(0.99, 0.5, len(instances))
        result.pred_classes = instances.gt_classes
        outputs.append({"instances": result})
    return outputs


def evaluate(evaluator, records):
    evaluator.reset()
    for record, output in zip(records, perfect_predictions(records)):
        inputs = {k: record[k] for k in ("image_id", "file_name", "height", "width")}
        evaluator.process([inputs], [output])
    return evaluator.evaluate()


def lvis_dataset(tmp_path, registered, name="shapes_as_lvis_val"):
    json_file, image_root = write_shapes_as_lvis(tmp_path)
    # What register_lvis_instances does for a dataset without built-in metadata (it would look
    # up LVIS's 1203 classes by name): load_lvis_json maps category id k to class k - 1.
    return registered(
        name,
        lambda: load_lvis_json(json_file, image_root),
        json_file=json_file,
        image_root=image_root,
        evaluator_type="lvis",
        thing_classes=["circle", "triangle", "rectangle"],
    )


def test_perfect_predictions_on_lvis_data_score_ap_100_with_federated_rare_common_frequent(
    tmp_path, registered
):
    name = lvis_dataset(tmp_path, registered)
    cfg = solo_cfg(opts=["OUTPUT_DIR", str(tmp_path / "out"), "TEST.DETECTIONS_PER_IMAGE", "300"])
    evaluator = Trainer.build_evaluator(cfg, name)
    assert isinstance(evaluator, LVISEvaluator)
    assert evaluator._max_dets_per_image == 300
    records = DatasetCatalog.get(name)
    assert sum(len(r["annotations"]) for r in records) >= 5
    results = evaluate(evaluator, records)
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "APr", "APc", "APf"):
            assert results[task][metric] == pytest.approx(100.0), (task, metric)


def test_coco_evaluator_on_lvis_data_would_score_the_perfect_model_far_below_100(
    tmp_path, registered
):
    """The failure the evaluator_type table prevents (detectron2#845): COCO's evaluator keeps
    the 0-based classes against LVIS's 1-based category ids."""
    name = lvis_dataset(tmp_path, registered)
    records = DatasetCatalog.get(name)
    evaluator = SOLOCOCOEvaluator(name, tasks=("segm",), output_dir=str(tmp_path / "coco"))
    assert evaluate(evaluator, records)["segm"]["AP"] < 50


def test_lvis_with_fewer_than_300_detections_per_image_warns(tmp_path, registered, caplog):
    name = lvis_dataset(tmp_path, registered)
    cfg = solo_cfg(opts=["OUTPUT_DIR", str(tmp_path / "out")])  # COCO's 100
    with capture_warnings(caplog, "solo.evaluation"):
        build_solo_evaluator(cfg, name)
    assert "TEST.DETECTIONS_PER_IMAGE 300" in caplog.text


def test_lvis_category_ids_that_are_not_1_to_n_are_refused(tmp_path, registered):
    json_file, _ = write_shapes_as_lvis(tmp_path)
    text = open(json_file).read().replace('"id": 3, "name"', '"id": 7, "name"')
    assert '"id": 7' in text
    open(json_file, "w").write(text)
    name = registered("lvis_gappy", list, json_file=json_file, evaluator_type="lvis")
    with pytest.raises(ValueError, match=r"category ids \[1, 2, 7\] are not 1..3"):
        build_solo_evaluator(solo_cfg(opts=["TEST.DETECTIONS_PER_IMAGE", "300"]), name)


def test_perfect_predictions_on_cityscapes_data_score_ap_100_leaving_no_file_in_the_cwd(
    tmp_path, registered, monkeypatch
):
    from cityscapesscripts.helpers.labels import labels

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # cityscapesscripts writes matches.json into the cwd
    image_dir, gt_dir = write_shapes_as_cityscapes(tmp_path)
    name = registered(
        "shapes_as_cityscapes_val",
        lambda: load_cityscapes_instances(image_dir, gt_dir, from_json=False, to_polygons=False),
        image_dir=image_dir,
        gt_dir=gt_dir,
        evaluator_type="cityscapes_instance",
        thing_classes=[
            label.name for label in labels if label.hasInstances and not label.ignoreInEval
        ],
    )
    evaluator = Trainer.build_evaluator(solo_cfg(opts=["OUTPUT_DIR", str(tmp_path / "o")]), name)
    assert isinstance(evaluator, CityscapesInstanceEvaluator)
    records = DatasetCatalog.get(name)
    classes = {a["category_id"] for r in records for a in r["annotations"]}
    assert len(classes) == 3  # car, person, truck
    results = evaluate(evaluator, records)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert list(workdir.iterdir()) == [] and workdir == type(workdir).cwd()
    assert results["segm"]["AP50"] == pytest.approx(100.0)


def test_cityscapes_dataset_with_non_cityscapes_class_names_is_refused_before_inference(
    registered,
):
    name = registered(
        "cityscapes_like",
        list,
        gt_dir="gtFine/val",
        evaluator_type="cityscapes_instance",
        thing_classes=["car", "circle"],
    )
    with pytest.raises(ValueError, match=r"unknown class names \['circle'\]"):
        build_solo_evaluator(solo_cfg(), name)


def test_unknown_evaluator_type_is_refused_naming_it_and_how_to_pass_an_evaluator(registered):
    name = registered("semantic_only", list, evaluator_type="sem_seg", thing_classes=["a"])
    with pytest.raises(ValueError, match="evaluator_type 'sem_seg'") as error:
        build_solo_evaluator(solo_cfg(), name)
    assert "evaluators=[...]" in str(error.value) and "EVALUATORS" in str(error.value)


def test_evaluator_table_has_coco_lvis_and_cityscapes_instance():
    assert {"coco", "lvis", "cityscapes_instance"} <= set(EVALUATORS)


def test_dataset_without_evaluator_type_is_evaluated_as_coco(tmp_path, registered):
    name = registered("no_type", list, thing_classes=["a"], json_file=str(tmp_path / "x.json"))
    (tmp_path / "x.json").write_text(
        '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}'
    )
    assert isinstance(build_solo_evaluator(solo_cfg(), name), SOLOCOCOEvaluator)


# train_net end to end on the synthetic data with the shipped LVIS / Cityscapes configs, narrowed
# to a tiny model: two iterations, then the final evaluation by the dataset's own rules.
TINY = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLO.NUM_STACKED_CONVS", "1",
    "MODEL.SOLO.HEAD_CHANNELS", "64", "MODEL.SOLO.MASK_KERNEL_CHANNELS", "32",
    "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
]  # fmt: skip


def run_train_net(config, dataset, num_classes, size, output_dir, caplog):
    opts = TINY + ["MODEL.SOLO.NUM_CLASSES", str(num_classes), "OUTPUT_DIR", str(output_dir)]
    opts += ["DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)"]
    opts += ["INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(2 * size)]
    opts += ["INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(2 * size)]
    with capture_warnings(caplog, "detectron2"), caplog.at_level("INFO", "detectron2"):
        return run_main(load_train_net(), ["--config-file", str(CONFIG_DIR / config), *opts])


def test_train_net_trains_with_repeat_factor_sampling_and_evaluates_lvis(
    tmp_path, registered, caplog
):
    name = lvis_dataset(tmp_path, registered)
    run_train_net("LVIS/SOLOv2_R50_1x.yaml", name, 3, 128, tmp_path / "out", caplog)
    assert "Using training sampler RepeatFactorTrainingSampler" in caplog.text
    final = read_metrics(tmp_path / "out")[-1]
    for metric in ("AP", "APr", "APc", "APf"):  # a 2-iteration model: 0 (not NaN) or more
        assert final[f"segm/{metric}"] >= 0


def test_train_net_trains_and_evaluates_cityscapes(tmp_path, registered, caplog):
    from cityscapesscripts.helpers.labels import labels

    image_dir, gt_dir = write_shapes_as_cityscapes(tmp_path, num_images=2)
    name = registered(
        "shapes_as_cityscapes_train_net",
        lambda: load_cityscapes_instances(image_dir, gt_dir, from_json=False, to_polygons=False),
        image_dir=image_dir,
        gt_dir=gt_dir,
        evaluator_type="cityscapes_instance",
        thing_classes=[
            label.name for label in labels if label.hasInstances and not label.ignoreInEval
        ],
    )
    run_train_net("Cityscapes/SOLOv2_R50.yaml", name, 8, 128, tmp_path / "out", caplog)
    final = read_metrics(tmp_path / "out")[-1]
    assert final["segm/AP"] >= 0 and final["segm/AP50"] >= 0
