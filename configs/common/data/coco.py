"""COCO 2017 instance segmentation with SOLO's data path (configs/SOLO/Base-SOLO.yaml): the
checked dataset loader (unusable annotations reported and dropped), SOLO's mapper (bitmasks,
typed empty instances) and the COCO evaluator of masks and their boxes."""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader

from omegaconf import OmegaConf
from solo.data import SOLODatasetMapper, load_dataset_dicts
from solo.evaluation import SOLOCOCOEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(load_dataset_dicts)(
        names=["coco_2017_train"], num_classes=80, check_annotations=True, filter_empty=True
    ),
    mapper=L(SOLODatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",
        dataset_name="coco_2017_train",  # for messages
        num_classes="${..dataset.num_classes}",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(load_dataset_dicts)(names=["coco_2017_val"], num_classes=80, filter_empty=False),
    mapper=L(SOLODatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
        dataset_name="coco_2017_val",
    ),
    num_workers=4,
)

dataloader.evaluator = L(SOLOCOCOEvaluator)(
    dataset_name="coco_2017_val",
    tasks=("bbox", "segm"),
    max_dets_per_image=100,
)
