"""Tests of the checkpoint conversion (solo.convert, tools/convert_checkpoint.py).

The published checkpoints cannot be downloaded here, so the source checkpoints are synthetic:
their key names and shapes are generated from the architecture definitions of the source code
bases (WXinlong/SOLO = mmdetection v1, AdelaiDet), written out below independently of the
conversion rules, and filled with random values.
"""

import importlib
import math
import numpy as np
import os
import pickle
import re
import sys
import types
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

import solo
from helpers import REPO_ROOT, load_script
from solo.checkpoint import convert
from solo.checkpoint.convert import ConversionError
from solo.modeling.bottom_up import MOBILENET_V3_STAGES as STAGES
from solo.modeling.heads import build_solo_head

ROOT = str(REPO_ROOT)
GRIDS = [40, 36, 24, 16, 12]
# mmdetection's CocoDataset.CLASSES (= Detectron2's COCO thing_classes, same order).
COCO_CLASSES = tuple(MetadataCatalog.get("coco_2017_val").thing_classes)


def make_cfg(config, opts=()):
    cfg = get_cfg()
    solo.add_solo_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# ------------------------------------------------------------------------------------------------
# Key names and shapes of the source checkpoints, from the source code bases.
# ------------------------------------------------------------------------------------------------


def _bn(keys, prefix, channels, counter=True):
    for p in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{p}"] = (channels,)
    if counter:
        keys[f"{prefix}.num_batches_tracked"] = ()


def mmdet_resnet(depth, groups=1, base_width=4, dcn=None, prefix="backbone."):
    """mmdet v1 ResNet / ResNeXt (= torchvision names): conv1/bn1, layer{1-4}.{b}.conv{i}/bn{i},
    downsample.{0,1}; DCN stages (2-4) add conv2.conv_offset (2 or 3 x 9 channels)."""
    basic = depth in (18, 34)
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    expansion = 1 if basic else 4
    keys = {f"{prefix}conv1.weight": (64, 3, 7, 7)}
    _bn(keys, f"{prefix}bn1", 64)
    inplanes = 64
    for i, n in enumerate(blocks):
        planes = 64 * 2**i
        for b in range(n):
            p = f"{prefix}layer{i + 1}.{b}."
            if basic:
                keys[p + "conv1.weight"] = (planes, inplanes, 3, 3)
                keys[p + "conv2.weight"] = (planes, planes, 3, 3)
                _bn(keys, p + "bn1", planes)
                _bn(keys, p + "bn2", planes)
            else:
                width = planes if groups == 1 else math.floor(planes * base_width / 64) * groups
                keys[p + "conv1.weight"] = (width, inplanes, 1, 1)
                keys[p + "conv2.weight"] = (width, width // groups, 3, 3)
                keys[p + "conv3.weight"] = (planes * 4, width, 1, 1)
                for j, c in ((1, width), (2, width), (3, planes * 4)):
                    _bn(keys, f"{p}bn{j}", c)
                if dcn and i > 0:
                    offsets = (3 if dcn == "DCNv2" else 2) * 9
                    keys[p + "conv2.conv_offset.weight"] = (offsets, width, 3, 3)
                    keys[p + "conv2.conv_offset.bias"] = (offsets,)
            if b == 0 and (i > 0 or inplanes != planes * expansion):
                keys[p + "downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                _bn(keys, p + "downsample.1", planes * expansion)
            inplanes = planes * expansion
    return keys


def conv_module(keys, prefix, cin, cout, k=3, dcn=None):
    """mmdet ConvModule with GN (no conv bias); DCN packs add conv.conv_offset."""
    keys[f"{prefix}.conv.weight"] = (cout, cin, k, k)
    if dcn:
        offsets = (3 if dcn == "DCNv2" else 2) * k * k
        keys[f"{prefix}.conv.conv_offset.weight"] = (offsets, cin, k, k)
        keys[f"{prefix}.conv.conv_offset.bias"] = (offsets,)
    keys[f"{prefix}.gn.weight"] = (cout,)
    keys[f"{prefix}.gn.bias"] = (cout,)


def conv(keys, prefix, cin, cout, k):
    keys[f"{prefix}.weight"] = (cout, cin, k, k)
    keys[f"{prefix}.bias"] = (cout,)


def official_keys(spec):
    """The state dict layout of an official (WXinlong/SOLO) model."""
    depth, head = spec["depth"], spec["head"]
    keys = mmdet_resnet(depth, spec.get("groups", 1), 4, spec.get("dcn"))
    in_chs = [64, 128, 256, 512] if depth in (18, 34) else [256, 512, 1024, 2048]
    for i, c in enumerate(in_chs):  # FPN: ConvModules without norm, so with conv bias
        conv(keys, f"neck.lateral_convs.{i}.conv", c, 256, 1)
        conv(keys, f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    n, ch = spec["convs"], spec["channels"]
    tower_dcn = spec.get("tower_dcn")
    for i in range(n):
        dcn = tower_dcn if (not spec.get("dcn_last_only") or i == n - 1) else None
        conv_module(keys, f"bbox_head.cate_convs.{i}", 256 if i == 0 else ch, ch, 3, dcn)
        if head == "SOLOHead" or head == "DecoupledSOLOLightHead":
            conv_module(keys, f"bbox_head.ins_convs.{i}", 258 if i == 0 else ch, ch, 3, dcn)
        elif head == "DecoupledSOLOHead":
            for xy in "xy":
                conv_module(keys, f"bbox_head.ins_convs_{xy}.{i}", 257 if i == 0 else ch, ch)
        else:
            conv_module(keys, f"bbox_head.kernel_convs.{i}", 258 if i == 0 else ch, ch, 3, dcn)
    if head == "SOLOHead":
        for level, s in enumerate(GRIDS):
            conv(keys, f"bbox_head.solo_ins_list.{level}", ch, s * s, 1)
        conv(keys, "bbox_head.solo_cate", ch, 80, 3)
    elif head.startswith("Decoupled"):
        for level, s in enumerate(GRIDS):
            conv(keys, f"bbox_head.dsolo_ins_list_x.{level}", ch, s, 3)
            conv(keys, f"bbox_head.dsolo_ins_list_y.{level}", ch, s, 3)
        conv(keys, "bbox_head.dsolo_cate", ch, 80, 3)
    else:  # SOLOv2Head / SOLOv2LightHead + MaskFeatHead(start_level=0, end_level=3)
        conv(keys, "bbox_head.solo_cate", ch, 80, 3)
        conv(keys, "bbox_head.solo_kernel", ch, spec["kernels"], 3)
        mdcn = spec.get("mask_dcn")
        conv_module(keys, "mask_feat_head.convs_all_levels.0.conv0", 256, 128, 3, mdcn)
        for level in range(1, 4):
            for j in range(level):
                cin = (258 if level == 3 else 256) if j == 0 else 128
                conv_module(
                    keys, f"mask_feat_head.convs_all_levels.{level}.conv{j}", cin, 128, 3, mdcn
                )
        conv_module(keys, "mask_feat_head.conv_pred.0", 128, spec["kernels"], 1, mdcn)
    return keys


def mmdet_keys(spec):
    """The state dict layout of an mmdetection 2.x / 3.x SOLO-family detector: backbone and neck
    as the official ones; the head under ``mask_head`` (``dense_heads/solo_head.py``:
    cls_convs / mask_convs(_x, _y) / conv_mask_list(_x, _y) / conv_cls; ``solov2_head.py``:
    kernel_convs / conv_kernel and the MaskFeatModule ``mask_feature_head``, whose conv_pred is
    a ConvModule); DCN only on the last tower conv for the light heads."""
    depth, head = spec["depth"], spec["head"]
    keys = mmdet_resnet(depth, spec.get("groups", 1), 4, spec.get("dcn"))
    in_chs = [64, 128, 256, 512] if depth in (18, 34) else [256, 512, 1024, 2048]
    for i, c in enumerate(in_chs):
        conv(keys, f"neck.lateral_convs.{i}.conv", c, 256, 1)
        conv(keys, f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    n, ch = spec["convs"], spec["channels"]
    for i in range(n):
        dcn = spec.get("tower_dcn") if (not spec.get("dcn_last_only") or i == n - 1) else None
        conv_module(keys, f"mask_head.cls_convs.{i}", 256 if i == 0 else ch, ch, 3, dcn)
        if head in ("SOLOHead", "DecoupledSOLOLightHead"):
            conv_module(keys, f"mask_head.mask_convs.{i}", 258 if i == 0 else ch, ch, 3, dcn)
        elif head == "DecoupledSOLOHead":
            for xy in "xy":
                conv_module(keys, f"mask_head.mask_convs_{xy}.{i}", 257 if i == 0 else ch, ch)
        else:
            conv_module(keys, f"mask_head.kernel_convs.{i}", 258 if i == 0 else ch, ch, 3, dcn)
    conv(keys, "mask_head.conv_cls", ch, 80, 3)
    if head == "SOLOHead":
        for level, s in enumerate(GRIDS):
            conv(keys, f"mask_head.conv_mask_list.{level}", ch, s * s, 1)
    elif head.startswith("Decoupled"):
        for level, s in enumerate(GRIDS):
            conv(keys, f"mask_head.conv_mask_list_x.{level}", ch, s, 3)
            conv(keys, f"mask_head.conv_mask_list_y.{level}", ch, s, 3)
    else:  # SOLOV2Head, MaskFeatModule(start_level=0, end_level=3)
        conv(keys, "mask_head.conv_kernel", ch, spec["kernels"], 3)
        mdcn, feat = spec.get("mask_dcn"), "mask_head.mask_feature_head"
        conv_module(keys, f"{feat}.convs_all_levels.0.conv0", 256, 128, 3, mdcn)
        for level in range(1, 4):
            for j in range(level):
                cin = (258 if level == 3 else 256) if j == 0 else 128
                conv_module(keys, f"{feat}.convs_all_levels.{level}.conv{j}", cin, 128, 3, mdcn)
        conv_module(keys, f"{feat}.conv_pred", 128, spec["kernels"], 1, mdcn)
    return keys


def detectron2_resnet(depth, prefix="backbone.bottom_up."):
    """Detectron2 ResNet names (FrozenBN: no step counter)."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    keys = {f"{prefix}stem.conv1.weight": (64, 3, 7, 7)}
    _bn(keys, f"{prefix}stem.conv1.norm", 64, counter=False)
    inplanes = 64
    for i, n in enumerate(blocks):
        planes = 64 * 2**i
        for b in range(n):
            p = f"{prefix}res{i + 2}.{b}."
            for j, shape in enumerate(
                [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            ):
                keys[f"{p}conv{j + 1}.weight"] = shape
                _bn(keys, f"{p}conv{j + 1}.norm", shape[0], counter=False)
            if b == 0:
                keys[p + "shortcut.weight"] = (planes * 4, inplanes, 1, 1)
                _bn(keys, p + "shortcut.norm", planes * 4, counter=False)
            inplanes = planes * 4
    return keys


def adelaidet_keys(depth):
    """AdelaiDet SOLOv2 R50/R101_3x: 4 tower convs of 512, 256 kernels, GN; flat Sequentials."""
    keys = detectron2_resnet(depth)
    for i, c in enumerate([256, 512, 1024, 2048]):
        conv(keys, f"backbone.fpn_lateral{i + 2}", c, 256, 1)
        conv(keys, f"backbone.fpn_output{i + 2}", 256, 256, 3)
    for tower, cin in (("cate", 256), ("kernel", 258)):
        for i in range(4):
            keys[f"ins_head.{tower}_tower.{3 * i}.weight"] = (512, cin if i == 0 else 512, 3, 3)
            keys[f"ins_head.{tower}_tower.{3 * i + 1}.weight"] = (512,)
            keys[f"ins_head.{tower}_tower.{3 * i + 1}.bias"] = (512,)
    conv(keys, "ins_head.cate_pred", 512, 80, 3)
    conv(keys, "ins_head.kernel_pred", 512, 256, 3)
    for level in range(4):
        for j in range(max(level, 1)):
            cin = (258 if level == 3 else 256) if j == 0 else 128
            keys[f"mask_head.convs_all_levels.{level}.conv{j}.0.weight"] = (128, cin, 3, 3)
            keys[f"mask_head.convs_all_levels.{level}.conv{j}.1.weight"] = (128,)
            keys[f"mask_head.convs_all_levels.{level}.conv{j}.1.bias"] = (128,)
    keys["mask_head.conv_pred.0.weight"] = (256, 128, 1, 1)
    keys["mask_head.conv_pred.1.weight"] = (256,)
    keys["mask_head.conv_pred.1.bias"] = (256,)
    return keys


def random_state_dict(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (
            torch.randint(0, 1000, s, generator=g)
            if k.endswith("num_batches_tracked") and s == ()
            else torch.randn(s, generator=g)
        )
        for k, s in keys.items()
    }


# Official model zoo: our config -> the official config's settings (configs/solo*/).
SOLO_V1 = dict(head="SOLOHead", convs=7, channels=256)
DSOLO = dict(head="DecoupledSOLOHead", convs=7, channels=256)
DSOLO_LIGHT = dict(head="DecoupledSOLOLightHead", convs=4, channels=256)
V2 = dict(head="SOLOv2Head", convs=4, channels=512, kernels=256)
V2_LIGHT = dict(head="SOLOv2Head", convs=2, channels=256, kernels=128)
V2_DCN = dict(V2, dcn="DCNv2", tower_dcn="DCNv2", mask_dcn="DCNv2")
OFFICIAL_ZOO = {
    "SOLO/R50_1x.yaml": dict(SOLO_V1, depth=50),
    "SOLO/R50_3x.yaml": dict(SOLO_V1, depth=50),
    "SOLO/R101_3x.yaml": dict(SOLO_V1, depth=101),
    "DecoupledSOLO/R50_1x.yaml": dict(DSOLO, depth=50),
    "DecoupledSOLO/R50_3x.yaml": dict(DSOLO, depth=50),
    "DecoupledSOLO/R101_3x.yaml": dict(DSOLO, depth=101),
    "DecoupledSOLO/Light_R50_3x.yaml": dict(DSOLO_LIGHT, depth=50),
    "DecoupledSOLO/Light_DCN_R50_3x.yaml": dict(
        DSOLO_LIGHT, depth=50, dcn="DCN", tower_dcn="DCN", dcn_last_only=True
    ),
    "SOLOv2/R50_1x.yaml": dict(V2, depth=50),
    "SOLOv2/R50_3x.yaml": dict(V2, depth=50),
    "SOLOv2/R101_3x.yaml": dict(V2, depth=101),
    "SOLOv2/R101_DCN_3x.yaml": dict(V2_DCN, depth=101),
    "SOLOv2/X101_DCN_3x.yaml": dict(V2_DCN, depth=101, groups=64),
    "SOLOv2/Light_448_R18_3x.yaml": dict(V2_LIGHT, depth=18),
    "SOLOv2/Light_448_R34_3x.yaml": dict(V2_LIGHT, depth=34),
    "SOLOv2/Light_448_R50_3x.yaml": dict(V2_LIGHT, depth=50),
    "SOLOv2/Light_512_DCN_R50_3x.yaml": dict(
        V2_LIGHT, convs=3, depth=50, dcn="DCN", tower_dcn="DCN", dcn_last_only=True
    ),
}

# mmdetection model zoo (configs/solo, configs/solov2): our config (+ opts) -> mmdet's settings.
# mmdet's light DCN head uses modulated DCN (DCNv2) where the official one used DCN v1.
MMDET_DCN_LIGHT_OPTS = ("MODEL.RESNETS.DEFORM_MODULATED", "True", "MODEL.SOLO.TOWER_DCN", "DCNv2")
MMDET_ZOO = {
    "SOLO/R50_1x.yaml": (dict(SOLO_V1, depth=50), ()),
    "SOLO/R50_3x.yaml": (dict(SOLO_V1, depth=50), ()),
    "DecoupledSOLO/R50_1x.yaml": (dict(DSOLO, depth=50), ()),
    "DecoupledSOLO/R50_3x.yaml": (dict(DSOLO, depth=50), ()),
    "DecoupledSOLO/Light_R50_3x.yaml": (dict(DSOLO_LIGHT, depth=50), ()),
    "SOLOv2/R50_1x.yaml": (dict(V2, depth=50), ()),
    "SOLOv2/R50_3x.yaml": (dict(V2, depth=50), ()),
    "SOLOv2/R101_3x.yaml": (dict(V2, depth=101), ()),
    "SOLOv2/R101_DCN_3x.yaml": (dict(V2_DCN, depth=101), ()),
    "SOLOv2/X101_DCN_3x.yaml": (dict(V2_DCN, depth=101, groups=64), ()),
    "SOLOv2/Light_448_R18_3x.yaml": (dict(V2_LIGHT, depth=18), ()),
    "SOLOv2/Light_448_R34_3x.yaml": (dict(V2_LIGHT, depth=34), ()),
    "SOLOv2/Light_448_R50_3x.yaml": (dict(V2_LIGHT, depth=50), ()),
    "SOLOv2/Light_512_DCN_R50_3x.yaml": (
        dict(V2_LIGHT, convs=3, depth=50, dcn="DCNv2", tower_dcn="DCNv2", dcn_last_only=True),
        MMDET_DCN_LIGHT_OPTS,
    ),
}

# Hand-written (official key -> our key) pairs, checked wherever the official key exists.
OFFICIAL_SAMPLES = {
    "backbone.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
    "backbone.bn1.running_mean": "backbone.bottom_up.stem.conv1.norm.running_mean",
    "backbone.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
    "backbone.layer2.0.downsample.1.weight": "backbone.bottom_up.res3.0.shortcut.norm.weight",
    "backbone.layer3.1.bn2.running_var": "backbone.bottom_up.res4.1.conv2.norm.running_var",
    "backbone.layer4.2.conv3.weight": "backbone.bottom_up.res5.2.conv3.weight",
    "backbone.layer4.1.conv2.weight": "backbone.bottom_up.res5.1.conv2.weight",
    "backbone.layer3.5.conv2.conv_offset.weight": "backbone.bottom_up.res4.5.conv2_offset.weight",
    "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral2.weight",
    "neck.lateral_convs.3.conv.bias": "backbone.fpn_lateral5.bias",
    "neck.fpn_convs.1.conv.weight": "backbone.fpn_output3.weight",
    "bbox_head.cate_convs.0.conv.weight": "head.cate_tower.0.conv.weight",
    "bbox_head.cate_convs.1.gn.bias": "head.cate_tower.1.norm.bias",
    "bbox_head.cate_convs.3.conv.conv_offset.bias": "head.cate_tower.3.conv.conv_offset.bias",
    "bbox_head.solo_cate.weight": "head.cate_pred.weight",
    "bbox_head.dsolo_cate.bias": "head.cate_pred.bias",
    "bbox_head.ins_convs.6.gn.weight": "head.mask_tower.6.norm.weight",
    "bbox_head.ins_convs.3.conv.conv_offset.weight": "head.mask_tower.3.conv.conv_offset.weight",
    "bbox_head.solo_ins_list.4.weight": "head.mask_preds.4.weight",
    "bbox_head.solo_ins_list.0.bias": "head.mask_preds.0.bias",
    "bbox_head.ins_convs_x.0.conv.weight": "head.mask_tower_x.0.conv.weight",
    "bbox_head.ins_convs_y.5.gn.bias": "head.mask_tower_y.5.norm.bias",
    "bbox_head.dsolo_ins_list_x.2.weight": "head.mask_preds_x.2.weight",
    "bbox_head.dsolo_ins_list_y.4.bias": "head.mask_preds_y.4.bias",
    "bbox_head.kernel_convs.0.conv.weight": "head.kernel_tower.0.conv.weight",
    "bbox_head.kernel_convs.1.gn.weight": "head.kernel_tower.1.norm.weight",
    "bbox_head.kernel_convs.2.conv.conv_offset.weight": (
        "head.kernel_tower.2.conv.conv_offset.weight"
    ),
    "bbox_head.solo_kernel.weight": "head.kernel_pred.weight",
    "mask_feat_head.convs_all_levels.0.conv0.gn.bias": "head.mask_features.levels.0.0.norm.bias",
    "mask_feat_head.convs_all_levels.1.conv0.conv.weight": (
        "head.mask_features.levels.1.0.conv.weight"
    ),
    "mask_feat_head.convs_all_levels.2.conv1.gn.weight": (
        "head.mask_features.levels.2.2.norm.weight"
    ),
    "mask_feat_head.convs_all_levels.3.conv2.conv.weight": (
        "head.mask_features.levels.3.4.conv.weight"
    ),
    "mask_feat_head.convs_all_levels.3.conv0.conv.conv_offset.weight": (
        "head.mask_features.levels.3.0.conv.conv_offset.weight"
    ),
    "mask_feat_head.conv_pred.0.conv.weight": "head.mask_features.pred.conv.weight",
    "mask_feat_head.conv_pred.0.gn.weight": "head.mask_features.pred.norm.weight",
}

ADELAIDET_SAMPLES = {
    "backbone.bottom_up.res3.2.conv2.norm.running_var": (
        "backbone.bottom_up.res3.2.conv2.norm.running_var"
    ),
    "backbone.fpn_output4.weight": "backbone.fpn_output4.weight",
    "ins_head.cate_tower.0.weight": "head.cate_tower.0.conv.weight",
    "ins_head.cate_tower.4.bias": "head.cate_tower.1.norm.bias",
    "ins_head.kernel_tower.9.weight": "head.kernel_tower.3.conv.weight",
    "ins_head.kernel_tower.10.weight": "head.kernel_tower.3.norm.weight",
    "ins_head.cate_pred.bias": "head.cate_pred.bias",
    "ins_head.kernel_pred.weight": "head.kernel_pred.weight",
    "mask_head.convs_all_levels.0.conv0.0.weight": "head.mask_features.levels.0.0.conv.weight",
    "mask_head.convs_all_levels.3.conv2.1.bias": "head.mask_features.levels.3.4.norm.bias",
    "mask_head.convs_all_levels.2.conv1.0.weight": "head.mask_features.levels.2.2.conv.weight",
    "mask_head.conv_pred.0.weight": "head.mask_features.pred.conv.weight",
    "mask_head.conv_pred.1.bias": "head.mask_features.pred.norm.bias",
}


MMDET_SAMPLES = {
    "backbone.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
    "backbone.layer3.4.conv2.conv_offset.bias": "backbone.bottom_up.res4.4.conv2_offset.bias",
    "neck.lateral_convs.3.conv.weight": "backbone.fpn_lateral5.weight",
    "neck.fpn_convs.0.conv.bias": "backbone.fpn_output2.bias",
    "mask_head.cls_convs.0.conv.weight": "head.cate_tower.0.conv.weight",
    "mask_head.cls_convs.1.gn.bias": "head.cate_tower.1.norm.bias",
    "mask_head.cls_convs.2.conv.conv_offset.weight": "head.cate_tower.2.conv.conv_offset.weight",
    "mask_head.conv_cls.weight": "head.cate_pred.weight",
    "mask_head.conv_cls.bias": "head.cate_pred.bias",
    "mask_head.mask_convs.0.conv.weight": "head.mask_tower.0.conv.weight",
    "mask_head.mask_convs.6.gn.weight": "head.mask_tower.6.norm.weight",
    "mask_head.conv_mask_list.0.weight": "head.mask_preds.0.weight",
    "mask_head.conv_mask_list.4.bias": "head.mask_preds.4.bias",
    "mask_head.mask_convs_x.0.conv.weight": "head.mask_tower_x.0.conv.weight",
    "mask_head.mask_convs_y.6.gn.bias": "head.mask_tower_y.6.norm.bias",
    "mask_head.conv_mask_list_x.1.weight": "head.mask_preds_x.1.weight",
    "mask_head.conv_mask_list_y.3.bias": "head.mask_preds_y.3.bias",
    "mask_head.kernel_convs.0.conv.weight": "head.kernel_tower.0.conv.weight",
    "mask_head.kernel_convs.1.gn.weight": "head.kernel_tower.1.norm.weight",
    "mask_head.kernel_convs.2.conv.conv_offset.bias": "head.kernel_tower.2.conv.conv_offset.bias",
    "mask_head.conv_kernel.weight": "head.kernel_pred.weight",
    "mask_head.mask_feature_head.convs_all_levels.0.conv0.conv.weight": (
        "head.mask_features.levels.0.0.conv.weight"
    ),
    "mask_head.mask_feature_head.convs_all_levels.2.conv1.gn.bias": (
        "head.mask_features.levels.2.2.norm.bias"
    ),
    "mask_head.mask_feature_head.convs_all_levels.3.conv2.conv.weight": (
        "head.mask_features.levels.3.4.conv.weight"
    ),
    "mask_head.mask_feature_head.convs_all_levels.3.conv0.conv.conv_offset.weight": (
        "head.mask_features.levels.3.0.conv.conv_offset.weight"
    ),
    "mask_head.mask_feature_head.conv_pred.conv.weight": "head.mask_features.pred.conv.weight",
    "mask_head.mask_feature_head.conv_pred.conv.conv_offset.weight": (
        "head.mask_features.pred.conv.conv_offset.weight"
    ),
    "mask_head.mask_feature_head.conv_pred.gn.bias": "head.mask_features.pred.norm.bias",
}


def check_conversion(source_sd, converted, model, samples, skip=()):
    """Strict load, exact values of the sampled pairs, and every source tensor used once."""
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    checked = 0
    for src, dst in samples.items():
        if src in source_sd and src not in skip:
            assert torch.equal(state[dst], source_sd[src]), (src, dst)
            checked += 1
    assert checked >= 5
    # Renaming only: the converted values are the source tensors themselves, each used once.
    used = {id(v) for k, v in converted.items() if k not in skip}
    wanted = {
        id(v)
        for k, v in source_sd.items()
        if not k.endswith("num_batches_tracked") and k not in skip
    }
    assert used == wanted and len(used) == len(converted) - len(skip)


@pytest.mark.parametrize("config", sorted(OFFICIAL_ZOO))
def test_official_zoo(config):
    cfg = make_cfg(config)
    model = build_model(cfg)
    source_sd = random_state_dict(official_keys(OFFICIAL_ZOO[config]))
    loaded = {"state_dict": source_sd, "meta": {"mmdet_version": "1.0.0", "CLASSES": ("a",) * 80}}
    converted = convert.convert_loaded(loaded, "official", cfg, config, model=model)
    check_conversion(source_sd, converted, model, OFFICIAL_SAMPLES)


@pytest.mark.parametrize("config", sorted(MMDET_ZOO))
def test_mmdet_zoo(config):
    spec, opts = MMDET_ZOO[config]
    cfg = make_cfg(config, opts)
    model = build_model(cfg)
    source_sd = random_state_dict(mmdet_keys(spec))
    meta = {"mmdet_version": "2.25.0", "CLASSES": COCO_CLASSES}
    converted = convert.convert_loaded(
        {"meta": meta, "state_dict": source_sd}, "mmdet", cfg, config, model=model
    )
    check_conversion(source_sd, converted, model, MMDET_SAMPLES)


class _MMConvModule(torch.nn.Module):
    """mmcv ConvModule(norm_cfg=GN): conv (no bias) -> gn -> ReLU, under those names."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.gn = torch.nn.GroupNorm(32, cout)

    def forward(self, x):
        return F.relu(self.gn(self.conv(x)))


def _mm_coordinates(x):
    """mmdet generate_coordinate: channel 0 = x (linspace over the width), 1 = y."""
    n, _, h, w = x.shape
    y, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.cat([xs.expand(n, 1, h, w), y.expand(n, 1, h, w)], 1)


def _up(x, **kwargs):
    return F.interpolate(x, mode="bilinear", align_corners=False, **kwargs)


class _MMDetHead(torch.nn.Module):
    """The forward passes of mmdetection's SOLOHead, DecoupledSOLOHead, DecoupledSOLOLightHead
    and SOLOV2Head (+ MaskFeatModule) in training mode, written from solo_head.py and
    solov2_head.py with their parameter names, to check that converted weights compute the same
    tensors in our heads."""

    def __init__(self, head, convs, ch, kernels=None):
        super().__init__()
        nn, self.head = torch.nn, head
        self.cls_convs = nn.ModuleList(
            _MMConvModule(256 if i == 0 else ch, ch, 3) for i in range(convs)
        )
        self.conv_cls = nn.Conv2d(ch, 80, 3, padding=1)
        if head in ("SOLOHead", "DecoupledSOLOLightHead"):
            self.mask_convs = nn.ModuleList(
                _MMConvModule(258 if i == 0 else ch, ch, 3) for i in range(convs)
            )
        if head == "SOLOHead":
            self.conv_mask_list = nn.ModuleList(nn.Conv2d(ch, s * s, 1) for s in GRIDS)
        elif head.startswith("Decoupled"):
            for xy in "xy":
                if head == "DecoupledSOLOHead":
                    towers = [_MMConvModule(257 if i == 0 else ch, ch, 3) for i in range(convs)]
                    setattr(self, f"mask_convs_{xy}", nn.ModuleList(towers))
                preds = [nn.Conv2d(ch, s, 3, padding=1) for s in GRIDS]
                setattr(self, f"conv_mask_list_{xy}", nn.ModuleList(preds))
        else:
            self.kernel_convs = nn.ModuleList(
                _MMConvModule(258 if i == 0 else ch, ch, 3) for i in range(convs)
            )
            self.conv_kernel = nn.Conv2d(ch, kernels, 3, padding=1)
            feat = self.mask_feature_head = nn.Module()
            feat.convs_all_levels = nn.ModuleList([nn.Sequential()])
            feat.convs_all_levels[0].add_module("conv0", _MMConvModule(256, 128, 3))
            for level in range(1, 4):
                seq = nn.Sequential()
                for j in range(level):
                    cin = (258 if level == 3 else 256) if j == 0 else 128
                    seq.add_module(f"conv{j}", _MMConvModule(cin, 128, 3))
                    seq.add_module(f"upsample{j}", nn.Upsample(scale_factor=2, mode="bilinear"))
                feat.convs_all_levels.append(seq)
            feat.conv_pred = _MMConvModule(128, kernels, 1)

    def forward(self, feats):
        """``feats``: P2-P6. Returns per-level lists (and the SOLOv2 mask features)."""
        out = {"cls": [], "kernels": [], "masks": [], "masks_x": [], "masks_y": []}
        if self.head == "SOLOV2Head":
            levels = self.mask_feature_head.convs_all_levels
            fused = levels[0](feats[0])
            for i in range(1, 4):
                x = torch.cat([feats[i], _mm_coordinates(feats[i])], 1) if i == 3 else feats[i]
                fused = fused + levels[i](x)
            out["mask_feats"] = self.mask_feature_head.conv_pred(fused)
        # resize_feats: the first level to the second's size, the last to the one before.
        first = _up(feats[0], size=feats[1].shape[-2:])
        last = _up(feats[4], size=feats[3].shape[-2:])
        for i, x in enumerate([first, *feats[1:4], last]):
            cls_feat = x
            if self.head == "SOLOV2Head":
                kernel_feat = _up(torch.cat([x, _mm_coordinates(x)], 1), size=GRIDS[i])
                cls_feat = kernel_feat[:, :-2]
                for layer in self.kernel_convs:
                    kernel_feat = layer(kernel_feat)
                out["kernels"].append(self.conv_kernel(kernel_feat))
            elif self.head in ("SOLOHead", "DecoupledSOLOLightHead"):
                mask_feat = torch.cat([x, _mm_coordinates(x)], 1)
                for layer in self.mask_convs:
                    mask_feat = layer(mask_feat)
                mask_feat = _up(mask_feat, scale_factor=2)
                if self.head == "SOLOHead":
                    out["masks"].append(self.conv_mask_list[i](mask_feat))
                else:
                    out["masks_x"].append(self.conv_mask_list_x[i](mask_feat))
                    out["masks_y"].append(self.conv_mask_list_y[i](mask_feat))
            else:
                coords = _mm_coordinates(x)
                feat_x = torch.cat([x, coords[:, 0:1]], 1)
                feat_y = torch.cat([x, coords[:, 1:2]], 1)
                for layer_x, layer_y in zip(self.mask_convs_x, self.mask_convs_y):
                    feat_x, feat_y = layer_x(feat_x), layer_y(feat_y)
                feat_x, feat_y = _up(feat_x, scale_factor=2), _up(feat_y, scale_factor=2)
                out["masks_x"].append(self.conv_mask_list_x[i](feat_x))
                out["masks_y"].append(self.conv_mask_list_y[i](feat_y))
            for j, layer in enumerate(self.cls_convs):
                if j == 0 and self.head != "SOLOV2Head":  # cls_down_index = 0
                    cls_feat = _up(cls_feat, size=GRIDS[i])
                cls_feat = layer(cls_feat)
            out["cls"].append(self.conv_cls(cls_feat))
        return out


@pytest.mark.parametrize(
    "config,head",
    [
        ("SOLOv2/R50_1x.yaml", "SOLOV2Head"),
        ("DecoupledSOLO/R50_1x.yaml", "DecoupledSOLOHead"),
        ("DecoupledSOLO/Light_R50_3x.yaml", "DecoupledSOLOLightHead"),
        ("SOLO/R50_1x.yaml", "SOLOHead"),
    ],
)
def test_mmdet_head_outputs_equal_ours(config, head):
    """Converted mmdet head weights give our head the same outputs as mmdet's forward: the
    coordinate channels, tower order, mask-feature levels and prediction convs all line up.
    (Towers of 3 convs of 64 channels: the layout does not depend on the sizes.)"""
    torch.manual_seed(0)
    convs, ch, kernels = 3, 64, 64
    ref = _MMDetHead(head, convs, ch, kernels).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    source_sd = {f"mask_head.{k}": v for k, v in ref.state_dict().items()}
    converted = convert.convert_state_dict(source_sd, "mmdet")
    sizes = ["NUM_STACKED_CONVS", convs, "HEAD_CHANNELS", ch, "MASK_KERNEL_CHANNELS", kernels]
    cfg = make_cfg(config, [f"MODEL.SOLO.{v}" if i % 2 == 0 else v for i, v in enumerate(sizes)])
    ours = build_solo_head(cfg, [ShapeSpec(channels=256)] * 5).eval()
    ours.load_state_dict({k[len("head.") :]: v for k, v in converted.items()}, strict=True)

    # P2-P6 of a 64 x 96 input (P6 = stride-2 max-pool of P5).
    feats = [torch.randn(2, 256, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    feats.append(F.max_pool2d(feats[-1], 1, stride=2))
    with torch.no_grad():
        expected = ref(feats)
        outputs = ours(feats)
    close = dict(rtol=1e-4, atol=1e-4)
    for level in range(5):
        torch.testing.assert_close(outputs.cate_logits[level], expected["cls"][level], **close)
        if head == "SOLOV2Head":
            torch.testing.assert_close(
                outputs.mask_outputs[0][level], expected["kernels"][level], **close
            )
        elif head.startswith("Decoupled"):
            logits_x, logits_y = outputs.mask_outputs[level]
            torch.testing.assert_close(logits_x, expected["masks_x"][level], **close)
            torch.testing.assert_close(logits_y, expected["masks_y"][level], **close)
        else:
            s, features = GRIDS[level], outputs.mask_outputs[level]
            cells = torch.arange(s * s).repeat(2)
            images = torch.arange(2).repeat_interleave(s * s)
            logits = ours.mask_logits(features, level, images, cells)
            torch.testing.assert_close(
                logits.view(2, s * s, *logits.shape[-2:]), expected["masks"][level], **close
            )
    if head == "SOLOV2Head":
        torch.testing.assert_close(outputs.mask_outputs[1], expected["mask_feats"], **close)


def test_official_legacy_dcn_names():
    """Checkpoints from mmdet < 1.0 name DCN offset convs ``conv2_offset`` / ``conv_offset``."""
    config = "DecoupledSOLO/Light_DCN_R50_3x.yaml"
    source_sd = random_state_dict(official_keys(OFFICIAL_ZOO[config]))
    legacy = {
        k.replace("conv2.conv_offset", "conv2_offset").replace("conv.conv_offset", "conv_offset"): v
        for k, v in source_sd.items()
    }
    assert "backbone.layer2.0.conv2_offset.weight" in legacy
    assert "bbox_head.ins_convs.3.conv_offset.bias" in legacy
    cfg = make_cfg(config)
    new = convert.convert_loaded({"state_dict": source_sd}, "official", cfg)
    old = convert.convert_loaded({"state_dict": legacy}, "official", cfg)
    assert new.keys() == old.keys()
    assert all(new[k] is old[k] for k in new)


@pytest.mark.parametrize("depth", [50, 101])
def test_adelaidet(depth):
    config = f"SOLOv2/R{depth}_3x.yaml"
    cfg = make_cfg(config, ["MODEL.RESNETS.STRIDE_IN_1X1", "True"])
    model = build_model(cfg)
    source_sd = random_state_dict(adelaidet_keys(depth), seed=depth)
    converted = convert.convert_loaded({"model": source_sd, "iteration": 1}, "adelaidet", cfg)
    stem = "backbone.bottom_up.stem.conv1.weight"
    check_conversion(source_sd, converted, model, ADELAIDET_SAMPLES, skip=(stem,))

    # The stem is re-normalised: BGR, mean-subtracted, std 1 inputs -> our RGB, std-normalised.
    image = torch.rand(1, 3, 32, 32) * 255  # RGB
    rgb_mean, rgb_std = torch.tensor(cfg.MODEL.PIXEL_MEAN), torch.tensor(cfg.MODEL.PIXEL_STD)
    ours = F.conv2d((image - rgb_mean.view(3, 1, 1)) / rgb_std.view(3, 1, 1), converted[stem])
    bgr = image.flip(1) - torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    theirs = F.conv2d(bgr, source_sd[stem])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-2)


def test_adelaidet_needs_msra_style_config():
    sd = random_state_dict(adelaidet_keys(50))
    with pytest.raises(ConversionError, match="STRIDE_IN_1X1 True"):
        convert.convert_loaded({"model": sd}, "adelaidet", make_cfg("SOLOv2/R50_3x.yaml"))


def test_adelaidet_without_gn_is_refused():
    sd = {"ins_head.cate_tower.2.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="NORM 'GN'"):
        convert.convert_state_dict(sd, "adelaidet")


# ------------------------------------------------------------------------------------------------
# torchvision ImageNet backbones.
# ------------------------------------------------------------------------------------------------


def _randomize_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)


@pytest.mark.parametrize(
    "arch,config", [("resnet50", "SOLO/R50_1x.yaml"), ("resnet18", "SOLOv2/Light_448_R18_3x.yaml")]
)
def test_torchvision_backbone_numerically_equal(tmp_path, arch, config):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None).eval()
    _randomize_bn(tv)
    src, dst = tmp_path / f"{arch}.pth", tmp_path / f"{arch}.pkl"
    torch.save(tv.state_dict(), src)
    cfg = make_cfg(config)
    convert.convert_checkpoint(str(src), str(dst), "torchvision", cfg)
    with open(dst, "rb") as f:
        data = pickle.load(f)
    assert data["matching_heuristics"] is True and "torchvision" in data["__author__"]
    assert "res2.0.conv1.weight" in data["model"] and "fc.weight" not in data["model"]

    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(dst))  # as MODEL.WEIGHTS would
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i in range(1, 5):
            y = getattr(tv, f"layer{i}")(y)
            # Same network, different float rounding (our inference folds FrozenBN into the convs
            # and may run channels-last), which grows with depth: compare at the output's scale.
            scale = float(y.abs().max())
            torch.testing.assert_close(ours[f"res{i + 1}"], y, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "config", ["SOLOv2/Light_448_MobileNetV3_3x.yaml", "Shapes/SOLOv2_MobileNetV3.yaml"]
)
def test_torchvision_mobilenet_v3_numerically_equal(tmp_path, config):
    """torchvision's MobileNetV3-Large ImageNet state dict, converted and loaded as MODEL.WEIGHTS,
    gives torchvision's features at strides 4-32 (FrozenBN and BN configs)."""
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_large(weights=None).eval()
    _randomize_bn(tv)
    src, dst = tmp_path / "mobilenet_v3_large.pth", tmp_path / "mobilenet_v3_large.pkl"
    torch.save(tv.state_dict(), src)
    cfg = make_cfg(config, ["MODEL.FPN.OUT_CHANNELS", "64"])
    converted = convert.convert_checkpoint(str(src), str(dst), "torchvision", cfg)
    assert "features.16.1.running_var" in converted and "classifier.0.weight" not in converted

    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(dst))  # as MODEL.WEIGHTS would
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        y, expected = x, {}
        for index, layer in enumerate(tv.features):
            y = layer(y)
            expected.update({name: y for name, (i, _) in STAGES.items() if i == index})
    for name in ("s1", "s2", "s3", "s4"):
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-5 * scale)


def test_torchvision_mobilenet_v3_for_a_resnet_config_names_the_keys():
    sd = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    with pytest.raises(
        ConversionError, match=r"(?s)missing from the conversion.*stem.conv1.*features.0.0.weight"
    ):
        convert.convert_loaded(sd, "torchvision", make_cfg("SOLOv2/Light_448_R18_3x.yaml"))


def test_torchvision_resnext_for_x101():
    """torchvision's (and open-mmlab's) ResNeXt-101 64x4d names fit the X101 config's body."""
    with torch.device("meta"):
        tv = torchvision.models.resnext101_64x4d()
    cfg = make_cfg("SOLOv2/X101_DCN_3x.yaml")
    converted = convert.convert_loaded({"state_dict": tv.state_dict()}, "torchvision", cfg)
    assert converted["res5.2.conv2.weight"].shape == (2048, 32, 3, 3)


def test_torchvision_config_must_be_pytorch_style():
    sd = torchvision.models.resnet50(weights=None).state_dict()
    cfg = make_cfg("SOLO/R50_1x.yaml", ["MODEL.RESNETS.STRIDE_IN_1X1", "True"])
    with pytest.raises(ConversionError, match="STRIDE_IN_1X1 False"):
        convert.convert_loaded(sd, "torchvision", cfg)


# ------------------------------------------------------------------------------------------------
# Failures are loud and name the problem.
# ------------------------------------------------------------------------------------------------

SMALL = "SOLOv2/Light_448_R18_3x.yaml"


@pytest.fixture(scope="module")
def small():
    cfg = make_cfg(SMALL)
    return cfg, build_model(cfg), random_state_dict(official_keys(OFFICIAL_ZOO[SMALL]))


def test_missing_key(small):
    cfg, model, sd = small
    sd = dict(sd)
    del sd["bbox_head.kernel_convs.1.gn.bias"]
    with pytest.raises(ConversionError, match="missing") as e:
        convert.convert_loaded({"state_dict": sd}, "official", cfg, "x.pth", model=model)
    assert "head.kernel_tower.1.norm.bias" in str(e.value) and "x.pth" in str(e.value)


def test_wrong_shape(small):
    cfg, model, sd = small
    sd = dict(sd, **{"bbox_head.solo_cate.weight": torch.zeros(81, 256, 3, 3)})
    with pytest.raises(ConversionError, match=r"head\.cate_pred\.weight: converted \(81,"):
        convert.convert_loaded({"state_dict": sd}, "official", cfg, model=model)


def test_wrong_config():
    """A SOLOv2 checkpoint converted for a SOLO config: same backbone, different head."""
    sd = random_state_dict(official_keys(OFFICIAL_ZOO["SOLOv2/Light_448_R50_3x.yaml"]))
    with pytest.raises(ConversionError, match="does not fit") as e:
        convert.convert_loaded({"state_dict": sd}, "official", make_cfg("SOLO/R50_1x.yaml"))
    assert "head.mask_preds.0.weight" in str(e.value)  # missing
    assert "head.kernel_pred.weight" in str(e.value)  # unexpected
    assert "head.cate_tower.0.conv.weight" not in str(e.value)  # fits


def test_unknown_key(small):
    _, _, sd = small
    sd = dict(
        sd,
        **{
            "bbox_head.extra_conv.weight": torch.zeros(1),
            "neck.fpn_convs.4.conv.bias": torch.zeros(1),
        },
    )
    with pytest.raises(ConversionError, match="not in the known official layout") as e:
        convert.convert_state_dict(sd, "official", "x.pth")
    assert "bbox_head.extra_conv.weight" in str(e.value) and "neck.fpn_convs.4" in str(e.value)


@pytest.mark.parametrize(
    "loaded,source,match",
    [
        ({"model": {}}, "official", r"state dict in \['model'\] is empty"),
        ({"state_dict": {"a": torch.zeros(1)}}, "adelaidet", r"no known layout; first keys: \['a"),
        ({"meta": {}, "weights": 3}, "torchvision", r"no weights found.*\['meta', 'weights'\]"),
        ([torch.zeros(1)], "official", "expected a dict"),
        ({"state_dict": {"backbone.conv1.weight": "x"}}, "official", "'backbone.conv1.weight'"),
    ],
)
def test_unknown_layout(loaded, source, match):
    with pytest.raises(ConversionError, match=match) as e:
        convert.convert_loaded(loaded, source, origin="ckpt.pth")
    assert "ckpt.pth" in str(e.value)


def test_untrusted_pickle(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": {}, "meta": {"obj": _Opaque()}}, path)
    with pytest.raises(ConversionError, match="--trust-pickle"):
        convert.load_checkpoint_file(str(path))
    assert "state_dict" in convert.load_checkpoint_file(str(path), trust_pickle=True)


class _Opaque:
    pass


# ------------------------------------------------------------------------------------------------
# Wrappers and prefixes of every source; the layout found is named when refusing.
# ------------------------------------------------------------------------------------------------


def _source_state_dicts():
    """One small state dict per source, in the source's own names."""
    light = OFFICIAL_ZOO[SMALL]
    return {
        "official": random_state_dict(official_keys(light), seed=1),
        "mmdet": random_state_dict(mmdet_keys(light), seed=2),
        "adelaidet": random_state_dict(adelaidet_keys(50), seed=3),
        "torchvision": torchvision.models.resnet18(weights=None).state_dict(),
        "solo": convert.convert_loaded(random_state_dict(official_keys(light), seed=4), "official"),
    }


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _zeros_like(sd):
    return {k: torch.zeros_like(v) for k, v in sd.items()}


#: name -> (how a trainer wraps the weights ``sd``, whether the result holds ``sd``'s tensors).
WRAPPERS = {
    "bare": lambda sd: sd,
    "ddp_module_prefix": lambda sd: {"state_dict": _prefixed(sd, "module.")},
    "lightning_model_prefix": lambda sd: {
        "epoch": 3,
        "state_dict": _prefixed(sd, "model."),
        "optimizer_states": [{}],
    },
    "compiled_ddp_in_detectron2_model": lambda sd: {
        "model": _prefixed(sd, "module._orig_mod."),
        "iteration": 9,
    },
    "model_then_state_dict_nesting": lambda sd: {"model": {"state_dict": sd}},
    # timm (state_dict_ema) and d2go (ema_state) keep the averaged copy apart: it is used.
    "timm_state_dict_ema": lambda sd: {
        "state_dict": _zeros_like(sd),
        "state_dict_ema": _prefixed(sd, "module."),
    },
    "d2go_ema_state": lambda sd: {"model": _zeros_like(sd), "ema_state": sd},
    # mmengine's EMAHook swaps the averages into state_dict, the raw weights into ema_state_dict.
    "mmengine_ema_state_dict": lambda sd: {
        "meta": {"mmengine_version": "0.10.3"},
        "state_dict": sd,
        "ema_state_dict": {"steps": torch.tensor(7), **_prefixed(_zeros_like(sd), "module.")},
    },
    # mmcv's EMA hooks register ema_<name> buffers next to the (swapped-in) averaged weights.
    "mmcv_ema_buffers": lambda sd: {
        "state_dict": {
            **sd,
            **{"ema_" + k.replace(".", "_"): torch.zeros_like(v) for k, v in sd.items()},
        }
    },
}


@pytest.fixture(scope="module")
def source_state_dicts():
    return _source_state_dicts()


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("source", convert.SOURCES)
def test_wrappers_and_prefixes_are_unwrapped(source_state_dicts, source, wrapper):
    sd = source_state_dicts[source]
    expected = convert.convert_loaded({"state_dict": sd, "model": sd}, source)
    converted = convert.convert_loaded(WRAPPERS[wrapper](sd), source, origin=wrapper)
    assert converted.keys() == expected.keys()
    # The very tensors of sd (not the zeroed decoys of the other copy) end up under each name.
    assert all(converted[k] is expected[k] for k in expected)


@pytest.mark.parametrize(
    "actual,source,look_like",
    [
        ("mmdet", "official", r"mmdetection 2\.x/3\.x SOLO-family checkpoint \(--source mmdet\)"),
        ("official", "mmdet", r"WXinlong/SOLO .*\(--source official\)"),
        (
            "torchvision",
            "official",
            r"torchvision ImageNet \(ResNet, MobileNetV3\) checkpoint \(--",
        ),
        ("official", "adelaidet", r"\(--source official\)"),
        ("adelaidet", "mmdet", r"AdelaiDet .*\(--source adelaidet\)"),
    ],
)
def test_refusal_names_the_layout_found(source_state_dicts, actual, source, look_like):
    loaded = {"state_dict": _prefixed(source_state_dicts[actual], "module.")}
    with pytest.raises(ConversionError, match=f"not in the known {source} layout") as e:
        convert.convert_loaded(loaded, source, origin="x.pth")
    assert re.search(f"The keys look like .*{look_like}", str(e.value)), str(e.value)
    assert "first keys: ['" in str(e.value) and "x.pth" in str(e.value)


def test_refusal_of_an_already_converted_checkpoint(small):
    cfg, model, sd = small
    ours = convert.convert_loaded({"state_dict": sd}, "official")
    plain = "no conversion needed, use it with MODEL.WEIGHTS"
    with pytest.raises(ConversionError, match=plain) as e:
        convert.convert_loaded({"model": ours, "__author__": "x"}, "adelaidet")
    assert "--source solo removes them" in str(e.value)
    assert convert.guess_layout(["foo.weight", "bar.bias"]) == (
        "keys are in no known layout; first keys: ['foo.weight', 'bar.bias']"
    )


# ------------------------------------------------------------------------------------------------
# mmdetection files: 2.x (legacy serialisation, meta.CLASSES), 3.x (meta.dataset_meta) and 3.x
# training checkpoints with pickled mmengine objects, read without mmengine.
# ------------------------------------------------------------------------------------------------

MMDET_SMALL = "SOLOv2/Light_448_R18_3x.yaml"


@pytest.fixture(scope="module")
def mmdet_small():
    cfg = make_cfg(MMDET_SMALL)
    sd = random_state_dict(mmdet_keys(MMDET_ZOO[MMDET_SMALL][0]), seed=5)
    return cfg, build_model(cfg), sd


def _convert_file(tmp_path, loaded, cfg, **save_kwargs):
    src, dst = tmp_path / "src.pth", tmp_path / "dst.pth"
    torch.save(loaded, src, **save_kwargs)
    converted = convert.convert_checkpoint(str(src), str(dst), "mmdet", cfg)
    return converted, torch.load(dst, weights_only=True)


def test_mmdet_2x_published_file(tmp_path, mmdet_small, caplog):
    """mmdet 2.x publish_model.py: torch's legacy (non-zip) format, meta.CLASSES."""
    cfg, model, sd = mmdet_small
    meta = {"mmdet_version": "2.25.0", "CLASSES": COCO_CLASSES, "epoch": 36, "iter": 1}
    with caplog.at_level("INFO", logger="solo.checkpoint.verify"):
        converted, written = _convert_file(
            tmp_path,
            {"meta": meta, "state_dict": sd},
            cfg,
            _use_new_zipfile_serialization=False,
        )
    assert "80 classes: person, bicycle, car" in caplog.text
    model.load_state_dict(written["model"], strict=True)
    assert torch.equal(
        model.state_dict()["head.kernel_pred.weight"], sd["mask_head.conv_kernel.weight"]
    )
    assert "open-mmlab/mmdetection" in written["__author__"]


def test_mmdet_3x_published_file(tmp_path, mmdet_small):
    cfg, model, sd = mmdet_small
    meta = {"dataset_meta": {"classes": COCO_CLASSES, "palette": [(220, 20, 60)] * 80}}
    loaded = {"meta": meta, "state_dict": sd}
    assert convert.checkpoint_class_names(loaded) == COCO_CLASSES
    converted, written = _convert_file(tmp_path, loaded, cfg)
    model.load_state_dict(written["model"], strict=True)


#: Set if unpickling ever runs code of the test's stand-in classes or functions.
_CALLED = []


def _record_call(*args):
    _CALLED.append(args)


class _CodeOnLoad:
    """Unpickling it calls ``_record_call``, as a malicious file would call os.system."""

    def __reduce__(self):
        return (_record_call, ("unpickled",))


@pytest.fixture
def fake_mmengine(monkeypatch):
    """Classes pickled under mmengine's module names, as mmengine's Runner saves them
    (``message_hub``: MessageHub state with HistoryBuffers of numpy arrays), whose modules are
    gone again before loading: mmengine is not installed here."""

    class HistoryBuffer:
        def __init__(self, values):
            self._log_history = np.asarray(values, dtype=np.float64)
            self._count_history = np.ones(len(values), dtype=np.int64)
            self.max_length = 1000000

        def __setstate__(self, state):  # never run when loading without mmengine
            _CALLED.append("HistoryBuffer.__setstate__")
            self.__dict__.update(state)

    modules = {}
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        modules[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, modules[name])
    HistoryBuffer.__module__ = "mmengine.logging.history_buffer"
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
    yield HistoryBuffer
    _CALLED.clear()


def _training_checkpoint(sd, buffer_cls):
    return {
        "meta": {
            "epoch": 12,
            "iter": 87960,
            "mmengine_version": "0.10.3",
            "dataset_meta": {"classes": COCO_CLASSES},
            "cfg": "model = dict(type='SOLOv2')",
        },
        "state_dict": sd,
        "message_hub": {
            "log_scalars": {"train/loss": buffer_cls([1.5, 1.25]), "train/lr": buffer_cls([0.01])},
            "runtime_info": {"epoch": 12, "iter": 87960},
            "resumed_keys": {"train/loss": True},
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
    }


def test_mmdet_3x_training_checkpoint_loads_without_mmengine(tmp_path, mmdet_small, fake_mmengine):
    cfg, model, sd = mmdet_small
    src = tmp_path / "epoch_12.pth"
    torch.save(_training_checkpoint(sd, fake_mmengine), src)
    for name in ("mmengine.logging.history_buffer", "mmengine.logging", "mmengine"):
        del sys.modules[name]
    with pytest.raises(ImportError):  # really not importable: what a real load would need
        importlib.import_module("mmengine.logging.history_buffer")

    loaded = convert.load_checkpoint_file(str(src))
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, convert.PickledObjectPlaceholder)
    assert buffer.qualname == "mmengine.logging.history_buffer.HistoryBuffer"
    np.testing.assert_array_equal(buffer.state["_log_history"], [1.5, 1.25])  # numpy kept
    assert not _CALLED  # none of the class's code ran
    assert all(loaded["state_dict"][k].equal(v) for k, v in sd.items())

    dst, config = tmp_path / "out.pth", os.path.join(ROOT, "configs", MMDET_SMALL)
    assert _cli().main(["--source", "mmdet", "--config", config, str(src), str(dst)]) == 0
    model.load_state_dict(torch.load(dst, weights_only=True)["model"], strict=True)


def test_pickled_code_is_refused_next_to_mmengine_objects(tmp_path, mmdet_small, fake_mmengine):
    cfg, model, sd = mmdet_small
    src = tmp_path / "evil.pth"
    checkpoint = _training_checkpoint(sd, fake_mmengine)
    checkpoint["meta"]["hook"] = _CodeOnLoad()
    torch.save(checkpoint, src)
    with pytest.raises(ConversionError, match="--trust-pickle") as e:
        convert.load_checkpoint_file(str(src))
    assert "test_convert._record_call" in str(e.value)
    assert not _CALLED


def test_class_count_must_match_the_config(mmdet_small):
    cfg, model, sd = mmdet_small
    loaded = {"meta": {"CLASSES": ("cat", "dog", "bird")}, "state_dict": sd}
    with pytest.raises(ConversionError, match="trained on 3 classes \\(cat, dog, bird\\)") as e:
        convert.convert_loaded(loaded, "mmdet", cfg, "pets.pth", model=model)
    assert "MODEL.SOLO.NUM_CLASSES 80" in str(e.value) and "pets.pth" in str(e.value)


def test_class_names_in_another_order_are_reported(mmdet_small, caplog):
    cfg, model, sd = mmdet_small
    names = list(COCO_CLASSES)
    names[1], names[2] = names[2], names[1]
    loaded = {"meta": {"dataset_meta": {"classes": names}}, "state_dict": sd}
    with caplog.at_level("WARNING", logger="solo.checkpoint.verify"):
        convert.convert_loaded(loaded, "mmdet", cfg, "x.pth", model=model)
    assert "2 class names differ from coco_2017_val's thing_classes" in caplog.text
    assert "1: 'car' vs 'bicycle'" in caplog.text


def test_fold_refuses_mean_shift():
    w = torch.randn(4, 3, 7, 7)
    other = convert.InputConvention("RGB", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ConversionError, match="PIXEL_MEAN"):
        convert.fold_input_normalization(w, convert.RGB_IMAGENET, other)
    assert convert.fold_input_normalization(w, convert.RGB_IMAGENET, convert.RGB_IMAGENET) is w


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def _cli():
    return load_script("tools/convert_checkpoint.py", "convert_checkpoint")


def test_cli(tmp_path, small):
    cfg, model, sd = small
    cli = _cli()
    src, dst = tmp_path / "SOLOv2_LIGHT_448_R18_3x.pth", tmp_path / "out" / "converted.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 36}}, src)
    config = os.path.join(ROOT, "configs", SMALL)
    argv = ["--source", "official", "--config", config, str(src), str(dst)]
    assert cli.main(argv) == 0

    # Loads with MODEL.WEIGHTS: nothing missing, nothing unexpected, every value in place.
    fresh = build_model(cfg)
    checkpointer, reports = DetectionCheckpointer(fresh), []
    load_model = checkpointer._load_model  # record what load() reports as incompatible
    checkpointer._load_model = lambda ckpt: reports.append(load_model(ckpt)) or reports[-1]
    checkpointer.load(str(dst))
    assert len(reports) == 1
    assert not reports[0].missing_keys and not reports[0].unexpected_keys
    assert not reports[0].incorrect_shapes
    assert torch.equal(
        fresh.state_dict()["head.kernel_pred.weight"], sd["bbox_head.solo_kernel.weight"]
    )

    # Failures: exit code 1, nothing written.
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}}, bad)
    assert (
        cli.main(["--source", "official", "--config", config, str(bad), str(tmp_path / "x.pth")])
        == 1
    )
    assert cli.main(["--source", "adelaidet", str(src), str(tmp_path / "y.pth")]) == 1
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()
    with pytest.raises(SystemExit):
        cli.main(["--source", "caffe", str(src), str(dst)])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: _prefixed(sd, "module."),  # torch.save(ddp_model.state_dict())
        lambda sd: {"state_dict": _prefixed(sd, "model._orig_mod."), "epoch": 2},
        lambda sd: {"model": _zeros_like(sd), "model_ema": _prefixed(sd, "module.")},
    ],
    ids=["ddp", "lightning_compiled", "ema"],
)
def test_cli_our_own_wrapped_checkpoint_is_unwrapped_and_loads_strictly(tmp_path, small, wrap):
    """A model of this project saved by other code than Detectron2's checkpointer: MODEL.WEIGHTS
    alone would load nothing of the last two; --source solo writes a plain checkpoint."""
    cfg, _, _ = small
    torch.manual_seed(0)
    trained = build_model(cfg).state_dict()
    src, dst = tmp_path / "wrapped.pth", tmp_path / "plain.pth"
    torch.save(wrap(trained), src)
    config = os.path.join(ROOT, "configs", SMALL)
    assert _cli().main(["--source", "solo", "--config", config, str(src), str(dst)]) == 0

    fresh = build_model(cfg)
    incompatible = DetectionCheckpointer(fresh)._load_model(torch.load(dst, weights_only=True))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


def test_detectron2_pkl_file_of_our_model_converts_and_opaque_pickles_are_refused(tmp_path, small):
    """Detectron2's .pkl format (pickled numpy arrays), which torch.load cannot read: its arrays
    load without --trust-pickle, any other pickled object is named and refused."""
    cfg, _, _ = small
    torch.manual_seed(0)
    trained = build_model(cfg).state_dict()
    src, dst = str(tmp_path / "model_final.pkl"), str(tmp_path / "plain.pth")
    convert.save_checkpoint(src, trained, "someone")
    with pytest.raises(Exception, match="magic number"):
        torch.load(src, weights_only=False)
    config = os.path.join(ROOT, "configs", SMALL)
    assert _cli().main(["--source", "solo", "--config", config, src, dst]) == 0
    written = torch.load(dst, weights_only=True)["model"]
    assert all(torch.equal(written[k], v) for k, v in trained.items())

    odd = tmp_path / "odd.pkl"
    odd.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "meta": _Opaque()}))
    with pytest.raises(ConversionError, match=r"odd.pkl: a .pkl file .*_Opaque.*--trust-pickle"):
        convert.load_checkpoint_file(str(odd))
    assert isinstance(convert.load_checkpoint_file(str(odd), trust_pickle=True)["meta"], _Opaque)
