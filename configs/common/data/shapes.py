"""The built-in shapes dataset (configs/Shapes/Base-Shapes.yaml's data): 128 x 160 images, batch
4, one loader worker; generated on first use."""

from .coco import dataloader

dataloader.train.dataset.update(names=["shapes_train"], num_classes=3)
dataloader.train.mapper.dataset_name = "shapes_train"
dataloader.train.mapper.augmentations[0].update(short_edge_length=(128,), max_size=160)
dataloader.train.update(total_batch_size=4, num_workers=1)
dataloader.test.dataset.update(names=["shapes_val"], num_classes=3)
dataloader.test.mapper.dataset_name = "shapes_val"
dataloader.test.mapper.augmentations[0].update(short_edge_length=128, max_size=160)
dataloader.test.num_workers = 1
dataloader.evaluator.dataset_name = "shapes_val"
