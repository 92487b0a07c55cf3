"""Temporal coverage: turn per-frame detections into the boxes each frame must redact.

Owns tracking (association, gap filling, padding, smoothing), frame memory, detection stride and
privacy zones. Everything here works on a bounded look-ahead window, never on the whole clip.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dashcamd.boxes import Detection, RedactBox, enlarged_xyxy, pairwise_iou
from dashcamd.config import RedactSettings

# Association gates, relative to the boxes: a centre may move at most one mean box diagonal away from
# its prediction, and the size may change at most 2x per link. Loose on purpose: a wrong link only
# changes how a gap is filled, never whether a confident detection is redacted.
_CENTRE_GATE = 1.0
_SIZE_RATIO_GATE = 2.0
# Weight of the newest centre displacement in the track's velocity (an alpha-beta style update).
_VELOCITY_ALPHA = 0.5
# Temporal Gaussian sigma (frames) at smoothing = 1 and stride = 1; the window is +-2 sigma.
_SMOOTH_SIGMA_MAX_FRAMES = 3.0
# Extrapolated boxes may grow (an object approaching) but never beyond this factor, nor shrink.
_PAD_MAX_GROWTH = 2.0


FrameBoxes = tuple[int, list[RedactBox]]


@dataclass
class _Det:
    box_xyxy: np.ndarray  # float64 (4,)
    label: str
    score: float


class _BoxRows:
    """Boxes (N, 4) float64 appended at the end and dropped from the front, read back as slices of one array:
    smoothing reads ~17 consecutive ones for every output box, which a list had to stack each time."""

    def __init__(self) -> None:
        self._rows = np.empty((32, 4))
        self._start = self._end = 0

    def append(self, box: np.ndarray) -> None:
        if self._end == len(self._rows):
            live = self._rows[self._start:self._end]
            grown = np.empty((max(32, 2 * len(live)), 4))  # room to append at least as many again
            grown[:len(live)] = live
            self._rows, self._start, self._end = grown, 0, len(live)
        self._rows[self._end] = box
        self._end += 1

    def drop_first(self, count: int) -> None:
        self._start = min(self._start + count, self._end)

    def rows(self, first: int, stop: int) -> np.ndarray:
        """Rows first..stop-1 (counted from the oldest kept) as a view."""
        return self._rows[self._start + first : self._start + stop]


@dataclass
class _Track:
    """Detections of one object; consecutive detections are at most gap_limit + 1 frames apart."""

    label: str
    start: int  # first frame ever detected (kept when old detections are trimmed)
    frames: list[int] = field(default_factory=list)
    boxes_xyxy: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    velocity_xy: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre px per frame
    closed: bool = False
    # The core box of every frame from frames[0] to last: detected, or linearly interpolated across a gap.
    # Kept as detections arrive, so each output frame only slices it (smoothing reads ~17 frames of it).
    core_boxes: _BoxRows = field(default_factory=_BoxRows)

    @property
    def last(self) -> int:
        return self.frames[-1]


def _read_detection(detection: Detection | Sequence) -> _Det:
    """Accept the detector's NamedTuple or any object with the six fields (attributes or tuple order)."""
    if hasattr(detection, "x1"):
        x1, y1, x2, y2 = detection.x1, detection.y1, detection.x2, detection.y2
        label, score = detection.label, detection.score
    else:
        x1, y1, x2, y2, label, score = detection
    x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
    if not all(map(math.isfinite, (x1, y1, x2, y2))):
        # Failing the clip is safer than publishing it with an object we cannot place.
        raise ValueError(f"detection with non-finite coordinates: {[x1, y1, x2, y2]}")
    return _Det(np.array([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]), str(label), float(score))


def _centre_size(box_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres and sizes (..., 2) of boxes (..., 4) xyxy."""
    return (box_xyxy[..., :2] + box_xyxy[..., 2:]) / 2.0, box_xyxy[..., 2:] - box_xyxy[..., :2]


def _from_centre_size(centre_xy: np.ndarray, size_wh: np.ndarray) -> np.ndarray:
    return np.concatenate([centre_xy - size_wh / 2.0, centre_xy + size_wh / 2.0])


def _union(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    return np.concatenate([np.minimum(a_xyxy[:2], b_xyxy[:2]), np.maximum(a_xyxy[2:], b_xyxy[2:])])


class TemporalFilter:
    """Per-frame detections in, final per-frame redaction boxes out, with bounded delay.

    Tracking: detections are linked per class by greedy matching on (1 - IoU) + centre distance
    against a constant-velocity prediction (velocity = running mean of recent centre steps). A Kalman
    filter would also smooth positions, but here positions are smoothed afterwards with look-ahead
    (two-sided, so without the lag a causal filter has), and a wrong link cannot lose coverage: every
    detection is output on its own frame whatever track it joins. So the cheap predictor is enough.
    Detections below their class's start threshold are matched second, to the tracks still unmatched
    (ByteTrack's two-pass association): a detector's score drops on a blurred, dark or cut-off frame of
    an object it found confidently before, and those frames are where a plate would otherwise leak.

    Per track: gaps of at most ``gap_limit`` frames are filled by linear interpolation; the track is
    smoothed by a two-sided temporal Gaussian and each smoothed box is united with the track's boxes of
    the ``hold`` frames before and after (smoothing only ever grows a box; the hold keeps a plate found
    whole in one frame and in pieces or lagging in the next covered by its neighbours' extent); ends are
    extended ``pad`` frames with the track's velocity, centre clamped inside the frame so an object
    entering or leaving keeps the edge covered.

    Stride k: frames pushed with ``None`` were not run through the detector, so the gap limit is at
    least k - 1 and padding at least k - 1 (the object may be present until the next detector run).
    """

    def __init__(
        self,
        settings: RedactSettings,
        frame_size: tuple[int, int],
        detection_stride: int = 1,
        start_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        """``start_thresholds``: per class, the score a detection needs to start a track (or, without
        tracking, to be redacted or remembered at all). A weaker one, as the detector reports when
        ``Settings.detector_thresholds`` lowers its thresholds, can only continue a track that no
        confident detection continued in that frame. Classes not named, or None: every detection counts.
        """
        width, height = frame_size
        if width <= 0 or height <= 0:
            raise ValueError(f"frame_size must be positive (width, height), got {frame_size}")
        if detection_stride < 1:
            raise ValueError(f"detection_stride must be >= 1, got {detection_stride}")
        self._settings = settings
        self._start_thresholds = dict(start_thresholds or {})
        self._width, self._height = float(width), float(height)
        self._track_enabled = settings.track
        self._memory = settings.frame_memory
        self._gap_limit = max(settings.max_gap, detection_stride - 1)
        self._pad = max(settings.pad, detection_stride - 1)
        # Pad velocity from detections within this many frames of a track's end: more than one
        # detector run, so a single jittery box does not fling the extrapolation.
        self._velocity_window = max(4, 2 * detection_stride)
        sigma = _SMOOTH_SIGMA_MAX_FRAMES * settings.smoothing * detection_stride
        self._smooth_radius = int(math.ceil(2.0 * sigma)) if sigma > 0 else 0
        offsets = np.arange(-self._smooth_radius, self._smooth_radius + 1, dtype=np.float64)
        self._smooth_weights = np.exp(-0.5 * (offsets / sigma) ** 2) if sigma > 0 else np.ones(1)
        self._hold = settings.hold
        self._read_radius = max(self._smooth_radius, self._hold)  # core boxes a final box reads, each way

        if self._track_enabled:
            # Frame f is final once every input that can change it has been pushed:
            # smoothing and hold read core boxes up to f + R, and a core box at t is known once the
            # track is re-detected or dead (t + gap_limit); a backward pad needs a track starting by
            # f + pad and its start velocity (velocity_window more frames).
            back_pad_needs = self._pad + self._velocity_window if self._pad > 0 else 0
            self.lookahead_frames = max(self._read_radius + self._gap_limit, back_pad_needs)
        else:
            self.lookahead_frames = 0

        self._zone_boxes = [
            RedactBox(z.x1 * width, z.y1 * height, z.x2 * width, z.y2 * height, "zone", 1.0, "zone")
            for z in settings.zones
        ]
        self._tracks: list[_Track] = []
        self._raw: dict[int, list[_Det] | None] = {}
        self._held: list[_Det] = []  # last detector output, for skipped frames without tracking
        self._next_push: int | None = None
        self._next_final = 0
        self._flushed = False

    # -- input ---------------------------------------------------------------------------------

    def push(
        self, frame_index: int, detections: Sequence[Detection] | None
    ) -> list[FrameBoxes]:
        """Add one frame's detections (None = detector not run on it); return frames now final, in order.

        Frames must be pushed consecutively; the first index pushed is the clip's start.
        After this call every frame up to ``frame_index - lookahead_frames`` has been returned.
        """
        if self._flushed:
            raise RuntimeError("push after flush")
        if self._next_push is None:
            self._next_push = self._next_final = frame_index
        if frame_index != self._next_push:
            raise ValueError(f"expected frame {self._next_push}, got {frame_index}")
        self._next_push = frame_index + 1
        dets, weak = None, []
        if detections is not None:
            dets = []
            for det in map(_read_detection, detections):
                (dets if self.is_confident(det.label, det.score) else weak).append(det)
        self._raw[frame_index] = dets
        for track in self._tracks:
            # Too long unseen: a later detection of the object starts a new track, not a fill.
            if not track.closed and frame_index - track.last > self._gap_limit + 1:
                track.closed = True
        if self._track_enabled and (dets or weak):
            self._associate(frame_index, dets, weak)
        return self._finalize_until(frame_index - self.lookahead_frames)

    def is_confident(self, label: str, score: float) -> bool:
        """Whether a detection may start a track (at or above its class's start threshold), or only
        continue one."""
        return score >= self._start_thresholds.get(label, 0.0)

    def flush(self) -> list[FrameBoxes]:
        """End of clip: return every frame not yet returned."""
        self._flushed = True
        if self._next_push is None:
            return []
        return self._finalize_until(self._next_push - 1)

    def _associate(self, frame_index: int, confident: list[_Det], weak: list[_Det]) -> None:
        for label in sorted({d.label for d in confident + weak}):
            live = [t for t in self._tracks if t.label == label and not t.closed]
            label_confident = [d for d in confident if d.label == label]
            used_tracks, used_dets = self._match(live, label_confident, frame_index)
            for di, det in enumerate(label_confident):
                if di not in used_dets:
                    track = _Track(label=label, start=frame_index)
                    self._extend(track, frame_index, det)
                    self._tracks.append(track)
            # Second pass (as in ByteTrack): a weak detection may only continue a track still unmatched.
            unmatched = [t for ti, t in enumerate(live) if ti not in used_tracks]
            self._match(unmatched, [d for d in weak if d.label == label], frame_index)

    def _match(self, live: list[_Track], dets: list[_Det], frame_index: int) -> tuple[set[int], set[int]]:
        """Greedily link detections to the live tracks they fit best; return the indices used of both."""
        used_tracks: set[int] = set()
        used_dets: set[int] = set()
        if not live or not dets:
            return used_tracks, used_dets
        predicted = self._predicted(live, frame_index)  # (T, 4)
        observed = np.stack([d.box_xyxy for d in dets])  # (D, 4)
        pred_centre, pred_size = _centre_size(predicted)
        det_centre, det_size = _centre_size(observed)
        pred_diag = np.linalg.norm(pred_size, axis=1)
        det_diag = np.linalg.norm(det_size, axis=1)
        scale = np.maximum(0.5 * (pred_diag[:, None] + det_diag[None, :]), 1.0)
        distance = np.linalg.norm(det_centre[None, :] - pred_centre[:, None], axis=2) / scale
        pred_area = np.maximum(np.prod(pred_size, axis=1), 1.0)
        det_area = np.maximum(np.prod(det_size, axis=1), 1.0)
        area_ratio = det_area[None, :] / pred_area[:, None]
        size_ratio = np.sqrt(np.maximum(area_ratio, 1.0 / area_ratio))
        cost = 1.0 - pairwise_iou(predicted, observed) + distance
        gated = (distance <= _CENTRE_GATE) & (size_ratio <= _SIZE_RATIO_GATE)
        pairs = sorted((float(cost[ti, di]), int(ti), int(di)) for ti, di in zip(*np.nonzero(gated)))
        for _, ti, di in pairs:
            if ti in used_tracks or di in used_dets:
                continue
            used_tracks.add(ti)
            used_dets.add(di)
            self._extend(live[ti], frame_index, dets[di])
        return used_tracks, used_dets

    @staticmethod
    def _predicted(live: list[_Track], frame_index: int) -> np.ndarray:
        """Each track's last box (T, 4) moved along its velocity to ``frame_index``, size unchanged."""
        last_boxes = np.stack([t.boxes_xyxy[-1] for t in live])
        shift_xy = np.stack([t.velocity_xy * (frame_index - t.last) for t in live])
        return last_boxes + np.concatenate([shift_xy, shift_xy], axis=1)

    @staticmethod
    def _extend(track: _Track, frame_index: int, det: _Det) -> None:
        if track.frames:
            previous, gap = track.boxes_xyxy[-1], frame_index - track.last
            for step_index in range(1, gap):
                track.core_boxes.append(previous + step_index / gap * (det.box_xyxy - previous))
            step = (_centre_size(det.box_xyxy)[0] - _centre_size(previous)[0]) / gap
            if len(track.frames) == 1:
                track.velocity_xy = step
            else:
                track.velocity_xy = _VELOCITY_ALPHA * step + (1 - _VELOCITY_ALPHA) * track.velocity_xy
        track.frames.append(frame_index)
        track.boxes_xyxy.append(det.box_xyxy)
        track.scores.append(det.score)
        track.core_boxes.append(det.box_xyxy)

    # -- output --------------------------------------------------------------------------------

    def _finalize_until(self, last_final: int) -> list[FrameBoxes]:
        out: list[FrameBoxes] = []
        while self._next_push is not None and self._next_final <= min(last_final, self._next_push - 1):
            frame_index = self._next_final
            out.append((frame_index, self._frame_boxes(frame_index)))
            self._next_final += 1
        self._forget()
        return out

    def _frame_boxes(self, frame_index: int) -> list[RedactBox]:
        raw: list[RedactBox] = []
        dets = self._raw.get(frame_index)
        if self._track_enabled:
            for track in self._tracks:
                box = self._track_box(track, frame_index)
                if box is not None:
                    raw.append(box)
        elif dets is not None:
            raw.extend(self._det_box(d, "detected") for d in dets)
        if dets is not None:
            self._held = dets
        elif not self._track_enabled:
            # The detector skipped this frame (stride): the last detector output stands in for it.
            raw.extend(self._det_box(d, "memory") for d in self._held)
        for back in range(1, self._memory + 1):
            raw.extend(self._det_box(d, "memory") for d in self._raw.get(frame_index - back) or ())

        boxes: list[RedactBox] = []
        seen: set[tuple] = set()
        for box in raw:
            box = self._enlarge(box)
            if box.x2 <= 0 or box.y2 <= 0 or box.x1 >= self._width or box.y1 >= self._height:
                continue
            key = (round(box.x1, 1), round(box.y1, 1), round(box.x2, 1), round(box.y2, 1), box.label)
            if key in seen:  # memory and held boxes often repeat the same detection
                continue
            seen.add(key)
            boxes.append(box)
        boxes.extend(self._zone_boxes)
        return boxes

    @staticmethod
    def _det_box(det: _Det, source: str) -> RedactBox:
        x1, y1, x2, y2 = (float(v) for v in det.box_xyxy)
        return RedactBox(x1, y1, x2, y2, det.label, det.score, source)

    def _enlarge(self, box: RedactBox) -> RedactBox:
        factor = self._settings.enlarge.get(box.label, 1.0)
        if factor == 1.0:
            return box
        x1, y1, x2, y2 = enlarged_xyxy(box.x1, box.y1, box.x2, box.y2, factor)
        return box._replace(x1=x1, y1=y1, x2=x2, y2=y2)

    def _track_box(self, track: _Track, frame_index: int) -> RedactBox | None:
        last = track.last
        if frame_index < track.start - self._pad or frame_index > last + self._pad:
            return None
        if frame_index < track.start:
            anchor = track.boxes_xyxy[0]
            window = self._window(track, track.start, track.start + self._velocity_window)
            box = self._extrapolate(track, anchor, window, frame_index - track.start)
            return self._box(box, track.label, track.scores[0], "tracked")
        if frame_index > last:
            anchor = self._smoothed(track, last)
            window = self._window(track, last - self._velocity_window, last)
            box = self._extrapolate(track, anchor, window, frame_index - last)
            return self._box(box, track.label, track.scores[-1], "tracked")
        at = bisect_left(track.frames, frame_index)
        if track.frames[at] == frame_index:
            return self._box(self._smoothed(track, frame_index), track.label, track.scores[at], "detected")
        score = float(np.interp(frame_index, track.frames, track.scores))
        return self._box(self._smoothed(track, frame_index), track.label, score, "tracked")

    def _smoothed(self, track: _Track, frame_index: int) -> np.ndarray:
        """Two-sided Gaussian mean of the core boxes, united with every core box within ``hold`` frames
        (so never smaller than the core box itself)."""
        first = track.frames[0]
        lo = max(frame_index - self._read_radius, first)
        hi = min(frame_index + self._read_radius, track.last)
        core = track.core_boxes.rows(lo - first, hi - first + 1)
        here = frame_index - lo
        held = core[max(here - self._hold, 0) : here + self._hold + 1]
        box = np.concatenate([held[:, :2].min(axis=0), held[:, 2:].max(axis=0)])
        if self._smooth_radius == 0:
            return box
        first = max(here - self._smooth_radius, 0)
        near = core[first : here + self._smooth_radius + 1]
        weights = self._smooth_weights[first - here + self._smooth_radius :][: len(near)]
        return _union(weights @ near / weights.sum(), box)

    @staticmethod
    def _window(track: _Track, lo: int, hi: int) -> list[int]:
        return list(range(bisect_left(track.frames, lo), bisect_right(track.frames, hi)))

    def _extrapolate(self, track: _Track, anchor_xyxy: np.ndarray, window: list[int], dt: int) -> np.ndarray:
        """Move the anchor box dt frames along the velocity measured over the window's detections."""
        centre, size = _centre_size(anchor_xyxy)
        if len(window) >= 2:
            a, b = window[0], window[-1]
            span = track.frames[b] - track.frames[a]
            c_a, s_a = _centre_size(track.boxes_xyxy[a])
            c_b, s_b = _centre_size(track.boxes_xyxy[b])
            centre = centre + (c_b - c_a) / span * dt
            # Grow if the object was growing in the direction we extrapolate; never shrink.
            growth = np.maximum((s_b - s_a) / span * dt, 0.0)
            size = np.minimum(size + growth, size * _PAD_MAX_GROWTH)
        centre = np.clip(centre, 0.0, [self._width, self._height])
        return _from_centre_size(centre, size)

    @staticmethod
    def _box(box_xyxy: np.ndarray, label: str, score: float, source: str) -> RedactBox:
        x1, y1, x2, y2 = (float(v) for v in box_xyxy)
        return RedactBox(x1, y1, x2, y2, label, float(score), source)

    def _forget(self) -> None:
        """Drop inputs no unfinished frame can read, so memory stays bounded on long clips."""
        oldest_needed = self._next_final - self._memory
        for frame_index in [f for f in self._raw if f < oldest_needed]:
            del self._raw[frame_index]
        self._tracks = [t for t in self._tracks if not (t.closed and t.last + self._pad < self._next_final)]
        # Keep only detections that smoothing, interpolation or end velocity can still read.
        keep_from = self._next_final - self._read_radius - self._pad - self._velocity_window - 1
        for track in self._tracks:
            cut = bisect_left(track.frames, keep_from) - 1
            if cut > 0:
                track.core_boxes.drop_first(track.frames[cut] - track.frames[0])
                del track.frames[:cut], track.boxes_xyxy[:cut], track.scores[:cut]
