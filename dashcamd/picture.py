"""A video frame in the layout the encoder takes: 8-bit YUV 4:2:0, limited range, even size.

Frames stay in this layout from decoder to encoder. Redaction works on the planes directly (blur,
mosaic and the feathered blend are linear, so they commute with the RGB <-> YUV matrix), which saves
two full-frame colour conversions (about 10 ms a 1080p frame on one core, bench/README.md) and
leaves every unredacted pixel exactly as decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

# Luma weights (Kr, Kb) of the matrices dashcamd decodes with (ITU-R BT.709 and BT.601).
_LUMA_WEIGHTS = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114)}

PLANE_SUBSAMPLING = (1, 2, 2)  # Y at full resolution, U and V at half in both directions


@dataclass(frozen=True, slots=True)
class Picture:
    """One frame as a single I420 buffer: Y (height x width), then U and V (height/2 x width/2).

    ``width`` and ``height`` are even. A source with an odd side gets one more column or row that
    repeats its edge (x264's 4:2:0 needs even sides); no source pixel is lost.
    """

    buffer: np.ndarray  # uint8 (height * 3 // 2, width): I420 as FFmpeg's yuv420p ndarrays have it
    width: int
    height: int

    @classmethod
    def blank(cls, width: int, height: int) -> Picture:
        if width % 2 or height % 2:
            raise ValueError(f"4:2:0 needs even sides, got {width}x{height}")
        return cls(np.empty((height * 3 // 2, width), np.uint8), width, height)

    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Writable views (Y, U, V) into the buffer; see PLANE_SUBSAMPLING for their scales."""
        flat = self.buffer.reshape(-1)
        luma_size, chroma_size = self.width * self.height, self.width * self.height // 4
        chroma_shape = (self.height // 2, self.width // 2)
        return (flat[:luma_size].reshape(self.height, self.width),
                flat[luma_size:luma_size + chroma_size].reshape(chroma_shape),
                flat[luma_size + chroma_size:].reshape(chroma_shape))

    @classmethod
    def from_frame(cls, frame: av.VideoFrame) -> Picture:
        """Copy a decoded ``yuv420p`` frame (any size) into a new Picture."""
        if frame.format.name != "yuv420p":
            raise ValueError(f"expected a yuv420p frame, got {frame.format.name}")
        picture = cls.blank(frame.width + frame.width % 2, frame.height + frame.height % 2)
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
        """A new ``yuv420p`` VideoFrame holding a copy of the pixels (the encoder may keep it)."""
        return av.VideoFrame.from_ndarray(self.buffer, format="yuv420p")


def limited_range_yuv(rgb: tuple[int, int, int], matrix: str) -> tuple[int, int, int]:
    """8-bit full-range RGB -> 8-bit limited-range (Y 16-235, U/V 16-240) YUV with ``matrix``
    ("bt709" | "bt601"): the values a solid redaction colour takes in the planes."""
    kr, kb = _LUMA_WEIGHTS[matrix]
    r, g, b = (channel / 255.0 for channel in rgb)
    luma = kr * r + (1 - kr - kb) * g + kb * b
    cb = (b - luma) / (2 * (1 - kb))
    cr = (r - luma) / (2 * (1 - kr))
    return round(16 + 219 * luma), round(128 + 224 * cb), round(128 + 224 * cr)
