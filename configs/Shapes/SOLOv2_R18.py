"""The shapes recipe as a LazyConfig (Shapes/SOLOv2_R18.yaml): SOLOv2 on a GroupNorm ResNet-18
trained from scratch with AdamW and a cosine schedule, sized for a CPU."""

from fvcore.common.param_scheduler import CosineParamScheduler

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.solver import WarmupParamScheduler

from ..common.data.shapes import dataloader
from ..common.models.solov2 import model
from ..common.optim import AdamW as optimizer
from ..common.train import train

# ResNet-18, GroupNorm everywhere (trains from scratch at any batch size), nothing frozen.
model.backbone.bottom_up.resnet = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="GN"),
    stages=L(ResNet.make_default_stages)(depth=18, norm="GN"),
    out_features=["res2", "res3", "res4", "res5"],
    freeze_at=0,
)
model.backbone.bottom_up.trainable_affine_norm = False
model.backbone.update(out_channels=128, norm="GN")
model.num_classes = 3
model.head.update(
    num_grids=[24, 20, 12, 8, 6], channels=128, num_convs=2,
    mask_kernel_channels=64, mask_feature_channels=64,
)  # fmt: skip
model.target_assigner.update(
    scale_ranges=[[1, 20], [10, 40], [20, 80], [40, 160], [80, 2048]], sigma=0.5
)
model.cate_loss_weight = 15.0
model.postprocessor.min_mask_areas = [0, 0, 0, 0, 0]  # keep every non-empty mask
model.channels_last = True  # CPU

train.update(max_iter=1700, device="cpu", seed=42, output_dir="output/shapes/SOLOv2_R18_lazy")
train.amp.enabled = True  # bfloat16 forward pass where the CPU has it natively
train.checkpointer.period = 700
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=100 / 1700,
    warmup_method="linear",
    warmup_factor=0.001,
)
