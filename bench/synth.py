"""Synthetic dashcam-like clips made from real annotated photos, with ground truth that moves with them.

A virtual camera pans, zooms and rolls slightly over a still photo; the ground-truth boxes follow the same
affine transform. The clip is compressed with libx264 and carries an AAC track, so decoders, the detector
and the pipeline see what they would see on a real h264 dashcam file. A few hard frames (motion blur, a
dark frame, a compression burst) make the detector miss sometimes, which is what temporal coverage is for.

Used by bench/leak.py (many short clips with ground truth) and bench/pipeline.py (one long clip).
Run it alone to look at a clip: ``python bench/synth.py OUT.mp4 [--image IMG] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
# A BDD100K dashcam frame (parked cars with plates, daylight): what the speed benchmark pans over.
DEFAULT_PANNING_IMAGE = Path("eval/street_scenes_unlabelled/images/bdd100k_yolop_0ace96c3-48481887.jpg")

AUDIO_RATE = 48_000
AUDIO_FRAME_SAMPLES = 1024  # AAC's frame size
MAX_ROLL_DEG = 2.0
# A box that leaves the frame is ground truth only while at least this much of it is inside.
MIN_VISIBLE_FRACTION = 0.5

# Hard-frame kinds and how many consecutive frames each lasts.
HARD_FRAMES = {"motion_blur": 4, "dark": 1, "jpeg_burst": 3}


class GtBox(NamedTuple):
    """One ground-truth object in one frame: frame pixels xyxy (clipped), class, and a per-clip object id
    (its index in the photo's annotation list) so an object can be followed across frames."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    obj: int


def load_annotations(data_dir: Path, set_name: str) -> list[dict]:
    """Entries of ``<data>/eval/<set>/annotations.json`` with ``image`` made an absolute path."""
    root = Path(data_dir) / "eval" / set_name
    entries = json.loads((root / "annotations.json").read_text())
    for entry in entries:
        entry["image"] = str(root / entry["image"])
        entry["set"] = set_name
    return entries


def hard_frame_schedule(frame_count: int, seed: int) -> dict[int, str]:
    """{frame index: kind} for the hard stretches of a clip; deterministic in (frame_count, seed).

    Each kind gets its own third of the clip (in shuffled order), away from the clip's first and last
    frames, so the stretches never touch each other and each has normal frames on both sides.
    Clips under 30 frames get none.
    """
    if frame_count < 30:
        return {}
    rng = np.random.default_rng([seed, 7])
    kinds = list(HARD_FRAMES)
    order = rng.permutation(len(kinds))
    third = frame_count // 3
    schedule: dict[int, str] = {}
    for slot, kind_index in enumerate(order):
        kind = kinds[kind_index]
        length = HARD_FRAMES[kind]
        lo = slot * third + 3
        hi = (slot + 1) * third - 3 - length
        start = int(rng.integers(lo, max(lo, hi) + 1))
        for i in range(start, start + length):
            schedule[i] = kind
    return schedule


class _CameraPath:
    """Per-frame affine maps (2x3, source pixel -> frame pixel) of a camera moving over a photo.

    The view always lies inside the photo (no borders): the base scale fills the frame even at the
    largest roll, zoom only magnifies, and the view centre is clamped to where the rotated view fits.
    """

    def __init__(self, photo_wh: tuple[int, int], frame_wh: tuple[int, int], frame_count: int, fps: int,
                 rng: np.random.Generator, long_pan: bool, focus_xy: tuple[float, float] | None = None) -> None:
        self.photo_w, self.photo_h = photo_wh
        self.frame_w, self.frame_h = frame_wh
        rad = math.radians(MAX_ROLL_DEG)
        c, s = math.cos(rad), math.sin(rad)
        self.fill_scale = max((self.frame_w * c + self.frame_h * s) / self.photo_w,
                              (self.frame_w * s + self.frame_h * c) / self.photo_h)
        n = max(frame_count, 1)
        t = np.arange(n) / max(n - 1, 1)  # 0..1 over the clip
        seconds = np.arange(n) / fps
        if long_pan:
            # Several seconds: sweep back and forth (one sweep per ~10 s), zoom breathing in and out.
            cycles = max(1.0, n / (10.0 * fps))
            self.u = 0.5 + 0.45 * np.sin(2 * math.pi * cycles * t + rng.uniform(0, 2 * math.pi))
            self.v = 0.5 + 0.3 * np.sin(2 * math.pi * 0.5 * cycles * t + rng.uniform(0, 2 * math.pi))
            self.zoom = 1.25 + 0.2 * np.sin(2 * math.pi * 0.7 * cycles * t + rng.uniform(0, 2 * math.pi))
        else:
            # A few seconds: one pan (mostly horizontal, as a car turning) with a zoom (approach). With a
            # focus (an annotated object), the view passes over it mid-clip, so the clip is not empty.
            z0, z1 = rng.uniform(1.05, 1.6, 2)
            ease = t * t * (3 - 2 * t)
            self.zoom = z0 + (z1 - z0) * ease
            if focus_xy is None:
                u_mid, v_mid = rng.uniform(0.2, 0.8, 2)
            else:
                u_mid, v_mid = self._pan_fraction(focus_xy, 0.5 * (z0 + z1))
            span_u = rng.uniform(0.3, 0.9) * rng.choice([-1.0, 1.0])
            span_v = rng.uniform(0.0, 0.3) * rng.choice([-1.0, 1.0])
            self.u = u_mid + span_u * (ease - 0.5) + 0.05 * np.sin(2 * math.pi * 1.5 * t)
            self.v = v_mid + span_v * (ease - 0.5)
        amplitude = rng.uniform(0.5, 1.0) * MAX_ROLL_DEG
        self.roll_deg = amplitude * np.sin(2 * math.pi * rng.uniform(0.1, 0.4) * seconds + rng.uniform(0, 2 * math.pi))
        # Road vibration: a smoothed random walk of a pixel or two in frame pixels.
        shake = rng.normal(0.0, 1.0, (n, 2))
        kernel = np.ones(5) / 5
        self.shake_px = np.stack([np.convolve(shake[:, k], kernel, mode="same") for k in range(2)], axis=1) * 1.5

    def _pan_fraction(self, point_xy: tuple[float, float], zoom: float) -> tuple[float, float]:
        """(u, v) that centre the view on a photo point at this zoom (unrolled; clipped to 0..1)."""
        scale = self.fill_scale * zoom
        half_x, half_y = self.frame_w / 2 / scale, self.frame_h / 2 / scale
        u = (point_xy[0] - half_x) / max(self.photo_w - 2 * half_x, 1e-6)
        v = (point_xy[1] - half_y) / max(self.photo_h - 2 * half_y, 1e-6)
        return float(np.clip(u, 0.0, 1.0)), float(np.clip(v, 0.0, 1.0))

    def matrix(self, i: int) -> np.ndarray:
        scale = self.fill_scale * float(self.zoom[i])
        theta = math.radians(float(self.roll_deg[i]))
        c, s = math.cos(theta), math.sin(theta)
        half_x = (self.frame_w / 2 * abs(c) + self.frame_h / 2 * abs(s)) / scale
        half_y = (self.frame_w / 2 * abs(s) + self.frame_h / 2 * abs(c)) / scale
        u = float(np.clip(self.u[i], 0.0, 1.0))
        v = float(np.clip(self.v[i], 0.0, 1.0))
        centre_x = half_x + u * max(self.photo_w - 2 * half_x, 0.0) + self.shake_px[i, 0] / scale
        centre_y = half_y + v * max(self.photo_h - 2 * half_y, 0.0) + self.shake_px[i, 1] / scale
        centre_x = float(np.clip(centre_x, half_x, self.photo_w - half_x))
        centre_y = float(np.clip(centre_y, half_y, self.photo_h - half_y))
        # out = scale * R * (p - centre) + frame centre
        rot = np.array([[c, -s], [s, c]]) * scale
        offset = np.array([self.frame_w / 2, self.frame_h / 2]) - rot @ np.array([centre_x, centre_y])
        return np.hstack([rot, offset[:, None]])


def transform_boxes(boxes: Sequence[Sequence], matrix: np.ndarray, frame_wh: tuple[int, int]) -> list[GtBox]:
    """Annotation boxes [x1, y1, x2, y2, label] -> frame boxes: the bounding box of the four transformed
    corners, clipped to the frame; boxes less than half inside are dropped.

    Coordinates are continuous (pixel i spans [i, i+1)), whereas cv2.warpAffine maps pixel centres, hence
    the half-pixel shifts.
    """
    width, height = frame_wh
    out: list[GtBox] = []
    for obj, (x1, y1, x2, y2, label, *_) in enumerate(boxes):
        corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]], dtype=np.float64) + 0.5
        mapped = corners @ matrix[:, :2].T + matrix[:, 2] - 0.5
        bx1, by1 = mapped.min(axis=0)
        bx2, by2 = mapped.max(axis=0)
        area = (bx2 - bx1) * (by2 - by1)
        cx1, cy1 = max(bx1, 0.0), max(by1, 0.0)
        cx2, cy2 = min(bx2, float(width)), min(by2, float(height))
        if cx2 - cx1 < 1 or cy2 - cy1 < 1 or area <= 0:
            continue
        if (cx2 - cx1) * (cy2 - cy1) / area < MIN_VISIBLE_FRACTION:
            continue
        out.append(GtBox(float(cx1), float(cy1), float(cx2), float(cy2), str(label), obj))
    return out


def degrade(frame_rgb: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One hard frame: ``motion_blur`` (a fast camera jolt), ``dark`` (tunnel or night: gamma, gain and
    sensor noise) or ``jpeg_burst`` (a bitrate collapse: heavy JPEG blocking before h264)."""
    height = frame_rgb.shape[0]
    if kind == "motion_blur":
        length = max(3, int(round(height * rng.uniform(0.015, 0.035))))  # 16-38 px at 1080p
        angle = rng.uniform(-25, 25) + (90 if rng.random() < 0.2 else 0)
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0
        rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle, 1.0)
        kernel = cv2.warpAffine(kernel, rot, (length, length))
        kernel /= max(kernel.sum(), 1e-6)
        return cv2.filter2D(frame_rgb, -1, kernel, borderType=cv2.BORDER_REFLECT)
    if kind == "dark":
        lut = (255.0 * 0.45 * (np.arange(256) / 255.0) ** 2.2).astype(np.float32)
        dark = lut[frame_rgb]
        dark += rng.normal(0.0, 4.0, dark.shape).astype(np.float32)
        return np.clip(dark, 0, 255).astype(np.uint8)
    if kind == "jpeg_burst":
        quality = int(rng.integers(6, 14))
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encode failed")
        return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    raise ValueError(f"unknown hard-frame kind {kind!r}")


class _H264Writer:
    """libx264 (yuv420p, BT.709 limited range, tagged) in MP4 with an AAC sine track interleaved."""

    def __init__(self, path: Path, size: tuple[int, int], fps: int, crf: int, preset: str, audio: bool) -> None:
        self._fps = fps
        self._out = av.open(str(path), "w", format="mp4")
        self._video = self._out.add_stream("libx264", rate=fps)
        ctx = self._video.codec_context
        ctx.width, ctx.height = size
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, fps)
        ctx.gop_size = fps  # a keyframe a second, as many dashcams write
        ctx.thread_type = "FRAME"
        ctx.colorspace = 1  # BT.709
        ctx.color_range = 1  # limited (MPEG)
        ctx.options = {"crf": str(crf), "preset": preset}
        self._audio = None
        self._samples = 0
        if audio:
            self._audio = self._out.add_stream("aac", rate=AUDIO_RATE)
            self._audio.layout = "mono"
        self._frames = 0

    def write(self, frame_rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        yuv = frame.reformat(format="yuv420p", src_colorspace="ITU709", dst_colorspace="ITU709",
                             src_color_range="JPEG", dst_color_range="MPEG")
        yuv.pts = self._frames
        yuv.time_base = Fraction(1, self._fps)
        self._out.mux(self._video.encode(yuv))
        self._frames += 1
        self._write_audio(self._frames / self._fps)

    def _write_audio(self, until_s: float) -> None:
        if self._audio is None:
            return
        target = int(until_s * AUDIO_RATE)
        while self._samples < target:
            n = min(AUDIO_FRAME_SAMPLES, target - self._samples)
            t = np.arange(self._samples, self._samples + n) / AUDIO_RATE
            # Engine-ish hum: a low tone with a slow wobble, quiet.
            wave = 0.1 * np.sin(2 * math.pi * 110.0 * t + 0.5 * np.sin(2 * math.pi * 0.3 * t))
            frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None, :], format="fltp", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts = self._samples
            frame.time_base = Fraction(1, AUDIO_RATE)
            self._out.mux(self._audio.encode(frame))
            self._samples += n

    def close(self) -> None:
        self._out.mux(self._video.encode(None))
        if self._audio is not None:
            self._out.mux(self._audio.encode(None))
        self._out.close()


def _plan(photo_wh: tuple[int, int], boxes: Sequence[Sequence], frame_count: int, fps: int,
          size: tuple[int, int], seed: int, long_pan: bool) -> tuple[_CameraPath, np.random.Generator]:
    """The camera path, and the generator the hard frames then draw from (same order every time)."""
    rng = np.random.default_rng(seed)
    focus = None
    if boxes and not long_pan:
        x1, y1, x2, y2 = boxes[int(rng.integers(len(boxes)))][:4]
        focus = ((x1 + x2) / 2, (y1 + y2) / 2)
    return _CameraPath(photo_wh, size, frame_count, fps, rng, long_pan, focus), rng


def clip_truth(photo_wh: tuple[int, int], boxes: Sequence[Sequence], seconds: float = 3.0, fps: int = 30,
               size: tuple[int, int] = (1920, 1080), seed: int = 0) -> list[list[GtBox]]:
    """The ground truth ``make_clip_from_image`` returns for the same arguments, without rendering anything
    (for a clip already on disk). ``photo_wh``: the photo's (width, height) as stored."""
    frame_count = max(1, round(seconds * fps))
    camera, _ = _plan(photo_wh, boxes, frame_count, fps, size, seed, long_pan=False)
    return [transform_boxes(boxes, camera.matrix(i), size) for i in range(frame_count)]


def _render_clip(photo_rgb: np.ndarray, boxes: Sequence[Sequence], out_path: Path, seconds: float, fps: int,
                 size: tuple[int, int], seed: int, long_pan: bool, hard: bool, crf: int, preset: str,
                 audio: bool) -> list[list[GtBox]]:
    frame_count = max(1, round(seconds * fps))
    camera, rng = _plan((photo_rgb.shape[1], photo_rgb.shape[0]), boxes, frame_count, fps, size, seed, long_pan)
    schedule = hard_frame_schedule(frame_count, seed) if hard else {}
    truth: list[list[GtBox]] = []
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.mp4")
    writer = _H264Writer(tmp, size, fps, crf, preset, audio)
    try:
        for i in range(frame_count):
            matrix = camera.matrix(i)
            frame = cv2.warpAffine(photo_rgb, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            kind = schedule.get(i)
            if kind is not None:
                frame = degrade(frame, kind, rng)
            writer.write(frame)
            truth.append(transform_boxes(boxes, matrix, size))
        writer.close()
        tmp.replace(out_path)  # a half-written clip never sits at the final name (clips are cached)
    finally:
        tmp.unlink(missing_ok=True)
    return truth


def _read_photo(image_path: Path | str) -> np.ndarray:
    bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {image_path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def make_clip_from_image(image_path: Path | str, boxes: Sequence[Sequence], out_path: Path | str,
                         seconds: float = 3.0, fps: int = 30, size: tuple[int, int] = (1920, 1080), seed: int = 0,
                         *, hard: bool = True, crf: int = 23, preset: str = "veryfast",
                         audio: bool = True) -> list[list[GtBox]]:
    """Write a short h264+AAC clip of a camera moving over the photo; return the ground truth per frame.

    ``boxes``: the photo's annotation boxes [x1, y1, x2, y2, label] in photo pixels. ``size``: (width,
    height) of the clip. Result: for frame i, the GtBox list of objects at least half inside the frame,
    GtBox.obj being the box's index in ``boxes``. Hard frames (see ``hard_frame_schedule(frame_count,
    seed)`` for where) are on unless ``hard`` is False. Deterministic in its arguments.
    """
    return _render_clip(_read_photo(image_path), boxes, Path(out_path), seconds, fps, size, seed,
                        long_pan=False, hard=hard, crf=crf, preset=preset, audio=audio)


def make_panning_clip(out_path: Path | str, seconds: float = 20.0, *, image: Path | str | None = None,
                      data_dir: Path | str = DEFAULT_DATA, fps: int = 30, size: tuple[int, int] = (1920, 1080),
                      seed: int = 0, hard: bool = True, crf: int = 23, preset: str = "veryfast",
                      audio: bool = True) -> Path:
    """A long clip (speed benchmark): one photo swept back and forth with zoom and roll, with audio.

    ``image`` defaults to a BDD100K dashcam frame from ``data_dir`` (DEFAULT_PANNING_IMAGE).
    """
    photo = Path(image) if image is not None else Path(data_dir) / DEFAULT_PANNING_IMAGE
    _render_clip(_read_photo(photo), [], Path(out_path), seconds, fps, size, seed, long_pan=True, hard=hard,
                 crf=crf, preset=preset, audio=audio)
    return Path(out_path)


def make_random_weights(path: Path | str, data_dir: Path | str = DEFAULT_DATA, seed: int = 0,
                        boxes_per_frame: float = 8.0) -> Path:
    """A YOLOv5n face+plate checkpoint with random weights, for smoke runs before trained weights exist.

    A freshly initialised net is useless even as a load: its features vanish with depth, so every anchor
    gets the same score and all of them pass the threshold (3000 NMS candidates, 300 boxes a frame). So
    the BatchNorm statistics are set from a few street photos (features then vary with the image), and
    the head is rescaled so that about ``boxes_per_frame`` anchors pass on those photos, each with one
    clear class. Detections are still noise: numbers measured with it say nothing about accuracy.
    """
    path = Path(path)
    if path.exists():
        return path
    import torch
    from torch import nn

    from dashcamd.detect import build_model, save_checkpoint, yolov5_arch

    torch.manual_seed(seed)
    model = build_model(yolov5_arch("n", nc=2), ["plate", "face"])
    photos = sorted((Path(data_dir) / DEFAULT_PANNING_IMAGE).parent.glob("*.jpg"))[:8]
    if photos:
        images = [cv2.resize(_read_photo(p), (640, 384)) for p in photos]
    else:  # no data: smooth noise stands in for photos
        rng = np.random.default_rng(seed)
        images = [cv2.resize(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), (640, 384)) for _ in range(4)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over this one batch
        model.train()
        model(batch)
        model.eval()
        head = model.detect
        feats = model.forward_features(batch)
        objectness = torch.cat([conv(f).view(len(images), head.na, head.no, -1)[:, :, 4].flatten()
                                for conv, f in zip(head.m, feats)])
        cut = float(torch.quantile(objectness, 1.0 - boxes_per_frame * len(images) / objectness.numel()))
        sharpen = 8.0  # objectness well above the cut scores ~1, below it ~0: few boxes, steady count
        for conv in head.m:
            weight = conv.weight.view(head.na, head.no, -1)
            bias = conv.bias.view(head.na, head.no)
            weight[:, 4] *= sharpen
            bias[:, 4] = sharpen * (bias[:, 4] - cut)
            # Class logits as the difference of the two: exactly one class is likely per anchor.
            diff_w, diff_b = weight[:, 5] - weight[:, 6], bias[:, 5] - bias[:, 6]
            weight[:, 5], weight[:, 6] = sharpen * diff_w, -sharpen * diff_w
            bias[:, 5], bias[:, 6] = sharpen * diff_b, -sharpen * diff_b
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, {"note": "random weights for benchmark smoke runs", "seed": seed})
    return path


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); both even (4:2:0 needs it)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as bad:
        raise argparse.ArgumentTypeError(f"size must look like 1920x1080, got {text!r}") from bad
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"size must be even and at least 16x16, got {text!r}")
    return width, height


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output .mp4")
    parser.add_argument("--image", type=Path, help="photo (default: a dashcam frame from --data)")
    parser.add_argument("--set", help="take the photo and its boxes from this eval set instead (e.g. openalpr_us)")
    parser.add_argument("--index", type=int, default=0, help="which entry of --set's annotations")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--size", type=parse_size, default=(1920, 1080))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truth", type=Path, help="write the per-frame ground truth here (JSON)")
    args = parser.parse_args(argv)
    if args.set:
        entry = load_annotations(args.data, args.set)[args.index]
        truth = make_clip_from_image(entry["image"], entry["boxes"], args.out, args.seconds, args.fps, args.size,
                                     args.seed)
    else:
        make_panning_clip(args.out, args.seconds, image=args.image, data_dir=args.data, fps=args.fps,
                          size=args.size, seed=args.seed)
        truth = []
    if args.truth:
        args.truth.write_text(json.dumps({"frames": [[list(b) for b in frame] for frame in truth],
                                          "hard_frames": hard_frame_schedule(len(truth), args.seed)}))
    print(f"wrote {args.out} ({len(truth)} frames of ground truth)" if truth else f"wrote {args.out}")


if __name__ == "__main__":
    main()
