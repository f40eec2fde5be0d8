"""COCO-format datasets named in the config, registered in every process that reads it.

``DATASETS.COCO_FORMAT`` lists ``[name, json_file, image_root]`` triples; ``train_net.py`` (in
``setup()``, which every ``--num-gpus`` worker runs), ``demo/demo.py`` and
``tools/export_model.py`` register them with Detectron2's ``register_coco_instances``, so a
folder of images with a COCO JSON trains and evaluates from the command line alone::

    python train_net.py --config-file configs/SOLOv2/R50_1x.yaml \\
        DATASETS.COCO_FORMAT "[['mine_train', 'mine/train.json', 'mine/images'], \\
                               ['mine_val', 'mine/val.json', 'mine/images']]" \\
        DATASETS.TRAIN "('mine_train',)" DATASETS.TEST "('mine_val',)" MODEL.SOLO.NUM_CLASSES 3

The key is saved with the run's ``config.yaml``, so evaluating, drawing or exporting with that
file registers the same datasets again.
"""

from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.file_io import PathManager

from .panoptic_shapes import register_panoptic_shapes_datasets
from .shapes import register_shapes_datasets

__all__ = ["COCO_FORMAT_KEY", "register_coco_format_datasets", "register_datasets"]

COCO_FORMAT_KEY = "DATASETS.COCO_FORMAT"
_EXAMPLE = "[['mine_train', 'mine/train.json', 'mine/images']]"


def _entry(entry, key: str):
    if (
        not isinstance(entry, (list, tuple))
        or len(entry) != 3
        or not all(isinstance(x, str) and x for x in entry)
    ):
        raise ValueError(
            f"{key} entry {entry!r} is not a [name, json_file, image_root] triple of non-empty "
            f'strings; write e.g. {key} "{_EXAMPLE}".'
        )
    return tuple(entry)


def register_coco_format_datasets(
    entries: Sequence[Sequence[str]], key: str = COCO_FORMAT_KEY
) -> List[str]:
    """Register each ``[name, json_file, image_root]`` as a COCO-format instance dataset
    (``register_coco_instances``: masks from polygons or RLE, ``evaluator_type`` "coco").

    Idempotent: a name already registered with the same files is skipped (``setup()`` may run
    twice in one process). Paths relative to the working directory stay relative, as the
    launching process and its workers share it.

    Args:
        entries: the value of ``DATASETS.COCO_FORMAT``.
        key: the name used in error messages.

    Returns:
        the dataset names, in order.

    Raises:
        ValueError: an entry that is not a triple of strings, a JSON file or image folder that
            does not exist, or a name registered before with other files (e.g. a built-in
            dataset); each message names the entry and the fix.
    """
    triples = [_entry(e, key) for e in entries]  # validate all before registering any
    for name, json_file, image_root in triples:
        if not PathManager.isfile(json_file):
            raise ValueError(f"{key}: dataset '{name}': JSON file '{json_file}' does not exist.")
        if not PathManager.isdir(image_root):
            raise ValueError(
                f"{key}: dataset '{name}': image folder '{image_root}' does not exist (the "
                "third entry is the folder that the JSON's file_name entries are relative to)."
            )
    names = []
    registered = set(DatasetCatalog.list())
    for name, json_file, image_root in triples:
        names.append(name)
        if name in registered:
            metadata = MetadataCatalog.get(name)
            if (metadata.get("json_file"), metadata.get("image_root")) == (json_file, image_root):
                continue
            raise ValueError(
                f"{key}: dataset '{name}' is already registered with json_file="
                f"{metadata.get('json_file')!r}, image_root={metadata.get('image_root')!r}; "
                "give your dataset another name."
            )
        register_coco_instances(name, {}, json_file, image_root)
        registered.add(name)
    return names


def register_datasets(cfg) -> List[str]:
    """Register what a run of ``cfg`` may name: the built-in shapes splits (nothing generated
    here) and the ``DATASETS.COCO_FORMAT`` datasets. Returns the latter's names."""
    register_shapes_datasets()
    register_panoptic_shapes_datasets()
    return register_coco_format_datasets(cfg.DATASETS.COCO_FORMAT)
