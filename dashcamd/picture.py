"""A video frame in the layout the encoder takes: 8-bit YUV 4:2:0, limited range, even size.

Frames stay in this layout from decoder to encoder. Redaction works on the planes directly (blur,
mosaic and the feathered blend are linear, so they commute with the RGB <-> YUV matrix), which saves
two full-frame colour conversions (about 10 ms a 1080p frame on one core, bench/README.md) and
leaves every unredacted pixel exactly as decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np

# Luma weights (Kr, Kb) of the matrices dashcamd decodes with (ITU-R BT.709 and BT.601).
_LUMA_WEIGHTS = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114)}

PLANE_SUBSAMPLING = (1, 2, 2)  # Y at full resolution, U and V at half in both directions


@dataclass(frozen=True, slots=True, eq=False)
class Picture:
    """One frame's Y (height x width), U and V (height/2 x width/2) planes as writable numpy views, in one of
    two homes:

    - an FFmpeg ``yuv420p`` VideoFrame of its own (``blank``, ``from_frame``), which the encoder takes as it is
      (``to_frame``). Why not a numpy buffer: copying one into a new VideoFrame (PyAV's ``from_ndarray``)
      held the interpreter lock ~0.7 ms a 1080p frame, a lock the pipeline's threads share (bench/gil.py);
    - a slot of memory shared with redaction processes (``in_slot``, see dashcamd.shared_frames), which
      ``to_frame`` copies out (numpy copies, run without the lock) before giving the slot back.

    The copy in from the decoder stays either way: the decoder may still read its frames as references.
    ``width`` and ``height`` are even. A source with an odd side gets one more column or row that
    repeats its edge (x264's 4:2:0 needs even sides); no source pixel is lost.
    """

    width: int
    height: int
    _planes: tuple[np.ndarray, np.ndarray, np.ndarray]
    _frame: av.VideoFrame | None = None
    slot: int | None = None  # the shared slot it lives in, if any
    _give_back: Callable[[int], None] | None = None

    @classmethod
    def blank(cls, width: int, height: int) -> Picture:
        """A picture of undefined content (as ``np.empty``) in a VideoFrame of its own, to be written over."""
        _check_even(width, height)
        frame = av.VideoFrame(width, height, "yuv420p")
        planes = tuple(
            np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
            for plane in frame.planes
        )
        return cls(width, height, planes, frame)

    @classmethod
    def in_slot(cls, memory: np.ndarray, width: int, height: int, slot: int | None = None,
                give_back: Callable[[int], None] | None = None) -> Picture:
        """A picture over ``memory`` (uint8, at least ``width * height * 3 // 2`` bytes: I420, rows packed).
        ``give_back(slot)`` is called once ``to_frame`` has copied the pixels out."""
        _check_even(width, height)
        luma_size, chroma_size = width * height, width * height // 4
        chroma_shape = (height // 2, width // 2)
        planes = (memory[:luma_size].reshape(height, width),
                  memory[luma_size:luma_size + chroma_size].reshape(chroma_shape),
                  memory[luma_size + chroma_size:luma_size + 2 * chroma_size].reshape(chroma_shape))
        return cls(width, height, planes, None, slot, give_back)

    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Writable views (Y, U, V) of the pixels; see PLANE_SUBSAMPLING for their scales."""
        return self._planes

    @classmethod
    def from_frame(cls, frame: av.VideoFrame, into: Picture | None = None) -> Picture:
        """Copy a decoded ``yuv420p`` frame (any size) into ``into`` (a picture of its size rounded up to
        even), or into a new Picture."""
        if frame.format.name != "yuv420p":
            raise ValueError(f"expected a yuv420p frame, got {frame.format.name}")
        picture = into or cls.blank(frame.width + frame.width % 2, frame.height + frame.height % 2)
        for target, plane in zip(picture.planes(), frame.planes):
            rows = np.frombuffer(plane, np.uint8, count=plane.line_size * plane.height)
            target[:plane.height, :plane.width] = rows.reshape(plane.height, plane.line_size)[:, :plane.width]
        picture.repeat_edges(frame.width, frame.height)
        return picture

    def repeat_edges(self, width: int, height: int) -> None:
        """Fill the padding beyond a ``width`` x ``height`` source with its last column and row. Run
        again after redaction, so the padding repeats redacted pixels, not the originals."""
        luma = self.planes()[0]  # chroma sides round up, so only luma can have padding
        if width < self.width:
            luma[:, width:] = luma[:, width - 1:width]
        if height < self.height:
            luma[height:] = luma[height - 1:height]

    def to_frame(self) -> av.VideoFrame:
        """The pixels as a VideoFrame for the encoder; the picture is handed over (x264 copies the pixels in
        before ``encode`` returns). A picture in a VideoFrame gives that frame itself; one in a shared slot
        is copied into a new frame and its slot given back, so do not touch it afterwards."""
        if self._frame is not None:
            return self._frame
        frame = Picture.blank(self.width, self.height)
        for target, source in zip(frame.planes(), self._planes):
            target[...] = source
        if self._give_back is not None and self.slot is not None:
            self._give_back(self.slot)
        return frame.to_frame()


def _check_even(width: int, height: int) -> None:
    if width % 2 or height % 2:
        raise ValueError(f"4:2:0 needs even sides, got {width}x{height}")


def limited_range_yuv(rgb: tuple[int, int, int], matrix: str) -> tuple[int, int, int]:
    """8-bit full-range RGB -> 8-bit limited-range (Y 16-235, U/V 16-240) YUV with ``matrix``
    ("bt709" | "bt601"): the values a solid redaction colour takes in the planes."""
    kr, kb = _LUMA_WEIGHTS[matrix]
    r, g, b = (channel / 255.0 for channel in rgb)
    luma = kr * r + (1 - kr - kb) * g + kb * b
    cb = (b - luma) / (2 * (1 - kb))
    cr = (r - luma) / (2 * (1 - kr))
    return round(16 + 219 * luma), round(128 + 224 * cb), round(128 + 224 * cr)
