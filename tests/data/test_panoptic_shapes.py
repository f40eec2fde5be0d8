"""Panoptic shapes dataset, panoptic mapper, dataset/task checks and PQ evaluation
(solo/data/panoptic_shapes.py, solo/data/panoptic_mapper.py, solo/evaluation.py)."""

import json
import numpy as np
import os
import pytest
import torch
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from helpers import REPO_ROOT, load_train_net, read_metrics, run_main, solo_cfg
from solo.data import DatasetError
from solo.data.panoptic_mapper import PanopticDatasetMapper, check_dataset_tasks
from solo.data.panoptic_shapes import (
    generate_panoptic_shapes_split,
    register_panoptic_shapes_datasets,
)
from solo.data.shapes import ShapesSplit
from solo.evaluation import build_solo_evaluator
from solo.modeling.panoptic import panoptic_outputs

SPLIT = "shapes_pqtest_panoptic"
PANOPTIC, INSTANCES = f"{SPLIT}_separated", f"{SPLIT}_instances"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 12-image panoptic shapes split, registered (and generated) once for the module."""
    root = tmp_path_factory.mktemp("panoptic_shapes")
    for name in (PANOPTIC, INSTANCES):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_panoptic_shapes_datasets(str(root), {SPLIT: {"num_images": 12, "seed": 5}})
    return DatasetCatalog.get(PANOPTIC)


def panoptic_cfg(opts=()):
    cfg = solo_cfg("Shapes/PanopticSOLOv2_R18.yaml")
    cfg.DATASETS.TRAIN = (PANOPTIC,)
    cfg.DATASETS.TEST = (PANOPTIC,)
    cfg.merge_from_list(list(opts))
    return cfg


def read_labels(path):
    return utils.read_image(path, "L")[..., 0]


def test_panoptic_pngs_semantic_pngs_and_instance_masks_agree(dataset):
    metadata = MetadataCatalog.get(PANOPTIC)
    with open(metadata.panoptic_json) as f:
        panoptic = {a["image_id"]: a for a in json.load(f)["annotations"]}
    seen_void = seen_stuff = 0
    for record in dataset:
        name = os.path.basename(record["file_name"])
        rgb = utils.read_image(os.path.join(metadata.panoptic_root, name), "RGB")
        ids = rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        semantic = read_labels(record["sem_seg_file_name"])
        segments = panoptic[record["image_id"]]["segments_info"]
        things = [s for s in segments if s["category_id"] <= 3]
        # Every instance annotation is exactly one thing segment of the panoptic PNG.
        assert len(things) == len(record["annotations"])
        for anno, segment in zip(record["annotations"], things):
            mask = mask_util.decode(anno["segmentation"]).astype(bool)
            assert np.array_equal(mask, ids == segment["id"])
            assert (semantic[mask] == 0).all()
        for segment in segments:
            assert segment["area"] == (ids == segment["id"]).sum()
            if segment["category_id"] > 3:  # stuff 4, 5, 6 -> contiguous 1, 2, 3
                assert (semantic[ids == segment["id"]] == segment["category_id"] - 3).all()
                seen_stuff += 1
        assert np.array_equal(ids == 0, semantic == 255)  # void in both
        seen_void += (ids == 0).any()
    assert seen_stuff > len(dataset) and seen_void >= 1


def test_generation_is_deterministic(dataset, tmp_path):
    spec = MetadataCatalog.get(PANOPTIC).panoptic_shapes_split
    generate_panoptic_shapes_split(str(tmp_path), spec)
    metadata = MetadataCatalog.get(PANOPTIC)
    for key in ("panoptic_json", "json_file"):
        relative = os.path.relpath(metadata.get(key), metadata.shapes_root)
        with open(metadata.get(key), "rb") as a, open(tmp_path / relative, "rb") as b:
            assert a.read() == b.read()
    assert isinstance(spec, ShapesSplit)


def test_semantic_targets_follow_the_resize_and_flip_of_image_and_masks(dataset):
    cfg = panoptic_cfg()
    augmentations = [T.ResizeShortestEdge(200, 1000), T.RandomFlip(prob=1.0)]
    mapper = PanopticDatasetMapper(cfg, is_train=True)
    mapper.augmentations = T.AugmentationList(augmentations)
    record = next(r for r in dataset if len(r["annotations"]) >= 2)
    out = mapper(record)
    semantic = read_labels(record["sem_seg_file_name"])
    h, w = out["image"].shape[-2:]
    assert (h, w) == (200, 250) and out["sem_seg"].shape == (h, w)
    expected = T.ResizeTransform(128, 160, h, w, interp=0).apply_segmentation(semantic)[:, ::-1]
    assert torch.equal(out["sem_seg"], torch.from_numpy(expected.copy()).long())
    # Things in the semantic target are exactly the transformed instance masks.
    masks = out["instances"].gt_masks.tensor
    assert torch.equal(out["sem_seg"] == 0, masks.any(0))


def test_record_without_semantic_png_trains_with_an_all_ignored_target(dataset):
    record = dict(dataset[0])
    record.pop("sem_seg_file_name")
    out = PanopticDatasetMapper(panoptic_cfg(), is_train=True)(record)
    assert (out["sem_seg"] == 255).all() and out["sem_seg"].shape == out["image"].shape[-2:]


def test_inference_records_get_no_semantic_target(dataset):
    out = PanopticDatasetMapper(panoptic_cfg(), is_train=False)(dict(dataset[0]))
    assert "sem_seg" not in out and "sem_seg_file_name" not in out


def test_missing_semantic_png_is_named(dataset, tmp_path):
    record = dict(dataset[1])
    record["sem_seg_file_name"] = str(tmp_path / "gone.png")
    with pytest.raises(DatasetError, match=r"gone\.png' \(sem_seg_file_name\) does not exist"):
        PanopticDatasetMapper(panoptic_cfg(), is_train=True)(record)
    records = [dict(r) for r in dataset[:3]] + [record]
    with pytest.raises(DatasetError, match=rf"'{PANOPTIC}': 1 of 4 semantic PNGs.*gone\.png"):
        check_dataset_tasks(panoptic_cfg(), [PANOPTIC], "TRAIN", records)


def test_semantic_labels_outside_the_head_classes_are_named(dataset, tmp_path):
    import cv2

    record = dict(dataset[2])
    labels = read_labels(record["sem_seg_file_name"]).copy()
    labels[:3, :3] = 7
    cv2.imwrite(str(tmp_path / "bad.png"), labels)
    record["sem_seg_file_name"] = str(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match=r"labels \[7\].*MODEL.SEM_SEG_HEAD.NUM_CLASSES"):
        PanopticDatasetMapper(panoptic_cfg(), is_train=True)(record)


def test_panoptic_config_on_an_instance_only_dataset_is_refused(dataset):
    with pytest.raises(DatasetError, match=rf"DATASETS.TRAIN names '{INSTANCES}'.*META_ARCH"):
        check_dataset_tasks(panoptic_cfg(), [INSTANCES], "TRAIN")


def test_instance_config_on_a_panoptic_dataset_is_refused(dataset):
    cfg = panoptic_cfg(["MODEL.META_ARCHITECTURE", "SOLO"])
    with pytest.raises(DatasetError, match=rf"DATASETS.TEST names '{PANOPTIC}'.*'PanopticSOLOv2'"):
        check_dataset_tasks(cfg, [PANOPTIC], "TEST")
    check_dataset_tasks(cfg, [INSTANCES], "TEST")  # its instance view is fine


def test_semantic_class_count_must_match_the_dataset(dataset):
    cfg = panoptic_cfg(["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 54])
    with pytest.raises(DatasetError, match=r"NUM_CLASSES=54.*4 semantic classes.*set"):
        check_dataset_tasks(cfg, [PANOPTIC], "TRAIN")


def perfect_outputs(record):
    """What a perfect PanopticSOLOv2 outputs for a record: its instances (score 1) and one-hot
    semantic logits of its semantic PNG (void as "things", which the merge leaves empty)."""
    h, w = record["height"], record["width"]
    masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in record["annotations"]]
    instances = Instances((h, w))
    masks = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    instances.pred_masks = torch.from_numpy(masks)
    instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
    instances.scores = torch.ones(len(masks))
    # load_coco_json made the category ids contiguous already.
    classes = [a["category_id"] for a in record["annotations"]]
    instances.pred_classes = torch.tensor(classes, dtype=torch.long)
    semantic = torch.from_numpy(read_labels(record["sem_seg_file_name"]).astype(np.int64))
    semantic[semantic == 255] = 0
    logits = torch.nn.functional.one_hot(semantic, 4).permute(2, 0, 1).float()
    # Stride-1 logits: panoptic_outputs' upsampling is then the identity.
    return {
        "instances": instances,
        **panoptic_outputs(logits, 1, instances, (h, w), (h, w), 0.5, 0, 0.5),
    }


def test_perfect_predictions_score_100_pq_miou_and_mask_ap_with_the_panoptic_evaluators(
    dataset, tmp_path
):
    pytest.importorskip("panopticapi")
    evaluator = build_solo_evaluator(panoptic_cfg(["OUTPUT_DIR", str(tmp_path)]), PANOPTIC)
    evaluator.reset()
    for record in dataset:
        evaluator.process([record], [perfect_outputs(record)])
    results = evaluator.evaluate()
    panoptic = results["panoptic_seg"]
    assert (panoptic["PQ"], panoptic["PQ_th"], panoptic["PQ_st"]) == pytest.approx((100,) * 3)
    assert results["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_train_net_trains_the_three_losses_and_reports_pq_miou_and_mask_ap(dataset, tmp_path):
    """The Trainer's wiring: panoptic mapper, dataset checks, the coco_panoptic_seg evaluators."""
    pytest.importorskip("panopticapi")
    out = str(tmp_path / "run")
    argv = ["--config-file", str(REPO_ROOT / "configs/Shapes/PanopticSOLOv2_R18.yaml")]
    argv += ["DATASETS.TRAIN", f"('{PANOPTIC}',)", "DATASETS.TEST", f"('{PANOPTIC}',)"]
    argv += ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", out]
    argv += ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLO.HEAD_CHANNELS", "64"]
    argv += ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "DATALOADER.NUM_WORKERS", "0"]
    run_main(load_train_net(), argv)
    metrics = read_metrics(out)
    losses = [m for m in metrics if "loss_sem_seg" in m]
    names = ("loss_cate", "loss_mask", "loss_sem_seg")
    assert losses and all(np.isfinite(m[k]) for m in losses for k in names)
    final = metrics[-1]  # the final evaluation, written after training
    keys = ("panoptic_seg/PQ", "panoptic_seg/PQ_th", "panoptic_seg/PQ_st", "sem_seg/mIoU")
    assert all(np.isfinite(final[k]) for k in keys + ("segm/AP", "bbox/AP"))
