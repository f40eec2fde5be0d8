"""Straightforward, loop-based re-implementations of the official SOLO semantics (WXinlong/SOLO,
``solo_target_single`` / ``solov2_target_single`` / ``get_seg_single`` / ``matrix_nms``), used as
references for the vectorised code in ``solo``. Slow on purpose: one instance, cell or pair at a
time, in the order of the official code.
"""

import numpy as np
import cv2
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def official_cell(coord, size, num_grid):
    """``int((c / size) // (1. / S))`` with ``c`` a float32 0-dim tensor, as the official code."""
    return int((coord / size) // (1.0 / num_grid))


def official_center_of_mass(mask):
    """float32 centre of mass (x, y) of one (H, W) 0/1 mask, as the official ``center_of_mass``."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    h, w = m.shape
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    m00 = m.sum().clamp(min=1e-6)
    return (m * xs).sum() / m00, (m * ys[:, None]).sum() / m00


def cv2_downsample(mask, stride):
    """``mmcv.imrescale(mask, 1 / stride)`` on a uint8 0/1 mask: cv2 bilinear, size rounded."""
    h, w = mask.shape
    size = (int(w / stride + 0.5), int(h / stride + 0.5))
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_LINEAR)


def reference_targets_single(
    masks, boxes, labels, num_classes, num_grids, scale_ranges, mask_strides, sigma, keep_all
):
    """Targets of one image, one instance and one cell at a time.

    ``masks``: (n, Hp, Wp) 0/1 numpy array already padded; ``boxes``: (n, 4) detectron2 XYXY
    (x2 = x + w), converted here to mmdetection v1's inclusive boxes; ``labels`` 0-based.
    Returns, per level, ``(cate_label (S, S) int64 with num_classes = background, entries)``,
    ``entries`` being the list of ``(cell, mask target)`` pairs the mask loss sees: one per
    positive cell (last writer wins) or, with ``keep_all`` (SOLOv2), one per (instance, cell).
    """
    hp, wp = masks.shape[-2:]
    boxes = torch.as_tensor(boxes, dtype=torch.float32).clone()
    boxes[:, 2:] -= 1  # inclusive x2, y2
    areas = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    results = []
    for (low, high), num_grid, stride in zip(scale_ranges, num_grids, mask_strides):
        cate_label = np.full((num_grid, num_grid), num_classes, dtype=np.int64)
        cell_masks = {}  # SOLO: cell -> mask of the last instance written there
        pairs = []  # SOLOv2: every (cell, mask)
        target_size = (hp // stride, wp // stride)
        for i in range(len(masks)):
            if not (low <= areas[i] <= high):
                continue
            if masks[i].sum() == 0:
                continue
            half_w = 0.5 * (boxes[i, 2] - boxes[i, 0]) * sigma
            half_h = 0.5 * (boxes[i, 3] - boxes[i, 1]) * sigma
            cx, cy = official_center_of_mass(masks[i])
            coord_w = official_cell(cx, wp, num_grid)
            coord_h = official_cell(cy, hp, num_grid)
            top_box = max(0, official_cell(cy - half_h, hp, num_grid))
            down_box = min(num_grid - 1, official_cell(cy + half_h, hp, num_grid))
            left_box = max(0, official_cell(cx - half_w, wp, num_grid))
            right_box = min(num_grid - 1, official_cell(cx + half_w, wp, num_grid))
            top, down = max(top_box, coord_h - 1), min(down_box, coord_h + 1)
            left, right = max(coord_w - 1, left_box), min(right_box, coord_w + 1)

            small = cv2_downsample(masks[i], stride)
            target = np.zeros(target_size, dtype=bool)
            target[: small.shape[0], : small.shape[1]] = small[: target_size[0], : target_size[1]]
            for row in range(top, down + 1):
                for col in range(left, right + 1):
                    cate_label[row, col] = int(labels[i])
                    cell = row * num_grid + col
                    cell_masks[cell] = target
                    pairs.append((cell, target))
        entries = pairs if keep_all else sorted(cell_masks.items(), key=lambda kv: kv[0])
        results.append((cate_label, entries))
    return results


# --------------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------------


def reference_iou(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


def reference_matrix_nms(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """The paper's Matrix NMS, pair by pair, on masks sorted by descending score.

    decay_j = min(1, min over higher-scored same-class i of f(iou_ij) / f(comp_i)),
    comp_i = max IoU of i with a higher-scored same-class mask (0 if none).
    """
    masks = [np.asarray(m, bool) for m in masks]
    labels = [int(x) for x in labels]
    n = len(masks)

    def f(x):
        return np.exp(-sigma * x * x) if kernel == "gaussian" else 1.0 - x

    iou = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] == labels[j]:
                iou[i, j] = reference_iou(masks[i], masks[j])
    comp = [max([iou[k, i] for k in range(i)], default=0.0) for i in range(n)]
    out = []
    for j in range(n):
        decay = 1.0
        for i in range(j):
            if labels[i] == labels[j] and f(comp[i]) > 0:
                decay = min(decay, f(iou[i, j]) / f(comp[i]))
        out.append(float(scores[j]) * decay)
    return np.array(out)


def reference_mask_nms(masks, labels, iou_threshold):
    """Sequential greedy NMS on masks sorted by descending score: the keep flags."""
    keep = []
    for j in range(len(masks)):
        suppressed = any(
            keep[i]
            and int(labels[i]) == int(labels[j])
            and reference_iou(masks[i], masks[j]) > iou_threshold
            for i in range(j)
        )
        keep.append(not suppressed)
    return np.array(keep, dtype=bool)


def reference_points_nms(scores):
    """(C, S, S) array: keep a cell iff it is >= its up, left and up-left neighbours."""
    out = np.array(scores, dtype=np.float64, copy=True)
    c, h, w = out.shape
    for k in range(c):
        for i in range(h):
            for j in range(w):
                neighbours = [(i - 1, j), (i, j - 1), (i - 1, j - 1)]
                for a, b in neighbours:
                    if a >= 0 and b >= 0 and scores[k][a][b] > scores[k][i][j]:
                        out[k, i, j] = 0.0
    return out


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def reference_seg_single(
    cate_scores_per_level,
    seg_preds,
    level_strides,
    img_shape,
    ori_shape,
    *,
    score_thr=0.1,
    mask_thr=0.5,
    nms_pre=500,
    update_thr=0.05,
    kernel="gaussian",
    sigma=2.0,
    max_per_img=100,
    nms_type="matrix",
    mask_nms_thr=0.5,
):
    """The official ``get_seg_single`` for one image.

    ``cate_scores_per_level``: per level (C, S, S) sigmoid scores *before* point NMS;
    ``nms_type="mask"`` swaps Matrix NMS for greedy mask NMS (the SOLO paper's baseline);
    ``seg_preds``: (sum S^2, h, w) soft masks of every cell at stride 4, computed the official
    way (all channels). Returns ``(masks (n, H, W) bool, labels, scores)`` numpy, or empty.
    """
    cate = []
    strides = []
    for scores, stride in zip(cate_scores_per_level, level_strides):
        kept = reference_points_nms(scores.numpy())
        c, s, _ = kept.shape
        cate.append(kept.reshape(c, s * s).T)  # (S^2, C), cells row-major
        strides += [stride] * (s * s)
    cate = torch.from_numpy(np.concatenate(cate)).float()
    strides = torch.tensor(strides, dtype=torch.float32)
    h4, w4 = seg_preds.shape[-2:]
    h, w = img_shape
    empty = (np.zeros((0, *ori_shape), bool), np.zeros(0, np.int64), np.zeros(0, np.float32))

    candidates = []  # (score, label, soft mask, binary mask, area)
    for cell in range(cate.shape[0]):
        for label in range(cate.shape[1]):
            score = float(cate[cell, label])
            if not score > score_thr:
                continue
            soft = seg_preds[cell]
            binary = soft > mask_thr
            area = float(binary.sum())
            if not area > float(strides[cell]):
                continue
            maskness = float((soft * binary).sum()) / area
            candidates.append((score * maskness, label, soft, binary, area))
    if not candidates:
        return empty
    candidates.sort(key=lambda c: -c[0])
    candidates = candidates[:nms_pre]
    binary = [c[3].numpy() for c in candidates]
    labels = [c[1] for c in candidates]
    if nms_type == "matrix":
        decayed = reference_matrix_nms(binary, labels, [c[0] for c in candidates], kernel, sigma)
    else:  # greedy mask NMS: suppressed candidates get score 0, the others keep theirs
        keep = reference_mask_nms(binary, labels, mask_nms_thr)
        decayed = np.where(keep, [c[0] for c in candidates], 0.0)
    survivors = [(s, c) for s, c in zip(decayed, candidates) if s >= update_thr]
    if not survivors:
        return empty
    survivors.sort(key=lambda sc: -sc[0])
    survivors = survivors[:max_per_img]
    soft = torch.stack([c[2] for _, c in survivors])[None]
    soft = F.interpolate(soft, size=(h4 * 4, w4 * 4), mode="bilinear", align_corners=False)
    soft = soft[:, :, :h, :w]
    masks = F.interpolate(soft, size=tuple(ori_shape), mode="bilinear", align_corners=False)[0]
    return (
        (masks > mask_thr).numpy(),
        np.array([c[1] for _, c in survivors], dtype=np.int64),
        np.array([s for s, _ in survivors], dtype=np.float32),
    )
