"""Measure a model's int8 activation ranges on training photos, once, when its weights are made.

The result ships beside the weights (``<weights>.int8.json``) and is what lets the CPU run the detector in
int8 at run time without any image (see ``dashcamd.detect.quantize``). Calibration photos come from the
training split, never from eval/.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import Sample, letterbox, read_rgb


def calibrate(weights: Path, samples: Sequence[Sample], count: int, size_px: int = 640) -> dict[str, Any]:
    """Measure and write the ranges of ``weights`` over ``count`` photos spread evenly over ``samples``,
    each letterboxed whole to ``size_px`` as the detector sees a frame. Returns the written document."""
    from dashcamd.detect.checkpoint import load_model
    from dashcamd.detect.model import YoloV5
    from dashcamd.detect.onnx_backend import export_bytes
    from dashcamd.detect.quantize import head_scope, measure_ranges, ranges_path, write_ranges

    model = load_model(weights)
    if not isinstance(model, YoloV5):
        raise ValueError(f"{weights}: calibration needs torch weights, not an ONNX file")
    picked = list(samples)[::max(1, len(samples) // count)][:count]
    document = measure_ranges(export_bytes(model.float().eval(), (size_px, size_px)), head_scope(model),
                              _model_inputs(picked, size_px), weights)
    document["size_px"] = size_px
    document["photos"] = [sample.image_path.name for sample in picked]
    write_ranges(document, ranges_path(weights))
    return document


def _model_inputs(samples: Sequence[Sample], size_px: int) -> Iterator[np.ndarray]:
    for sample in samples:
        image, _, _ = letterbox(read_rgb(sample.image_path), size_px)
        yield (image.transpose(2, 0, 1)[None].astype(np.float32) / 255).copy()
