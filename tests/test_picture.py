"""Picture: the I420 frame layout from decoder to encoder, odd sides, and the solid-colour conversion."""

from __future__ import annotations

import av
import numpy as np
import pytest

from dashcamd.picture import Picture, limited_range_yuv


def _yuv_frame(width: int, height: int, seed: int = 0) -> av.VideoFrame:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")


def test_round_trip_keeps_every_sample():
    frame = _yuv_frame(64, 48)
    picture = Picture.from_frame(frame)
    assert (picture.width, picture.height) == (64, 48)
    assert np.array_equal(picture.to_frame().to_ndarray(), frame.to_ndarray())
    y, u, v = picture.planes()
    assert y.shape == (48, 64) and u.shape == v.shape == (24, 32)
    y[0, 0] = 7  # the planes are views of the frame the encoder gets
    assert picture.to_frame().to_ndarray()[0, 0] == 7


@pytest.mark.parametrize(("width", "height"), [(65, 48), (64, 49), (33, 17)])
def test_odd_sides_are_padded_by_repeating_the_edge(width, height):
    frame = _yuv_frame(width, height)
    picture = Picture.from_frame(frame)
    assert (picture.width, picture.height) == (width + width % 2, height + height % 2)
    luma = picture.planes()[0]
    source_luma = np.frombuffer(frame.planes[0], np.uint8, count=frame.planes[0].line_size * height).reshape(
        height, -1)[:, :width]
    assert np.array_equal(luma[:height, :width], source_luma)
    assert np.array_equal(luma[:, -1], luma[:, width - 1]) and np.array_equal(luma[-1], luma[height - 1])
    luma[:height, :width] = 0  # e.g. redacted up to the edge: the padding must follow
    picture.repeat_edges(width, height)
    assert not luma.any()


def test_only_yuv420p_frames_are_taken():
    with pytest.raises(ValueError, match="yuv420p"):
        Picture.from_frame(av.VideoFrame(16, 16, "rgb24"))


@pytest.mark.parametrize(("rgb", "matrix", "expected"), [
    ((0, 0, 0), "bt709", (16, 128, 128)),
    ((255, 255, 255), "bt709", (235, 128, 128)),
    ((255, 0, 0), "bt709", (63, 102, 240)),  # BT.709 red
    ((255, 0, 0), "bt601", (81, 90, 240)),  # BT.601 red
    ((0, 0, 255), "bt601", (41, 240, 110)),  # BT.601 blue
])
def test_limited_range_yuv(rgb, matrix, expected):
    assert limited_range_yuv(rgb, matrix) == expected
