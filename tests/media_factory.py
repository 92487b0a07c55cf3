"""Test-time media generator: tiny real clips made with PyAV (no ffmpeg binary), plus broken-file helpers.

Every clip is deterministic (fixed seeds), so a failing test can be re-run and inspected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Encoder name and the pixel format each test codec is written with.
_VIDEO_CODECS = {
    "h264": ("libx264", "yuv420p"),
    "hevc": ("libx265", "yuv420p"),
    "mjpeg": ("mjpeg", "yuvj420p"),
    "mpeg4": ("mpeg4", "yuv420p"),
}
_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".ts": "mpegts"}
AUDIO_RATE = 48_000
# Irregular frame gaps (in nominal frame durations) for VFR clips: a dashcam dropping and bunching frames.
_VFR_GAPS = (1.0, 0.5, 1.5, 1.0, 0.75, 1.25, 2.0, 1.0)
VFR_TIME_BASE = Fraction(1, 90_000)


def make_clip(
    path: Path | str,
    width: int = 320,
    height: int = 240,
    seconds: float = 1.0,
    fps: int | Fraction = 30,
    audio_streams: int = 1,
    vfr: bool = False,
    codec: str = "h264",
    rotation: int | None = None,
    pattern: str = "moving",
    audio_codec: str = "aac",
    creation_time: str | None = None,
    video: bool = True,
    tag_colors: bool = True,
    subtitles: bool = False,
    timecode: str | None = None,
    second_video: tuple[int, int] | None = None,
    start_seconds: float = 0.0,
) -> Path:
    """Write a small clip and return its path; the container follows the suffix (.mp4/.mov/.mkv/.avi/.ts).

    pattern: "moving" (gradient with a white square crossing the frame), "static" (same image every frame)
    or "bars" (flat colour patches, see ``BAR_COLORS_RGB``, for colour round-trip checks).
    audio: ``audio_streams`` sine tracks at 48 kHz (440 Hz, 660 Hz, ...), ``audio_codec`` "aac",
    "pcm_s16le" or "pcm_mulaw" (the last one cannot go into MP4 untouched).
    vfr: irregular pts in a 1/90000 time base (average rate still ``fps``).
    rotation: display-matrix rotation in degrees (MP4/MOV only), as phones and some dashcams write it.
    video=False writes an audio-only file.
    colours: BT.709 from 720 lines up, BT.601 below (JPEG: BT.601 full range), tagged unless
    ``tag_colors`` is False (many cameras leave them untagged).
    subtitles: a mov_text track with one "GPS <n>" line a second (MP4/MOV), as some dashcams log GPS.
    timecode: e.g. "10:00:00:00" makes the MOV/MP4 muxer add a tmcd data track.
    second_video: (w, h) of a second, independent video track (a rear camera in the same file).
    start_seconds: every stream starts this late (MPEG-TS cameras start their clocks anywhere).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CONTAINERS:
        raise ValueError(f"unsupported suffix {suffix!r}")
    if codec not in _VIDEO_CODECS:
        raise ValueError(f"unsupported codec {codec!r}")
    if vfr and suffix == ".avi":
        raise ValueError("AVI cannot carry variable frame timing")
    path.parent.mkdir(parents=True, exist_ok=True)
    fps = Fraction(fps)
    n_frames = max(1, round(seconds * fps))
    encoder_name, pix_fmt = _VIDEO_CODECS[codec]
    if (width % 2 or height % 2) and codec in ("h264", "hevc"):
        # x264/x265 refuse odd sizes in 4:2:0; 4:4:4 keeps the odd size that the test is about.
        pix_fmt = "yuv444p"

    with av.open(str(path), "w", format=_CONTAINERS[suffix]) as container:
        if creation_time is not None:
            container.metadata["creation_time"] = creation_time
        video_stream = None
        if video:
            video_stream = container.add_stream(encoder_name, rate=fps)
            video_stream.width = width
            video_stream.height = height
            video_stream.pix_fmt = pix_fmt
            matrix = "itu709" if height >= 720 and codec != "mjpeg" else "itu601"
            full_range = pix_fmt == "yuvj420p"
            if tag_colors:
                video_stream.codec_context.colorspace = 1 if matrix == "itu709" else 6
                video_stream.codec_context.color_range = 2 if full_range else 1
            if codec == "h264":
                video_stream.options = {"preset": "ultrafast", "crf": "23"}
            elif codec == "hevc":
                video_stream.options = {"preset": "ultrafast", "x265-params": "log-level=error"}
            elif codec == "mjpeg":
                video_stream.options = {"q:v": "5"}
            if vfr:
                video_stream.codec_context.time_base = VFR_TIME_BASE
                video_stream.time_base = VFR_TIME_BASE
            else:
                video_stream.codec_context.time_base = 1 / fps
            if rotation is not None:
                video_stream.set_display_rotation(rotation)
            if timecode is not None:
                video_stream.metadata["timecode"] = timecode
        rear = None
        if second_video is not None:
            rear = container.add_stream("libx264", rate=fps)
            rear.width, rear.height = second_video
            rear.pix_fmt = "yuv420p"
            rear.options = {"preset": "ultrafast"}
            rear.codec_context.time_base = 1 / fps
        subtitle_stream = None
        if subtitles:
            subtitle_stream = container.add_mux_stream("mov_text")
            subtitle_stream.time_base = Fraction(1, 1000)
        audio_out = []
        for k in range(audio_streams):
            stream = container.add_stream(audio_codec, rate=AUDIO_RATE if audio_codec != "pcm_mulaw" else 8000)
            stream.layout = "mono"
            audio_out.append(stream)

        video_tb = video_stream.codec_context.time_base if video_stream is not None else Fraction(1, 1)
        start_ticks = round(Fraction(start_seconds).limit_denominator(1000) / video_tb)
        video_pts = [start_ticks + pts for pts in _video_pts(n_frames, fps, vfr)]
        audio_samples_done = [0] * audio_streams
        # Audio ends where the last frame ends, as a camera's recording does.
        total_seconds = float((video_pts[-1] - start_ticks) * video_tb + 1 / fps) if video else seconds
        rng = np.random.default_rng(1234)
        for i in range(n_frames if video else 0):
            frame = av.VideoFrame.from_ndarray(_draw(pattern, i, width, height, rng), format="rgb24")
            frame = frame.reformat(
                format=pix_fmt, dst_colorspace=matrix, dst_color_range="JPEG" if full_range else "MPEG"
            )
            frame.pts = video_pts[i]
            frame.time_base = video_tb
            container.mux(video_stream.encode(frame))
            now_s = float(video_pts[i] * video_tb)
            if rear is not None:
                back = av.VideoFrame.from_ndarray(_draw("static", i, *second_video, rng)[::-1].copy(), format="rgb24")
                back.pts, back.time_base = round(now_s * fps), 1 / fps
                container.mux(rear.encode(back.reformat(format="yuv420p")))
            if subtitle_stream is not None and i % max(1, round(fps)) == 0:
                text = f"GPS {i}".encode()
                packet = av.Packet(len(text).to_bytes(2, "big") + text)
                packet.pts = packet.dts = round(now_s * 1000)
                packet.duration = 500
                packet.time_base = Fraction(1, 1000)
                packet.stream = subtitle_stream
                container.mux(packet)
            for k, stream in enumerate(audio_out):
                # Slightly ahead of the video, like real files' interleaving.
                audio_samples_done[k] = _write_audio(
                    container, stream, k, audio_samples_done[k], min(now_s - start_seconds + 0.1, total_seconds),
                    start_seconds,
                )
        for k, stream in enumerate(audio_out):
            _write_audio(container, stream, k, audio_samples_done[k], total_seconds, start_seconds)
        if video_stream is not None:
            container.mux(video_stream.encode(None))
        if rear is not None:
            container.mux(rear.encode(None))
        for stream in audio_out:
            container.mux(stream.encode(None))
    return path


def _video_pts(n_frames: int, fps: Fraction, vfr: bool) -> list[int]:
    if not vfr:
        return list(range(n_frames))  # codec time base is 1/fps
    nominal = VFR_TIME_BASE.denominator / fps
    pts, now = [], Fraction(0)
    for i in range(n_frames):
        pts.append(round(now))
        now += nominal * Fraction(_VFR_GAPS[i % len(_VFR_GAPS)]).limit_denominator(100)
    return pts


# Colour patches of the "bars" pattern, left to right, as RGB.
BAR_COLORS_RGB = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 220), (20, 20, 20), (200, 200, 40))


def _draw(pattern: str, index: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB frame (H, W, 3) uint8."""
    if pattern == "bars":
        frame = np.zeros((height, width, 3), np.uint8)
        edges = np.linspace(0, width, len(BAR_COLORS_RGB) + 1).astype(int)
        for color, x0, x1 in zip(BAR_COLORS_RGB, edges[:-1], edges[1:]):
            frame[:, x0:x1] = color
        return frame
    y, x = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = (x * 255 // max(1, width - 1)).astype(np.uint8)
    frame[..., 1] = (y * 255 // max(1, height - 1)).astype(np.uint8)
    frame[..., 2] = 96
    if pattern == "static":
        return frame
    if pattern != "moving":
        raise ValueError(f"unknown pattern {pattern!r}")
    side = max(4, min(width, height) // 4)
    x0 = (index * 7) % max(1, width - side)
    y0 = (height - side) // 2
    frame[y0 : y0 + side, x0 : x0 + side] = 255
    # A little texture so the encoder has real work and frames differ in more than one place.
    frame[::8, :, 2] = rng.integers(0, 255, size=(frame[::8].shape[0], width), dtype=np.uint8)
    return frame


def _write_audio(container, stream, k: int, done: int, until_s: float, start_seconds: float = 0.0) -> int:
    """Encode sine samples [done, until_s*rate) in 1024-sample frames; returns the new sample count."""
    rate = stream.codec_context.sample_rate
    target = int(until_s * rate)
    freq = 440.0 * (1.0 + 0.5 * k)
    fmt = stream.codec_context.format.name
    while done < target:
        n = min(1024, target - done)
        t = (np.arange(done, done + n) / rate).astype(np.float64)
        wave = 0.3 * np.sin(2 * math.pi * freq * t)
        if fmt == "fltp":
            data = wave.astype(np.float32)[None, :]
        else:  # packed s16 for PCM codecs
            data = (wave * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
        frame.sample_rate = rate
        frame.pts = done + round(start_seconds * rate)
        frame.time_base = Fraction(1, rate)
        container.mux(stream.encode(frame))
        done += n
    return done


def make_audio_only(path: Path | str, seconds: float = 1.0) -> Path:
    """An .mp4/.m4a-like file with one AAC track and no video."""
    return make_clip(path, seconds=seconds, video=False)


def make_text_file_named_mp4(path: Path | str) -> Path:
    """A text file that only looks like a clip by name."""
    path = Path(path)
    path.write_text("this is not a video\n" * 20)
    return path


def make_zero_byte(path: Path | str) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def mp4_top_level_boxes(path: Path | str) -> list[tuple[str, int, int]]:
    """(type, offset, size) of the top-level MP4 boxes, read from the headers only."""
    boxes = []
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + 8 <= file_size:
            f.seek(offset)
            header = f.read(16)
            size = int.from_bytes(header[:4], "big")
            kind = header[4:8].decode("latin-1")
            if size == 1:
                size = int.from_bytes(header[8:16], "big")
            elif size == 0:
                size = file_size - offset
            if size < 8:
                break
            boxes.append((kind, offset, size))
            offset += size
    return boxes


def truncate_moov(path: Path | str, keep_fraction: float = 0.6) -> Path:
    """Cut an MP4 as a half-finished copy or a power cut would: the trailing moov box and part of mdat go."""
    path = Path(path)
    moov = [offset for kind, offset, _ in mp4_top_level_boxes(path) if kind == "moov"]
    if not moov:
        raise ValueError(f"{path} has no moov box")
    size = path.stat().st_size
    cut = min(moov[0], int(size * keep_fraction))
    with open(path, "r+b") as f:
        f.truncate(cut)
    return path


def corrupt_video_packets(path: Path | str, indices: Iterable[int], seed: int = 0) -> list[int]:
    """Overwrite the payload of the given video packets (decode order) with noise, in place.

    The 4-byte NAL length prefix is kept for H.264/HEVC so the demuxer still splits the stream;
    the decoder then sees garbage slices (like a flash-card bit error). Returns the packet sizes hit.
    """
    path = Path(path)
    wanted = set(indices)
    spans = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, packet in enumerate(p for p in container.demux(stream) if p.size):
            if i in wanted:
                spans.append((packet.pos, packet.size))
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        for pos, size in spans:
            f.seek(pos + 5)
            f.write(rng.integers(0, 256, size=max(0, size - 5), dtype=np.uint8).tobytes())
    return [size for _, size in spans]


def read_packets(path: Path | str, kind: str = "audio") -> list[list[bytes]]:
    """Payload bytes of every packet of each stream of ``kind``, per stream, in demux order."""
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == kind]
        indices = [s.index for s in streams]
        out: dict[int, list[bytes]] = {i: [] for i in indices}
        for packet in container.demux(streams):
            if packet.size and packet.dts is not None:
                out[packet.stream.index].append(bytes(packet))
    return [out[i] for i in indices]


def video_pts(path: Path | str) -> list[int]:
    """Presentation timestamps of the decoded video frames, in the stream's time base, sorted."""
    with av.open(str(path)) as container:
        return sorted(frame.pts for frame in container.decode(video=0))
