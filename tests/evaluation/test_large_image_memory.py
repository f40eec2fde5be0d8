"""Large images without gigabytes: ``TEST.MASK_FORMAT cropped`` keeps the memory of
``inference_on_dataset`` + ``SOLOCOCOEvaluator`` bounded by the objects' areas.

The post-processor and the evaluator are the real ones; the network is replaced by synthetic
category logits and stride-4 mask probabilities (many separate blobs, so that they all survive
Matrix NMS) of a 800x1088 canvas whose output size is the original photo's 2000x3000. Peak RSS
is read in a fresh process (Linux VmHWM, reset after the warm-up).
"""

import json
import subprocess
import sys
import textwrap
import pytest

from helpers import REPO_ROOT

CHILD = textwrap.dedent(r"""
    import json, sys, tempfile, os
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import inference_on_dataset
    from solo.config import get_solo_cfg
    from solo.evaluation import SOLOCOCOEvaluator
    from solo.modeling import SOLOPostProcessor

    mask_format, num_instances = sys.argv[1], int(sys.argv[2])
    H, W, padded, grid = 2000, 3000, (800, 1088), 40

    class SyntheticNetwork(torch.nn.Module):
        # Category logits with `num_instances` isolated confident cells and one Gaussian blob
        # per cell (radius 6..20 samples at stride 4), through the real post-processor.
        def __init__(self, post):
            super().__init__()
            self.post = post
            gen = torch.Generator().manual_seed(0)
            cells = torch.randperm(grid * grid // 4, generator=gen)[:num_instances]
            self.cells = (cells // (grid // 2)) * 2 * grid + (cells % (grid // 2)) * 2
            self.radius = 6 + 14 * torch.rand(num_instances, generator=gen)

        def mask_probs(self, image, levels, cells, size, out=None):
            h4, w4 = size
            i, j = cells // grid, cells % grid
            cy, cx = (i.float() + 0.5) * h4 / grid, (j.float() + 0.5) * w4 / grid
            rank = torch.searchsorted(self.cells, cells).clamp(max=num_instances - 1)
            r = self.radius[rank]
            yy = torch.arange(h4).float()[None, :, None]
            xx = torch.arange(w4).float()[None, None, :]
            d2 = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
            probs = torch.exp(-d2 / (2 * (r[:, None, None] / 1.5) ** 2))
            return probs if out is None else out.copy_(probs)

        def forward(self, batched):
            logits = torch.full((1, 1, grid, grid), -10.0)
            logits.view(-1)[self.cells] = 3.0
            sizes = [(x["height"], x["width"]) for x in batched]
            results = self.post([logits], self.mask_probs, padded, [padded], sizes)
            return [{"instances": r} for r in results]

    cfg = get_solo_cfg(opts=["TEST.MASK_FORMAT", mask_format, "MODEL.SOLO.NUM_CLASSES", "1"])
    post = SOLOPostProcessor(cfg, level_strides=[8])
    model = SyntheticNetwork(post)
    tmp = tempfile.mkdtemp()
    gt = {"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"} for i in (1, 2)],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1e4,
                           "bbox": [10, 10, 100, 100],
                           "segmentation": [[10, 10, 110, 10, 110, 110, 10, 110]]}],
          "categories": [{"id": 1, "name": "blob"}]}
    with open(os.path.join(tmp, "gt.json"), "w") as f:
        json.dump(gt, f)
    register_coco_instances("large_images", {}, os.path.join(tmp, "gt.json"), tmp)
    evaluator = SOLOCOCOEvaluator("large_images", tasks=("segm",), distributed=False,
                                  max_dets_per_image=num_instances)
    loader = [[{"image_id": i, "height": H, "width": W}] for i in (1, 2)]
    model(loader[0])  # warm-up: allocator, probes

    def rss(key):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) / 1024 for x in f if x.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss("VmRSS")
    results = inference_on_dataset(model, loader, evaluator)
    found = len(evaluator._predictions[0]["instances"])
    print(json.dumps({"peak_increase_mb": rss("VmHWM") - before, "instances": found,
                      "segm_ap": results["segm"]["AP"]}))
    """)


def run_child(mask_format, num_instances):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mask_format, str(num_instances)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_inference_on_dataset_of_large_images_keeps_memory_bounded_with_cropped_masks():
    num_instances = 60
    report = run_child("cropped", num_instances)
    assert report["instances"] == num_instances
    dense_mb = num_instances * 2000 * 3000 / 2**20  # (N, H, W) bool masks of one image: 343 MB
    # Each mask's crop, a stage-2 resize of one mask at a time (floats) and the RLE strips.
    assert report["peak_increase_mb"] < dense_mb / 3, report
