"""``dashcamd detect``, ``eval`` and ``export-onnx``: argument parsing lives in dashcamd/cli.py; each
function here returns the process exit code (0 ok, 1 some inputs failed, 2 unusable arguments/weights).

Results go to stdout; problems to stderr. Logging must be configured to stderr for ``detect --json``, so
that stdout stays one JSON object per line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dashcamd.detect.errors import DetectorError
from dashcamd.detect.evaluate import EXHAUSTIVE_CLASSES, ClassTally, summarise, tally_image
from dashcamd.detect.infer import Detection, Detector

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _read_rgb(path: Path) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB, or None when the file is not a readable image."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def find_images(paths: list[str]) -> list[Path]:
    """Files as given, plus images (IMAGE_SUFFIXES, any case) found recursively in folders, sorted."""
    found = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    return found


def _box_row(det: Detection) -> list[Any]:
    return [round(det.x1, 1), round(det.y1, 1), round(det.x2, 1), round(det.y2, 1), det.label, round(det.score, 4)]


def run_detect(paths: list[str], weights: Path, device: str, json_lines: bool,
               thresholds: Mapping[str, float] | None, inference_size: int, precision: str = "auto") -> int:
    """Detect in images/folders. json_lines: one ``{"image": path, "boxes": [[x1, y1, x2, y2, label,
    score], ...]}`` per image on stdout (frame pixels); otherwise one readable line per image."""
    try:
        images = find_images(paths)
        detector = Detector(weights, device=device, thresholds=thresholds, inference_size=inference_size,
                            precision=precision)
    except (FileNotFoundError, DetectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not images:
        print("error: no images found", file=sys.stderr)
        return EXIT_USAGE
    failed = 0
    for path in images:
        frame_rgb = _read_rgb(path)
        if frame_rgb is None:
            print(f"error: {path}: not a readable image", file=sys.stderr)
            failed += 1
            continue
        (detections,) = detector.detect([frame_rgb])
        rows = [_box_row(det) for det in detections]
        if json_lines:
            print(json.dumps({"image": str(path), "boxes": rows}), flush=True)
        else:
            described = ", ".join(f"{label} {score:.2f} at ({x1:.0f}, {y1:.0f})-({x2:.0f}, {y2:.0f})"
                                  for x1, y1, x2, y2, label, score in rows)
            print(f"{path}: {len(rows)} boxes{': ' + described if rows else ''}", flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def evaluate_set(detector: Detector, set_dir: Path, exhaustive_classes: set[str],
                 enlarge: Mapping[str, float] | None = None) -> dict[str, Any] | None:
    """Metrics of one ``<set>/annotations.json`` folder, or None when it has no labelled boxes.
    ``enlarge``: per-class factors for the hidden rule (see evaluate.py)."""
    records = json.loads((set_dir / "annotations.json").read_text())
    if not any(record.get("boxes") for record in records):
        return None
    tallies: dict[str, ClassTally] = {name: ClassTally() for name in detector.names}
    detect_s, evaluated, unreadable = 0.0, 0, []
    for start in range(0, len(records), detector.batch_size):
        batch = []
        for record in records[start:start + detector.batch_size]:
            frame_rgb = _read_rgb(set_dir / record["image"])
            if frame_rgb is None:
                unreadable.append(record["image"])
            else:
                batch.append((record, frame_rgb))
        if not batch:
            continue
        started = time.perf_counter()
        detections = detector.detect([frame for _, frame in batch])
        detect_s += time.perf_counter() - started
        for (record, _), frame_detections in zip(batch, detections):
            tally_image(tallies, record["boxes"], [list(det) for det in frame_detections], enlarge)
        evaluated += len(batch)
    return {
        "images": evaluated,
        "unreadable_images": unreadable,
        "detect_images_per_s": round(evaluated / detect_s, 2) if detect_s > 0 else None,
        "classes": {label: summarise(tally, label in exhaustive_classes)
                    for label, tally in sorted(tallies.items()) if tally.gt or label in exhaustive_classes},
    }


def _print_set(name: str, result: dict[str, Any]) -> None:
    print(f"{name}: {result['images']} images, {result['detect_images_per_s']} images/s (detection only)")
    for label, m in result["classes"].items():
        by_width = "  ".join(f"{bucket}: {b['hidden']}/{b['gt']}" for bucket, b in m["recall_by_width"].items())
        line = f"  {label:6s} recall {m['recall']} ({m['hidden']}/{m['gt']})  by width {by_width}"
        if "precision" in m:
            line += f"  precision {m['precision']} ({m['true_positives']}/{m['predictions']})"
        print(line)


def run_eval(data_dir: Path, weights: Path, device: str, thresholds: Mapping[str, float] | None,
             inference_size: int, json_out: Path | None = None, enlarge: Mapping[str, float] | None = None,
             precision: str = "auto") -> int:
    """Evaluate on every ``<set>/annotations.json`` under data_dir (see evaluate.py for the rules);
    print per set and class, and write the whole result as JSON to ``json_out`` when given.
    ``enlarge``: per-class factors applied to the detections before the hidden rule (None: as detected)."""
    data_dir = Path(data_dir)
    set_dirs = sorted(p.parent for p in data_dir.glob("*/annotations.json"))
    if not set_dirs:
        print(f"error: no <set>/annotations.json under {data_dir}", file=sys.stderr)
        return EXIT_USAGE
    try:
        detector = Detector(weights, device=device, thresholds=thresholds, inference_size=inference_size,
                            precision=precision)
    except DetectorError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    results: dict[str, Any] = {"weights": str(weights), "inference_size": inference_size,
                               "model_precision": detector.precision,
                               "thresholds": dict(thresholds or {}), "device": str(detector.device),
                               "enlarge": dict(enlarge or {}), "sets": {}}
    if enlarge:
        print("hidden = >= 80 % under detections enlarged as redacted: "
              + ", ".join(f"{label} x{factor:g}" for label, factor in enlarge.items()))
    failed = False
    for set_dir in set_dirs:
        result = evaluate_set(detector, set_dir, EXHAUSTIVE_CLASSES.get(set_dir.name, set()), enlarge)
        if result is None:
            print(f"{set_dir.name}: no labelled boxes, skipped")
            continue
        failed |= bool(result["unreadable_images"])
        results["sets"][set_dir.name] = result
        _print_set(set_dir.name, result)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")
    return EXIT_SOME_FAILED if failed else EXIT_OK


def run_export_onnx(weights: Path, out: Path, inference_size: int) -> int:
    """Export torch weights to ONNX (dynamic batch, square input of inference_size rounded up to 32)."""
    from dashcamd.detect.onnx_backend import export_onnx

    try:
        export_onnx(weights, out, inference_size)
    except DetectorError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out}")
    return EXIT_OK
