"""solo.evaluation: COCO AP that sees every detection (TEST.DETECTIONS_PER_IMAGE), 0 instead of
NaN without predictions, and ground truth without 'area'/'iscrowd' or with uncompressed RLE."""

import json
import logging
import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BitMasks, BoxMode, Instances

from solo.evaluation import build_solo_evaluator

LOGGER = "solo.evaluation"
HEIGHT, WIDTH = 200, 300


def grid_of_squares(num_objects, size=12, step=20):
    """``num_objects`` disjoint squares (x0, y0, x1, y1) on a HEIGHT x WIDTH image."""
    per_row = WIDTH // step
    return [
        (
            step * (i % per_row),
            step * (i // per_row),
            step * (i % per_row) + size,
            step * (i // per_row) + size,
        )
        for i in range(num_objects)
    ]


def square_masks(boxes):
    masks = torch.zeros((len(boxes), HEIGHT, WIDTH), dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


def perfect_predictions(boxes):
    instances = Instances((HEIGHT, WIDTH))
    masks = BitMasks(square_masks(boxes))
    instances.pred_masks = masks.tensor
    instances.pred_boxes = masks.get_bounding_boxes()
    # Distinct scores, so that every cap keeps the same (first) detections.
    instances.scores = torch.linspace(0.99, 0.5, len(boxes))
    instances.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
    return instances


def uncompressed_rle(mask):
    flat = mask.numpy().astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], change])).tolist()}


def coco_ground_truth(boxes, drop=(), rle=False):
    annotations = []
    masks = square_masks(boxes)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        polygons = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        anno = {
            "id": i + 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": uncompressed_rle(masks[i]) if rle else polygons,
            "area": float((x1 - x0) * (y1 - y0)),
            "iscrowd": 0,
        }
        annotations.append({k: v for k, v in anno.items() if k not in drop})
    return {
        "images": [{"id": 1, "file_name": "img.png", "height": HEIGHT, "width": WIDTH}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "square"}],
    }


@pytest.fixture
def dataset(tmp_path):
    """Register a one-image COCO JSON dataset; returns (name, cfg) and cleans up."""
    names = []

    def register(boxes, drop=(), rle=False):
        name = f"evaluation_{len(names)}_{tmp_path.name}"
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(coco_ground_truth(boxes, drop, rle)))
        register_coco_instances(name, {}, str(path), str(tmp_path))
        DatasetCatalog.get(name)  # sets the category id mapping, as the test loader does
        names.append(name)
        cfg = get_cfg()
        cfg.OUTPUT_DIR = str(tmp_path / "output")
        return name, cfg

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def evaluate(evaluator, instances):
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": instances}])
    return evaluator.evaluate()


def test_150_perfect_detections_on_one_image_score_ap_100(dataset):
    boxes = grid_of_squares(150)
    name, cfg = dataset(boxes)
    cfg.TEST.DETECTIONS_PER_IMAGE = 150
    results = evaluate(build_solo_evaluator(cfg, name), perfect_predictions(boxes))
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100.0)
        assert results[task]["AP50"] == pytest.approx(100.0)

    # Detectron2's default keeps COCO's 100 per image: the last 50 objects count as missed.
    plain = COCOEvaluator(name, tasks=("segm",), output_dir=cfg.OUTPUT_DIR)
    plain_ap = evaluate(plain, perfect_predictions(boxes))["segm"]["AP"]
    assert plain_ap == pytest.approx(66.3, abs=0.05)


def test_detections_beyond_the_cap_are_not_counted(dataset):
    """The cap is TEST.DETECTIONS_PER_IMAGE itself: with 120, 30 of 150 objects are missed."""
    boxes = grid_of_squares(150)
    name, cfg = dataset(boxes)
    cfg.TEST.DETECTIONS_PER_IMAGE = 120
    results = evaluate(build_solo_evaluator(cfg, name), perfect_predictions(boxes))
    assert results["segm"]["AP"] == pytest.approx(80.0, abs=0.5)


def test_no_prediction_at_all_scores_0_ap_not_nan(dataset, caplog):
    boxes = grid_of_squares(5)
    name, cfg = dataset(boxes)
    empty = perfect_predictions(boxes)[:0]
    plain = COCOEvaluator(name, tasks=("segm",), output_dir=cfg.OUTPUT_DIR)
    assert np.isnan(evaluate(plain, empty)["segm"]["AP"])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = evaluate(build_solo_evaluator(cfg, name), empty)
    assert results["segm"]["AP"] == 0.0 and results["bbox"]["AP50"] == 0.0
    assert "No segm predictions above the score threshold: AP is 0." in caplog.text


@pytest.mark.parametrize(
    "drop, rle",
    [(("area",), False), (("iscrowd",), False), (("area", "iscrowd"), False), (("area",), True)],
)
def test_ground_truth_without_area_or_iscrowd_is_completed_when_the_evaluator_is_built(
    dataset, caplog, drop, rle
):
    boxes = grid_of_squares(8)
    name, cfg = dataset(boxes, drop=drop, rle=rle)
    plain = COCOEvaluator(name, tasks=("segm",), output_dir=cfg.OUTPUT_DIR)
    with pytest.raises(KeyError):  # after the whole inference, in pycocotools
        evaluate(plain, perfect_predictions(boxes))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        evaluator = build_solo_evaluator(cfg, name)  # before inference starts
    missing_area = 8 if "area" in drop else 0
    assert f"{missing_area} annotations without 'area'" in caplog.text
    assert MetadataCatalog.get(name).json_file in caplog.text
    areas = [a["area"] for a in evaluator._coco_api.dataset["annotations"]]
    assert areas == [144.0] * 8  # 12 x 12 squares
    results = evaluate(evaluator, perfect_predictions(boxes))
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "mask_kind, plain_error",
    [("uncompressed_rle", "Expected bytes"), ("array", "Unknown segmentation type")],
)
def test_dataset_without_json_file_and_with_uncompressed_rle_or_array_masks_is_evaluated(
    tmp_path, mask_kind, plain_error
):
    boxes = grid_of_squares(6)
    masks = square_masks(boxes)
    encode = uncompressed_rle if mask_kind == "uncompressed_rle" else lambda m: m.numpy()
    record = {
        "file_name": "img.png",
        "image_id": 1,
        "height": HEIGHT,
        "width": WIDTH,
        "annotations": [
            {
                "bbox": list(box),
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": 0,
                "segmentation": encode(mask),
                "iscrowd": 0,
            }
            for box, mask in zip(boxes, masks)
        ],
    }
    name = f"evaluation_hand_registered_{mask_kind}"
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(thing_classes=["square"])
    try:
        cfg = get_cfg()
        cfg.OUTPUT_DIR = str(tmp_path)
        with pytest.raises(TypeError, match=plain_error):
            COCOEvaluator(name, output_dir=str(tmp_path / "plain"))
        MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(thing_classes=["square"])
        results = evaluate(build_solo_evaluator(cfg, name), perfect_predictions(boxes))
        assert results["segm"]["AP"] == pytest.approx(100.0)
        assert name + "__solo_coco_conversion" not in DatasetCatalog.list()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_ground_truth_without_bbox_gets_the_mask_box_when_the_evaluator_is_built(dataset, caplog):
    boxes = grid_of_squares(8)
    name, cfg = dataset(boxes, drop=("bbox",))
    plain = COCOEvaluator(name, tasks=("bbox",), output_dir=cfg.OUTPUT_DIR)
    with pytest.raises(KeyError, match="bbox"):  # after the whole inference, in pycocotools
        evaluate(plain, perfect_predictions(boxes))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        evaluator = build_solo_evaluator(cfg, name)
    assert "8 without 'bbox'" in caplog.text
    derived = [a["bbox"] for a in evaluator._coco_api.dataset["annotations"]]
    assert derived == [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes]
    results = evaluate(evaluator, perfect_predictions(boxes))
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_ground_truth_without_segmentation_is_refused_before_inference(dataset):
    boxes = grid_of_squares(7)
    name, cfg = dataset(boxes, drop=("segmentation",))
    plain = COCOEvaluator(name, tasks=("segm",), output_dir=cfg.OUTPUT_DIR)
    with pytest.raises(KeyError, match="segmentation"):  # after the whole inference
        evaluate(plain, perfect_predictions(boxes))
    with pytest.raises(
        ValueError,
        match=r"7 of 7 annotations have no 'segmentation' \(ids " r"1, 2, 3, 4, 5, \.\.\.\)",
    ) as info:
        build_solo_evaluator(cfg, name)
    assert MetadataCatalog.get(name).json_file in str(info.value)


def test_ground_truth_without_category_id_names_the_file(tmp_path):
    ground_truth = coco_ground_truth(grid_of_squares(3))
    del ground_truth["annotations"][1]["category_id"]
    path = tmp_path / "no_category.json"
    path.write_text(json.dumps(ground_truth))
    name = "evaluation_without_category_id"
    register_coco_instances(name, {}, str(path), str(tmp_path))
    try:
        cfg = get_cfg()
        cfg.OUTPUT_DIR = str(tmp_path / "output")
        with pytest.raises(ValueError, match=r"an annotation has no 'category_id'") as info:
            build_solo_evaluator(cfg, name)
        assert str(path) in str(info.value)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_derived_areas_equal_detectron2_polygon_and_pycocotools_rle_areas(tmp_path):
    """complete_coco_annotations works on the whole file at once; its areas are those of
    Detectron2's PolygonMasks (multi-part polygons) and pycocotools (RLE, also uncompressed)."""
    import pycocotools.mask as mask_util
    from pycocotools.coco import COCO

    from detectron2.structures import PolygonMasks

    from solo.evaluation import complete_coco_annotations

    rng = np.random.default_rng(0)
    segms = [[rng.uniform(0, 150, 2 * n).tolist() for n in (3, 7)] for _ in range(5)]
    segms.append([[10, 10, 60, 10, 35, 50]])
    masks = square_masks(grid_of_squares(3))
    rles = [uncompressed_rle(masks[0])]
    compressed = mask_util.encode(np.asfortranarray(masks[1].numpy().astype(np.uint8)))
    rles.append({"size": compressed["size"], "counts": compressed["counts"].decode()})
    ground_truth = coco_ground_truth(grid_of_squares(len(segms) + len(rles) + 1), drop=("area",))
    for ann, segm in zip(ground_truth["annotations"], segms + rles):
        ann["segmentation"] = segm
    del ground_truth["annotations"][-1]["segmentation"]  # box only: area from the box
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ground_truth))
    coco = COCO(str(path))
    assert complete_coco_annotations(coco, str(path)) == len(ground_truth["annotations"])
    areas = [ann["area"] for ann in coco.dataset["annotations"]]
    expected = [float(PolygonMasks([segm]).area()[0]) for segm in segms]
    with_rle = coco.dataset["annotations"][len(segms) : -1]
    expected += [float(mask_util.area(coco.annToRLE(ann))) for ann in with_rle]
    np.testing.assert_allclose(areas[:-1], expected, rtol=1e-9)
    assert areas[:-1][len(segms) :] == [144.0, 144.0] and areas[-1] == 144.0
