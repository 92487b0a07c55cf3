"""Leak benchmark: how much of each ground-truth face and plate the redaction misses, frame by frame.

Issue "redaction that never flickers". Clips are made from the eval photos (bench/synth.py), decoded
from h264 (the detector must see compression artefacts) and run through the detector once per frame;
the detections are cached, and every variant (per-frame detection, frame memory, tracker; strides 1-3)
is then evaluated offline through the real ``TemporalFilter`` and the redactor's real mask shapes.

    python bench/leak.py [--clips 16] [--seconds 3] [--json OUT] [--work DIR]

See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(REPO_ROOT), str(BENCH_DIR)]  # this checkout's dashcamd, and synth.py beside us

import numpy as np  # noqa: E402
import structlog  # noqa: E402

import synth  # noqa: E402
from dashcamd.config import RedactSettings, Settings, load_settings  # noqa: E402
from dashcamd.redact import region_mask  # noqa: E402
from dashcamd.track import RedactBox, TemporalFilter  # noqa: E402

DEFAULT_SETS = ("openimages_plates_roboflow", "openalpr_us", "openalpr_br", "widerface_val_subset")
COVERED_FRACTION = 0.8  # a ground-truth box this much inside fully redacted pixels is covered (issue spec)
MAX_FLASH_FRAMES = 3  # a leak of 1-3 frames between covered frames is a "flash" (issue spec)
STRIDES = (1, 2, 3)
MODES = ("per-frame", "memory", "tracker")
# Object size buckets: sqrt(box area) in clip pixels.
SIZE_BUCKETS = ((0, 16), (16, 32), (32, 64), (64, 128), (128, math.inf))
TARGET_LEAK_RATIO = 1 / 3
TARGET_LEAK_FRACTION = 0.03


# ------------------------------------------------------------------------------------------ clips


@dataclass
class Clip:
    """One synthetic clip: where it is, where it came from, its ground truth and (later) its detections."""

    name: str
    set_name: str
    image: str
    seed: int
    path: Path
    truth: list[list[synth.GtBox]]
    hard: dict[int, str]
    detections: list[list[list]] = field(default_factory=list)  # per frame: [x1, y1, x2, y2, label, score]


def pick_images(data_dir: Path, sets: Sequence[str], count: int, seed: int) -> list[dict]:
    """``count`` annotated photos with at least one box, spread evenly over ``sets``, fixed by ``seed``;
    interleaved by set so that a smaller --clips still mixes faces and plates."""
    rng = np.random.default_rng(seed)
    per_set: list[list[dict]] = []
    for k, set_name in enumerate(sets):
        entries = [e for e in synth.load_annotations(data_dir, set_name) if e["boxes"]]
        want = count // len(sets) + (1 if k < count % len(sets) else 0)
        chosen = rng.choice(len(entries), size=min(want, len(entries)), replace=False)
        per_set.append([entries[i] for i in sorted(chosen)])
    picked = []
    for row in range(max((len(p) for p in per_set), default=0)):
        picked.extend(p[row] for p in per_set if row < len(p))
    return picked


def make_clips(entries: list[dict], work: Path, seconds: float, fps: int, size: tuple[int, int],
               seed: int) -> list[Clip]:
    """Render each clip once; an existing file in ``work`` with the same parameters is reused."""
    clips = []
    for i, entry in enumerate(entries):
        clip_seed = seed * 1000 + i
        stem = Path(entry["image"]).stem[:24]
        name = f"{i:02d}-{entry['set']}-{stem}"
        path = work / f"{name}-s{clip_seed}-{seconds:g}s-{size[0]}x{size[1]}-{fps}.mp4"
        if path.exists():
            truth = synth.clip_truth((entry["width"], entry["height"]), entry["boxes"], seconds, fps, size, clip_seed)
        else:
            started = time.monotonic()
            truth = synth.make_clip_from_image(entry["image"], entry["boxes"], path, seconds, fps, size, clip_seed)
            _progress(f"clip {i + 1}/{len(entries)} {name}: rendered in {time.monotonic() - started:.1f} s")
        clips.append(Clip(name, entry["set"], entry["image"], clip_seed, path, truth,
                          synth.hard_frame_schedule(len(truth), clip_seed)))
    return clips


# ------------------------------------------------------------------------------------- detection


def _detection_key(settings: Settings) -> str:
    """What the cached detections depend on: the weights' bytes, their int8 ranges (precision "auto" is
    int8 on the CPU only where those exist) and the detector settings."""
    from dashcamd.detect.quantize import ranges_path

    d = settings.detector
    digest = hashlib.sha256(Path(d.weights).read_bytes()).hexdigest()[:16]
    ranges = ranges_path(Path(d.weights))
    ranges_digest = hashlib.sha256(ranges.read_bytes()).hexdigest()[:16] if ranges.is_file() else None
    return json.dumps({"weights": digest, "int8_ranges": ranges_digest, "size": d.inference_size,
                       "thresholds": settings.detector_thresholds(),
                       "iou": d.iou_threshold, "device": d.device, "precision": d.precision,
                       "resize": "decoder-area"}, sort_keys=True)


def detect_clips(clips: list[Clip], settings: Settings) -> dict:
    """Fill ``clip.detections`` (detector run on every decoded frame, once); cached beside each clip."""
    from dashcamd.media import ClipReader, probe
    from dashcamd.pipeline import load_detector

    key = _detection_key(settings)
    detector = None
    frames_run, seconds_run = 0, 0.0
    for n, clip in enumerate(clips):
        cache = clip.path.with_suffix(".detections.json")
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key and len(cached["frames"]) == len(clip.truth):
                clip.detections = cached["frames"]
                continue
        if detector is None:
            detector = load_detector(settings)
        started = time.monotonic()
        per_frame: list[list[list]] = []
        batch: list[np.ndarray] = []
        # Frames reach the detector as in the pipeline: shrunk by the decoder's scaler.
        info = probe(clip.path)
        source_hw = (info.height, info.width)
        with ClipReader(clip.path, info=info, detector_size=detector.resized_size(*source_hw)) as reader:
            for frame in reader.frames():
                batch.append(frame.detector_rgb)
                if len(batch) == settings.detector.batch_size:
                    per_frame.extend(_as_lists(detector.detect(batch, source_hw=source_hw)))
                    batch = []
        if batch:
            per_frame.extend(_as_lists(detector.detect(batch, source_hw=source_hw)))
        if len(per_frame) != len(clip.truth):
            raise RuntimeError(f"{clip.path}: decoded {len(per_frame)} frames, ground truth has {len(clip.truth)}")
        elapsed = time.monotonic() - started
        frames_run += len(per_frame)
        seconds_run += elapsed
        clip.detections = per_frame
        cache.write_text(json.dumps({"key": key, "frames": per_frame}))
        _progress(f"clip {n + 1}/{len(clips)} {clip.name}: decoded + detected {len(per_frame)} frames "
                  f"in {elapsed:.1f} s")
    return {"frames": frames_run, "seconds": round(seconds_run, 2),
            "ms_per_frame": round(1000 * seconds_run / frames_run, 1) if frames_run else None,
            "device": str(detector.device) if detector is not None else "cached"}


def _as_lists(per_frame) -> list[list[list]]:
    return [[[round(d.x1, 2), round(d.y1, 2), round(d.x2, 2), round(d.y2, 2), d.label, round(d.score, 4)]
             for d in dets] for dets in per_frame]


# ------------------------------------------------------------------------------------- evaluation


def variant_settings(base: RedactSettings, mode: str, memory: int) -> RedactSettings:
    """per-frame: each frame's own (or, at stride > 1, the last) detections; memory: plus the last
    ``memory`` frames' detections; tracker: the settings as configured (defaults: tracking on)."""
    if mode == "per-frame":
        return base.model_copy(update={"track": False, "frame_memory": 0})
    if mode == "memory":
        return base.model_copy(update={"track": False, "frame_memory": memory})
    return base


def redacted_boxes(detections: list[list[list]], settings: RedactSettings, frame_size: tuple[int, int],
                   stride: int, start_thresholds: dict[str, float]) -> list[list[RedactBox]]:
    """What the pipeline would redact per frame: detections on frames index % stride == 0 only, through
    the real TemporalFilter (tracking, memory, padding, enlargement; detections below ``start_thresholds``
    only continue tracks)."""
    temporal = TemporalFilter(settings, frame_size, stride, start_thresholds)
    out: list[list[RedactBox]] = [[] for _ in detections]
    final = []
    for index, dets in enumerate(detections):
        final.extend(temporal.push(index, dets if index % stride == 0 else None))
    final.extend(temporal.flush())
    for index, boxes in final:
        out[index] = boxes
    return out


class _Tally:
    """Counts for one variant over any number of clips; ``summary()`` turns them into fractions."""

    def __init__(self) -> None:
        self.object_frames = 0
        self.leaked = 0
        self.by_class: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [leaked, total]
        self.by_size: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.by_condition: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.flashes = 0
        self.frames = 0
        self.frame_px = 0
        self.over_px = 0
        self.gt_px = 0
        self.coverage_sum = 0.0

    def add(self, other: _Tally) -> None:
        for name in ("object_frames", "leaked", "flashes", "frames", "frame_px", "over_px", "gt_px", "coverage_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.by_class, other.by_class), (self.by_size, other.by_size),
                             (self.by_condition, other.by_condition)):
            for key, (leaked, total) in theirs.items():
                mine[key][0] += leaked
                mine[key][1] += total

    def summary(self) -> dict:
        def frac(leaked: int, total: int) -> float | None:
            return round(leaked / total, 5) if total else None

        return {
            "object_frames": self.object_frames,
            "leaked_object_frames": self.leaked,
            "leaked_fraction": frac(self.leaked, self.object_frames),
            "mean_coverage": round(self.coverage_sum / self.object_frames, 4) if self.object_frames else None,
            "flashes": self.flashes,
            "over_blur_frame_fraction": round(self.over_px / self.frame_px, 5) if self.frame_px else None,
            "over_blur_per_gt_area": round(self.over_px / self.gt_px, 3) if self.gt_px else None,
            "leaked_by_class": {k: {"leaked": v[0], "total": v[1], "fraction": frac(*v)}
                                for k, v in sorted(self.by_class.items())},
            "leaked_by_size_px": {k: {"leaked": v[0], "total": v[1], "fraction": frac(*v)}
                                  for k, v in _size_order(self.by_size)},
            "leaked_by_condition": {k: {"leaked": v[0], "total": v[1], "fraction": frac(*v)}
                                    for k, v in sorted(self.by_condition.items())},
        }


def _size_label(size_px: float) -> str:
    for lo, hi in SIZE_BUCKETS:
        if lo <= size_px < hi:
            return f"{lo}-{hi}" if math.isfinite(hi) else f">={lo}"
    return "?"


def _size_order(by_size: dict) -> list:
    order = [_size_label(lo) for lo, _ in SIZE_BUCKETS]
    return [(k, by_size[k]) for k in order if k in by_size]


def score_clip(clip: Clip, boxes_per_frame: list[list[RedactBox]], frame_size: tuple[int, int], feather: float,
               alpha_min: float) -> _Tally:
    """Coverage of each ground-truth box by the redacted pixels, flashes per object, over-blur.

    Redacted pixels are rasterised with ``dashcamd.redact.region_mask``, the redactor's own shapes
    (ellipse through the box corners for faces, box with a feathered rim for plates). A pixel counts as
    covering ground truth when its alpha >= ``alpha_min`` (default 1: fully redacted; the feather rim
    is a blend that leaves part of the original visible). Over-blur counts every pixel the redactor
    touches at all (alpha > 0) outside every ground-truth box.
    """
    width, height = frame_size
    alpha = np.zeros((height, width), np.float32)
    gt_mask = np.zeros((height, width), bool)
    tally = _Tally()
    covered_at: dict[int, dict[int, bool]] = defaultdict(dict)  # obj -> frame -> covered
    for index, (truth, boxes) in enumerate(zip(clip.truth, boxes_per_frame)):
        touched = []
        for box in boxes:
            planned = region_mask(box, frame_size, feather)
            if planned is None:
                continue
            region, mask = planned
            roi = alpha[region.y0:region.y1, region.x0:region.x1]
            np.maximum(roi, mask, out=roi)
            touched.append((region.x0, region.y0, region.x1, region.y1))
        condition = clip.hard.get(index, "normal")
        gt_slices = []
        for gt in truth:
            x0, x1 = pixel_span(gt.x1, gt.x2, width)
            y0, y1 = pixel_span(gt.y1, gt.y2, height)
            gt_slices.append((x0, y0, x1, y1))
            covered_fraction = float(np.count_nonzero(alpha[y0:y1, x0:x1] >= alpha_min)) / ((x1 - x0) * (y1 - y0))
            covered = covered_fraction >= COVERED_FRACTION
            tally.object_frames += 1
            tally.coverage_sum += covered_fraction
            tally.gt_px += (x1 - x0) * (y1 - y0)
            for bucket, key in ((tally.by_class, gt.label),
                                (tally.by_size, _size_label(math.sqrt((gt.x2 - gt.x1) * (gt.y2 - gt.y1)))),
                                (tally.by_condition, condition)):
                bucket[key][1] += 1
                bucket[key][0] += not covered
            tally.leaked += not covered
            covered_at[gt.obj][index] = covered
        if touched:
            # Over-blur only where something was drawn: the bounding box of all regions of this frame.
            bx0, by0 = min(t[0] for t in touched), min(t[1] for t in touched)
            bx1, by1 = max(t[2] for t in touched), max(t[3] for t in touched)
            for x0, y0, x1, y1 in gt_slices:
                gt_mask[y0:y1, x0:x1] = True
            drawn = alpha[by0:by1, bx0:bx1] > 0
            tally.over_px += int(np.count_nonzero(drawn & ~gt_mask[by0:by1, bx0:bx1]))
            for x0, y0, x1, y1 in gt_slices:
                gt_mask[y0:y1, x0:x1] = False
            alpha[by0:by1, bx0:bx1] = 0.0
        tally.frames += 1
        tally.frame_px += width * height
    tally.flashes = sum(count_flashes(frames) for frames in covered_at.values())
    return tally


def pixel_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Pixels whose centres lie in [lo, hi), at least one, inside [0, limit)."""
    start = min(max(int(math.floor(lo + 0.5)), 0), limit - 1)
    end = min(max(int(math.floor(hi + 0.5)), start + 1), limit)
    return start, end


def count_flashes(covered_at: dict[int, bool]) -> int:
    """Runs of 1..MAX_FLASH_FRAMES consecutive uncovered frames with a covered frame right before and
    right after (the object visible for a blink while it is otherwise hidden)."""
    flashes = 0
    run = 0
    previous_covered = False  # was the frame just before the current run present and covered?
    last_index = None
    for index in sorted(covered_at):
        if last_index is not None and index != last_index + 1:  # object left the frame: chain broken
            run, previous_covered = 0, False
        if covered_at[index]:
            if previous_covered and 1 <= run <= MAX_FLASH_FRAMES:
                flashes += 1
            run, previous_covered = 0, True
        elif previous_covered:
            run += 1
        last_index = index
    return flashes


# ----------------------------------------------------------------------------------------- report


def _variant_name(mode: str, stride: int) -> str:
    return f"{mode} s{stride}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def print_report(clips: list[Clip], per_clip: dict[str, dict[str, dict]], total: dict[str, dict],
                 target: dict, detect_info: dict, args: argparse.Namespace, weights: Path) -> None:
    variants = list(total)
    print(f"\nleak benchmark: {len(clips)} clips x {args.seconds:g} s at {args.size[0]}x{args.size[1]} "
          f"{args.fps} fps; weights {weights}; inference {args.inference_size or 'default'}; "
          f"detector {detect_info.get('device')} {detect_info.get('ms_per_frame') or '-'} ms/frame")
    print(f"covered = >= {COVERED_FRACTION:.0%} of the GT box under fully redacted pixels "
          f"(alpha >= {args.alpha_min:g}); flash = 1-{MAX_FLASH_FRAMES} uncovered frames between covered ones\n")
    print("leaked object-frames % / flashes, per clip")
    header = f"{'clip':44} {'obj':>4} {'obj-fr':>6} " + " ".join(f"{v:>13}" for v in variants)
    print(header)
    for clip in clips:
        cells = per_clip[clip.name]
        first = next(iter(cells.values()))
        objects = len({gt.obj for frame in clip.truth for gt in frame})
        row = f"{clip.name[:44]:44} {objects:>4} {first['object_frames']:>6} "
        row += " ".join(f"{_pct(cells[v]['leaked_fraction']) + '/' + str(cells[v]['flashes']):>13}" for v in variants)
        print(row)
    row = f"{'TOTAL':44} {'':>4} {next(iter(total.values()))['object_frames']:>6} "
    row += " ".join(f"{_pct(total[v]['leaked_fraction']) + '/' + str(total[v]['flashes']):>13}" for v in variants)
    print(row)

    print("\ntotals per variant (leaked %; over-blur: % of frame area, and x GT area)")
    classes = sorted({k for v in variants for k in total[v]["leaked_by_class"]})
    conditions = sorted({k for v in variants for k in total[v]["leaked_by_condition"]})
    sizes = [k for k, _ in _size_order({k: 0 for v in variants for k in total[v]["leaked_by_size_px"]})]
    columns = (["leaked", "flashes", "over%", "overxGT", "cover"] + [f"{c}" for c in classes]
               + [f"{c}" for c in conditions] + [f"px{s}" for s in sizes])
    print(f"{'variant':14} " + " ".join(f"{c[:11]:>11}" for c in columns))
    for v in variants:
        t = total[v]
        cells = [_pct(t["leaked_fraction"], 2), str(t["flashes"]), _pct(t["over_blur_frame_fraction"], 2),
                 "-" if t["over_blur_per_gt_area"] is None else f"{t['over_blur_per_gt_area']:.2f}",
                 _pct(t["mean_coverage"])]
        cells += [_pct(t["leaked_by_class"].get(c, {}).get("fraction")) for c in classes]
        cells += [_pct(t["leaked_by_condition"].get(c, {}).get("fraction")) for c in conditions]
        cells += [_pct(t["leaked_by_size_px"].get(s, {}).get("fraction")) for s in sizes]
        print(f"{v:14} " + " ".join(f"{c:>11}" for c in cells))
    counts = {c: total[variants[0]]["leaked_by_condition"][c]["total"] for c in conditions}
    size_counts = {s: total[variants[0]]["leaked_by_size_px"][s]["total"] for s in sizes}
    print(f"object-frames per condition: {counts}; per size (sqrt area, px): {size_counts}")

    ratio = "-" if target["ratio"] is None else f"{target['ratio']:.2f}"
    print(f"\ntarget (default settings: {target['variant']} vs per-frame s1): "
          f"leaked {_pct(target['leaked_fraction'], 2)} % vs {_pct(target['baseline_leaked_fraction'], 2)} % "
          f"(ratio {ratio}, need <= {TARGET_LEAK_RATIO:.2f}; and <= {TARGET_LEAK_FRACTION:.0%}); "
          f"flashes {target['flashes']} (need 0): {'PASS' if target['pass'] else 'FAIL'}")
    if args.random_weights:
        print("(random weights: these numbers only prove that the benchmark runs)")


def compute_target(total: dict[str, dict], default_variant: str) -> dict:
    """The issue's acceptance test on the default settings."""
    mine, base = total[default_variant], total[_variant_name("per-frame", 1)]
    leaked, baseline = mine["leaked_fraction"], base["leaked_fraction"]
    ratio = None if leaked is None or not baseline else leaked / baseline
    ok_ratio = leaked is not None and (leaked == 0 or (ratio is not None and ratio <= TARGET_LEAK_RATIO))
    ok = ok_ratio and leaked is not None and leaked <= TARGET_LEAK_FRACTION and mine["flashes"] == 0
    return {"variant": default_variant, "leaked_fraction": leaked, "baseline_leaked_fraction": baseline,
            "ratio": None if ratio is None else round(ratio, 3), "flashes": mine["flashes"], "pass": bool(ok),
            "criteria": f"leaked <= {TARGET_LEAK_RATIO:.3f} x per-frame s1, leaked <= {TARGET_LEAK_FRACTION}, "
                        "flashes == 0"}


# ------------------------------------------------------------------------------------------- main


def build_settings(args: argparse.Namespace, work: Path) -> Settings:
    """The daemon's settings (config file, DASHCAMD_* env, then these options), as the pipeline gets them."""
    detector: dict = {}
    if args.weights is not None:
        detector["weights"] = str(args.weights)
    if args.inference_size:
        detector["inference_size"] = args.inference_size
    if args.device:
        detector["device"] = args.device
    if args.precision:
        detector["precision"] = args.precision
    detector["torch_threads"] = args.threads if args.threads else (os.cpu_count() or 1)
    overrides = {"detector": detector}
    if args.config is None:
        overrides["paths"] = {"watch": [str(work / "watch")], "output": str(work / "output"),
                              "state": str(work / "state")}
    return load_settings(args.config, overrides)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=synth.DEFAULT_DATA, help="folder with eval/<set>/")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS))
    parser.add_argument("--clips", type=int, default=16, help="number of photos/clips, spread over --sets")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each clip")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--size", type=synth.parse_size, default=(1920, 1080), help="clip size WxH")
    parser.add_argument("--seed", type=int, default=1, help="picks the photos and the camera paths")
    parser.add_argument("--weights", type=Path, help="detector weights (default: the settings' default)")
    parser.add_argument("--random-weights", action="store_true",
                        help="use a random-weights YOLOv5n (smoke run before trained weights exist)")
    parser.add_argument("--config", type=Path, help="take detector/redact settings from this dashcamd config")
    parser.add_argument("--inference-size", type=int, default=0, help="detector input long side (0: settings)")
    parser.add_argument("--device", help="cpu | cuda | auto (default: settings)")
    parser.add_argument("--precision", help="detector precision: auto | fp32 | fp16 | bf16 | int8 (default: settings)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: all cores; nothing else runs beside the detector here)")
    parser.add_argument("--memory", type=int, default=3, help="frame_memory of the 'memory' variant")
    parser.add_argument("--alpha-min", type=float, default=1.0,
                        help="mask alpha that counts as redacted for coverage (1 = fully redacted)")
    parser.add_argument("--work", type=Path,
                        help="keep clips and cached detections here and reuse them (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_logs()
    work = args.work or Path(tempfile.mkdtemp(prefix="dashcamd-leak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.random_weights:
            args.weights = synth.make_random_weights(work / "random-yolov5n.pt", args.data)
        settings = build_settings(args, work)
        weights = Path(settings.detector.weights)
        if not weights.is_file():
            print(f"weights {weights} not found: pass --weights, or --random-weights for a smoke run",
                  file=sys.stderr)
            return 2
        args.inference_size = settings.detector.inference_size
        started = time.monotonic()
        entries = pick_images(args.data, args.sets, args.clips, args.seed)
        clips = make_clips(entries, work, args.seconds, args.fps, args.size, args.seed)
        detect_info = detect_clips(clips, settings)
        _progress("evaluating variants")
        per_clip: dict[str, dict[str, dict]] = {}
        totals: dict[str, _Tally] = {}
        for clip in clips:
            per_clip[clip.name] = {}
            for mode in MODES:
                redact = variant_settings(settings.redact, mode, args.memory)
                for stride in STRIDES:
                    name = _variant_name(mode, stride)
                    boxes = redacted_boxes(clip.detections, redact, args.size, stride,
                                           settings.detector.thresholds)
                    tally = score_clip(clip, boxes, args.size, redact.feather, args.alpha_min)
                    per_clip[clip.name][name] = tally.summary()
                    totals.setdefault(name, _Tally()).add(tally)
        total = {name: tally.summary() for name, tally in totals.items()}
        default_variant = _variant_name("tracker", settings.detector.detection_stride)
        if default_variant not in total:  # a configured stride beyond 3: evaluate it too
            tally = _Tally()
            for clip in clips:
                boxes = redacted_boxes(clip.detections, settings.redact, args.size, settings.detector.detection_stride,
                                       settings.detector.thresholds)
                tally.add(score_clip(clip, boxes, args.size, settings.redact.feather, args.alpha_min))
            total[default_variant] = tally.summary()
        target = compute_target(total, default_variant)
        print_report(clips, per_clip, total, target, detect_info, args, weights)
        print(f"\n(total {time.monotonic() - started:.0f} s; work dir {work if args.work else 'temporary'})")
        if args.json:
            args.json.write_text(json.dumps({
                "settings": {"weights": str(weights), "detector": settings.detector.model_dump(mode="json"),
                             "redact": settings.redact.model_dump(mode="json"), "memory_variant": args.memory,
                             "alpha_min": args.alpha_min, "covered_fraction": COVERED_FRACTION,
                             "clip_size": list(args.size), "fps": args.fps, "seconds": args.seconds,
                             "random_weights": args.random_weights},
                "detector": detect_info,
                "clips": [{"name": c.name, "set": c.set_name, "image": c.image, "seed": c.seed,
                           "frames": len(c.truth), "hard_frames": {str(k): v for k, v in sorted(c.hard.items())},
                           "variants": per_clip[c.name]} for c in clips],
                "total": total,
                "target": target,
            }, indent=1))
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _quiet_logs() -> None:
    """dashcamd logs info lines on stdout; here they would break the table. Warnings go to stderr."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
