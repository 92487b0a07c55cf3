"""YOLOv5 training loss: target-to-anchor assignment, CIoU box loss, BCE objectness and class.

Implemented from the published YOLOv5 description. Raw head outputs per level are (B, na, ny, nx,
5 + nc) laid out [tx, ty, tw, th, obj, cls...]; a box decodes as
    xy = (2 * sigmoid(txy) - 0.5 + cell) * stride,   wh = (2 * sigmoid(twh)) ** 2 * anchor_px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def bbox_ciou(box1_xywh: torch.Tensor, box2_xywh: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU (Zheng et al. 2020) of paired boxes (N, 4) cx,cy,w,h -> (N,).

    IoU minus the normalised centre distance minus an aspect-ratio consistency term.
    """
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1_xywh.unbind(-1), box2_xywh.unbind(-1)
    b1x1, b1x2, b1y1, b1y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2x1, b2x2, b2y1, b2y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(0) * \
            (torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)  # enclosing box
    ch = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


@dataclass(frozen=True)
class LossConfig:
    """Gains as in YOLOv5's from-scratch hyper-parameters (before the per-level/size scaling)."""

    box_gain: float = 0.05
    obj_gain: float = 1.0
    cls_gain: float = 0.5
    anchor_ratio_max: float = 4.0  # a target matches an anchor if w and h are within 4x of it
    level_balance: tuple[float, ...] = (4.0, 1.0, 0.4)  # P3, P4, P5 objectness weights


@dataclass
class Assignment:
    """Positives of one level: K matched (target, anchor, cell) triples."""

    image: torch.Tensor  # (K,) long
    anchor: torch.Tensor  # (K,) long
    cell_y: torch.Tensor  # (K,) long
    cell_x: torch.Tensor  # (K,) long
    box_xywh: torch.Tensor  # (K, 4) float: xy relative to the cell (-0.5..1.5), wh in grid units
    anchor_wh: torch.Tensor  # (K, 2) float, grid units
    cls: torch.Tensor  # (K,) long


def assign_targets(targets: torch.Tensor, anchors_grid: torch.Tensor, grid_hw: tuple[int, int],
                   ratio_max: float) -> Assignment:
    """Match targets to one level's anchors and cells (YOLOv5 rule).

    targets: (T, 6) [image_index, cls, cx, cy, w, h] in this level's grid units.
    anchors_grid: (na, 2) anchor w, h in grid units. grid_hw: (ny, nx).
    An anchor matches when max(w/aw, aw/w, h/ah, ah/h) < ratio_max. Each match uses the centre's
    cell plus the two nearest neighbours (left/right by x, up/down by y) whose side the centre is
    closer to, since the prediction's xy offset reaches -0.5..1.5 cells.
    """
    ny, nx = grid_hw
    dev = targets.device
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if targets.shape[0] == 0:
        return Assignment(empty, empty, empty, empty, torch.zeros((0, 4), device=dev),
                          torch.zeros((0, 2), device=dev), empty)
    ratio = targets[None, :, 4:6] / anchors_grid[:, None]  # (na, T, 2)
    match = torch.max(ratio, 1 / ratio).amax(2) < ratio_max  # (na, T)
    a_idx, t_idx = match.nonzero(as_tuple=True)
    t = targets[t_idx]
    gxy = t[:, 2:4]
    gxy_inv = torch.tensor([nx, ny], device=dev, dtype=gxy.dtype) - gxy
    frac, frac_inv = gxy % 1, gxy_inv % 1
    left, up = ((frac < 0.5) & (gxy > 1)).T
    right, down = ((frac_inv < 0.5) & (gxy_inv > 1)).T
    offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=dev, dtype=gxy.dtype)
    use = torch.stack([torch.ones_like(left), left, up, right, down])  # (5, K0)
    # Neighbour cells: subtracting (1, 0) moves left etc.; centre kept once.
    sel_t = t[None].expand(5, -1, -1)[use]
    sel_a = a_idx[None].expand(5, -1)[use]
    cell = (gxy[None] - offsets[:, None])[use].long()
    cell[:, 0].clamp_(0, nx - 1)
    cell[:, 1].clamp_(0, ny - 1)
    box = torch.cat([sel_t[:, 2:4] - cell, sel_t[:, 4:6]], 1)
    return Assignment(sel_t[:, 0].long(), sel_a, cell[:, 1], cell[:, 0], box, anchors_grid[sel_a],
                      sel_t[:, 1].long())


class YoloV5Loss:
    """Callable: loss(preds, targets, image_size) -> (total scaled by batch size, (box, obj, cls) detached).

    preds: list of nl tensors (B, na, ny, nx, 5 + nc). targets: (T, 6) [image_index, cls, x1, y1,
    x2, y2] in input pixels. strides (nl,) and anchors_px (nl, na, 2) come from the Detect head.
    """

    def __init__(self, strides: torch.Tensor, anchors_px: torch.Tensor, num_classes: int,
                 cfg: LossConfig = LossConfig()):
        self.anchors_grid = anchors_px.float() / strides.float().view(-1, 1, 1)
        # Plain numbers: reading a stride from a GPU tensor every step would wait for the GPU each time.
        self.strides = strides.float().tolist()
        self.nc, self.cfg = num_classes, cfg
        nl = len(strides)
        self.balance = list(cfg.level_balance) if nl == 3 else [1.0] * nl
        self.box_gain = cfg.box_gain * 3 / nl
        self.cls_gain = cfg.cls_gain * num_classes / 80 * 3 / nl

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor, image_size: int):
        dev = preds[0].device
        obj_gain = self.cfg.obj_gain * (image_size / 640) ** 2 * 3 / len(preds)
        xyxy = targets[:, 2:6]
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        lbox, lobj, lcls = (torch.zeros((), device=dev) for _ in range(3))
        for i, p in enumerate(preds):
            stride = self.strides[i]
            t = torch.cat([targets[:, :2], cxcywh / stride], 1)
            a = assign_targets(t, self.anchors_grid[i].to(dev), p.shape[2:4], self.cfg.anchor_ratio_max)
            tobj = torch.zeros(p.shape[:4], device=dev, dtype=p.dtype)
            if a.image.numel():
                ps = p[a.image, a.anchor, a.cell_y, a.cell_x]  # (K, 5 + nc)
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * a.anchor_wh
                ciou = bbox_ciou(torch.cat([pxy, pwh], 1), a.box_xywh)
                lbox = lbox + (1.0 - ciou).mean()
                # Objectness target = IoU; ascending sort so the best match wins a shared cell.
                iou = ciou.detach().clamp(0).to(p.dtype)
                order = iou.argsort()
                tobj[a.image[order], a.anchor[order], a.cell_y[order], a.cell_x[order]] = iou[order]
                if self.nc > 1:
                    tcls = F.one_hot(a.cls, self.nc).to(ps.dtype)
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tcls)
            lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * self.balance[i]
        lbox, lobj, lcls = lbox * self.box_gain, lobj * obj_gain, lcls * self.cls_gain
        batch = preds[0].shape[0]
        return (lbox + lobj + lcls) * batch, torch.stack([lbox, lobj, lcls]).detach()
