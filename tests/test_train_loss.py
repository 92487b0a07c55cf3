"""YOLOv5 loss: CIoU, target-to-anchor/cell assignment, and that better predictions cost less."""

import math

import pytest
import torch

from dashcamd.train.loss import YoloV5Loss, assign_targets, bbox_ciou

STRIDES = torch.tensor([8.0, 16.0, 32.0])
ANCHORS_PX = torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119],
                           [116, 90, 156, 198, 373, 326]], dtype=torch.float32).view(3, 3, 2)


def test_ciou_is_one_for_identical_boxes_and_penalises_distance():
    box = torch.tensor([[10.0, 10.0, 4.0, 2.0]])
    assert bbox_ciou(box, box).item() == pytest.approx(1.0, abs=1e-5)
    far = torch.tensor([[30.0, 10.0, 4.0, 2.0]])  # no overlap: the distance term makes it negative
    near = torch.tensor([[11.0, 10.0, 4.0, 2.0]])
    assert bbox_ciou(box, far).item() < 0 < bbox_ciou(box, near).item() < 1


def test_assignment_picks_anchors_by_ratio_and_the_two_nearest_neighbour_cells():
    # Centre (6.875, 6.625) cells: closer to the right and the lower neighbour.
    # Size 3.75 x 3.25 cells matches all three P3 anchors (ratios < 4).
    target = torch.tensor([[0, 1, 6.875, 6.625, 3.75, 3.25]])
    a = assign_targets(target, ANCHORS_PX[0] / 8, (16, 16), 4.0)
    cells = {(int(y), int(x)) for y, x in zip(a.cell_y, a.cell_x)}
    assert cells == {(6, 6), (6, 7), (7, 6)}
    assert sorted(set(a.anchor.tolist())) == [0, 1, 2]
    assert len(a.image) == 9
    # Offsets are relative to the assigned cell and stay inside the reachable -0.5..1.5 range.
    assert ((a.box_xywh[:, :2] > -0.5) & (a.box_xywh[:, :2] < 1.5)).all()

    # A wide plate, 4 x 0.75 cells: the tall 16x30 anchor (2 x 3.75 cells) is 5x too high for it.
    plate = torch.tensor([[0, 0, 3.25, 3.25, 4.0, 0.75]])
    b = assign_targets(plate, ANCHORS_PX[0] / 8, (16, 16), 4.0)
    assert set(b.anchor.tolist()) == {0, 2}
    cells = {(int(y), int(x)) for y, x in zip(b.cell_y, b.cell_x)}
    assert cells == {(3, 3), (3, 2), (2, 3)}  # fractions 0.25: the left and upper neighbours


def test_no_targets_gives_only_objectness_loss():
    loss_fn = YoloV5Loss(STRIDES, ANCHORS_PX, num_classes=2)
    preds = [torch.zeros(2, 3, 64 // int(s), 64 // int(s), 7, requires_grad=True) for s in STRIDES]
    total, parts = loss_fn(preds, torch.zeros((0, 6)), 64)
    assert parts[0] == 0 and parts[2] == 0 and parts[1] > 0
    total.backward()
    assert all(p.grad is not None for p in preds)


def _perfect_logits(loss_fn, targets_xyxy, size, shift_cells=0.0):
    """Raw predictions that decode exactly onto every assigned (target, anchor, cell), optionally
    with the centre moved by shift_cells, and confident objectness/class there; -8 logit elsewhere."""
    preds = []
    cxcywh = torch.cat([(targets_xyxy[:, 2:4] + targets_xyxy[:, 4:6]) / 2,
                        targets_xyxy[:, 4:6] - targets_xyxy[:, 2:4]], 1)
    for i, stride in enumerate(STRIDES.tolist()):
        n = size // int(stride)
        p = torch.full((1, 3, n, n, 7), -8.0)
        t = torch.cat([targets_xyxy[:, :2], cxcywh / stride], 1)
        a = assign_targets(t, loss_fn.anchors_grid[i], (n, n), 4.0)
        xy = (a.box_xywh[:, :2] + shift_cells + 0.5) / 2
        wh = torch.sqrt(a.box_xywh[:, 2:] / a.anchor_wh) / 2
        raw = torch.logit(torch.cat([xy, wh], 1).clamp(1e-4, 1 - 1e-4))
        p[a.image, a.anchor, a.cell_y, a.cell_x, :4] = raw
        p[a.image, a.anchor, a.cell_y, a.cell_x, 4] = 8.0
        p[a.image, a.anchor, a.cell_y, a.cell_x, 5 + a.cls] = 8.0
        preds.append(p)
    return preds


def test_a_perfect_prediction_costs_less_than_a_shifted_one():
    loss_fn = YoloV5Loss(STRIDES, ANCHORS_PX, num_classes=2)
    # Far apart, so no (anchor, cell) is assigned to both and the perfect logits are unambiguous.
    targets = torch.tensor([[0, 0, 20.0, 44.0, 68.0, 60.0], [0, 1, 110.0, 70.0, 140.0, 110.0]])
    perfect, parts_perfect = loss_fn(_perfect_logits(loss_fn, targets, 160), targets, 160)
    shifted, parts_shifted = loss_fn(_perfect_logits(loss_fn, targets, 160, 0.3), targets, 160)
    assert parts_perfect[0].item() == pytest.approx(0.0, abs=1e-3)  # CIoU = 1 everywhere
    assert perfect < shifted
    assert parts_shifted[0] > parts_perfect[0]
    assert math.isfinite(shifted.item())
