"""Speed benchmark: frames/s of decode alone, of decode + encode (the copy limit), and of the full pipeline.

Issue "speed". One 1080p30 h264 clip with audio (bench/synth.py pans a real dashcam photo, >= 20 s) is
processed by each measurement in a fresh subprocess, so peak RSS is per measurement and thread settings
apply from a clean start. Repetitions are interleaved (a slow spell on a shared machine hits every
measurement alike) and the median is reported.

    python bench/pipeline.py [--repeats 3] [--seconds 20] [--variants NAME...] [--json OUT] [--quick]

The copy limit is ``process_clip`` itself with a detector that finds nothing: the same reader, writer,
threads, queues, verification and publishing, minus detection and redaction. ``replay`` is ``process_clip``
with the real detector's boxes replayed at no cost: everything but inference, so ``full`` against
``replay`` against ``copy`` splits what inference costs from what tracking, redacting and encoding its
boxes cost. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(REPO_ROOT), str(BENCH_DIR)]  # this checkout's dashcamd, and synth.py beside us

import synth  # noqa: E402

INFERENCE_SIZES = (640, 960, 1280)
STRIDES = (1, 2, 3)
BATCH_SIZES = (1, 4, 8)
CUDA_BATCH_SIZES = (16, 32)  # a GPU wants larger batches than a CPU; only planned where CUDA is used
ENCODER_PRESETS = ("superfast", "veryfast")


@dataclass
class Measurement:
    """One thing to time. ``kind``: decode | copy | full | replay; ``overrides``: settings sections to change."""

    name: str
    kind: str
    what: str
    overrides: dict = field(default_factory=dict)


def plan_measurements(defaults: dict, cuda: bool) -> list[Measurement]:
    """decode, copy, full, then one variant per setting that differs from the default (a variant equal
    to the default would just be ``full`` again). ``defaults``: the detector settings in effect."""
    out = [
        Measurement("decode", "decode", "probe + decode (ClipReader), nothing else"),
        Measurement("copy", "copy", "process_clip with a detector that finds nothing: decode + encode + mux"),
        Measurement("full", "full", f"process_clip, default settings (size {defaults['inference_size']}, "
                                    f"stride {defaults['detection_stride']}, batch {defaults['batch_size']}, "
                                    f"torch threads {defaults['threads_resolved']}, "
                                    f"precision {defaults['precision']}, runtime {defaults['runtime']})"),
        Measurement("replay", "replay", "as full, with the detector's boxes replayed at no cost: all but inference"),
    ]
    for size in INFERENCE_SIZES:
        if size != defaults["inference_size"]:
            out.append(Measurement(f"size={size}", "full", f"inference size {size}",
                                   {"detector": {"inference_size": size}}))
    for stride in STRIDES:
        if stride != defaults["detection_stride"]:
            out.append(Measurement(f"stride={stride}", "full", f"detect 1 frame in {stride}",
                                   {"detector": {"detection_stride": stride}}))
    for batch in BATCH_SIZES + (CUDA_BATCH_SIZES if cuda else ()):
        if batch != defaults["batch_size"]:
            out.append(Measurement(f"batch={batch}", "full", f"batch size {batch}",
                                   {"detector": {"batch_size": batch}}))
    cpus = os.cpu_count() or 1
    for threads in sorted({1, 2, cpus}):
        if threads <= cpus and threads != defaults["threads_resolved"]:
            out.append(Measurement(f"threads={threads}", "full", f"torch CPU threads {threads}",
                                   {"detector": {"torch_threads": threads}}))
    # Precision: "auto" is fp16 on CUDA; on the CPU int8 (onnxruntime, weights with int8 ranges), else fp32.
    if cuda and defaults["precision"] != "fp32":
        out.append(Measurement("precision=fp32", "full", "CUDA in fp32 (default fp16)",
                               {"detector": {"precision": "fp32"}}))
    elif cuda:
        out.append(Measurement("precision=fp16", "full", "CUDA in fp16", {"detector": {"precision": "fp16"}}))
    else:
        for precision, what in (("fp32", "CPU fp32 (default: int8 where the weights have int8 ranges)"),
                                ("bf16", "CPU bf16 autocast on torch, channels_last")):
            if defaults["precision"] != precision:
                out.append(Measurement(f"precision={precision}", "full", what, {"detector": {"precision": precision}}))
    if not cuda:
        out.append(Measurement("runtime=torch", "full", "torch eager on the CPU instead of onnxruntime",
                               {"detector": {"runtime": "torch"}}))
    # The encoder is the floor on a CPU: what a faster x264 preset buys, and costs in bitrate.
    for preset in ENCODER_PRESETS:
        if preset != defaults["preset"]:
            out.append(Measurement(f"preset={preset}", "full", f"x264 preset {preset}",
                                   {"encoder": {"preset": preset}}))
            out.append(Measurement(f"copy:preset={preset}", "copy", f"copy limit with x264 preset {preset}",
                                   {"encoder": {"preset": preset}}))
    if defaults["weak_detections"]:
        out.append(Measurement("continue=off", "full", "no weak detections for the tracker (continue_threshold 1)",
                               {"redact": {"continue_threshold": 1.0}}))
    if defaults["encoder_nice"]:
        out.append(Measurement("nice=0", "full", "encoder threads at the detector's priority",
                               {"encoder": {"nice": 0}}))
    # Redaction in helper processes (dashcamd/redact_processes.py), which "auto" uses on many-core hosts only.
    processes = 0 if defaults["redaction_processes"] else 2
    out.append(Measurement(f"processes={processes}", "full", f"{processes} redaction helper processes",
                           {"redact": {"processes": processes}}))
    # dashcamd's tuning of veryfast (dashcamd/x264.py) against the plain preset, on both sides of the ratio.
    if defaults["preset"] == "veryfast" and defaults["x264_params"] is None:
        plain = {"encoder": {"x264_params": ""}}
        out.append(Measurement("x264=plain", "full", "x264 plain veryfast, without dashcamd's tuning", plain))
        out.append(Measurement("copy:x264=plain", "copy", "copy limit with plain veryfast", plain))
    return out


def select(measurements: list[Measurement], wanted: Sequence[str] | None) -> list[Measurement]:
    """``wanted``: exact names (``stride=2``) or groups (``stride`` = every ``stride=*``)."""
    if not wanted:
        return measurements
    chosen = [m for m in measurements if m.name in wanted or m.name.split("=")[0] in wanted]
    unknown = [w for w in wanted if not any(m.name == w or m.name.split("=")[0] == w for m in measurements)]
    if unknown:
        names = ", ".join(m.name for m in measurements)
        raise SystemExit(f"unknown variants {unknown}; available here: {names}")
    return chosen


# ------------------------------------------------------------------------------------------ child


class _NullDetector:
    """Finds nothing, instantly: turns process_clip into the copy limit without changing its code path."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.device = "none"

    def resized_size(self, frame_h: int, frame_w: int) -> None:
        return None  # no shrunk copy for the detector: the copy limit is decode + encode alone

    def detect(self, frames_rgb: Sequence, source_hw=None) -> list[list]:
        return [[] for _ in frames_rgb]


class _ReplayDetector:
    """The real detector's answers for one clip, recorded in an untimed first ``process_clip`` (so the
    calls, strides and batches are the pipeline's own), then handed back at no cost. ``recorded``: answers
    recorded before (e.g. by another process, as bench/gil.py does), to replay from the start."""

    def __init__(self, detector, recorded: list[list] | None = None) -> None:
        self._detector = detector
        self.names, self.device = detector.names, detector.device
        self.recorded: list[list] = [] if recorded is None else recorded
        self._replayed = 0
        self._replaying = recorded is not None

    def record(self, clip: Path, output: Path, settings) -> None:
        from dashcamd.pipeline import process_clip

        try:
            process_clip(clip, output, settings, self)
        finally:
            output.unlink(missing_ok=True)
        self._replaying = True

    def resized_size(self, frame_h: int, frame_w: int):
        return self._detector.resized_size(frame_h, frame_w)

    def detect(self, frames_rgb: Sequence, source_hw=None) -> list[list]:
        if not self._replaying:
            found = self._detector.detect(frames_rgb, source_hw=source_hw)
            self.recorded.extend(found)
            return found
        found = self.recorded[self._replayed:self._replayed + len(frames_rgb)]
        self._replayed += len(frames_rgb)
        return found


def _child_settings(spec: dict):
    from dashcamd.config import load_settings

    work = Path(spec["work"])
    overrides: dict = {k: dict(v) for k, v in spec["overrides"].items()}
    if spec.get("config") is None:
        overrides.setdefault("paths", {}).update(
            {"watch": [str(work / "watch")], "output": str(work / "output"), "state": str(work / "state")})
    return load_settings(Path(spec["config"]) if spec.get("config") else None, overrides)


def run_child(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns its numbers."""
    _quiet_logs()
    from dashcamd.media import ClipReader, probe
    from dashcamd.pipeline import load_detector, process_clip

    settings = _child_settings(spec)
    clip = Path(spec["clip"])
    result: dict = {"name": spec["name"], "kind": spec["kind"]}
    detector = None
    output = Path(spec["work"]) / "output" / f"{spec['name'].replace('=', '-')}-{os.getpid()}.mp4"
    if spec["kind"] in ("full", "replay"):
        started = time.monotonic()
        detector = load_detector(settings)
        result["load_s"] = round(time.monotonic() - started, 3)
        # The daemon's worker loads once and then runs clip after clip: time the steady state, so one
        # warm-up batch (lazy kernel set-up, CUDA autotuning) is run first and timed apart.
        info = probe(clip)
        import numpy as np

        source_hw = (info.height, info.width)
        blank = np.zeros((*detector.resized_size(*source_hw), 3), np.uint8)  # as the decoder hands them over
        started = time.monotonic()
        detector.detect([blank] * settings.detector.batch_size, source_hw=source_hw)
        result["warmup_s"] = round(time.monotonic() - started, 3)
        result["device"] = str(detector.device)
        result["precision"] = getattr(detector, "precision", None)
        result["runtime"] = getattr(detector, "runtime", None)
        if spec["kind"] == "replay":
            detector = _ReplayDetector(detector)
            detector.record(clip, output, settings)
    elif spec["kind"] == "copy":
        from dashcamd.config import CLASS_NAMES

        detector = _NullDetector(CLASS_NAMES)

    cpu_before = _cpu_s()
    started = time.monotonic()
    if spec["kind"] == "decode":
        info = probe(clip)  # as process_clip: probe once, hand the info to the reader
        frames = 0
        with ClipReader(clip, info=info) as reader:
            for _ in reader.frames():
                frames += 1
    else:
        try:
            report = process_clip(clip, output, settings, detector)
            result["output_mbit_s"] = round(output.stat().st_size * 8 / probe(output).duration_s / 1e6, 2)
        finally:
            output.unlink(missing_ok=True)
        frames = report.frames
        result["stage_cpu_ms_per_frame"] = report.cpu_ms_per_frame
        result["detections"] = report.detections
        result["redacted_frames"] = report.redacted_frames
    elapsed = time.monotonic() - started
    cpu = _cpu_s() - cpu_before
    self_kb = _peak_rss_kb()
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result.update({
        "frames": frames,
        "seconds": round(elapsed, 3),
        "fps": round(frames / elapsed, 2) if elapsed > 0 else None,
        "cpu_ms_per_frame": round(1000 * cpu / frames, 1) if frames else None,
        "peak_rss_mb": round((self_kb + children_kb) / 1024, 1),
        "settings": {"detector": settings.detector.model_dump(mode="json"),
                     "encoder": settings.encoder.model_dump(mode="json")},
    })
    if str(getattr(detector, "device", "")).startswith("cuda"):
        import torch

        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["cuda_device"] = torch.cuda.get_device_name(detector.device)
    return result


def _peak_rss_kb() -> int:
    """This process's peak resident set, in KiB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a parent that had
    imported torch would report the parent's peak (checked: a 10 MB child of a 300 MB parent says 312 MB).
    VmHWM belongs to the address space that exec created, so it is this measurement's alone.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_s() -> float:
    """This process's CPU seconds and its reaped children's (the redaction helpers, when there are any)."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def _quiet_logs() -> None:
    """dashcamd logs info lines on stdout; keep warnings, on stderr, where the parent shows them on failure."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


# ----------------------------------------------------------------------------------------- parent


def spawn(measurement: Measurement, clip: Path, work: Path, base_overrides: dict, config: Path | None,
          timeout_s: float | None) -> dict:
    """Run one measurement in a fresh interpreter; its numbers come back through a JSON file."""
    overrides = {section: dict(values) for section, values in base_overrides.items()}
    for section, values in measurement.overrides.items():
        overrides.setdefault(section, {}).update(values)
    spec = {"name": measurement.name, "kind": measurement.kind, "clip": str(clip), "work": str(work),
            "overrides": overrides, "config": str(config) if config else None}
    result_path = work / f"result-{measurement.name.replace('=', '-')}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--result", str(result_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"name": measurement.name, "error": f"timed out after {timeout_s} s"}
    if done.returncode != 0 or not result_path.exists():
        return {"name": measurement.name, "error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return json.loads(result_path.read_text())


def summarise(runs: list[dict], clip_fps: float) -> dict:
    """Median of the repetitions (and their spread) for one measurement."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"runs": len(runs), "ok": 0, "errors": [r["error"] for r in runs]}
    fps = [r["fps"] for r in good]
    median_fps = statistics.median(fps)
    summary = {
        "runs": len(runs), "ok": len(good),
        "fps_median": round(median_fps, 2), "fps_min": min(fps), "fps_max": max(fps),
        "realtime_factor": round(median_fps / clip_fps, 3),
        "cpu_ms_per_frame_median": statistics.median(r["cpu_ms_per_frame"] for r in good),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in good),
        "frames": good[0]["frames"],
    }
    for key in ("load_s", "warmup_s", "cuda_peak_mb", "output_mbit_s"):
        if key in good[0]:
            summary[key] = statistics.median(r[key] for r in good)
    if "detections" in good[0]:
        summary["detections"] = good[0]["detections"]
    if "stage_cpu_ms_per_frame" in good[0]:
        summary["stage_cpu_ms_per_frame"] = {
            stage: statistics.median(r["stage_cpu_ms_per_frame"][stage] for r in good)
            for stage in good[0]["stage_cpu_ms_per_frame"]}
    if len(good) < len(runs):
        summary["errors"] = [r["error"] for r in runs if "error" in r]
    return summary


def describe_machine(device: str | None) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "device_setting": device or "settings default", "load_average_at_start": load}


def print_table(measurements: list[Measurement], summaries: dict[str, dict], clip_info: dict,
                machine: dict, devices: set[str]) -> None:
    print(f"\nclip: {clip_info['width']}x{clip_info['height']} {clip_info['fps']:g} fps h264, {clip_info['frames']} "
          f"frames ({clip_info['seconds']:.1f} s), audio: {clip_info['audio']}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; detector device: {', '.join(sorted(devices)) or '-'}"
          f"; load average at start {machine['load_average_at_start']}")
    print(f"\n{'measurement':17} {'fps':>7} {'min-max':>13} {'x realtime':>10} {'cpu ms/fr':>9} "
          f"{'peak RSS MB':>11} {'out Mbit/s':>10}  what")
    for m in measurements:
        s = summaries[m.name]
        if not s.get("ok"):
            print(f"{m.name:17} {'FAILED':>7}  {s.get('errors', ['?'])[0][:200]}")
            continue
        spread = f"{s['fps_min']:.1f}-{s['fps_max']:.1f}"
        extra = f" [CUDA peak {s['cuda_peak_mb']:.0f} MB]" if "cuda_peak_mb" in s else ""
        bitrate = f"{s['output_mbit_s']:.2f}" if "output_mbit_s" in s else "-"
        print(f"{m.name:17} {s['fps_median']:>7.1f} {spread:>13} {s['realtime_factor']:>10.2f} "
              f"{s['cpu_ms_per_frame_median']:>9.1f} {s['peak_rss_mb_max']:>11.0f} {bitrate:>10}  {m.what}{extra}")
    full, copy = summaries.get("full", {}), summaries.get("copy", {})
    if full.get("ok") and copy.get("ok"):
        print(f"\nfull / copy limit = {full['fps_median'] / copy['fps_median']:.2f} "
              f"(1.0 = detection and redaction cost nothing on top of decode + encode)")
    for variant, what in [("x264=plain", "plain veryfast"),
                          *((f"preset={preset}", f"preset {preset}") for preset in ENCODER_PRESETS)]:
        full_with, copy_with = summaries.get(variant, {}), summaries.get(f"copy:{variant}", {})
        if full_with.get("ok") and copy_with.get("ok"):
            print(f"with {what} on both sides: {full_with['fps_median'] / copy_with['fps_median']:.2f}")
    staged = [m for m in measurements if "stage_cpu_ms_per_frame" in summaries[m.name]]
    if staged:
        stages = list(summaries[staged[0].name]["stage_cpu_ms_per_frame"])
        print("\nCPU ms per frame by pipeline thread (medians; track = the detect thread's time in the temporal "
              "filter; other = codec and inference worker threads, encoder flush, output check)")
        print(f"{'measurement':17} " + " ".join(f"{stage:>8}" for stage in stages))
        for m in staged:
            by_stage = summaries[m.name]["stage_cpu_ms_per_frame"]
            print(f"{m.name:17} " + " ".join(f"{by_stage[stage]:>8.1f}" for stage in stages))


def clip_description(clip: Path) -> dict:
    from dashcamd.media import probe

    info = probe(clip)
    return {"path": str(clip), "width": info.width, "height": info.height, "fps": float(info.avg_fps),
            "frames": info.frame_count, "seconds": info.duration_s, "audio": ",".join(info.audio_codecs) or "none",
            "codec": info.video_codec}


def default_detector_settings(config: Path | None, base_overrides: dict, work: Path) -> dict:
    from dashcamd.pipeline import redaction_process_count

    spec = {"work": str(work), "overrides": base_overrides, "config": str(config) if config else None}
    settings = _child_settings(spec)
    detector = settings.detector
    threads = detector.torch_threads or max(1, (os.cpu_count() or 2) - 1)  # as load_detector resolves it
    return {"inference_size": detector.inference_size, "detection_stride": detector.detection_stride,
            "batch_size": detector.batch_size, "threads_resolved": threads, "device": detector.device,
            "precision": detector.precision, "runtime": detector.runtime, "weights": str(detector.weights),
            "preset": settings.encoder.preset, "x264_params": settings.encoder.x264_params,
            "encoder_nice": settings.encoder.nice,
            "weak_detections": settings.detector_thresholds() != settings.detector.thresholds,
            "redaction_processes": redaction_process_count(settings)}


def _cuda_expected(device_setting: str) -> bool:
    if device_setting.startswith("cuda"):
        return True
    if device_setting != "auto":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, help="benchmark this clip instead of making the synthetic one")
    parser.add_argument("--image", type=Path, help="photo to pan over (default: a BDD100K dashcam frame)")
    parser.add_argument("--data", type=Path, default=synth.DEFAULT_DATA)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", type=synth.parse_size, default=(1920, 1080))
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="subset: names (decode copy full size=960 stride=2 batch=1 threads=2 precision=bf16 "
                             "preset=superfast) or groups (size stride batch threads precision preset)")
    parser.add_argument("--weights", type=Path, help="detector weights (default: the settings' default)")
    parser.add_argument("--random-weights", action="store_true", help="random-weights YOLOv5n (smoke runs)")
    parser.add_argument("--device", help="detector device: cpu | cuda | auto (default: settings)")
    parser.add_argument("--config", type=Path, help="dashcamd config to take the default settings from")
    parser.add_argument("--timeout-s", type=float, help="give up on a measurement after this long")
    parser.add_argument("--work", type=Path, help="keep the clip here and reuse it (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 640x360, 2 s, 1 repeat, decode copy full stride=2 batch=1")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.seconds, args.repeats = (640, 360), 2.0, 1
        args.variants = args.variants or ["decode", "copy", "full", "stride=2", "batch=1"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.result.write_text(json.dumps(run_child(json.loads(args.child))))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="dashcamd-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        clip = args.clip
        if clip is None:
            photo = (args.image or synth.DEFAULT_PANNING_IMAGE).stem[:24]
            clip = work / f"panning-{photo}-{args.seconds:g}s-{args.size[0]}x{args.size[1]}-{args.fps}.mp4"
            if not clip.exists():
                _progress(f"making {clip.name}")
                synth.make_panning_clip(clip, args.seconds, image=args.image, data_dir=args.data, fps=args.fps,
                                        size=args.size)
        detector_overrides: dict = {}
        if args.random_weights:
            detector_overrides["weights"] = str(synth.make_random_weights(work / "random-yolov5n.pt", args.data))
        elif args.weights:
            detector_overrides["weights"] = str(args.weights)
        if args.device:
            detector_overrides["device"] = args.device
        base_overrides = {"detector": detector_overrides} if detector_overrides else {}
        defaults = default_detector_settings(args.config, base_overrides, work)
        selected = select(plan_measurements(defaults, _cuda_expected(defaults["device"])), args.variants)
        if any(m.kind == "full" for m in selected) and not Path(defaults["weights"]).is_file():
            print(f"weights {defaults['weights']} not found: pass --weights, or --random-weights for a smoke run",
                  file=sys.stderr)
            return 2
        clip_info = clip_description(clip)
        machine = describe_machine(args.device)
        runs: dict[str, list[dict]] = {m.name: [] for m in selected}
        started = time.monotonic()
        for repeat in range(args.repeats):
            for m in selected:
                result = spawn(m, clip, work, base_overrides, args.config, args.timeout_s)
                runs[m.name].append(result)
                shown = result.get("error", "")[:300] or (f"{result['fps']:.1f} fps, {result['cpu_ms_per_frame']} "
                                                          f"cpu ms/frame, {result['peak_rss_mb']:.0f} MB")
                _progress(f"[{repeat + 1}/{args.repeats}] {m.name}: {shown}")
                if args.json:  # after every run: a run cut short (a lease ending) keeps what it measured
                    write_json(args.json, selected, runs, clip_info, machine, defaults, args)
        summaries = {name: summarise(r, clip_info["fps"]) for name, r in runs.items()}
        print_table(selected, summaries, clip_info, machine, detector_devices(runs))
        print(f"(medians of {args.repeats}; {time.monotonic() - started:.0f} s in all)")
        if args.random_weights:
            print("(random weights: detections are noise, so per-frame redaction work is not representative)")
        return 0 if all(s.get("ok") == s.get("runs") for s in summaries.values()) else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def detector_devices(runs: dict[str, list[dict]]) -> set[str]:
    devices = {r.get("device") for rs in runs.values() for r in rs if r.get("device")}
    return devices | {r["cuda_device"] for rs in runs.values() for r in rs if r.get("cuda_device")}


def write_json(path: Path, selected: list[Measurement], runs: dict[str, list[dict]], clip_info: dict,
               machine: dict, defaults: dict, args: argparse.Namespace) -> None:
    """Every run so far and the medians of those; "complete" says whether all repeats are in."""
    done = [m for m in selected if runs[m.name]]
    summaries = {m.name: summarise(runs[m.name], clip_info["fps"]) for m in done}
    full, copy = summaries.get("full", {}), summaries.get("copy", {})
    path.write_text(json.dumps({
        "clip": clip_info, "machine": machine, "detector_devices": sorted(detector_devices(runs)),
        "defaults": defaults, "repeats": args.repeats, "random_weights": args.random_weights,
        "complete": all(len(runs[m.name]) == args.repeats for m in selected),
        "measurements": [{"name": m.name, "kind": m.kind, "what": m.what, "overrides": m.overrides,
                          "summary": summaries[m.name], "runs": runs[m.name]} for m in done],
        "full_over_copy": (round(full["fps_median"] / copy["fps_median"], 3)
                           if full.get("ok") and copy.get("ok") else None),
    }, indent=1))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
