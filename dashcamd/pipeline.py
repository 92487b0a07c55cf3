"""One clip, start to finish: decode → detect (batched) → track → redact → encode → verify → publish.

Four threads overlap the stages: the reader decodes ahead, this thread runs the detector and the
temporal filter, a third redacts, the writer encodes. Redaction has a thread of its own so that no thread
carries two stages' Python work: with the detector on a GPU, one busy thread rather than the cores can bound
the speed. On an H200 it did not raise the frame rate (README, "On a lent NVIDIA H200"); it costs nothing
measurable on two cores. With ``[redact] processes`` the redact thread hands each frame to helper processes
instead (dashcamd.redact_processes), so redaction's Python work leaves this interpreter's lock.
Bounded queues between the stages keep memory flat: at most the tracker's look-ahead plus a few batches
of frames are alive at any time.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import cv2
import structlog

from dashcamd import publish, shared_frames
from dashcamd.config import Settings
from dashcamd.errors import InvalidClip, SourceChanged, TransientError
from dashcamd.media import ClipReader, ClipWriter, DecodedFrame, probe
from dashcamd.boxes import RedactBox
from dashcamd.redact import Redactor
from dashcamd.redact_processes import RedactionProcesses
from dashcamd.shared_frames import SharedFrames
from dashcamd.track import FrameBoxes, TemporalFilter

QUEUE_TIMEOUT_S = 0.5
_END = object()

log = structlog.get_logger()

ProgressCallback = Callable[[int, int], None]


@dataclass
class ClipReport:
    """What one processed clip looked like; the fields go into the canonical log line."""

    output: str
    frames: int
    seconds: float
    fps: float
    realtime_factor: float
    detections: dict[str, int] = field(default_factory=dict)
    redacted_frames: int = 0
    # CPU milliseconds per frame by where they went: the decode, detect, redact and encode stages' own threads
    # (Python and whatever the libraries run on the calling thread; the detect thread's share spent in the
    # temporal filter is "track", not "detect"), "other" (FFmpeg's and x264's frame
    # threads, torch's and onnxruntime's worker threads, the encoder flush, the output check), "helpers"
    # (the redaction processes, if any) and "total" (the process and its helpers, from probe to publish).
    # Where the time goes on a given machine, for the benchmark.
    cpu_ms_per_frame: dict[str, float] = field(default_factory=dict)

    def as_fields(self) -> dict[str, Any]:
        return asdict(self)


def size_thread_pools(settings: Settings) -> None:
    """Size this process's library thread pools for the pipeline, whose stages already run in parallel.

    torch: the configured count, else one core fewer than the machine (room for the encoder).
    OpenCV: one thread. Redaction calls it on small regions only, where waking a pool buys little and
    its busy-waiting workers burn the encoder's CPU: 5 boxes on a 1080p frame took 1.3-1.7 ms of CPU
    single-threaded and 2.4-3.1 ms with OpenCV's 2 threads on the 2-core machine (wall 1.3-1.7 vs
    1.2-1.6 ms); a pool per core on a 16-core GPU host wakes 16 threads per call.
    """
    import torch

    torch.set_num_threads(settings.detector.torch_threads or max(1, (os.cpu_count() or 2) - 1))
    cv2.setNumThreads(1)


def redaction_process_count(settings: Settings) -> int:
    """The configured number of redaction helper processes, "auto" resolved: 2 with 8 or more cores on Linux
    (a GPU host, where the interpreter lock bounds the pipeline; README, "Measured speed"), else none."""
    wanted = settings.redact.processes
    if wanted == "auto":
        wanted = 2 if (os.cpu_count() or 1) >= 8 else 0
    return wanted if shared_frames.supported() else 0


def load_detector(settings: Settings):
    """Build the detector once per process, after sizing the thread pools (``size_thread_pools``)."""
    from dashcamd.detect import Detector

    size_thread_pools(settings)
    return Detector(
        settings.detector.weights,
        device=settings.detector.device,
        thresholds=settings.detector_thresholds(),
        inference_size=settings.detector.inference_size,
        batch_size=settings.detector.batch_size,
        iou_threshold=settings.detector.iou_threshold,
        precision=settings.detector.precision,
        runtime=settings.detector.runtime,
    )


def process_clip(
    source: Path,
    output: Path,
    settings: Settings,
    detector,
    *,
    on_progress: ProgressCallback | None = None,
    boxes_path: Path | None = None,
) -> ClipReport:
    """Write the redacted clip to ``output`` atomically. The source is only ever read.

    Raises InvalidClip (never retry), TransientError / SourceChanged (retry), or whatever the callback
    raises (cancellation). On any failure no partial file is left at ``output``.
    """
    started, cpu_started, helpers_cpu_started = time.monotonic(), time.process_time(), _waited_children_cpu_s()
    info = probe(source)
    before = _identity(source)
    if boxes_path is None and settings.output.boxes_sidecar:
        boxes_path = output.with_suffix(".boxes.jsonl")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as unwritable:
        raise TransientError(f"cannot create output folder {output.parent}: {unwritable.strerror}") from unwritable
    temp_video = publish.temp_path_for(output)
    temp_boxes = publish.temp_path_for(boxes_path) if boxes_path else None
    try:
        try:
            # The decoder shrinks frames for the detector (see ClipReader); a detector that answers
            # None does not look at pixels (test doubles, the benchmark's copy limit) and gets None.
            detector_size = detector.resized_size(info.height, info.width)
            temporal = TemporalFilter(settings.redact, (info.width, info.height), settings.detector.detection_stride,
                                      start_thresholds=settings.detector.thresholds)
            frames, helpers = _start_redaction_processes(settings, info.width, info.height, info.color_matrix,
                                                         temporal.lookahead_frames)
            try:
                with (ClipReader(source, info=info, detector_size=detector_size,
                                 pictures=frames.take if frames else None) as reader,
                      ClipWriter(temp_video, reader, settings.encoder) as writer):
                    boxes_file = temp_boxes.open("w", encoding="utf-8") if temp_boxes else None
                    try:
                        done = _run_stages(reader, writer, settings, detector, temporal, on_progress, boxes_file,
                                           helpers)
                    finally:
                        if boxes_file is not None:
                            boxes_file.close()
            finally:
                if helpers is not None:
                    helpers.close()
                if frames is not None:
                    frames.close()
            publish.verify_output(info, temp_video, frames_dropped=reader.frames_dropped)
            cpu_total_s = time.process_time() - cpu_started
            helpers_cpu_s = _waited_children_cpu_s() - helpers_cpu_started  # the helpers are reaped by now
        except InvalidClip as invalid:
            # A clip rewritten under the reader decodes as garbage; that is a new version to process, not a
            # broken clip to quarantine (found by tests/test_faults.py).
            if _identity(source) != before:
                raise SourceChanged(f"{source} changed while it was processed") from invalid
            raise
        if _identity(source) != before:
            raise SourceChanged(f"{source} changed while it was processed")
        publish.publish(temp_video, output)
        if temp_boxes is not None and boxes_path is not None:
            publish.publish(temp_boxes, boxes_path)
    finally:
        for temp in (temp_video, temp_boxes):
            if temp is not None:
                temp.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    fps = done.frames / seconds if seconds > 0 else 0.0
    cpu_s = {**done.cpu_s, "other": max(0.0, cpu_total_s - sum(done.cpu_s.values())), "helpers": helpers_cpu_s,
             "total": cpu_total_s + helpers_cpu_s}
    return ClipReport(
        output=str(output),
        frames=done.frames,
        seconds=round(seconds, 3),
        fps=round(fps, 2),
        realtime_factor=round(fps / float(info.avg_fps), 3) if info.avg_fps else 0.0,
        detections=done.counts,
        redacted_frames=done.redacted,
        cpu_ms_per_frame={where: round(1000 * s / max(done.frames, 1), 2) for where, s in cpu_s.items()},
    )


def _start_redaction_processes(settings: Settings, width: int, height: int, color_matrix: str, look_ahead: int
                               ) -> tuple[SharedFrames | None, RedactionProcesses | None]:
    """Shared frame slots and the helpers that redact in them, or (None, None) for redaction in-thread.

    Slots: enough for every frame the stages can hold at once (queues, batch, the tracker's look-ahead); when
    they run out the reader hands out private frames, which the redact thread redacts itself.
    """
    count = redaction_process_count(settings)
    if count == 0:
        return None, None
    # Queues (3 x 2 batches), the batch being filled, the tracker's window (look-ahead + a batch), the frames
    # out at the helpers (2 each), and one in each stage's hands.
    slots = look_ahead + 8 * settings.detector.batch_size + 2 * count + 4
    frames = SharedFrames(width + width % 2, height + height % 2, slots)
    try:
        return frames, RedactionProcesses(settings.redact, color_matrix, frames, count)
    except BaseException:
        frames.close()
        raise


def _waited_children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _identity(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as gone:
        raise TransientError(f"source unavailable: {gone.strerror}") from gone
    return stat.st_size, stat.st_mtime_ns


class _StagesDone(NamedTuple):
    counts: dict[str, int]  # detections per class
    frames: int  # frames written
    redacted: int  # frames with at least one redacted region
    cpu_s: dict[str, float]  # CPU seconds of each stage's own thread: decode, detect, track, redact, encode


def _run_stages(
    reader: ClipReader,
    writer: ClipWriter,
    settings: Settings,
    detector,
    temporal: TemporalFilter,
    on_progress: ProgressCallback | None,
    boxes_file: TextIO | None,
    helpers: RedactionProcesses | None,
) -> _StagesDone:
    detect_cpu_started = time.thread_time()
    info = reader.info
    frames_total = info.frame_count
    batch_size = settings.detector.batch_size
    source_hw = (info.height, info.width)
    decoded: queue.Queue = queue.Queue(maxsize=2 * batch_size)
    redact_queue: queue.Queue = queue.Queue(maxsize=2 * batch_size)
    encode_queue: queue.Queue = queue.Queue(maxsize=2 * batch_size)
    failure: list[BaseException] = []
    stop = threading.Event()
    encode_stats = {"frames": 0, "redacted": 0}
    cpu_s = {"decode": 0.0, "detect": 0.0, "track": 0.0, "redact": 0.0, "encode": 0.0}

    def tracked(step: Callable[..., list[FrameBoxes]], *args: Any) -> list[FrameBoxes]:
        """``step(*args)``, a call of the temporal filter, with its CPU time charged to "track"."""
        started = time.thread_time()
        try:
            return step(*args)
        finally:
            cpu_s["track"] += time.thread_time() - started

    redactor = Redactor(settings.redact, info.color_matrix)
    frames = reader.frames()
    threads = [
        _stage_thread("decode", lambda: _decode_frames(frames, decoded, stop, failure), stop, failure, cpu_s),
        _stage_thread("redact", lambda: _redact_frames(redact_queue, encode_queue, redactor, helpers, boxes_file,
                                                       stop, failure), stop, failure, cpu_s),
        _stage_thread("encode", lambda: _encode_frames(encode_queue, writer, settings.encoder.nice, stop, encode_stats),
                      stop, failure, cpu_s),
    ]
    for thread in threads:
        thread.start()
    counts = {name: 0 for name in detector.names}
    window: dict[int, DecodedFrame] = {}
    try:
        for batch in _batches(decoded, batch_size, stop, failure):
            to_detect = [f for f in batch if f.index % settings.detector.detection_stride == 0]
            found_per_frame = detector.detect([f.detector_rgb for f in to_detect], source_hw=source_hw)
            detections = dict(zip((f.index for f in to_detect), found_per_frame))
            for frame in batch:
                window[frame.index] = frame
                found = detections.get(frame.index)
                for box in found or ():
                    # Weak detections (below the class threshold, for the tracker only) are not counted.
                    if temporal.is_confident(box.label, box.score):
                        counts[box.label] = counts.get(box.label, 0) + 1
                _hand_over(tracked(temporal.push, frame.index, found), window, redact_queue, stop, failure)
            if on_progress is not None:
                on_progress(batch[-1].index + 1, frames_total)
        _hand_over(tracked(temporal.flush), window, redact_queue, stop, failure)
        _put(redact_queue, _END, stop, failure)
        for thread in threads:
            thread.join()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failure:
        raise failure[0]
    if on_progress is not None:
        on_progress(encode_stats["frames"], frames_total)
    cpu_s["detect"] = time.thread_time() - detect_cpu_started - cpu_s["track"]
    return _StagesDone(counts, encode_stats["frames"], encode_stats["redacted"], cpu_s)


def _stage_thread(name: str, body: Callable[[], None], stop: threading.Event, failure: list[BaseException],
                  cpu_s: dict[str, float]) -> threading.Thread:
    """A thread named ``dashcamd-<name>`` that runs ``body``: an error is handed to the main thread (which
    re-raises it) and stops the other stages; the thread's CPU seconds go to ``cpu_s[name]``."""

    def run() -> None:
        started = time.thread_time()
        try:
            body()
        except BaseException as error:
            failure.append(error)
            stop.set()
        finally:
            cpu_s[name] = time.thread_time() - started

    return threading.Thread(target=run, name=f"dashcamd-{name}", daemon=True)


def _decode_frames(frames: Iterator[DecodedFrame], out: queue.Queue, stop: threading.Event,
                   failure: list[BaseException]) -> None:
    for frame in frames:
        if not _put(out, frame, stop, failure):
            return
    _put(out, _END, stop, failure)


def _redact_frames(in_queue: queue.Queue, out: queue.Queue, redactor: Redactor, helpers: RedactionProcesses | None,
                   boxes_file: TextIO | None, stop: threading.Event, failure: list[BaseException]) -> None:
    """Redact each frame (here, or in a helper process when it lives in a shared slot) and pass the frames on
    in order. Up to two frames a helper are out at once, so the helpers work while this thread reads on."""
    out_at_once = 2 * helpers.count if helpers is not None else 0
    pending: deque[tuple[object, int | None]] = deque()  # (item, the helper redacting it, if any)
    while True:
        item = _get(in_queue, stop)
        if item is None:
            return
        helper = None
        if item is not _END:
            frame, boxes = item
            if boxes and helpers is not None and frame.picture.slot is not None:
                helper = helpers.submit(frame.picture.slot, boxes)
            elif boxes:
                redactor.apply(frame.picture, boxes)
            if boxes_file is not None:
                boxes_file.write(_boxes_line(frame, boxes))
        pending.append((item, helper))
        while pending and (item is _END or pending[0][1] is None or len(pending) > out_at_once):
            oldest, its_helper = pending.popleft()
            if its_helper is not None and not helpers.wait(its_helper, stop.is_set):
                return
            if not _put(out, oldest, stop, failure) or oldest is _END:
                return


def _encode_frames(in_queue: queue.Queue, writer: ClipWriter, nice: int, stop: threading.Event,
                   stats: dict[str, int]) -> None:
    _lower_thread_priority(nice)  # before the first frame: x264 starts its threads then, from this one
    while True:
        item = _get(in_queue, stop)
        if item is _END or item is None:
            return
        frame, boxes = item
        writer.write(frame.picture, frame.pts)
        stats["frames"] += 1
        stats["redacted"] += bool(boxes)


def _lower_thread_priority(by: int) -> None:
    """Make the calling thread, and every thread it starts from now on, ``by`` nicer (Linux keeps the nice
    value per thread; elsewhere nothing changes).

    Why: on a CPU the detector's thread is the pipeline's one serial stage, while x264's frame threads can
    use whatever CPU is left at any moment. At equal priority the scheduler shares the cores among all of
    them and the detector waits; with x264 5 nicer the 2-core machine ran the speed clip 10-17 % faster
    (README, "Measured speed"). Raising a thread's nice value needs no privilege.
    """
    if by <= 0 or sys.platform != "linux":
        return
    thread_id = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, thread_id, os.getpriority(os.PRIO_PROCESS, thread_id) + by)


def _boxes_line(frame: DecodedFrame, boxes: list[RedactBox]) -> str:
    pts_s = float(frame.pts * frame.time_base) if frame.pts is not None else None
    rounded = [[round(b.x1, 1), round(b.y1, 1), round(b.x2, 1), round(b.y2, 1), b.label, round(b.score, 3),
                b.source] for b in boxes]
    return json.dumps({"frame": frame.index, "pts": pts_s, "boxes": rounded}) + "\n"


def _batches(decoded: queue.Queue, batch_size: int, stop: threading.Event,
             failure: list[BaseException]) -> Iterator[list[DecodedFrame]]:
    batch: list[DecodedFrame] = []
    while True:
        item = _get(decoded, stop)
        if item is None:  # stopped because another stage failed
            if failure:
                raise failure[0]
            return
        if item is _END:
            if batch:
                yield batch
            return
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []


def _hand_over(final: list[tuple[int, list[RedactBox]]], window: dict[int, DecodedFrame],
               out: queue.Queue, stop: threading.Event, failure: list[BaseException]) -> None:
    for index, boxes in final:
        if not _put(out, (window.pop(index), boxes), stop, failure):
            raise failure[0] if failure else RuntimeError("pipeline stopped")


def _put(out: queue.Queue, item: object, stop: threading.Event, failure: list[BaseException]) -> bool:
    """Block until there is room, unless the pipeline is stopping (then False)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=QUEUE_TIMEOUT_S)
            return True
        except queue.Full:
            continue
    return False


def _get(in_queue: queue.Queue, stop: threading.Event) -> object | None:
    """Next item, or None once the pipeline is stopping."""
    while not stop.is_set():
        try:
            return in_queue.get(timeout=QUEUE_TIMEOUT_S)
        except queue.Empty:
            continue
    return None
