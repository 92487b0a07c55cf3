"""Interpreter-lock benchmark: how many milliseconds a frame each pipeline thread holds Python's lock.

Issue "speed", GPU half. On a many-core GPU host the pipeline stopped at ~118 frames/s with no inference at
all (README, "On a lent NVIDIA H200", ``replay``), with no thread near a core's limit. The four stage
threads share one interpreter, and the time each spends holding its lock adds up across them: a frame can
go no faster than their sum, however many cores there are. This measures that sum, and where it goes, on
any machine, so the work on it can be checked without a GPU.

    pip install py-spy   # a sampling profiler (a dev tool; not a dashcamd dependency)
    python bench/gil.py [--mode replay|full] [--processes auto|N] [--clip var/bench/speed_clip.mp4] [--rate 200]
                        [--top 8] [--json OUT]

How: ``replay`` (the default): one subprocess runs the detector over the clip through ``process_clip`` and
saves its answers; a second replays them through ``process_clip`` (everything but inference, as the speed
benchmark's ``replay``) under ``py-spy record --gil``, which keeps only the samples of the thread holding
the lock. ``full``: one subprocess under py-spy runs the real detector (after a warm-up batch), so the
detect thread's share includes what inference holds the lock for (on CUDA, every kernel launch). Samples in
the stage threads and under ``process_clip`` in the main thread, divided by the sampling rate and the
frames, give lock-held ms a frame per thread. ``--processes``: ``[redact] processes`` (helper processes
redacting outside this interpreter; the settings' "auto" picks none on fewer than 8 cores). Where threads
outnumber idle cores (2 cores here), a thread the system pre-empts while it holds the lock still counts as
holding it: figures there are upper bounds, unless ``--pace`` holds the replay to a rate that leaves the
cores idle part of the time.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(REPO_ROOT), str(BENCH_DIR)]

import pipeline as speed_bench  # noqa: E402  (bench/pipeline.py: its replay of the detector's answers)
import synth  # noqa: E402

# py-spy names each sample's thread; the main thread counts only inside process_clip (not start-up).
STAGE_THREADS = {"dashcamd-decode": "decode", "dashcamd-redact": "redact", "dashcamd-encode": "encode"}
MAIN_THREAD, MAIN_STAGE, MAIN_WINDOW = "MainThread", "detect+track", "process_clip ("


class _PacedReplay(speed_bench._ReplayDetector):
    """The speed benchmark's replay of recorded answers, held to ``pace_fps`` frames a second when set."""

    def __init__(self, detector, recorded: list[list], pace_fps: float) -> None:
        super().__init__(detector, recorded)
        self._pace_fps = pace_fps
        self._started: float | None = None

    def detect(self, frames_rgb, source_hw=None) -> list[list]:
        if self._pace_fps:
            self._started = self._started or time.monotonic()
            time.sleep(max(0.0, self._started + self._replayed / self._pace_fps - time.monotonic()))
        return super().detect(frames_rgb, source_hw)


def run_child(mode: str, clip: Path, answers_path: Path, work: Path, report_path: Path | None,
              processes: str, pace_fps: float) -> None:
    """``record``: save the detector's answers for ``clip``; ``replay``: process it with them; ``full``: process
    it with the detector itself. The last two write the clip's report as JSON."""
    import structlog

    from dashcamd.config import load_settings
    from dashcamd.media import probe
    from dashcamd.pipeline import load_detector, process_clip

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    overrides: dict = {"paths": {"watch": [str(work / "watch")], "output": str(work / "output"),
                                 "state": str(work / "state")}}
    if processes != "auto":
        overrides["redact"] = {"processes": int(processes)}
    settings = load_settings(None, overrides)
    detector = load_detector(settings)
    output = work / f"{mode}.mp4"
    if mode == "record":
        recorder = speed_bench._ReplayDetector(detector)
        recorder.record(clip, output, settings)
        answers_path.write_bytes(pickle.dumps(recorder.recorded))
        return
    if mode == "full":
        import numpy as np

        info = probe(clip)
        blank = np.zeros((*detector.resized_size(info.height, info.width), 3), np.uint8)
        detector.detect([blank] * settings.detector.batch_size, source_hw=(info.height, info.width))  # warm-up
    else:
        detector = _PacedReplay(detector, pickle.loads(answers_path.read_bytes()), pace_fps)
    report = process_clip(clip, output, settings, detector)
    report_path.write_text(json.dumps(report.as_fields()))


def lock_held_by_thread(raw_samples: Path, rate_hz: float, frames: int, top: int) -> dict:
    """From py-spy's raw output (``thread (id): name;frame;frame... count``): lock-held ms a frame per stage,
    and each stage's ``top`` innermost dashcamd lines."""
    held: collections.Counter = collections.Counter()
    lines: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in raw_samples.read_text().splitlines():
        stack, count = row.rsplit(" ", 1)
        thread, *frames_in_stack = stack.split(";")
        name = thread.split(": ", 1)[-1].rstrip("0123456789 ")  # py-spy appends a sample index to some names
        if name in STAGE_THREADS:
            stage = STAGE_THREADS[name]
        elif name == MAIN_THREAD and any(f.startswith(MAIN_WINDOW) for f in frames_in_stack):
            stage = MAIN_STAGE
        else:
            continue
        held[stage] += int(count)
        ours = [f for f in frames_in_stack if "dashcamd/" in f]
        lines[stage][ours[-1] if ours else (frames_in_stack or ["(no Python frame)"])[-1]] += int(count)
    per_frame = {stage: 1000 * n / rate_hz / frames for stage, n in held.items()}
    return {
        "ms_per_frame": {stage: round(ms, 2) for stage, ms in sorted(per_frame.items())},
        "total_ms_per_frame": round(sum(per_frame.values()), 2),
        "top_lines": {stage: [(where, round(1000 * n / rate_hz / frames, 2)) for where, n in c.most_common(top)]
                      for stage, c in lines.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("replay", "full"), default="replay",
                        help="replay: the detector's answers replayed (all but inference); full: the real detector")
    parser.add_argument("--processes", default="auto", help="[redact] processes: auto or a number")
    parser.add_argument("--pace", type=float, default=0.0,
                        help="replay: hold the pipeline to this many frames/s, so that it leaves cores idle")
    parser.add_argument("--clip", type=Path, default=REPO_ROOT / "var/bench/speed_clip.mp4",
                        help="made by bench/synth.py (the speed clip) when missing")
    parser.add_argument("--rate", type=float, default=200, help="py-spy samples a second")
    parser.add_argument("--top", type=int, default=8, help="lines shown per thread")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("record", "replay", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--answers", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.clip, args.answers, args.work, args.report, args.processes, args.pace)
        return 0
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        parser.error("py-spy is not on PATH (pip install py-spy)")
    if not args.clip.exists():
        args.clip.parent.mkdir(parents=True, exist_ok=True)
        synth.make_panning_clip(str(args.clip), seconds=20)
    with tempfile.TemporaryDirectory(prefix="dashcamd-gil-") as temp:
        work = Path(temp)
        child = [sys.executable, str(Path(__file__).resolve()), "--clip", str(args.clip), "--work", str(work),
                 "--answers", str(work / "answers.pkl"), "--report", str(work / "report.json"),
                 "--processes", args.processes, "--pace", str(args.pace)]
        if args.mode == "replay":
            subprocess.run([*child, "--child", "record"], check=True)
        raw = work / "samples.txt"
        subprocess.run([py_spy, "record", "--gil", "--threads", "--nonblocking", "--rate", str(int(args.rate)),
                        "--format", "raw", "--output", str(raw), "--", *child, "--child", args.mode], check=True)
        report = json.loads((work / "report.json").read_text())
        result = {"mode": args.mode, "processes": args.processes, "pace_fps": args.pace, "clip": str(args.clip),
                  "frames": report["frames"], "fps": report["fps"],
                  "rate_hz": args.rate, **lock_held_by_thread(raw, args.rate, report["frames"], args.top)}
    print(f"\n{args.mode} run of {result['clip']} (redaction processes: {args.processes}): {result['frames']} frames "
          f"at {result['fps']} frames/s")
    print("interpreter lock held, ms a frame: " + ", ".join(f"{stage} {ms}" for stage, ms in
                                                            result["ms_per_frame"].items())
          + f"; total {result['total_ms_per_frame']} (a ceiling of "
            f"{1000 / max(result['total_ms_per_frame'], 1e-9):.0f} frames/s on any number of cores)")
    for stage, where in result["top_lines"].items():
        print(f"\n{stage}:")
        for line, ms in where:
            print(f"  {ms:6.2f}  {line}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
