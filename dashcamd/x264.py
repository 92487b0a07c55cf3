"""The options dashcamd hands to x264, and a check that x264 takes them.

Why the check: FFmpeg's libx264 wrapper only logs a warning for an ``x264-params`` entry it cannot parse
and then encodes without it, so a typo in the config would silently change every output. Opening a tiny
in-memory encoder with the options when the settings load turns that into a config error.
"""

from __future__ import annotations

from fractions import Fraction

import av
import av.error
import av.logging


# On top of veryfast when the config sets no x264_params: the fastest sub-pixel refinement, and no
# analysis of inter partitions below 16x16. On 1080p clips here that took 34-43 % of x264's CPU for 4-10 %
# more bytes at the same CRF, 0.15-0.34 dB less PSNR (README, "Measured speed"); the default CRF 19
# (was 20) gives that back. Other presets get nothing added: a user who picks "medium" means medium.
VERYFAST_TUNING = "subme=1:partitions=i8x8,i4x4"


def encoder_options(crf: int, preset: str, params: str | None) -> dict[str, str]:
    """FFmpeg codec options for libx264: CRF, preset, and x264's own ``key=value:...`` on top of it
    (``params``; None = ``VERYFAST_TUNING`` with preset veryfast, nothing with any other)."""
    if params is None:
        params = VERYFAST_TUNING if preset == "veryfast" else ""
    options = {"crf": str(crf), "preset": preset}
    if params:
        options["x264-params"] = params
    return options


def rejected_options(options: dict[str, str]) -> list[str]:
    """What libx264 says against ``options`` when a 64x64 encoder opens with them; empty if it takes them."""
    previous_level = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)  # PyAV forwards no FFmpeg messages until a level is set
    try:
        with av.logging.Capture() as messages:
            context = av.CodecContext.create("libx264", "w")
            context.width = context.height = 64
            context.pix_fmt = "yuv420p"
            context.time_base = Fraction(1, 30)
            context.options = options
            try:
                context.open()
            except av.error.FFmpegError as refused:
                return [str(refused)]
    finally:
        av.logging.set_level(previous_level)
    return [text.strip() for level, source, text in messages
            if source == "libx264" and level <= av.logging.WARNING]
