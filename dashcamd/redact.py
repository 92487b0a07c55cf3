"""Redaction drawing: soft masks (ellipse for faces, rounded rectangle for plates, rectangle for zones)
and the blur / pixelate / solid effects, applied in place on a small ROI around each box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

from dashcamd.boxes import RedactBox
from dashcamd.config import RedactSettings
from dashcamd.picture import PLANE_SUBSAMPLING, Picture, limited_range_yuv

__all__ = ["RedactBox", "Redactor", "Region", "plan_region", "region_alpha", "region_mask"]

# The Gaussian runs on a copy shrunk by a whole factor until sigma is 2.5-5 pixels there: cost stops
# growing with the box and the result is the same low-pass image, because at sigma 2.5 px the gain at
# the small copy's Nyquist rate is ~e^-31.
_SMALL_SIGMA_PX = 2.5
_ELLIPSE_LABELS = frozenset({"face"})
_UNFEATHERED_LABELS = frozenset({"zone"})


class Region(NamedTuple):
    """How one box is drawn, in frame pixels: ROI (x0, y0, x1, y1, end exclusive, clipped to the
    frame), the integer box covering every pixel the box touches, shape and feather ramp width."""

    x0: int
    y0: int
    x1: int
    y1: int
    box_x0: int
    box_y0: int
    box_x1: int
    box_y1: int
    ellipse: bool
    ramp_px: float

    @property
    def short_side_px(self) -> int:
        return min(self.box_x1 - self.box_x0, self.box_y1 - self.box_y0)

    @property
    def long_side_px(self) -> int:
        return max(self.box_x1 - self.box_x0, self.box_y1 - self.box_y0)

    @property
    def hard_rectangle(self) -> bool:
        """The mask is all ones over the ROI: no mask or blend needed (zones, feather = 0)."""
        return not self.ellipse and self.ramp_px == 0


def plan_region(box: RedactBox, frame_size: tuple[int, int], feather: float) -> Region | None:
    """Shape and ROI for ``box`` (frame pixels, xyxy) in a (width, height) frame; None if off-frame.

    Every pixel the box touches gets alpha = 1 whatever the shape: covering the detected (enlarged)
    area is the privacy guarantee, so shapes and feather only ever add pixels outside it. Faces get
    the ellipse through the box's corners; other labels the box itself, whose feather (Euclidean
    distance to the box) makes the soft edge a rounded rectangle; zones are never feathered. The ramp
    is ``feather`` x the box's short side wide and lies wholly outside the shape.
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
    # The ellipse through the box's corners has semi-axes sqrt(2) x the half sides.
    grow = math.sqrt(2.0) if ellipse else 1.0
    reach_x, reach_y = box_w / 2.0 * grow + ramp_px, box_h / 2.0 * grow + ramp_px
    centre_x, centre_y = (bx0 + bx1) / 2.0, (by0 + by1) / 2.0
    x0 = max(math.floor(centre_x - reach_x), 0)
    y0 = max(math.floor(centre_y - reach_y), 0)
    x1 = min(math.ceil(centre_x + reach_x), width)
    y1 = min(math.ceil(centre_y + reach_y), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return Region(x0, y0, x1, y1, bx0, by0, bx1, by1, ellipse, ramp_px)


def region_alpha(region: Region) -> np.ndarray:
    """Alpha mask float32 (ROI height, ROI width), 0..1, exactly 1 on the box and 0 beyond the ramp."""
    xs = np.arange(region.x0, region.x1, dtype=np.float32) + np.float32(0.5)  # pixel centres
    ys = np.arange(region.y0, region.y1, dtype=np.float32) + np.float32(0.5)
    # In-place float32 arithmetic: this mask is most of the per-region cost.
    if region.ellipse:
        centre_x = np.float32((region.box_x0 + region.box_x1) / 2.0)
        centre_y = np.float32((region.box_y0 + region.box_y1) / 2.0)
        semi_x = np.float32((region.box_x1 - region.box_x0) / math.sqrt(2.0))
        semi_y = np.float32((region.box_y1 - region.box_y0) / math.sqrt(2.0))
        dx, dy = xs - centre_x, ys - centre_y
        rho = np.add.outer((dy / semi_y) ** 2, (dx / semi_x) ** 2)
        outside_px = np.add.outer(dy * dy, dx * dx)
        np.sqrt(outside_px, out=outside_px)  # distance to the centre
        np.maximum(rho, np.float32(1.0), out=rho)  # inside the ellipse: distance 0 below
        np.sqrt(rho, out=rho)
        # Distance outside the ellipse along the ray from the centre: r - r / rho.
        np.divide(outside_px, rho, out=rho)
        np.subtract(outside_px, rho, out=outside_px)
    else:
        zero = np.float32(0.0)
        dx = np.maximum(np.maximum(np.float32(region.box_x0) - xs, xs - np.float32(region.box_x1)), zero)
        dy = np.maximum(np.maximum(np.float32(region.box_y0) - ys, ys - np.float32(region.box_y1)), zero)
        outside_px = np.add.outer(dy * dy, dx * dx)
        np.sqrt(outside_px, out=outside_px)
    if region.ramp_px <= 0:
        return (outside_px <= 0).astype(np.float32)
    alpha = outside_px
    alpha *= np.float32(-1.0 / region.ramp_px)
    alpha += np.float32(1.0)
    np.clip(alpha, 0.0, 1.0, out=alpha)
    return alpha


def region_mask(
    box: RedactBox, frame_size: tuple[int, int], feather: float
) -> tuple[Region, np.ndarray] | None:
    """plan_region and region_alpha together; None if the box misses the frame."""
    region = plan_region(box, frame_size, feather)
    return None if region is None else (region, region_alpha(region))


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
    solid: ``solid_color`` (RGB), converted with the clip's ``color_matrix`` for the YUV planes.
    Boxes are drawn in order; overlaps simply redact already-redacted pixels again.
    """

    def __init__(self, settings: RedactSettings, color_matrix: str = "bt709") -> None:
        self._mode = settings.mode
        self._blur_strength = settings.blur_strength
        self._pixelate_blocks = settings.pixelate_blocks
        self._solid_rgb = settings.solid_color
        self._solid_yuv = limited_range_yuv(settings.solid_color, color_matrix)
        self._feather = settings.feather

    def apply(self, picture: Picture, boxes: Sequence[RedactBox]) -> None:
        """Redact ``boxes`` (frame pixels, xyxy) in ``picture``, in place: each plane at its own scale,
        so chroma gets the same shapes, blur and mosaic relative to the box as luma. U and V share one
        scale, so they share each box's region and mask (the mask is the costliest step)."""
        luma, *chroma = picture.planes()
        luma_fill, *chroma_fills = self._solid_yuv
        chroma_scale = 1 / PLANE_SUBSAMPLING[1]
        self._apply_to_planes([luma], boxes, [luma_fill])
        self._apply_to_planes(chroma, [_scaled(box, chroma_scale) for box in boxes], chroma_fills)

    def apply_to_image(self, image: np.ndarray, boxes: Sequence[RedactBox],
                       solid: int | tuple[int, ...] | None = None) -> None:
        """Redact ``boxes`` (this image's pixels, xyxy) in ``image``, uint8 (H, W) or (H, W, C), in place.

        ``solid``: the fill for mode = "solid" in this image's channels (default: solid_color, RGB).
        """
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
        self._apply_to_planes([image], boxes, [self._solid_rgb if solid is None else solid])

    def _apply_to_planes(self, images: Sequence[np.ndarray], boxes: Sequence[RedactBox],
                         fills: Sequence[int | tuple[int, ...]]) -> None:
        """Redact ``boxes`` in each of ``images`` (same size), filling ``fills[i]`` in mode "solid"."""
        fill_arrays = [np.asarray(fill, dtype=np.uint8) for fill in fills]
        frame_size = (images[0].shape[1], images[0].shape[0])
        for box in boxes:
            region = plan_region(box, frame_size, self._feather)
            if region is None:
                continue
            alpha = None if region.hard_rectangle else region_alpha(region)  # one weight a pixel, any channels
            keep = None if alpha is None else 1.0 - alpha
            for image, fill in zip(images, fill_arrays):
                patch = image[region.y0 : region.y1, region.x0 : region.x1]
                effect = self._effect(patch, region, fill)
                if alpha is None:
                    patch[...] = effect
                else:
                    patch[...] = cv2.blendLinear(patch, effect, keep, alpha)

    def _effect(self, patch: np.ndarray, region: Region, fill: np.ndarray) -> np.ndarray:
        roi_h, roi_w = patch.shape[:2]
        if self._mode == "solid":
            return np.broadcast_to(fill, patch.shape).copy()
        if self._mode == "pixelate":
            cell_px = max(region.long_side_px / self._pixelate_blocks, 1.0)
            cells = (max(round(roi_w / cell_px), 1), max(round(roi_h / cell_px), 1))
            small = cv2.resize(patch, cells, interpolation=cv2.INTER_AREA)
            return cv2.resize(small, (roi_w, roi_h), interpolation=cv2.INTER_NEAREST)
        sigma_px = self._blur_strength * region.short_side_px
        # A whole shrink factor: OpenCV averages k x k blocks on a fast path, ~6x quicker than a
        # fractional one. The ROI is padded (edge pixels repeated) to a multiple of k, then cropped back.
        factor = max(int(sigma_px / _SMALL_SIGMA_PX), 1)
        pad_h, pad_w = -roi_h % factor, -roi_w % factor
        padded = cv2.copyMakeBorder(patch, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE) if pad_h or pad_w else patch
        small_size = ((roi_w + pad_w) // factor, (roi_h + pad_h) // factor)
        small = cv2.resize(padded, small_size, interpolation=cv2.INTER_AREA) if factor > 1 else padded
        small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma_px / factor, borderType=cv2.BORDER_REPLICATE)
        if factor == 1:
            return small
        return cv2.resize(small, (roi_w + pad_w, roi_h + pad_h), interpolation=cv2.INTER_LINEAR)[:roi_h, :roi_w]


def _scaled(box: RedactBox, factor: float) -> RedactBox:
    return box._replace(x1=box.x1 * factor, y1=box.y1 * factor, x2=box.x2 * factor, y2=box.y2 * factor)
