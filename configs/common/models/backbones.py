"""Bottom-up networks and pyramids for SOLO's LazyConfig models: any Detectron2 backbone whose
outputs are an FPN-like pyramid (p2-p6, strides 4-64) feeds the head (``model.head_in_features``).

Each names the ImageNet (or MAE) checkpoint Detectron2's own configs start from; users download
it (nothing is downloaded at run time) and set ``train.init_checkpoint``.
"""

from functools import partial
from torch import nn

from detectron2.config import LazyCall as L
from detectron2.modeling import MViT, SimpleFeaturePyramid, SwinTransformer, ViT
from detectron2.modeling.backbone import FPN, RegNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.regnet import ResBottleneckBlock, SimpleStem

from solo.modeling.bottom_up import REGNETS, MobileNetV3

IMAGENET_RGB = dict(pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
# pycls's RegNets: BGR input, Detectron2's mean, 1/255-scaled ImageNet std.
PYCLS_BGR = dict(pixel_mean=[103.53, 116.28, 123.675], pixel_std=[57.375, 57.12, 58.395])


def fpn(bottom_up, in_features):
    """Detectron2's FPN over ``in_features`` (strides 4-32) with P6 by max-pooling: p2-p6."""
    return L(FPN)(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=256,
        top_block=L(LastLevelMaxPool)(),
    )


STAGES = ["s1", "s2", "s3", "s4"]

# torchvision's MobileNetV3-Large: tools/convert_checkpoint.py --source torchvision
# mobilenet_v3_large-8738ca79.pth checkpoints/torchvision-MobileNetV3-Large.pkl
mobilenet_v3_large_fpn = fpn(
    L(MobileNetV3)(out_features=STAGES, norm="FrozenBN", freeze_at=2), STAGES
)
MOBILENET_V3_CHECKPOINT = "checkpoints/torchvision-MobileNetV3-Large.pkl"


def regnet_fpn(name):
    """Detectron2's COCO RegNet configs (mask_rcnn_regnet{x,y}_4gf_dds_fpn_1x)."""
    net = L(RegNet)(
        stem_class=SimpleStem,
        stem_width=32,
        block_class=ResBottleneckBlock,
        freeze_at=2,
        norm="FrozenBN",
        out_features=STAGES,
        **REGNETS[name],
    )
    return fpn(net, STAGES)


regnetx_4gf_fpn = regnet_fpn("RegNetX-4GF")
regnety_4gf_fpn = regnet_fpn("RegNetY-4GF")
# pycls DDS baselines, in Detectron2's format (Detectron2's configs name them by URL).
REGNETX_4GF_CHECKPOINT = (
    "https://dl.fbaipublicfiles.com/pycls/dds_baselines/160906383/RegNetX-4.0GF_dds_8gpu.pyth"
)
REGNETY_4GF_CHECKPOINT = (
    "https://dl.fbaipublicfiles.com/pycls/dds_baselines/176245422/RegNetY-4.0GF_dds_8gpu.pyth"
)

# ViTDet (Detectron2's common/models/mask_rcnn_vitdet.py): ViT-B/16 and its simple pyramid,
# on images padded to 1024 x 1024.
vit_b_sfp = L(SimpleFeaturePyramid)(
    net=L(ViT)(
        img_size=1024,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],  # 2, 5, 8, 11: global attention
        residual_block_indexes=[],
        use_rel_pos=True,
        out_feature="last_feat",
    ),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=1024,
)
VIT_B_CHECKPOINT = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)

# Swin-T (Detectron2's swin.py, ImageNet-1k weights as ViTDet's Swin configs name them).
swin_t_fpn = fpn(
    L(SwinTransformer)(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.2
    ),
    ["p0", "p1", "p2", "p3"],
)
SWIN_T_CHECKPOINT = "detectron2://ImageNetPretrained/swin/swin_tiny_patch4_window7_224.pth"

# MViTv2-T (Detectron2's projects/MViTv2 mask_rcnn_mvitv2_t_3x.py).
mvitv2_t_fpn = fpn(
    L(MViT)(
        embed_dim=96,
        depth=10,
        num_heads=1,
        last_block_indexes=(0, 2, 7, 9),
        residual_pooling=True,
        drop_path_rate=0.2,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        out_features=("scale2", "scale3", "scale4", "scale5"),
    ),
    ["scale2", "scale3", "scale4", "scale5"],
)
MVITV2_T_CHECKPOINT = "detectron2://ImageNetPretrained/mvitv2/MViTv2_T_in1k.pyth"
