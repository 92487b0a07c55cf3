"""Plain-data YOLOv5 architecture configs (ultralytics' ``model.yaml`` layout), safe for weights_only loads.

An arch is a dict of plain types: ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors`` (per level a
flat list ``[w0, h0, w1, h1, ...]`` in input pixels) and ``backbone``/``head`` lists of
``[from, number, module, args]`` rows. Strings ``"nc"`` and ``"anchors"`` in args stand for those keys.
"""

from __future__ import annotations

import copy
from typing import Any

Arch = dict[str, Any]

# P3/8, P4/16, P5/32 anchors of the published YOLOv5 configs, (w, h) pairs in input pixels.
DEFAULT_ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]

# (depth_multiple, width_multiple) of the published sizes.
SIZE_MULTIPLES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}

# FPN/PAN head shared by both layouts; rows refer to backbone outputs 4 (P3), 6 (P4) and 10 (P5 after
# SPP/SPPF or the last C3).
_HEAD = [
    [-1, 1, "Conv", [512, 1, 1]],
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 6], 1, "Concat", [1]],
    [-1, 3, "C3", [512, False]],
    [-1, 1, "Conv", [256, 1, 1]],
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]],
    [-1, 3, "C3", [256, False]],  # 17: P3 out
    [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 14], 1, "Concat", [1]],
    [-1, 3, "C3", [512, False]],  # 20: P4 out
    [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 10], 1, "Concat", [1]],
    [-1, 3, "C3", [1024, False]],  # 23: P5 out
    [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
]

# v6.0+ backbone: 6x6 stride-2 conv stem, C3 counts 3/6/9/3, SPPF last.
_BACKBONE_V6 = [
    [-1, 1, "Conv", [64, 6, 2, 2]],
    [-1, 1, "Conv", [128, 3, 2]],
    [-1, 3, "C3", [128]],
    [-1, 1, "Conv", [256, 3, 2]],
    [-1, 6, "C3", [256]],
    [-1, 1, "Conv", [512, 3, 2]],
    [-1, 9, "C3", [512]],
    [-1, 1, "Conv", [1024, 3, 2]],
    [-1, 3, "C3", [1024]],
    [-1, 1, "SPPF", [1024, 5]],
]

# v5.0 backbone (DashcamCleaner's weights): Focus stem, C3 counts 3/9/9, SPP(5, 9, 13) before a last C3
# without shortcut.
_BACKBONE_V5_0 = [
    [-1, 1, "Focus", [64, 3]],
    [-1, 1, "Conv", [128, 3, 2]],
    [-1, 3, "C3", [128]],
    [-1, 1, "Conv", [256, 3, 2]],
    [-1, 9, "C3", [256]],
    [-1, 1, "Conv", [512, 3, 2]],
    [-1, 9, "C3", [512]],
    [-1, 1, "Conv", [1024, 3, 2]],
    [-1, 1, "SPP", [1024, [5, 9, 13]]],
    [-1, 3, "C3", [1024, False]],
]


def yolov5_arch(size: str = "n", nc: int = 2, layout: str = "v6") -> Arch:
    """The published YOLOv5 config of ``size`` (n/s/m/l/x) in the v6+ (``"v6"``) or v5.0 (``"v5.0"``) layout."""
    if size not in SIZE_MULTIPLES:
        raise ValueError(f"unknown YOLOv5 size {size!r}; expected one of {sorted(SIZE_MULTIPLES)}")
    backbones = {"v6": _BACKBONE_V6, "v5.0": _BACKBONE_V5_0}
    if layout not in backbones:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(backbones)}")
    depth, width = SIZE_MULTIPLES[size]
    return {
        "nc": nc,
        "depth_multiple": depth,
        "width_multiple": width,
        "anchors": copy.deepcopy(DEFAULT_ANCHORS_PX),
        "backbone": copy.deepcopy(backbones[layout]),
        "head": copy.deepcopy(_HEAD),
    }
