"""TemporalFilter: association, gap filling, padding, smoothing, memory, stride, look-ahead bound."""

from __future__ import annotations


import numpy as np
import pytest

from dashcamd.config import PrivacyZone, RedactSettings
from dashcamd.boxes import Detection
from dashcamd.track import RedactBox, TemporalFilter

FRAME_SIZE = (640, 360)


def make_settings(**overrides) -> RedactSettings:
    # Neutral defaults so each test sees one mechanism; enlarge={} means factor 1 for every class.
    values = dict(enlarge={}, smoothing=0.0, pad=0, max_gap=0, frame_memory=0, hold=0)
    values.update(overrides)
    return RedactSettings(**values)


def run(temporal: TemporalFilter, detections_by_frame: dict, n_frames: int) -> dict[int, list[RedactBox]]:
    """Push frames 0..n_frames-1 (missing key = detector ran, found nothing), flush, check completeness."""
    out: list[tuple[int, list[RedactBox]]] = []
    for frame_index in range(n_frames):
        out += temporal.push(frame_index, detections_by_frame.get(frame_index, []))
    out += temporal.flush()
    assert [f for f, _ in out] == list(range(n_frames))
    return dict(out)


def moving_box(frame_index: int, x0=100.0, y0=100.0, vx=10.0, vy=0.0, w=40.0, h=20.0, label="plate"):
    x = x0 + vx * frame_index
    y = y0 + vy * frame_index
    return Detection(x, y, x + w, y + h, label, 0.9)


def xyxy(box) -> np.ndarray:
    return np.array([box.x1, box.y1, box.x2, box.y2])


def covers(outer, inner, tol=1e-6) -> bool:
    return (
        outer.x1 <= inner.x1 + tol
        and outer.y1 <= inner.y1 + tol
        and outer.x2 >= inner.x2 - tol
        and outer.y2 >= inner.y2 - tol
    )


def test_isolated_single_detection_is_output():
    det = Detection(10, 20, 30, 40, "face", 0.31)
    boxes = run(TemporalFilter(make_settings(), FRAME_SIZE), {5: [det]}, 10)
    assert boxes[5] == [RedactBox(10, 20, 30, 40, "face", 0.31, "detected")]
    assert all(boxes[f] == [] for f in range(10) if f != 5)


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_gap_within_max_gap_is_filled_linearly(smoothing):
    dets = {f: [moving_box(f)] for f in range(25) if not 10 <= f <= 14}
    boxes = run(TemporalFilter(make_settings(max_gap=5, smoothing=smoothing), FRAME_SIZE), dets, 25)
    for f in range(10, 15):
        (box,) = boxes[f]
        assert box.source == "tracked"
        np.testing.assert_allclose(xyxy(box), xyxy(moving_box(f)), atol=1e-6)


def test_gaps_stay_linear_after_old_detections_are_forgotten():
    """A long track with a gap every few frames, smoothed and held: the look-ahead window trims old detections
    (and their interpolated frames) many times over, and every frame's box stays where the object is."""
    dets = {f: [moving_box(f, x0=0.0, vx=2.0)] for f in range(300) if f % 4 in (0, 1)}  # gaps of 2
    boxes = run(TemporalFilter(make_settings(max_gap=3, smoothing=0.5, hold=2), (1280, 360)), dets, 300)
    for f in range(30, 270):
        (box,) = boxes[f]
        # Hold unites the object's boxes of frames f-2..f+2: it moves 2 px a frame along x.
        np.testing.assert_allclose(xyxy(box), xyxy(moving_box(f, x0=0.0, vx=2.0)) + [-4, 0, 4, 0], atol=1e-6)


def test_no_fill_beyond_max_gap():
    dets = {f: [moving_box(f)] for f in range(25) if not 10 <= f <= 15}  # gap of 6 frames
    boxes = run(TemporalFilter(make_settings(max_gap=5), FRAME_SIZE), dets, 25)
    assert all(boxes[f] == [] for f in range(10, 16))
    assert len(boxes[9]) == 1 and len(boxes[16]) == 1


def test_pad_extends_both_ends_and_stops_at_clip_start():
    still = Detection(50, 50, 90, 70, "plate", 0.8)
    boxes = run(TemporalFilter(make_settings(pad=3), FRAME_SIZE), {f: [still] for f in range(10, 21)}, 30)
    covered = [f for f in range(30) if boxes[f]]
    assert covered == list(range(7, 24))
    assert {boxes[f][0].source for f in (7, 9, 21, 23)} == {"tracked"}
    np.testing.assert_allclose(xyxy(boxes[7][0]), xyxy(still))

    # A track starting at frame 1 can only be padded back to the clip's first frame.
    boxes = run(TemporalFilter(make_settings(pad=3), FRAME_SIZE), {f: [still] for f in range(1, 5)}, 10)
    assert [f for f in range(10) if boxes[f]] == list(range(0, 8))


def test_pad_follows_velocity_and_is_clamped_to_the_frame():
    dets = {f: [moving_box(f)] for f in range(5, 21)}  # moving right 10 px/frame
    boxes = run(TemporalFilter(make_settings(pad=3), FRAME_SIZE), dets, 30)
    np.testing.assert_allclose(xyxy(boxes[2][0]), xyxy(moving_box(2)), atol=1e-6)
    np.testing.assert_allclose(xyxy(boxes[23][0]), xyxy(moving_box(23)), atol=1e-6)

    # Leaving at the right edge: the box keeps covering the edge instead of flying off.
    width = FRAME_SIZE[0]
    dets = {f: [moving_box(f, x0=width - 150, vx=20)] for f in range(0, 6)}
    boxes = run(TemporalFilter(make_settings(pad=10), FRAME_SIZE), dets, 20)
    for f in range(6, 16):
        (box,) = boxes[f]
        assert (box.x1 + box.x2) / 2 <= width
        assert box.x2 >= width and box.x1 < width


def test_smoothing_never_shrinks_the_raw_box():
    rng = np.random.default_rng(1)
    raw = {}
    for f in range(40):
        x1, y1, x2, y2 = xyxy(moving_box(f, vx=3.0, w=60, h=30)) + rng.uniform(-6, 6, size=4)
        raw[f] = [Detection(x1, y1, x2, y2, "plate", 0.7)]
    boxes = run(TemporalFilter(make_settings(smoothing=1.0, max_gap=3), FRAME_SIZE), raw, 40)
    changed = 0
    for f in range(40):
        (box,) = boxes[f]
        assert box.source == "detected"
        assert covers(box, raw[f][0])
        changed += not np.allclose(xyxy(box), xyxy(raw[f][0]))
    assert changed > 20  # smoothing did something


def test_hold_covers_a_plate_found_whole_and_in_pieces():
    # A still plate found whole on even frames and only its left part on odd ones (one track).
    whole, piece = Detection(100, 100, 200, 140, "plate", 0.8), Detection(100, 100, 140, 140, "plate", 0.3)
    dets = {f: [whole if f % 2 == 0 else piece] for f in range(10)}
    held = run(TemporalFilter(make_settings(hold=1), FRAME_SIZE), dets, 10)
    assert all(len(held[f]) == 1 and covers(held[f][0], whole) for f in range(10))
    unheld = run(TemporalFilter(make_settings(hold=0), FRAME_SIZE), dets, 10)
    assert not covers(unheld[1][0], whole)


def test_hold_is_the_union_of_the_tracks_boxes_around_the_frame():
    dets = {f: [moving_box(f, vx=10.0)] for f in range(20)}
    boxes = run(TemporalFilter(make_settings(hold=2), FRAME_SIZE), dets, 20)
    for f in range(20):
        first, last = max(f - 2, 0), min(f + 2, 19)  # within the track's own frames only
        (box,) = boxes[f]
        expected = [moving_box(first).x1, 100.0, moving_box(last).x2, 120.0]
        assert xyxy(box) == pytest.approx(expected)


def test_crossing_objects_keep_identities():
    # A moves right, B moves left, rows overlapping; A is missed around the crossing (frame 25).
    def a(f):
        return moving_box(f, x0=0.0, vx=8.0)

    def b(f):
        return moving_box(f, x0=400.0, y0=104.0, vx=-8.0)

    dets = {f: ([] if 22 <= f <= 28 else [a(f)]) + [b(f)] for f in range(50)}
    boxes = run(TemporalFilter(make_settings(max_gap=10), FRAME_SIZE), dets, 50)
    for f in range(50):
        assert len(boxes[f]) == 2
        assert any(covers(box, a(f)) for box in boxes[f])
        assert any(covers(box, b(f)) for box in boxes[f])
    # Had A's track taken B's detections, A's gap would not be filled along A's own straight path.
    for f in range(22, 29):
        assert any(np.allclose(xyxy(box), xyxy(a(f))) and box.source == "tracked" for box in boxes[f])


def test_classes_are_never_linked():
    dets = {0: [Detection(10, 10, 50, 30, "plate", 0.9)], 3: [Detection(10, 10, 50, 30, "face", 0.9)]}
    boxes = run(TemporalFilter(make_settings(max_gap=5), FRAME_SIZE), dets, 5)
    assert boxes[1] == [] and boxes[2] == []


def test_frame_memory_repeats_recent_detections():
    det = Detection(10, 20, 30, 40, "plate", 0.5)
    for track in (False, True):
        boxes = run(TemporalFilter(make_settings(frame_memory=2, track=track), FRAME_SIZE), {5: [det]}, 10)
        assert [b.source for b in boxes[5]] == ["detected"]
        assert [b.source for b in boxes[6]] == ["memory"] and [b.source for b in boxes[7]] == ["memory"]
        assert boxes[8] == []
        np.testing.assert_allclose(xyxy(boxes[7][0]), xyxy(det))


@pytest.mark.parametrize("stride", [2, 3])
def test_stride_carries_boxes_between_detector_runs(stride):
    n_frames = 31
    temporal = TemporalFilter(make_settings(), FRAME_SIZE, detection_stride=stride)
    out = []
    for f in range(n_frames):
        out += temporal.push(f, [moving_box(f)] if f % stride == 0 else None)
    boxes = dict(out + temporal.flush())
    for f in range(n_frames):  # includes frames after the last detector run (pad >= stride - 1)
        (box,) = boxes[f]
        assert box.source == ("detected" if f % stride == 0 else "tracked")
        np.testing.assert_allclose(xyxy(box), xyxy(moving_box(f)), atol=1e-6)


def test_stride_without_tracking_holds_last_detector_output():
    temporal = TemporalFilter(make_settings(track=False), FRAME_SIZE, detection_stride=3)
    dets = {0: [moving_box(0)], 3: [moving_box(3)], 6: []}
    out = []
    for f in range(9):
        out += temporal.push(f, dets.get(f) if f % 3 == 0 else None)
    boxes = dict(out + temporal.flush())
    assert [(b.source, b.x1) for b in boxes[2]] == [("memory", moving_box(0).x1)]
    assert [(b.source, b.x1) for b in boxes[4]] == [("memory", moving_box(3).x1)]
    assert boxes[7] == []  # the detector ran at 6 and found nothing


START = {"plate": 0.5, "face": 0.5}


def weak(det: Detection) -> Detection:
    return det._replace(score=0.1)


def test_weak_detections_continue_a_track_beyond_gap_and_pad():
    # Confident for 10 frames, then only weak (a blurred or dark stretch) for 20: with max_gap and pad
    # 0 only the weak detections can keep the plate covered.
    dets = {f: [moving_box(f) if f < 10 else weak(moving_box(f))] for f in range(30)}
    boxes = run(TemporalFilter(make_settings(), FRAME_SIZE, start_thresholds=START), dets, 40)
    for f in range(30):
        (box,) = boxes[f]
        assert box.source == "detected" and covers(box, moving_box(f))
    assert all(boxes[f] == [] for f in range(30, 40))


def test_weak_detections_never_start_a_track_nor_count_without_tracking():
    dets = {f: [weak(moving_box(f))] for f in range(10)}
    for settings in (make_settings(), make_settings(track=False, frame_memory=2)):
        boxes = run(TemporalFilter(settings, FRAME_SIZE, start_thresholds=START), dets, 10)
        assert all(boxes[f] == [] for f in range(10))
    # A class the thresholds do not name: every detection counts.
    boxes = run(TemporalFilter(make_settings(), FRAME_SIZE, start_thresholds={"face": 0.5}), dets, 10)
    assert all(len(boxes[f]) == 1 for f in range(10))


def test_weak_detection_only_takes_a_track_no_confident_one_continued():
    # The confident detection continues the track; the weak one beside it is left unmatched and dropped,
    # and a weak detection far from the track (outside the gates) is dropped too.
    dets = {f: [moving_box(f)] for f in range(5)}
    dets[5] = [moving_box(5), weak(moving_box(5, y0=104.0)), weak(moving_box(5, y0=300.0))]
    boxes = run(TemporalFilter(make_settings(), FRAME_SIZE, start_thresholds=START), dets, 6)
    (box,) = boxes[5]
    assert box.score == 0.9 and np.allclose(xyxy(box), xyxy(moving_box(5)))


@pytest.mark.parametrize(
    "overrides, stride",
    [({}, 1), (dict(track=False, frame_memory=3), 2), (dict(max_gap=40, pad=30, smoothing=1.0), 3),
     (dict(hold=30, max_gap=2, pad=0), 1)],
)
def test_push_returns_frames_within_lookahead(overrides, stride):
    temporal = TemporalFilter(RedactSettings(**overrides), FRAME_SIZE, detection_stride=stride)
    lookahead = temporal.lookahead_frames
    assert lookahead == 0 if overrides.get("track") is False else 0 < lookahead <= 100
    rng = np.random.default_rng(2)
    returned = []
    for n in range(120):
        dets = [moving_box(n, vx=2)] if rng.random() < 0.6 else []
        got = temporal.push(n, dets if n % stride == 0 else None)
        returned += [f for f, _ in got]
        # Everything up to n - lookahead is out, nothing later: bounded delay, bounded window.
        assert returned == list(range(max(n - lookahead + 1, 0)))
    returned += [f for f, _ in temporal.flush()]
    assert returned == list(range(120))
    assert temporal.flush() == []
    with pytest.raises(RuntimeError):
        temporal.push(120, [])


@pytest.mark.parametrize(
    "overrides, stride",
    [({}, 1), (dict(max_gap=4, pad=7, smoothing=1.0), 1), (dict(pad=2, frame_memory=2), 3),
     (dict(hold=12, max_gap=2, pad=0, smoothing=0.2), 2)],
)
@pytest.mark.parametrize("start_thresholds", [None, START])
def test_lookahead_is_enough_to_match_whole_clip_result(overrides, stride, start_thresholds):
    # Same input through a filter that waits for the whole clip: any difference means a frame was
    # declared final before all the input that shapes it had arrived.
    rng = np.random.default_rng(3)
    n_frames = 150
    clip = []
    for n in range(n_frames):
        dets = [
            moving_box(n, x0=x0, y0=y0, vx=vx, label=label)._replace(score=rng.choice([0.1, 0.9]))
            for x0, y0, vx, label in ((0, 50, 3, "plate"), (600, 200, -4, "face"), (300, 10, 0.5, "plate"))
            if rng.random() < 0.7
        ]
        clip.append(dets if n % stride == 0 else None)
    streamed = TemporalFilter(RedactSettings(**overrides), FRAME_SIZE, stride, start_thresholds)
    whole = TemporalFilter(RedactSettings(**overrides), FRAME_SIZE, stride, start_thresholds)
    whole.lookahead_frames = 10**6
    out_streamed, out_whole = [], []
    for n, dets in enumerate(clip):
        out_streamed += streamed.push(n, dets)
        out_whole += whole.push(n, dets)
    out_streamed += streamed.flush()
    out_whole += whole.flush()
    assert out_whole and out_streamed == out_whole


def test_enlarge_zones_and_off_frame_boxes():
    zone = PrivacyZone(x1=0.5, y1=0.0, x2=1.0, y2=0.25)
    settings = make_settings(enlarge={"plate": 1.5}, zones=[zone])
    dets = {
        0: [Detection(100, 100, 140, 120, "plate", 0.9), Detection(-90, 10, -40, 30, "plate", 0.9)],  # 2nd: off-frame
        1: [Detection(0, 0, 2000, 9, "face", 1.0)],
    }
    boxes = run(TemporalFilter(settings, FRAME_SIZE), dets, 3)
    zone_box = RedactBox(320.0, 0.0, 640.0, 90.0, "zone", 1.0, "zone")
    assert boxes[0] == [RedactBox(90.0, 95.0, 150.0, 125.0, "plate", 0.9, "detected"), zone_box]
    assert boxes[1] == [RedactBox(0, 0, 2000, 9, "face", 1.0, "detected"), zone_box]  # kept unclipped
    assert boxes[2] == [zone_box]


def test_accepts_plain_tuples_and_rejects_non_finite():
    boxes = run(TemporalFilter(make_settings(), FRAME_SIZE), {0: [(30, 40, 10, 20, "plate", 0.4)]}, 1)
    assert boxes[0] == [RedactBox(10, 20, 30, 40, "plate", 0.4, "detected")]  # corners reordered
    temporal = TemporalFilter(make_settings(), FRAME_SIZE)
    with pytest.raises(ValueError):
        temporal.push(0, [Detection(float("nan"), 0, 10, 10, "plate", 0.5)])
    temporal = TemporalFilter(make_settings(), FRAME_SIZE)
    temporal.push(3, [])
    with pytest.raises(ValueError):
        temporal.push(5, [])  # frames must be consecutive
