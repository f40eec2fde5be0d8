"""What the demo gives besides drawings, and how it draws (issue 20 §3, issue 25 item 7).

* ``--output-json``: COCO results that ``COCO.loadRes`` reads, in the dataset's category and
  image ids, scoring the AP that ``train_net.py --eval-only`` reports on the same images.
* Video: instance ids that persist across the frames of a generated moving-shapes clip.
* Drawings: enlarged when small, colours stable per class and contrasting with the pixels they
  cover, labels inside the image and never on top of each other.
"""

import copy
import json
import numpy as np
import sys
import cv2
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.structures import BitMasks, Instances

from helpers import REPO_ROOT, build, force_candidates, load_script, load_train_net, solo_cfg
from solo.engine.predictor import Predictor
from solo.engine.results import instances_to_coco_results
from solo.engine.tracking import MaskIoUTracker

CONFIG = "configs/Shapes/SOLOv2_R18.yaml"
SMALL = [
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.SOLO.HEAD_CHANNELS", "64",
    "MODEL.SOLO.MASK_KERNEL_CHANNELS", "32",
    "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32",
    "MODEL.SOLO.NMS_PRE", "30",
    "TEST.DETECTIONS_PER_IMAGE", "8",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
CATEGORY_IDS = [3, 7, 11]  # the dataset's ids of the model's classes 0, 1, 2
IMAGE_IDS = [101, 205, 309]


@pytest.fixture(scope="module")
def demo():
    return load_script("demo/demo.py", "solo_demo_outputs")


@pytest.fixture(scope="module")
def drawing(demo):
    return sys.modules[demo.VisualizationDemo.__module__]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = build(solo_cfg("Shapes/SOLOv2_R18.yaml", SMALL), seed=0)
    force_candidates(model)
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def blob_image(seed, size=(60, 76)):
    rng = np.random.default_rng(seed)
    image = np.full((*size, 3), rng.integers(0, 80), np.uint8)
    for _ in range(3):
        center = (int(rng.integers(10, size[1] - 10)), int(rng.integers(10, size[0] - 10)))
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        cv2.circle(image, center, int(rng.integers(6, 14)), color, -1)
    return image


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory, weights):
    """Images and a COCO JSON whose ground truth is the model's own better half: its predictions
    scoring above their median (so the AP is high but not 100), in ids that are not 0-based."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "images").mkdir()
    predictor = Predictor(solo_cfg("Shapes/SOLOv2_R18.yaml", SMALL + ["MODEL.WEIGHTS", weights]))
    images, annotations = [], []
    for index, image_id in enumerate(IMAGE_IDS):
        image = blob_image(index)
        cv2.imwrite(str(root / "images" / f"{index}.png"), image)
        instances = predictor(image)["instances"]
        keep = instances[instances.scores > instances.scores.median()]
        assert len(keep) > 0
        for result in instances_to_coco_results(keep, image_id, CATEGORY_IDS):
            area = float(mask_util.area(result["segmentation"]))
            annotations.append(
                dict(result, id=len(annotations) + 1, area=area, iscrowd=0, score=None)
            )
        images.append({"id": image_id, "file_name": f"{index}.png", "height": 60, "width": 76})
    categories = [{"id": i, "name": f"class{i}"} for i in reversed(CATEGORY_IDS)]
    json_file = root / "val.json"
    for annotation in annotations:
        del annotation["score"]
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(json_file), str(root / "images")


def test_output_json_loads_with_loadres_and_scores_the_eval_only_ap(
    demo, weights, labelled_folder, tmp_path
):
    json_file, images = labelled_folder
    dataset = [
        "DATASETS.COCO_FORMAT", f"[['outputs_val', '{json_file}', '{images}']]",
        "DATASETS.TEST", "('outputs_val',)",
    ]  # fmt: skip
    train_net = load_train_net()
    args = train_net.parse_command_line(
        ["--config-file", str(REPO_ROOT / CONFIG), "--eval-only", *SMALL, *dataset]
        + ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "eval")]
    )
    expected = train_net.main(args)["segm"]["AP"]

    output = str(tmp_path / "predictions.json")
    argv = ["--config-file", str(REPO_ROOT / CONFIG), "--input", images, "--output-json", output]
    argv += [
        "--polygons",
        "--confidence-threshold",
        "0",
        *SMALL,
        *dataset,
        "MODEL.WEIGHTS",
        weights,
    ]
    assert demo.main(argv) == [output]

    ground_truth = COCO(json_file)
    predictions = ground_truth.loadRes(output)
    results = json.load(open(output))
    assert {r["image_id"] for r in results} == set(IMAGE_IDS)
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    evaluation = COCOeval(ground_truth, predictions, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert 20 < expected < 100
    assert evaluation.stats[0] * 100 == pytest.approx(expected, abs=1e-6)
    # --polygons: contours of the RLE masks (equal up to the pixels the contour line cuts).
    for result in results:
        rle = result["segmentation"]
        polygon_rle = mask_util.merge(mask_util.frPyObjects(result["polygons"], *rle["size"]))
        assert mask_util.iou([polygon_rle], [rle], [0])[0, 0] > 0.7


def test_results_of_an_unlabelled_folder_are_numbered_in_input_order(demo, weights, tmp_path):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"b{i}.png"), blob_image(10 + i))
    output = str(tmp_path / "p.json")
    argv = ["--config-file", str(REPO_ROOT / CONFIG), "--input", str(folder)]
    demo.main(argv + ["--output-json", output, *SMALL, "MODEL.WEIGHTS", weights])
    results = json.load(open(output))
    assert {(r["image_id"], r["file_name"]) for r in results} == {
        (1, str(folder / "b0.png")),
        (2, str(folder / "b1.png")),
    }
    assert {r["category_id"] for r in results} <= {1, 2, 3}  # shapes_val's ids (DATASETS.TEST)


# ----------------------------------------------------------------------------------------------
# Video: ids that persist
# ----------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255)]  # BGR of classes 0, 1, 2


def moving_shapes_clip(path, num_frames=12, size=(96, 128)):
    """Three shapes moving 2-3 pixels a frame (a fraction of their 14-18 pixel size, as in a
    real video) on parallel paths that never touch; MJPG in .avi."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, size[::-1], True)
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG videos")
    for t in range(num_frames):
        frame = np.full((*size, 3), 128, np.uint8)
        cv2.circle(frame, (10 + 3 * t, 16), 9, COLOURS[0], -1)
        cv2.rectangle(frame, (110 - 3 * t, 40), (124 - 3 * t, 54), COLOURS[1], -1)
        triangle = np.array([[20 + 2 * t, 90], [34 + 2 * t, 90], [27 + 2 * t, 72]], np.int32)
        cv2.fillPoly(frame, [triangle], COLOURS[2])
        writer.write(frame)
    writer.release()


def colour_oracle(frame):
    """Instances of the clip's shapes found by colour, in a shuffled order (as a model's)."""
    masks, classes = [], []
    for label, colour in enumerate(COLOURS):
        mask = np.abs(frame.astype(int) - colour).sum(axis=2) < 150
        if mask.sum() > 20:
            masks.append(mask)
            classes.append(label)
    order = np.random.default_rng(int(frame.sum())).permutation(len(masks))
    instances = Instances(frame.shape[:2])
    instances.pred_masks = torch.from_numpy(np.stack(masks)[order])
    instances.pred_classes = torch.tensor(classes)[order]
    instances.scores = torch.full((len(masks),), 0.9)
    instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
    return {"instances": instances}


def replace_predictor_with_colour_oracle(visualization_demo):
    visualization_demo.predictor = colour_oracle


def test_video_ids_persist_for_moving_shapes_and_are_written(demo, weights, tmp_path):
    clip = tmp_path / "moving.avi"
    moving_shapes_clip(clip)
    cfg = solo_cfg("Shapes/SOLOv2_R18.yaml", SMALL + ["MODEL.WEIGHTS", weights])
    visualization = demo.VisualizationDemo(cfg)
    replace_predictor_with_colour_oracle(visualization)
    results = demo.ResultsFile(str(tmp_path / "tracks.json"), visualization.metadata, 3, False)
    written = demo.run_on_video(visualization, str(clip), str(tmp_path / "vis"), False, results)
    results.write()
    tracks = json.load(open(tmp_path / "tracks.json"))
    assert {r["image_id"] for r in tracks} == set(range(12))
    ids_by_class = {}
    for r in tracks:
        ids_by_class.setdefault(r["category_id"], set()).add(r["track_id"])
    assert sorted(ids_by_class) == [1, 2, 3]  # shapes_val's category ids
    assert all(len(ids) == 1 for ids in ids_by_class.values()), ids_by_class  # no switch
    assert len({next(iter(ids)) for ids in ids_by_class.values()}) == 3
    drawn = cv2.VideoCapture(written[0])
    ok, frame = drawn.read()
    assert ok and frame.shape == (96 * 5, 128 * 5, 3)  # enlarged to a 480-pixel short side


def test_tracker_keeps_an_id_through_a_missed_frame_and_never_gives_it_to_another_object():
    tracker = MaskIoUTracker(iou_threshold=0.3, max_lost_frames=2)

    def frame(boxes, classes):
        masks = torch.zeros(len(boxes), 40, 60, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            mask[y0:y1, x0:x1] = True
        instances = Instances((40, 60))
        instances.pred_masks, instances.pred_classes = masks, torch.tensor(classes)
        return tracker.update(instances).ID

    a, b = frame([(0, 0, 10, 10), (30, 0, 40, 10)], [0, 1])
    assert frame([(32, 0, 42, 10)], [1]) == [b]  # a missed for a frame
    assert frame([(1, 0, 11, 10), (34, 0, 44, 10)], [0, 1]) == [a, b]  # a is back with its id
    # Same place, other class: a new object. Far from every track: a new object.
    new = frame([(2, 0, 12, 10), (40, 25, 50, 35)], [1, 0])
    assert len(set(new) | {a, b}) == 4
    empty = Instances((40, 60))
    empty.pred_masks = torch.zeros(0, 40, 60, dtype=torch.bool)
    empty.pred_classes = torch.zeros(0, dtype=torch.int64)
    assert tracker.update(empty).ID == []


# ----------------------------------------------------------------------------------------------
# Drawings
# ----------------------------------------------------------------------------------------------


def square_instances(size, boxes, classes, scores):
    instances = Instances(size)
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
    instances.pred_masks = masks
    instances.pred_classes = torch.tensor(classes)
    instances.scores = torch.tensor(scores)
    return instances


def test_small_images_are_drawn_enlarged_and_identical_detections_identically(drawing):
    image = np.full((128, 160, 3), 200, np.uint8)
    instances = square_instances(
        (128, 160), [(10, 20, 50, 60), (90, 70, 150, 120)], [0, 2], [0.9, 0.6]
    )
    first = drawing.draw_instances(image, instances, ["a", "b", "c"])
    again = drawing.draw_instances(image, copy.deepcopy(instances), ["a", "b", "c"])
    assert first.shape == (512, 640, 3)  # 4x: short side 480 or more
    np.testing.assert_array_equal(first, again)  # no random colours
    assert drawing.drawing_scale(600, 512) == 1 and drawing.drawing_scale(60, 76) == 8


def test_colour_is_the_class_colour_unless_it_would_not_stand_out(drawing):
    navy = np.array(drawing.PALETTE[3])  # (0, 130, 200): class 3's colour
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, :20] = navy
    masks = np.zeros((2, 40, 40), bool)
    masks[0, :, :20] = True  # over pixels of its own colour
    masks[1, :, 20:] = True  # over black
    colors = drawing.pick_colors(image, masks, [3, 4])
    assert colors[1] == drawing.PALETTE[4]
    assert colors[0] != drawing.PALETTE[3]
    assert np.linalg.norm(np.subtract(colors[0], navy)) >= drawing.MIN_CONTRAST
    # One class, one colour within an image.
    assert drawing.pick_colors(image, masks, [4, 4]) == [drawing.PALETTE[4]] * 2


def test_labels_stay_inside_the_image_and_never_overlap(drawing):
    anchors = [(5, 5)] * 4 + [(-30, -12), (150, 95), (60, 40)]
    sizes = [(40, 12)] * 7
    corners = drawing.place_labels(anchors, sizes, 160, 100)
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    assert all(0 <= x0 and 0 <= y0 and x1 <= 160 and y1 <= 100 for x0, y0, x1, y1 in rects)
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert not drawing._overlaps(a, b), (a, b)
    assert corners[-1] == (60, 40)  # a free place is kept as asked


def test_predictor_gives_coco_results_in_the_test_datasets_ids(weights):
    """Predictor.coco_results: DATASETS.TEST[0] is shapes_val, whose category ids are 1..3."""
    from solo.data import register_builtin_datasets

    register_builtin_datasets()
    predictor = Predictor(solo_cfg("Shapes/SOLOv2_R18.yaml", SMALL + ["MODEL.WEIGHTS", weights]))
    instances = predictor(blob_image(3))["instances"]
    results = predictor.coco_results(instances, image_id=7, polygons=True)
    assert len(results) == len(instances) > 0
    assert [r["category_id"] for r in results] == [c + 1 for c in instances.pred_classes.tolist()]
    assert {r["image_id"] for r in results} == {7}
    first = mask_util.decode(results[0]["segmentation"]).astype(bool)
    np.testing.assert_array_equal(first, instances.pred_masks[0].numpy())
    assert all(r["polygons"] for r in results)
