"""Shared helpers of the detector tests: tiny random models and checkpoints made at test time."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dashcamd.detect import YoloV5, build_model, save_checkpoint, yolov5_arch
from detect_fake_yolov5 import randomize

NAMES = ["plate", "face"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits against
    other processes (about 10x faster here). Restored afterwards; library code never sets it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_arch(layout: str = "v6") -> dict:
    """yolov5n at half its width: every layer type, a quarter of the compute."""
    return {**yolov5_arch("n", nc=2, layout=layout), "width_multiple": 0.125}


def random_model(seed: int = 0, layout: str = "v6") -> YoloV5:
    """A tiny model with random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(tiny_arch(layout), NAMES)
    randomize(model, seed)
    return model.eval()


def write_dashcamd_checkpoint(path: Path, model: YoloV5) -> YoloV5:
    """Save ``model``; return the fp32 reference with the same fp16-rounded weights the file holds."""
    save_checkpoint(model, path, meta={"epochs": 1, "note": "test"})
    return copy.deepcopy(model).half().float().eval()


def grid_model() -> YoloV5:
    """A model whose output is known exactly: only level 0 (stride 8), anchor 0 (10x13 px) fires, as a
    "face" with score sigmoid(10)^2, one box centred in every 8x8 cell, whatever the image."""
    model = random_model(seed=1)
    head = model.detect
    with torch.no_grad():
        for conv in head.m:
            conv.weight.zero_()
            conv.bias.fill_(-20.0)
        bias = head.m[0].bias.view(head.na, head.no)
        bias[0, :4] = 0.0  # sigmoid(0) = 0.5: centre of the cell, wh = anchor
        bias[0, 4] = 10.0  # objectness
        bias[0, 6] = 10.0  # class 1 = face
    return model


def grid_model_boxes_px(input_h: int, input_w: int) -> list[tuple[float, float, float, float]]:
    """The xyxy model-input boxes ``grid_model`` predicts for an input of input_h x input_w."""
    boxes = []
    for gy in range(input_h // 8):
        for gx in range(input_w // 8):
            cx, cy = (gx + 0.5) * 8, (gy + 0.5) * 8
            boxes.append((cx - 5, cy - 6.5, cx + 5, cy + 6.5))
    return boxes
