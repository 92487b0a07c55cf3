"""Redaction drawing: soft masks (ellipse for faces, rounded rectangle for plates, rectangle for zones)
and the blur / pixelate / solid effects, applied in place on a small ROI around each box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from dashcamd.config import RedactSettings
from dashcamd.track import RedactBox

__all__ = ["Redactor", "RedactBox", "Region", "region_mask"]

# The Gaussian runs on a copy downscaled until sigma is this many pixels: cost stops growing with the
# box (about 1 ms a region at 1080p instead of 7-10 ms for a full-size kernel) and the result is the
# same low-pass image, because a wide Gaussian leaves nothing above the downscaled Nyquist rate.
_SMALL_SIGMA_PX = 2.5
_ELLIPSE_LABELS = frozenset({"face"})
_UNFEATHERED_LABELS = frozenset({"zone"})


class Region(NamedTuple):
    """Where one box is drawn: ROI in frame pixels (x0, y0, x1, y1 exclusive) and the box's sides."""

    x0: int
    y0: int
    x1: int
    y1: int
    short_side_px: int
    long_side_px: int


def region_mask(
    box: RedactBox, frame_size: tuple[int, int], feather: float
) -> tuple[Region, np.ndarray] | None:
    """Alpha mask (float32 (h, w), 0..1) over the ROI that redacts ``box``; None if it misses the frame.

    Every pixel the box touches gets alpha = 1 whatever the shape: covering the detected (enlarged)
    area is the privacy guarantee, so shapes and feather only ever add pixels outside it. Faces get
    the ellipse through the box's corners; other labels the box itself, whose feather (Euclidean
    distance to the box) makes the soft edge a rounded rectangle. The ramp is ``feather`` x the box's
    short side wide and lies wholly outside the shape. frame_size is (width, height).
    """
    width, height = frame_size
    coords = (box.x1, box.y1, box.x2, box.y2)
    if not all(math.isfinite(c) for c in coords):
        raise ValueError(f"box with non-finite coordinates: {coords}")
    # Integer box covering every pixel the float box touches; at least one pixel.
    bx0, bx1 = math.floor(min(box.x1, box.x2)), math.ceil(max(box.x1, box.x2))
    by0, by1 = math.floor(min(box.y1, box.y2)), math.ceil(max(box.y1, box.y2))
    bx1, by1 = max(bx1, bx0 + 1), max(by1, by0 + 1)
    box_w, box_h = bx1 - bx0, by1 - by0
    ramp_px = 0.0 if box.label in _UNFEATHERED_LABELS else feather * min(box_w, box_h)
    ellipse = box.label in _ELLIPSE_LABELS
    centre_x, centre_y = (bx0 + bx1) / 2.0, (by0 + by1) / 2.0
    # Semi-axes of the ellipse through the box's corners: sqrt(2) x the half sides.
    semi_x, semi_y = box_w / math.sqrt(2.0), box_h / math.sqrt(2.0)
    reach_x = (semi_x if ellipse else box_w / 2.0) + ramp_px
    reach_y = (semi_y if ellipse else box_h / 2.0) + ramp_px
    x0 = max(math.floor(centre_x - reach_x), 0)
    y0 = max(math.floor(centre_y - reach_y), 0)
    x1 = min(math.ceil(centre_x + reach_x), width)
    y1 = min(math.ceil(centre_y + reach_y), height)
    if x1 <= x0 or y1 <= y0:
        return None

    xs = np.arange(x0, x1, dtype=np.float32) + 0.5  # pixel centres
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5
    # In-place float32 arithmetic: this mask is most of the per-region cost.
    if ellipse:
        dx, dy = xs - np.float32(centre_x), ys - np.float32(centre_y)
        rho = np.add.outer((dy / np.float32(semi_y)) ** 2, (dx / np.float32(semi_x)) ** 2)
        outside_px = np.add.outer(dy * dy, dx * dx)
        np.sqrt(outside_px, out=outside_px)  # distance to the centre
        np.maximum(rho, np.float32(1.0), out=rho)  # inside the ellipse: distance 0 below
        np.sqrt(rho, out=rho)
        # Distance outside the ellipse along the ray from the centre: r - r / rho.
        np.divide(outside_px, rho, out=rho)
        np.subtract(outside_px, rho, out=outside_px)
    else:
        dx = np.maximum(np.maximum(np.float32(bx0) - xs, xs - np.float32(bx1)), np.float32(0.0))
        dy = np.maximum(np.maximum(np.float32(by0) - ys, ys - np.float32(by1)), np.float32(0.0))
        outside_px = np.add.outer(dy * dy, dx * dx)
        np.sqrt(outside_px, out=outside_px)
    if ramp_px > 0:
        alpha = outside_px
        alpha *= np.float32(-1.0 / ramp_px)
        alpha += np.float32(1.0)
        np.clip(alpha, 0.0, 1.0, out=alpha)
    else:
        alpha = (outside_px <= 0).astype(np.float32)
    region = Region(x0, y0, x1, y1, min(box_w, box_h), max(box_w, box_h))
    return region, alpha


class Redactor:
    """Applies RedactSettings' mode to boxes of a frame, in place.

    blur: Gaussian with sigma = blur_strength x the box's short side, so a plate is equally
    unreadable at 720p and 4K. A thin blur is a known linear filter, and deconvolution (Wiener,
    blind) recovers what it only attenuates. It cannot recover what fell below the 8-bit quantisation
    step (gain < 1/255, i.e. sigma x frequency > ~0.53 cycles) and then through the encoder. Plate
    glyphs need detail of at least ~2 cycles per plate height: at the default 0.5, sigma x f >= 1, so
    attenuation is under e^-20. Keep blur_strength above ~0.3. The downscale before the blur averages
    pixels away as well (a many-to-one map, not just an attenuation).
    pixelate: a mosaic of square cells, ``pixelate_blocks`` cells across the box's long side. Weaker
    than the default blur against a known-font attack (Depix-style) with many blocks; keep it low.
    solid: ``solid_color`` (RGB).
    Boxes are drawn in order; overlaps simply redact already-redacted pixels again.
    """

    def __init__(self, settings: RedactSettings) -> None:
        self._mode = settings.mode
        self._blur_strength = settings.blur_strength
        self._pixelate_blocks = settings.pixelate_blocks
        self._solid_rgb = np.array(settings.solid_color, dtype=np.uint8)
        self._feather = settings.feather

    def apply(self, frame_rgb: np.ndarray, boxes: Sequence[RedactBox]) -> None:
        """Redact ``boxes`` (frame pixels, xyxy) in ``frame_rgb`` (uint8, (H, W, 3), RGB), in place."""
        if frame_rgb.dtype != np.uint8 or frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(f"frame_rgb must be uint8 (H, W, 3), got {frame_rgb.dtype} {frame_rgb.shape}")
        frame_size = (frame_rgb.shape[1], frame_rgb.shape[0])
        for box in boxes:
            found = region_mask(box, frame_size, self._feather)
            if found is None:
                continue
            region, alpha = found
            patch = frame_rgb[region.y0 : region.y1, region.x0 : region.x1]
            effect = self._effect(patch, region)
            frame_rgb[region.y0 : region.y1, region.x0 : region.x1] = cv2.blendLinear(
                patch, effect, 1.0 - alpha, alpha
            )

    def _effect(self, patch_rgb: np.ndarray, region: Region) -> np.ndarray:
        roi_h, roi_w = patch_rgb.shape[:2]
        if self._mode == "solid":
            return np.broadcast_to(self._solid_rgb, patch_rgb.shape).copy()
        if self._mode == "pixelate":
            cell_px = max(region.long_side_px / self._pixelate_blocks, 1.0)
            cells = (max(round(roi_w / cell_px), 1), max(round(roi_h / cell_px), 1))
            small = cv2.resize(patch_rgb, cells, interpolation=cv2.INTER_AREA)
            return cv2.resize(small, (roi_w, roi_h), interpolation=cv2.INTER_NEAREST)
        sigma_px = self._blur_strength * region.short_side_px
        scale = min(1.0, _SMALL_SIGMA_PX / sigma_px)
        small_w, small_h = max(round(roi_w * scale), 1), max(round(roi_h * scale), 1)
        small = cv2.resize(patch_rgb, (small_w, small_h), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(
            small,
            (0, 0),
            sigmaX=sigma_px * small_w / roi_w,
            sigmaY=sigma_px * small_h / roi_h,
            borderType=cv2.BORDER_REPLICATE,
        )
        return cv2.resize(small, (roi_w, roi_h), interpolation=cv2.INTER_LINEAR)
