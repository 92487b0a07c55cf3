"""Redactor and region_mask: full coverage of the box, untouched pixels outside, shapes, modes, edges."""

from __future__ import annotations

import math

import av
import cv2
import numpy as np
import pytest

from dashcamd.config import RedactSettings
from dashcamd.picture import PLANE_SUBSAMPLING, Picture, limited_range_yuv
from dashcamd.redact import Redactor, region_mask
from dashcamd.track import RedactBox

HEIGHT, WIDTH = 240, 320


def checkerboard() -> np.ndarray:
    """1-px black/white checkerboard (RGB uint8): all of its energy is at the highest frequency."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.repeat((((xx + yy) % 2) * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def noise(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def box(x1, y1, x2, y2, label="plate") -> RedactBox:
    return RedactBox(float(x1), float(y1), float(x2), float(y2), label, 0.9, "detected")


def outside_reach(label: str, b: RedactBox, feather: float) -> np.ndarray:
    """Boolean (H, W): pixels beyond the shape's bounding box plus the feather ramp (+1 px rounding)."""
    w, h = b.x2 - b.x1, b.y2 - b.y1
    ramp = feather * min(w, h)
    grow = 1 / math.sqrt(2) if label == "face" else 0.5
    cx, cy = (b.x1 + b.x2) / 2, (b.y1 + b.y2) / 2
    reach_x, reach_y = w * grow + ramp + 1, h * grow + ramp + 1
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    return (np.abs(xx - cx) > reach_x) | (np.abs(yy - cy) > reach_y)


@pytest.mark.parametrize("mode", ["blur", "pixelate", "solid"])
@pytest.mark.parametrize("label", ["plate", "face", "zone"])
def test_box_is_redacted_and_outside_is_untouched(mode, label):
    settings = RedactSettings(mode=mode, solid_color=(255, 0, 0), pixelate_blocks=4)
    frame = checkerboard()
    original = frame.copy()
    b = box(100, 80, 200, 130, label)
    Redactor(settings).apply_to_image(frame, [b])
    inside = frame[80:130, 100:200].astype(np.float32)
    if mode == "solid":
        assert (frame[80:130, 100:200] == (255, 0, 0)).all()
    else:
        # The 1-px pattern (std 127.5) is gone: nothing readable is left at fine scale.
        assert inside.std() < 4.0
    feather = 0.0 if label == "zone" else settings.feather
    untouched = outside_reach(label, b, feather)
    assert (frame[untouched] == original[untouched]).all()


def test_box_pixels_get_full_alpha_whatever_the_shape():
    b = box(10.3, 20.7, 50.2, 40.1)  # fractional: every touched pixel counts
    for label in ("plate", "face", "zone", "unknown"):
        region, alpha = region_mask(b._replace(label=label), (WIDTH, HEIGHT), 0.3)
        core = alpha[20 - region.y0 : 41 - region.y0, 10 - region.x0 : 51 - region.x0]
        assert core.shape == (21, 41) and (core == 1.0).all(), label
        assert alpha.min() >= 0.0 and alpha.max() <= 1.0


def alpha_at(b: RedactBox, feather: float, x: int, y: int) -> float:
    """Mask value at frame pixel (x, y); 0 outside the ROI."""
    region, alpha = region_mask(b, (WIDTH, HEIGHT), feather)
    if not (region.x0 <= x < region.x1 and region.y0 <= y < region.y1):
        return 0.0
    return float(alpha[y - region.y0, x - region.x0])


def test_ellipse_for_faces_rounded_feather_for_plates():
    plate = box(100, 100, 200, 160)  # short side 60
    face = plate._replace(label="face")
    # Without feather: the face ellipse bulges past the box's edges, the plate stops at the box.
    assert alpha_at(face, 0.0, 150, 95) == 1.0  # above the top edge's middle
    assert alpha_at(plate, 0.0, 150, 95) == 0.0
    assert alpha_at(face, 0.0, 97, 97) == 0.0  # diagonally off the corner
    assert alpha_at(plate, 0.0, 100, 100) == 1.0 and alpha_at(face, 0.0, 100, 100) == 1.0

    # With feather the plate's soft edge is a rounded rectangle: off the corner the ramp is measured
    # diagonally, so it fades sooner than straight off an edge by the same offset.
    straight = alpha_at(plate, 0.2, 209, 130)  # ramp 12 px; 9.5 px right of the edge
    diagonal = alpha_at(plate, 0.2, 209, 169)  # 9.5 px right of and below the corner
    assert 0.0 < straight < 1.0
    assert diagonal == 0.0


def test_zones_are_hard_rectangles():
    frame = noise()
    original = frame.copy()
    settings = RedactSettings(mode="solid", feather=0.5)
    Redactor(settings).apply_to_image(frame, [RedactBox(40, 30, 90, 70, "zone", 1.0, "zone")])
    changed = (frame != original).any(axis=2)
    assert changed[30:70, 40:90].all()
    changed[30:70, 40:90] = False
    assert not changed.any()


def test_blur_strength_scales_with_box_size():
    # The same plate at two resolutions ends up the same picture, scaled: the big one is no sharper.
    rng = np.random.default_rng(4)
    pattern = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    small = np.zeros((60, 80, 3), np.uint8)
    small[20:40, 20:60] = pattern
    big = cv2.resize(small, (240, 180), interpolation=cv2.INTER_NEAREST)
    redactor = Redactor(RedactSettings(feather=0.0))
    redactor.apply_to_image(small, [box(20, 20, 60, 40)])
    redactor.apply_to_image(big, [box(60, 60, 180, 120)])
    shrunk = cv2.resize(big, (80, 60), interpolation=cv2.INTER_AREA)
    diff = np.abs(shrunk[20:40, 20:60].astype(int) - small[20:40, 20:60].astype(int))
    assert diff.mean() < 6


def test_pixelate_makes_about_n_blocks_across_the_long_side():
    frame = noise()
    redactor = Redactor(RedactSettings(mode="pixelate", pixelate_blocks=8, feather=0.0))
    redactor.apply_to_image(frame, [box(0, 0, 160, 80)])
    row = frame[40, 0:160, 0]
    runs = 1 + int(np.count_nonzero(np.diff(row.astype(int))))
    assert 7 <= runs <= 9


@pytest.mark.parametrize("mode", ["blur", "pixelate", "solid"])
def test_edges_tiny_and_overlapping_boxes_do_not_crash(mode):
    frame = noise()
    boxes = [
        box(-50, -20, 60, 40, "face"),  # past the top-left corner
        box(WIDTH - 1, HEIGHT - 1, WIDTH + 10, HEIGHT + 10),  # one pixel in the frame
        box(WIDTH + 5, 10, WIDTH + 50, 40),  # wholly outside
        box(150, 100, 151, 101),  # 1 px
        box(160.5, 100.2, 160.5, 100.2, "face"),  # zero size
        box(170, 100, 172, 102, "face"),  # 2 px
        box(100, 100, 180, 140),
        box(120, 110, 200, 150, "face"),  # overlapping the previous box
    ]
    original = frame.copy()
    Redactor(RedactSettings(mode=mode, solid_color=(7, 7, 7))).apply_to_image(frame, boxes)
    if mode == "solid":
        for y, x in ((0, 0), (HEIGHT - 1, WIDTH - 1), (100, 150), (100, 160), (101, 171), (145, 190)):
            assert (frame[y, x] == 7).all(), (y, x)
    else:
        assert (frame[0:40, 0:60] != original[0:40, 0:60]).any()


def test_rejects_bad_frames_and_boxes():
    redactor = Redactor(RedactSettings())
    with pytest.raises(ValueError):
        redactor.apply_to_image(np.zeros((10,), np.uint8), [])
    with pytest.raises(ValueError):
        redactor.apply_to_image(np.zeros((10, 10, 3), np.float32), [])
    with pytest.raises(ValueError):
        redactor.apply_to_image(np.zeros((10, 10, 3), np.uint8), [box(float("inf"), 0, 5, 5)])


def _picture_of(rgb: np.ndarray) -> Picture:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return Picture.from_frame(frame.reformat(format="yuv420p", src_colorspace="ITU709", dst_colorspace="ITU709",
                                             src_color_range="JPEG", dst_color_range="MPEG"))


def _rgb_of(picture: Picture) -> np.ndarray:
    return picture.to_frame().reformat(format="rgb24", src_colorspace="ITU709", src_color_range="MPEG",
                                       dst_color_range="JPEG").to_ndarray()


@pytest.mark.parametrize("label", ["plate", "face"])
def test_picture_planes_are_redacted_each_at_its_own_scale(label):
    picture = _picture_of(noise())
    original = [plane.copy() for plane in picture.planes()]
    b = box(101, 81, 199, 131, label)
    Redactor(RedactSettings()).apply(picture, [b])
    for plane, before, subsampling in zip(picture.planes(), original, PLANE_SUBSAMPLING):
        x1, y1, x2, y2 = (round(v / subsampling) for v in (b.x1, b.y1, b.x2, b.y2))
        # Noise (std ~74 in luma) is flattened inside the box in every plane ...
        assert plane[y1:y2, x1:x2].astype(np.float32).std() < 6.0
        # ... and nothing beyond the feathered shape changed, at this plane's scale.
        scaled = box(b.x1 / subsampling, b.y1 / subsampling, b.x2 / subsampling, b.y2 / subsampling, label)
        untouched = outside_reach(label, scaled, RedactSettings().feather)[:plane.shape[0], :plane.shape[1]]
        assert (plane[untouched] == before[untouched]).all()


@pytest.mark.parametrize("mode", ["blur", "pixelate", "solid"])
def test_a_picture_is_redacted_as_if_each_plane_were_redacted_alone(mode):
    """U and V share each box's region and mask; the result is still each plane's own redaction."""
    settings = RedactSettings(mode=mode, solid_color=(200, 30, 60))
    picture = _picture_of(noise())
    expected = [plane.copy() for plane in picture.planes()]
    boxes = [box(101, 81, 199, 131, "plate"), box(30, 21, 91, 100, "face")]
    redactor = Redactor(settings)
    redactor.apply(picture, boxes)
    fills = limited_range_yuv(settings.solid_color, "bt709")
    for plane, alone, subsampling, fill in zip(picture.planes(), expected, PLANE_SUBSAMPLING, fills):
        scaled = [box(b.x1 / subsampling, b.y1 / subsampling, b.x2 / subsampling, b.y2 / subsampling, b.label)
                  for b in boxes]
        redactor.apply_to_image(alone, scaled, fill)
        assert np.array_equal(plane, alone)


@pytest.mark.parametrize("matrix", ["bt709", "bt601"])
def test_solid_colour_in_the_planes_comes_back_as_that_rgb(matrix):
    picture = _picture_of(noise())
    Redactor(RedactSettings(mode="solid", solid_color=(200, 30, 60)), color_matrix=matrix).apply(
        picture, [box(40, 40, 120, 100, "zone")])
    back = picture.to_frame().reformat(format="rgb24", src_colorspace="ITU709" if matrix == "bt709" else "ITU601",
                                       src_color_range="MPEG", dst_color_range="JPEG").to_ndarray()
    assert np.abs(back[44:96, 44:116].astype(int) - (200, 30, 60)).max() <= 3


def test_blur_in_the_planes_looks_like_blur_in_rgb():
    """Blur and blend are linear, so redacting the YUV planes and converting back matches redacting RGB
    (up to 4:2:0 chroma and 8-bit rounding)."""
    frame = noise()
    picture = _picture_of(frame)
    expected = _rgb_of(picture)  # the same source as the planes see it
    b = box(100, 80, 200, 130)
    Redactor(RedactSettings()).apply(picture, [b])
    Redactor(RedactSettings()).apply_to_image(expected, [b])
    assert np.abs(_rgb_of(picture)[85:125, 105:195].astype(int) - expected[85:125, 105:195]).mean() < 3.0
