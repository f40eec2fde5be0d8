"""The GPU path: every test here runs on CUDA and compares with the CPU where a result exists.

Marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is False, so the CPU suite stays
green; ``make gpu-check`` runs them (``pytest -m cuda tests/test_cuda.py``) on a GPU machine.
Comparisons run in float32 with TF32 off (cuDNN and matmul), so CUDA and CPU differ only by
summation order; float16 autocast is exercised through Detectron2's ``AMPTrainer``.
"""

import math
import numpy as np
import os
import pytest
import torch

from detectron2.engine import AMPTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import (
    HEADS,
    REPO_ROOT,
    SHAPES_CONFIG,
    SMALL_SHAPES_OPTS,
    force_candidates,
    load_train_net,
    random_batch,
    read_metrics,
    run_main,
    shapes_cache,
    tiny_cfg,
)
from solo.modeling.layers import DeformConvPack
from solo.modeling.nms import mask_nms, matrix_nms, points_nms
from solo.modeling.targets import gather_ground_truth
from solo.solver import build_solo_optimizer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False); run `make gpu-check` "
        "on a GPU machine",
    ),
]
CUDA = "cuda"  # the device under test; everything is compared with "cpu"


@pytest.fixture(autouse=True)
def float32_matmul():
    """TF32 off: float32 convolutions and matmuls on CUDA as exact as on the CPU."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def model_pair(head_name, opts=()):
    """The same random weights on the CPU and on ``CUDA``."""
    torch.manual_seed(0)
    cpu = build_model(tiny_cfg(head_name, opts=opts))
    gpu = build_model(tiny_cfg(head_name, opts=["MODEL.DEVICE", CUDA, *opts]))
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def assert_same_instances(expected, actual, score_atol=1e-3, mask_tol=1e-3):
    """Every instance has a counterpart on the other side with the same class, a score within
    ``score_atol`` and a mask differing in at most ``mask_tol`` of its pixels (a pixel whose
    probability is within rounding of MASK_THRESH may flip), in any order (near-equal scores
    may swap), and the same box where the masks are equal."""
    assert len(actual) == len(expected) > 0
    e, a = expected.pred_masks.flatten(1).float(), actual.pred_masks.cpu().flatten(1).float()
    differ = (e.sum(1)[:, None] + a.sum(1)[None, :] - 2 * e @ a.T) / e.shape[1]  # (N, N)
    scores = (expected.scores[:, None] - actual.scores.cpu()[None, :]).abs()
    classes = expected.pred_classes[:, None] == actual.pred_classes.cpu()[None, :]
    same = classes & (scores <= score_atol) & (differ <= mask_tol)
    assert same.any(1).all(), f"no counterpart for expected instances {(~same.any(1)).nonzero()}"
    assert same.any(0).all(), f"no counterpart for actual instances {(~same.any(0)).nonzero()}"
    match = same.float().argmax(1)  # a counterpart of each expected instance
    identical = differ[torch.arange(len(match)), match] == 0
    boxes = actual.pred_boxes.tensor.cpu()[match]
    assert torch.equal(boxes[identical], expected.pred_boxes.tensor[identical])


@pytest.mark.parametrize("head_name", HEADS)
def test_cuda_inference_equals_cpu_for_every_head(head_name):
    cpu, gpu = model_pair(head_name)
    for model in (cpu, gpu):
        force_candidates(model)
        model.eval()
    batched = [{"image": x["image"]} for x in random_batch([((96, 128), 0), ((80, 112), 0)], 5)]
    with torch.no_grad():
        expected, actual = cpu(batched), gpu(batched)
    for e, a in zip(expected, actual):
        assert a["instances"].pred_masks.device.type == torch.device(CUDA).type
        assert_same_instances(e["instances"], a["instances"])


@pytest.mark.parametrize("head_name", HEADS)
def test_float16_amp_training_step_through_amp_trainer(head_name):
    """Detectron2's AMPTrainer (float16 autocast, gradient scaler): finite losses and a
    gradient for every trainable parameter, for three steps (the scaler may skip a first step
    whose gradients overflow, as it is designed to)."""
    cfg = tiny_cfg(head_name, opts=["MODEL.DEVICE", CUDA, "SOLVER.AMP.ENABLED", True])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = random_batch([((128, 160), 4), ((96, 128), 2)], num_classes=5, seed=1)
    trainer = AMPTrainer(model, iter([batch] * 3), build_solo_optimizer(cfg, model))
    with EventStorage(0) as storage:
        trainer.storage = storage
        for trainer.iter in range(3):
            trainer.run_step()
            storage.step()
        losses = {k: storage.history(k).values() for k in ("loss_cate", "loss_mask")}
    assert all(math.isfinite(v) and v > 0 for h in losses.values() for v, _ in h)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert trainer.grad_scaler.get_scale() > 0
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("modulated", [False, True], ids=["DCN", "DCNv2"])
def test_deformable_conv_on_cuda_equals_cpu_with_gradients(modulated):
    torch.manual_seed(0)
    layer = DeformConvPack(8, 16, 3, padding=1, modulated=modulated)
    with torch.no_grad():  # non-zero offsets: bilinear sampling between pixels
        layer.conv_offset.weight.normal_(std=0.3)
        layer.conv_offset.bias.uniform_(-2, 2)
    x = torch.randn(2, 8, 13, 17)
    results = []
    for device in ("cpu", CUDA):
        moved = layer.to(device)
        moved.zero_grad()
        xd = x.clone().to(device).requires_grad_()
        y = moved(xd)
        (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        grads = [xd.grad] + [p.grad for p in moved.parameters()]
        results.append([t.detach().cpu().clone() for t in [y, *grads]])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def random_masks(rng, n, size=(40, 48)):
    """Overlapping rectangles (several near-duplicates) and a few empty masks."""
    masks = np.zeros((n, *size), dtype=bool)
    for i in range(n - 2):
        y, x = rng.integers(0, size[0] - 8), rng.integers(0, size[1] - 8)
        h, w = rng.integers(6, size[0] - y + 1), rng.integers(6, size[1] - x + 1)
        masks[i, y : y + h, x : x + w] = True
    return torch.from_numpy(masks)


@pytest.mark.parametrize("seed", [0, 1])
def test_matrix_nms_mask_nms_and_point_nms_on_cuda_equal_cpu(seed):
    rng = np.random.default_rng(seed)
    n = 60
    masks = random_masks(rng, n)
    labels = torch.from_numpy(rng.integers(0, 3, n))
    scores = torch.from_numpy(np.sort(rng.random(n))[::-1].copy()).float()
    for kernel in ("gaussian", "linear"):
        expected = matrix_nms(masks, labels, scores, kernel, 2.0)
        actual = matrix_nms(masks.to(CUDA), labels.to(CUDA), scores.to(CUDA), kernel, 2.0)
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-6)
    for threshold in (0.3, 0.5):
        expected = mask_nms(masks, labels, scores, threshold)
        actual = mask_nms(masks.to(CUDA), labels.to(CUDA), scores.to(CUDA), threshold)
        assert torch.equal(actual.cpu(), expected) and expected.sum() < n
    grid = torch.from_numpy(rng.random((2, 3, 12, 12))).float()
    grid[:, :, ::3] = grid[:, :, 1::3]  # ties
    assert torch.equal(points_nms(grid.to(CUDA)).cpu(), points_nms(grid))


@pytest.mark.parametrize("output_size", [(90, 151), (61, 97), (301, 455)])
def test_region_paste_on_cuda_equals_resizing_whole_masks_on_cuda(output_size):
    # Bit-identical on the same device (the region shortcut, or its full fallback where the
    # per-device probe differs: region_paste_support says which ran).
    from solo.modeling.layers import resize
    from solo.modeling.paste import paste_masks, region_paste_support

    gen = torch.Generator().manual_seed(0)
    probs = (resize(torch.rand((1, 6, 6, 10), generator=gen), (24, 40))[0] ** 3).to(CUDA)
    image = (90, 151)
    full = resize(probs[None], (96, 160))[:, :, : image[0], : image[1]]
    if image != output_size:
        full = resize(full, output_size)
    masks, _ = paste_masks(probs, (96, 160), image, output_size, 0.5)
    assert torch.equal(masks, full[0] > 0.5)
    compact, _ = paste_masks(probs, (96, 160), image, output_size, 0.5, compact=True)
    assert torch.equal(compact.tensor, masks)
    print(f"region paste on CUDA: {region_paste_support(CUDA)}")


@pytest.mark.parametrize("head_name", ["SOLOHead", "SOLOv2Head"])
def test_targets_on_cuda_equal_cpu(head_name):
    cpu, gpu = model_pair(head_name)
    batch = random_batch([((128, 160), 8), ((96, 128), 0), ((112, 96), 5)], 5, seed=3)
    gt = [x["instances"] for x in batch]
    padded = (128, 160)
    expected = cpu.target_assigner(gather_ground_truth(gt, padded, "cpu"))
    actual = gpu.target_assigner(gather_ground_truth(gt, padded, gpu.device))
    assert sum(int(t.positive_cells.sum()) for t in expected) > 0
    for level_expected, level_actual in zip(expected, actual):
        for name, value in vars(level_expected).items():
            other = getattr(level_actual, name)
            assert other.device.type == torch.device(CUDA).type, name
            assert torch.equal(other.cpu(), value), f"level target {name} differs"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from solo.data.shapes import register_shapes_datasets

    with shapes_cache(tmp_path_factory.mktemp("shapes")) as root:
        register_shapes_datasets(str(root), splits={"shapes_val_cuda": dict(num_images=8, seed=5)})
        yield root


def test_train_net_trains_with_amp_and_evaluates_on_cuda(shapes_root, tmp_path):
    """train_net.py on shapes on CUDA: a few float16-AMP iterations, then --eval-only."""
    train_net = load_train_net()
    out = str(tmp_path / "run")
    common = ["--config-file", str(REPO_ROOT / SHAPES_CONFIG)]
    opts = SMALL_SHAPES_OPTS + ["OUTPUT_DIR", out, "MODEL.DEVICE", CUDA]
    run_main(train_net, common + opts + ["SOLVER.MAX_ITER", "6", "SOLVER.AMP.ENABLED", "True"])
    metrics = [m for m in read_metrics(out) if "loss_cate" in m]
    assert metrics and all(math.isfinite(m["loss_cate"] + m["loss_mask"]) for m in metrics)
    weights = os.path.join(out, "model_final.pth")
    results = run_main(
        train_net,
        common
        + ["--eval-only"]
        + opts
        + ["MODEL.WEIGHTS", weights, "DATASETS.TEST", "('shapes_val_cuda',)"],
    )
    for task in ("bbox", "segm"):
        assert all(math.isfinite(results[task][k]) for k in ("AP", "AP50", "AP75"))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_on_cuda_equals_eager_cpu(fmt, tmp_path):
    """An exported model (exported on the CPU) run on CUDA: TorchScript on the GPU, ONNX
    Runtime with its CUDA execution provider where installed."""
    export = pytest.importorskip("solo.export", reason="the export module is not installed")
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    cpu, _ = model_pair("SOLOv2Head")
    force_candidates(cpu)
    cpu.eval()
    # Every (cell, class) pair is a forced candidate: K0 holds them all, so export is exact.
    every_pair = sum(s * s for s in cpu.head.num_grids) * cpu.head.num_classes
    path = export.export_model(cpu, fmt, str(tmp_path), max_candidates=every_pair)
    exported = export.ExportedModel(path, device=CUDA)
    batched = [{"image": x["image"]} for x in random_batch([((96, 128), 0), ((64, 96), 0)], 5)]
    with torch.no_grad():
        expected, actual = cpu(batched), exported(batched)
    for e, a in zip(expected, actual):
        assert a["instances"].scores.device.type == torch.device(CUDA).type
        assert_same_instances(e["instances"], a["instances"])
