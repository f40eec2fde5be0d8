"""Run an exported SOLO model (tools/export_model.py --format onnx) with plain ONNX Runtime, no
torch or detectron2: the file's metadata is its contract (docs/deploy.md, "The file's contract").

    python docs/onnxruntime_example.py exported/model.onnx image.jpg

The image is run at the size given. To get what Predictor and the demo report, first resize it
as the model was tested (shorter side INPUT.MIN_SIZE_TEST, longer at most INPUT.MAX_SIZE_TEST:
the "config" entry of the metadata; Detectron2's ResizeShortestEdge) and pass the original size
as the output size, as the exported model's runtime does.
"""

import json
import numpy as np
import sys
import cv2
import onnxruntime as ort


def predict(model_path, image_bgr):
    """(D,) scores, (D,) 0-based classes and (D, H, W) bool masks of one BGR uint8 image."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["solo_export.json"])
    image = image_bgr[:, :, ::-1] if meta["input_format"] == "RGB" else image_bgr
    h, w = image.shape[:2]  # any size: the graph normalises and pads
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
    names = ["scores", "labels", "masks", "num_detections"]
    scores, labels, masks, count = session.run(names, {"image": x})
    d, blocks = max(meta["size_divisibility"], 1), meta["min_blocks"]
    hp, wp = (max(-(-side // d) * d, blocks * d) for side in (h, w))  # the padded size
    n = int(count)  # rows from n on are padding
    # Masks are probabilities at stride 4 of the padded image: upsample x4, crop, threshold.
    up = [cv2.resize(m, (wp, hp), interpolation=cv2.INTER_LINEAR)[:h, :w] for m in masks[:n]]
    return scores[:n], labels[:n], np.array(up).reshape(n, h, w) > meta["mask_thresh"]


if __name__ == "__main__":
    for score, label, mask in zip(*predict(sys.argv[1], cv2.imread(sys.argv[2]))):
        print(f"class {label}, score {score:.3f}, {mask.sum()} pixels")
