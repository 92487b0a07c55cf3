"""Stride agreement on real footage: what detecting every k-th frame gives up against detecting every frame.

The leak benchmark measures coverage against ground truth, but on clips made from still photos. Real
clips have no ground truth, so here the reference is the pipeline itself at stride 1: every box the
detector found in a frame ("detected" in the box sidecar). A reference box counts as covered at stride k
when at least 80 % of it lies under fully redacted pixels of the stride-k run's same frame (the
redactor's own shapes, as in bench/leak.py). Each clip runs through ``process_clip`` once per stride with
the default settings otherwise; outputs go to a temporary folder.

    python bench/stride_agreement.py CLIP... [--strides 2 3] [--json OUT] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]  # this checkout's dashcamd, and leak.py beside us

import numpy as np  # noqa: E402
import structlog  # noqa: E402

from dashcamd.boxes import RedactBox  # noqa: E402
from dashcamd.config import Settings, load_settings  # noqa: E402
from dashcamd.media import probe  # noqa: E402
from dashcamd.pipeline import load_detector, process_clip  # noqa: E402
from dashcamd.redact import region_mask  # noqa: E402
from leak import COVERED_FRACTION, pixel_span  # noqa: E402


def settings_for(stride: int, work: Path, config: Path | None) -> Settings:
    overrides = {"detector": {"detection_stride": stride}}
    if config is None:
        overrides["paths"] = {"watch": [str(work / "watch")], "output": str(work / "output"),
                              "state": str(work / "state")}
    return load_settings(config, overrides)


def redacted_per_frame(clip: Path, stride: int, detector, work: Path, config: Path | None) -> list[list[RedactBox]]:
    """Run the pipeline at this stride; return the redacted boxes of every frame (from the box sidecar)."""
    settings = settings_for(stride, work, config)
    sidecar = work / f"{clip.stem}-s{stride}.boxes.jsonl"
    output = work / "output" / f"{clip.stem}-s{stride}.mp4"
    report = process_clip(clip, output, settings, detector, boxes_path=sidecar)
    output.unlink()
    frames: list[list[RedactBox]] = [[] for _ in range(report.frames)]
    for line in sidecar.read_text().splitlines():
        entry = json.loads(line)
        frames[entry["frame"]] = [RedactBox(*box) for box in entry["boxes"]]
    return frames


def agreement(reference: list[list[RedactBox]], candidate: list[list[RedactBox]], frame_size: tuple[int, int],
              feather: float) -> dict:
    """Share of the reference's detected boxes that the candidate's redaction covers, overall and per class."""
    width, height = frame_size
    alpha = np.zeros((height, width), np.float32)
    total, covered = Counter(), Counter()
    for ref_boxes, cand_boxes in zip(reference, candidate):
        for box in cand_boxes:
            planned = region_mask(box, frame_size, feather)
            if planned is not None:
                region, mask = planned
                roi = alpha[region.y0:region.y1, region.x0:region.x1]
                np.maximum(roi, mask, out=roi)
        for box in ref_boxes:
            if box.source != "detected":
                continue
            x0, x1 = pixel_span(box.x1, box.x2, width)
            y0, y1 = pixel_span(box.y1, box.y2, height)
            inside = np.count_nonzero(alpha[y0:y1, x0:x1] >= 1.0) / ((x1 - x0) * (y1 - y0))
            total[box.label] += 1
            covered[box.label] += int(inside >= COVERED_FRACTION)
        alpha[:] = 0.0
    result = {"reference_boxes": sum(total.values()),
              "covered": round(sum(covered.values()) / max(1, sum(total.values())), 4)}
    for label in sorted(total):
        result[label] = {"reference_boxes": total[label], "covered": round(covered[label] / total[label], 4)}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="+", type=Path)
    parser.add_argument("--strides", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--config", type=Path, help="dashcamd config to take the other settings from")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = {}
    with tempfile.TemporaryDirectory(prefix="dashcamd-stride-") as tmp:
        work = Path(tmp)
        base = settings_for(1, work, args.config)
        detector = load_detector(base)
        for clip in args.clips:
            info = probe(clip)
            reference = redacted_per_frame(clip, 1, detector, work, args.config)
            per_stride = {}
            for stride in args.strides:
                candidate = redacted_per_frame(clip, stride, detector, work, args.config)
                per_stride[stride] = agreement(reference, candidate, (info.width, info.height), base.redact.feather)
                print(f"{clip.name}: stride {stride} covers {per_stride[stride]['covered']:.1%} of "
                      f"{per_stride[stride]['reference_boxes']} boxes detected at stride 1 "
                      f"{ {k: v for k, v in per_stride[stride].items() if isinstance(v, dict)} }", flush=True)
            results[clip.name] = {"width": info.width, "height": info.height, "frames": info.frame_count,
                                  "strides": per_stride}
    if args.json:
        args.json.write_text(json.dumps({"settings": {"detector": base.detector.model_dump(mode="json"),
                                                      "redact": base.redact.model_dump(mode="json")},
                                         "clips": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
