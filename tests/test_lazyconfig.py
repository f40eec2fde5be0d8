"""LazyConfig files (configs/**/*.py) build the models of their YAML twins, with the same
schedule and optimizer; tools/lazyconfig_train_net.py trains and evaluates them."""

import numpy as np
import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.utils.events import EventStorage

from helpers import (
    CONFIG_DIR,
    assert_onnx_export_is_exact,
    force_candidates,
    load_script,
    random_batch,
    solo_cfg,
)
from solo.solver import build_solo_optimizer

# YAML config -> its LazyConfig twin; every head family, the light heads, the new backbones.
TWINS = {
    "SOLO/R50_1x.yaml": "SOLO/R50_1x.py",
    "DecoupledSOLO/R50_1x.yaml": "DecoupledSOLO/R50_1x.py",
    "DecoupledSOLO/Light_R50_3x.yaml": "DecoupledSOLO/Light_R50_3x.py",
    "SOLOv2/R50_1x.yaml": "SOLOv2/R50_1x.py",
    "SOLOv2/Light_448_R50_3x.yaml": "SOLOv2/Light_448_R50_3x.py",
    "SOLOv2/Light_448_MobileNetV3_3x.yaml": "SOLOv2/Light_448_MobileNetV3_3x.py",
    "SOLOv2/RegNetX_4GF_3x.yaml": "SOLOv2/RegNetX_4GF_3x.py",
    "SOLOv2/RegNetY_4GF_3x.yaml": "SOLOv2/RegNetY_4GF_3x.py",
    "Shapes/SOLOv2_R18.yaml": "Shapes/SOLOv2_R18.py",
    "Shapes/SOLOv2_MobileNetV3.yaml": "Shapes/SOLOv2_MobileNetV3.py",
}


def lazy_cfg(name, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(str(CONFIG_DIR / name)), list(overrides))


def twin_models(yaml_file):
    cfg = solo_cfg(yaml_file)
    lazy = lazy_cfg(TWINS[yaml_file])
    torch.manual_seed(0)
    yaml_model = build_model(cfg)
    # Channels-last is a CPU memory layout, on by default on CPU: the same as the YAML model's.
    lazy.model.channels_last = yaml_model.channels_last
    lazy_model = instantiate(lazy.model)
    return cfg, lazy, yaml_model, lazy_model


@pytest.mark.parametrize("yaml_file", sorted(TWINS))
def test_lazy_config_builds_the_yaml_model(yaml_file):
    """Same state-dict keys and shapes, same inference parameters; with the same weights, the
    same losses on a seeded batch and the same instances on a seeded image."""
    cfg, lazy, yaml_model, lazy_model = twin_models(yaml_file)
    yaml_state = yaml_model.state_dict()
    lazy_state = lazy_model.state_dict()
    assert list(lazy_state) == list(yaml_state)
    assert all(lazy_state[k].shape == v.shape for k, v in yaml_state.items())
    assert vars(lazy_model.postprocessor) == vars(yaml_model.postprocessor)
    assert vars(lazy_model.target_assigner) == vars(yaml_model.target_assigner)
    trainable = [n for n, p in yaml_model.named_parameters() if p.requires_grad]
    assert [n for n, p in lazy_model.named_parameters() if p.requires_grad] == trainable
    lazy_model.load_state_dict(yaml_state)
    for attr in ("input_format", "focal_alpha", "focal_gamma", "cate_loss_weight"):
        assert getattr(lazy_model, attr) == getattr(yaml_model, attr), attr
    torch.testing.assert_close(lazy_model.pixel_mean, yaml_model.pixel_mean)
    torch.testing.assert_close(lazy_model.pixel_std, yaml_model.pixel_std)

    batch = random_batch([((96, 128), 3), ((64, 96), 2)], cfg.MODEL.SOLO.NUM_CLASSES, seed=2)
    losses = []
    for model in (yaml_model, lazy_model):
        model.train()
        with EventStorage():
            losses.append({k: v.item() for k, v in model(batch).items()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 80, 112), np.uint8))
    results = []
    for model in (yaml_model, lazy_model):
        force_candidates(model)
        model.eval()
        with torch.no_grad():
            results.append(model([{"image": image}])[0]["instances"])
    assert len(results[0]) > 0 and len(results[0]) == len(results[1])
    torch.testing.assert_close(results[0].scores, results[1].scores)
    assert torch.equal(results[0].pred_masks, results[1].pred_masks)


@pytest.mark.parametrize("yaml_file", sorted(TWINS))
def test_lazy_config_has_the_yaml_schedule_and_optimizer(yaml_file):
    cfg, lazy, yaml_model, lazy_model = twin_models(yaml_file)
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    yaml_optimizer = build_solo_optimizer(cfg, yaml_model)
    lazy.optimizer.params.model = lazy_model
    lazy_optimizer = instantiate(lazy.optimizer)
    assert type(lazy_optimizer).__name__ == type(yaml_optimizer).__name__

    def hyper(optimizer, model):
        names = {p: n for n, p in model.named_parameters()}
        keys = ("lr", "weight_decay", "momentum", "betas", "eps")
        return {
            names[p]: {k: g.get(k, optimizer.defaults.get(k)) for k in keys}
            for g in optimizer.param_groups
            for p in g["params"]
        }

    assert hyper(lazy_optimizer, lazy_model) == hyper(yaml_optimizer, yaml_model)
    scheduler = build_lr_scheduler(cfg, yaml_optimizer)
    multiplier = instantiate(lazy.lr_multiplier)
    for it in (
        0,
        1,
        cfg.SOLVER.WARMUP_ITERS // 2,
        cfg.SOLVER.WARMUP_ITERS,
        cfg.SOLVER.MAX_ITER - 1,
    ):
        expected = scheduler._multiplier(it / cfg.SOLVER.MAX_ITER)
        assert multiplier(it / lazy.train.max_iter) == pytest.approx(expected), it


@pytest.mark.parametrize(
    "name", ["SOLOv2/ViTDet_B_3x.py", "SOLOv2/Swin_T_3x.py", "SOLOv2/MViTv2_T_3x.py"]
)
def test_transformer_backbones_feed_every_level_of_the_head(name):
    pytest.importorskip("timm")
    lazy = lazy_cfg(name)
    shapes = instantiate(lazy.model.backbone).output_shape()
    strides = [shapes[f].stride for f in lazy.model.head_in_features]
    assert strides == [4, 8, 16, 32, 64] and len({shapes[f].channels for f in shapes}) == 1


def test_config_without_a_section_is_refused_naming_it(tmp_path):
    tool = load_script("tools/lazyconfig_train_net.py", "lazyconfig_train_net")
    tool.register_shapes_datasets()
    lazy = lazy_cfg("Shapes/SOLOv2_R18.py")
    del lazy["optimizer"]
    with pytest.raises(tool.LazyConfigError, match=r"x.py has no \['optimizer'\]"):
        tool.check_lazy_config(lazy, "x.py", train=True)
    lazy = lazy_cfg("Shapes/SOLOv2_R18.py", ["dataloader.train.dataset.names=['nope']"])
    with pytest.raises(tool.LazyConfigError, match=r"dataset 'nope' is not registered"):
        tool.check_lazy_config(lazy, "x.py", train=True)
    with pytest.raises(tool.LazyConfigError, match=r"--eval-only needs weights"):
        tool.check_lazy_config(lazy_cfg("Shapes/SOLOv2_R18.py"), "x.py", train=False)


def test_lazyconfig_train_net_trains_the_shapes_recipe_then_evaluates_its_checkpoint(tmp_path):
    from detectron2.engine import default_argument_parser

    from solo.data.shapes import register_shapes_datasets

    register_shapes_datasets(
        str(tmp_path / "data"), splits={"shapes_lazy": dict(num_images=4, seed=5)}
    )
    tool = load_script("tools/lazyconfig_train_net.py", "lazyconfig_train_net")
    out = tmp_path / "run"
    overrides = [
        "dataloader.train.dataset.names=['shapes_lazy']",
        "dataloader.test.dataset.names=['shapes_lazy']",
        "dataloader.evaluator.dataset_name=shapes_lazy",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=2",
        "train.max_iter=3",
        "train.amp.enabled=False",
        f"train.output_dir={out}",
    ]
    argv = ["--config-file", str(CONFIG_DIR / "Shapes/SOLOv2_R18.py"), *overrides]
    trainer = tool.main(default_argument_parser().parse_args(argv))
    assert trainer.iter == 3 and (out / "model_final.pth").is_file()
    assert torch.isfinite(torch.tensor(trainer.storage.history("total_loss").latest()))
    results = trainer.storage.latest()  # the final evaluation, written by EvalHook
    assert any(k.startswith("segm/AP") for k in results)

    argv = [*argv[:2], "--eval-only", *overrides, f"train.init_checkpoint={out}/model_final.pth"]
    evaluated = tool.main(default_argument_parser().parse_args(argv))
    assert set(evaluated["segm"]) >= {"AP", "AP50"}
    # Strict loading: weights of another model are refused, not evaluated.
    other = tmp_path / "other.pth"
    torch.save({"model": {"head.cate_pred.weight": torch.zeros(1)}}, other)
    argv[-1] = f"train.init_checkpoint={other}"
    with pytest.raises(Exception, match="head.cate_pred.weight"):
        tool.main(default_argument_parser().parse_args(argv))


# Detectron2's transformer backbones, shrunk (a few narrow blocks) to run in seconds.
SMALL_HEAD = [
    "model.backbone.out_channels=64", "model.head.channels=64", "model.head.num_convs=1",
    "model.head.mask_kernel_channels=32", "model.head.mask_feature_channels=32",
    "model.num_classes=5", "model.head.num_grids=[12,10,8,6,4]",
    "model.target_assigner.scale_ranges=[[1,24],[12,48],[24,96],[48,192],[96,2048]]",
    "model.postprocessor.nms_pre=100",
]  # fmt: skip
SMALL_TRANSFORMERS = {
    "SOLOv2/ViTDet_B_3x.py": [
        "model.backbone.net.img_size=128", "model.backbone.net.embed_dim=64",
        "model.backbone.net.depth=2", "model.backbone.net.num_heads=2",
        "model.backbone.net.window_size=4", "model.backbone.net.window_block_indexes=[0]",
        "model.backbone.square_pad=128",
    ],
    "SOLOv2/Swin_T_3x.py": [
        "model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.depths=[1,1,1,1]",
        "model.backbone.bottom_up.num_heads=[1,1,2,2]",
    ],
    "SOLOv2/MViTv2_T_3x.py": [
        "model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.depth=4",
        "model.backbone.bottom_up.last_block_indexes=[0,1,2,3]",
        "model.backbone.bottom_up.adaptive_window_size=8",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SMALL_TRANSFORMERS))
def test_transformer_backbone_trains_and_predicts_independently_of_the_batch(name):
    pytest.importorskip("timm")
    lazy = lazy_cfg(name, SMALL_HEAD + SMALL_TRANSFORMERS[name])
    torch.manual_seed(0)
    model = instantiate(lazy.model)
    lazy.optimizer.params.model = model
    optimizer = instantiate(lazy.optimizer)
    batch = random_batch([((96, 128), 3), ((80, 112), 2)], 5, seed=1)
    model.train()
    for _ in range(2):
        with EventStorage():
            losses = model(batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    force_candidates(model)
    model.eval()
    images = [b["image"] for b in random_batch([((75, 120), 1), ((96, 64), 1)], 5, seed=4)]
    with torch.no_grad():
        together = [r["instances"] for r in model([{"image": im} for im in images])]
        alone = [model([{"image": im}])[0]["instances"] for im in images]
    for batched, single in zip(together, alone):
        assert len(single) > 0 and torch.equal(batched.pred_classes, single.pred_classes)
        torch.testing.assert_close(batched.scores, single.scores, rtol=0, atol=1e-5)
        assert torch.equal(batched.pred_masks, single.pred_masks)


def randomise_relative_positions(model, seed=0):
    """Seeded random relative-position tables (zeros at initialisation, where any indexing of
    them gives the same predictions)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("name", sorted(SMALL_TRANSFORMERS))
def test_transformer_backbone_exports_to_onnx_with_the_eager_predictions(name, tmp_path):
    """ViTDet, Swin-T and MViTv2 export exactly: at two image sizes other than the sample's, the
    ONNX file gives the eager predictions. ViTDet's graph pads every image to its square
    (square_pad, so all shapes in ViT are constants), and refuses larger images, as the eager
    model does; MViTv2's attention is replaced by one computing its reshapes and
    relative positions from the traced sizes (solo.export.traceable)."""
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    from solo.export import ExportError

    # The 30 best of ~600 forced candidates: past them, random weights give near-ties (1e-4)
    # whose order float rounding may swap, which changes their Matrix NMS decay.
    overrides = SMALL_HEAD + SMALL_TRANSFORMERS[name] + ["model.postprocessor.max_per_image=30"]
    torch.manual_seed(0)
    model = instantiate(lazy_cfg(name, overrides).model)
    randomise_relative_positions(model)
    force_candidates(model)
    sizes = [(128, 96), (75, 110)]
    exported = assert_onnx_export_is_exact(model.eval(), tmp_path, (97, 120), sizes)
    if name == "SOLOv2/ViTDet_B_3x.py":
        with pytest.raises(ExportError, match=r"pads every image to 128x128.*got a 129x96"):
            exported([{"image": torch.zeros(3, 129, 96, dtype=torch.uint8)}])


def test_eager_vitdet_refuses_an_image_larger_than_its_square_instead_of_cropping_it():
    """Detectron2's ImageList crops a single image larger than square_size (silently wrong
    masks) and fails on a batch: the model refuses both, naming the sizes and the fix."""
    pytest.importorskip("timm")
    name = "SOLOv2/ViTDet_B_3x.py"
    model = instantiate(lazy_cfg(name, SMALL_HEAD + SMALL_TRANSFORMERS[name]).model).eval()
    small = {"image": torch.zeros(3, 128, 96, dtype=torch.uint8)}
    large = {"image": torch.zeros(3, 96, 129, dtype=torch.uint8)}
    with torch.no_grad():
        assert model([small])[0]["instances"].image_size == (128, 96)
        for batch, index in [([large], 0), ([small, large], 1)]:
            message = rf"batched_inputs\[{index}\]\['image'\] is 96x129, larger than the 128x128"
            with pytest.raises(ValueError, match=message + r".*longer side is at most 128"):
                model(batch)


def test_vit_without_square_padding_is_refused_at_export_naming_square_pad(tmp_path):
    pytest.importorskip("timm")
    from solo.export import ExportError, export_model

    name = "SOLOv2/ViTDet_B_3x.py"
    overrides = SMALL_HEAD + SMALL_TRANSFORMERS[name] + ["model.backbone.square_pad=0"]
    model = instantiate(lazy_cfg(name, overrides).model).eval()
    with pytest.raises(ExportError, match=r"ViT backbone without square padding.*square_pad"):
        export_model(model, "onnx", str(tmp_path))
