"""Inference: letterbox geometry and round trip, NMS against a brute-force reference, per-class
thresholds, and the Detector end to end on a model whose output is known exactly."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch

from dashcamd.detect import Detection, Detector, DetectorError
from dashcamd.detect.infer import (PAD_VALUE, box_iou, letterbox, letterbox_geometry, nms, postprocess,
                                   unletterbox_boxes)
from dashcamd.detect.onnx_backend import export_onnx
from detect_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from detect_helpers import grid_model, grid_model_boxes_px, random_model, write_dashcamd_checkpoint


@pytest.mark.parametrize(("frame_h", "frame_w", "size", "expected_input"), [
    (1080, 1920, 640, (384, 640)),  # 360 rows resized, padded to 384
    (1920, 1080, 640, (640, 384)),
    (480, 640, 640, (480, 640)),
    (100, 192, 96, (64, 96)),
])
def test_letterbox_geometry(frame_h: int, frame_w: int, size: int, expected_input: tuple[int, int]) -> None:
    g = letterbox_geometry(frame_h, frame_w, size)
    assert (g.input_h, g.input_w) == expected_input
    assert max(g.resized_h, g.resized_w) == size
    assert g.input_h % 32 == 0 and g.input_w % 32 == 0
    assert abs(g.resized_w / g.resized_h - frame_w / frame_h) < 0.02
    assert 0 <= g.input_h - g.resized_h - 2 * g.pad_top <= 1  # centred


def test_letterbox_fixed_input_fits_and_pads() -> None:
    g = letterbox_geometry(100, 200, 640, input_hw=(96, 96))
    assert (g.resized_h, g.resized_w, g.input_h, g.input_w, g.pad_top, g.pad_left) == (48, 96, 96, 96, 24, 0)


def test_letterbox_pixels_and_unletterbox_round_trip() -> None:
    frame = np.zeros((100, 192, 3), np.uint8)
    frame[40:60, 100:140] = (255, 0, 0)  # a red block at x 100..140, y 40..60
    g = letterbox_geometry(100, 192, 96)  # scale 0.5 -> 50 x 96, pad 7 rows on top
    x = letterbox(torch.from_numpy(frame)[None], g)
    assert x.shape == (1, 3, 64, 96) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, : g.pad_top], torch.tensor(PAD_VALUE))
    assert torch.allclose(x[0, :, g.pad_top + g.resized_h:], torch.tensor(PAD_VALUE))
    red = (x[0, 0] > 0.5) & (x[0, 1] < 0.5)  # half-way: the block edges, blurred by the antialiasing
    rows, cols = red.nonzero(as_tuple=True)
    model_box = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=torch.float32)
    assert unletterbox_boxes(model_box, g).tolist() == [[100.0, 40.0, 140.0, 60.0]]
    # Any frame box, mapped into the model input and back, returns unchanged; outside parts are clipped.
    boxes = torch.tensor([[0.0, 0.0, 192.0, 100.0], [10.5, 20.25, 30.0, 99.0], [-20.0, 50.0, 300.0, 140.0]])
    forward = boxes * torch.tensor([g.scale_x, g.scale_y] * 2) + torch.tensor([g.pad_left, g.pad_top] * 2)
    back = unletterbox_boxes(forward, g)
    assert torch.allclose(back[:2], boxes[:2], atol=1e-4)
    assert torch.allclose(back[2], torch.tensor([0.0, 50.0, 192.0, 100.0]), atol=1e-4)


def _brute_force_nms(boxes: list[list[float]], scores: list[float], classes: list[int], iou_max: float) -> list[int]:
    def iou(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union if union > 0 else 0.0

    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(classes[k] != classes[i] or iou(boxes[k], boxes[i]) <= iou_max for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    boxes, scores, classes = [], [], []
    for _ in range(150):
        x, y, w, h = rng.uniform(0, 200), rng.uniform(0, 200), rng.uniform(2, 60), rng.uniform(2, 60)
        boxes.append([x, y, x + w, y + h])
        scores.append(rng.random())
        classes.append(rng.randrange(2))
    kept = nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes), 0.45)
    assert kept.tolist() == _brute_force_nms(boxes, scores, classes, 0.45)


def test_nms_keeps_overlapping_boxes_of_different_classes_and_handles_empty() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]])
    kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.5)
    assert kept.tolist() == [0, 1]
    assert nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


def test_box_iou_values() -> None:
    iou = box_iou(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]]))
    assert torch.allclose(iou, torch.tensor([[1 / 3, 0.0, 0.0]]))


def test_postprocess_per_class_thresholds() -> None:
    # Three boxes far apart; score = objectness x class score.
    pred = torch.tensor([[
        [10, 10, 4, 4, 0.5, 0.9, 0.1],  # plate 0.45, face 0.05
        [50, 50, 4, 4, 1.0, 0.2, 0.35],  # plate 0.20, face 0.35
        [90, 90, 4, 4, 0.8, 0.0, 0.5],  # face 0.40
    ]])
    (boxes, scores, classes), = postprocess(pred, torch.tensor([0.3, 0.38]), iou_threshold=0.45)
    assert classes.tolist() == [0, 1] and torch.allclose(scores, torch.tensor([0.45, 0.40]))
    assert boxes[1].tolist() == [88.0, 88.0, 92.0, 92.0]
    (_, scores, classes), = postprocess(pred, torch.tensor([0.15, 0.3]), iou_threshold=0.45)
    assert sorted(zip(classes.tolist(), [round(s, 2) for s in scores.tolist()])) == [
        (0, 0.2), (0, 0.45), (1, 0.35), (1, 0.4)]  # a box may count as both classes


@pytest.fixture(scope="module")
def grid_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "grid.pt"
    write_dashcamd_checkpoint(path, grid_model())
    return path


def _expected_grid_detections(frame_h: int, frame_w: int, size: int) -> list[tuple[float, ...]]:
    g = letterbox_geometry(frame_h, frame_w, size)
    model_boxes = torch.tensor(grid_model_boxes_px(g.input_h, g.input_w))
    frame_boxes = (model_boxes - torch.tensor([g.pad_left, g.pad_top] * 2)) / torch.tensor([g.scale_x, g.scale_y] * 2)
    frame_boxes = torch.minimum(frame_boxes.clamp(min=0), torch.tensor([frame_w, frame_h] * 2))
    return sorted(tuple(b) for b in frame_boxes.tolist() if b[2] > b[0] and b[3] > b[1])


def _as_sorted_boxes(detections: list[Detection]) -> list[tuple[float, ...]]:
    return sorted((d.x1, d.y1, d.x2, d.y2) for d in detections)


def test_detector_end_to_end_on_a_known_output(grid_weights: Path) -> None:
    # "auto" takes the GPU where there is one; the known output below is checked on the CPU everywhere.
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    with structlog.testing.capture_logs() as logs:
        chosen = Detector(grid_weights, device="auto", thresholds={"face": 0.5}, inference_size=96)
    assert chosen.device.type == expected_device
    assert any(e["event"] == "detector_device" and e["device"].startswith(expected_device) and "auto" in e["reason"]
               for e in logs)
    detector = Detector(grid_weights, device="cpu", thresholds={"face": 0.5}, inference_size=96, batch_size=2)
    assert detector.names == ["plate", "face"]
    frames = [np.full((100, 192, 3), 90, np.uint8), np.zeros((128, 192, 3), np.uint8),
              np.full((100, 192, 3), 200, np.uint8)]
    results = detector.detect(frames)
    assert len(results) == 3
    for frame, detections in zip(frames, results):
        assert {d.label for d in detections} == {"face"}
        assert all(d.score == pytest.approx(0.99991, abs=1e-4) for d in detections)
        expected = _expected_grid_detections(*frame.shape[:2], 96)
        actual = _as_sorted_boxes(detections)
        assert len(actual) == len(expected)
        assert np.allclose(actual, expected, atol=1e-3)
    assert detector.detect([]) == []


def test_detector_on_frames_already_shrunk_reports_boxes_in_source_pixels(grid_weights: Path) -> None:
    detector = Detector(grid_weights, device="cpu", thresholds={"face": 0.5}, inference_size=96, batch_size=2)
    source_hw = (200, 384)
    assert detector.resized_size(*source_hw) == (50, 96)
    shrunk = [np.full((50, 96, 3), 90, np.uint8)] * 3
    results = detector.detect(shrunk, source_hw=source_hw)
    expected = _expected_grid_detections(*source_hw, 96)
    assert len(results) == 3
    assert all(np.allclose(_as_sorted_boxes(found), expected, atol=1e-3) for found in results)
    with pytest.raises(ValueError, match="shrunk"):
        detector.detect([np.zeros((200, 384, 3), np.uint8)], source_hw=source_hw)


def test_detector_thresholds(grid_weights: Path) -> None:
    frame = np.zeros((64, 64, 3), np.uint8)
    strict = Detector(grid_weights, device="cpu", thresholds={"face": 0.99995}, inference_size=64)
    assert strict.detect([frame]) == [[]]
    with pytest.raises(DetectorError, match="faces"):
        Detector(grid_weights, device="cpu", thresholds={"faces": 0.3}, inference_size=64)
    with pytest.raises(ValueError, match="uint8"):
        strict.detect([frame.astype(np.float32)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_detector_on_cuda_matches_cpu(grid_weights: Path) -> None:
    frame = np.random.default_rng(0).integers(0, 255, (100, 192, 3), np.uint8)
    on_cpu = Detector(grid_weights, device="cpu", inference_size=96).detect([frame])[0]
    on_cuda = Detector(grid_weights, device="cuda", inference_size=96).detect([frame])[0]
    assert np.allclose(_as_sorted_boxes(on_cpu), _as_sorted_boxes(on_cuda), atol=0.1)


def test_detector_with_onnx_weights_matches_torch(tmp_path: Path) -> None:
    weights = tmp_path / "random.pt"
    write_dashcamd_checkpoint(weights, random_model(seed=7))
    export_onnx(weights, tmp_path / "random.onnx", inference_size=64)
    frame = np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)
    thresholds = {"plate": 0.05, "face": 0.05}
    from_torch = Detector(weights, device="cpu", thresholds=thresholds, inference_size=64).detect([frame])[0]
    from_onnx = Detector(tmp_path / "random.onnx", device="auto", thresholds=thresholds, inference_size=64)
    assert from_onnx.device == torch.device("cpu")
    onnx_detections = from_onnx.detect([frame])[0]
    assert len(from_torch) == len(onnx_detections) > 0
    for a, b in itertools.zip_longest(from_torch, onnx_detections):
        assert a.label == b.label and a.score == pytest.approx(b.score, abs=1e-4)
        assert np.allclose(a[:4], b[:4], atol=1e-2)


def test_bf16_on_cpu_stays_close_to_fp32(grid_weights: Path) -> None:
    frame = np.full((100, 192, 3), 90, np.uint8)
    fp32 = Detector(grid_weights, device="cpu", thresholds={"face": 0.5}, inference_size=96).detect([frame])[0]
    bf16 = Detector(grid_weights, device="cpu", thresholds={"face": 0.5}, inference_size=96, precision="bf16")
    assert bf16.precision == "bf16"
    detections = bf16.detect([frame])[0]
    assert len(detections) == len(fp32) > 0
    # Decoding runs in fp32 even under bf16 autocast, so boxes stay within a fraction of a pixel.
    assert np.allclose(_as_sorted_boxes(detections), _as_sorted_boxes(fp32), atol=0.5)
    with pytest.raises(DetectorError, match="CUDA"):
        Detector(grid_weights, device="cpu", precision="fp16")


def test_onnxruntime_runtime_matches_torch_on_several_frame_shapes(tmp_path: Path) -> None:
    weights = tmp_path / "random.pt"
    write_dashcamd_checkpoint(weights, random_model(seed=3))
    thresholds = {"plate": 0.05, "face": 0.05}
    on_torch = Detector(weights, device="cpu", thresholds=thresholds, inference_size=96, runtime="torch")
    on_ort = Detector(weights, device="cpu", thresholds=thresholds, inference_size=96, runtime="auto")
    assert (on_torch.runtime, on_ort.runtime) == ("torch", "onnxruntime")
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 255, shape, np.uint8) for shape in ((72, 128, 3), (72, 128, 3), (128, 96, 3))]
    for a_frame, b_frame in zip(on_torch.detect(frames), on_ort.detect(frames)):
        assert len(a_frame) == len(b_frame) > 0
        for a, b in zip(sorted(a_frame), sorted(b_frame)):
            assert a.label == b.label and a.score == pytest.approx(b.score, abs=1e-4)
            assert np.allclose(a[:4], b[:4], atol=1e-2)
    with pytest.raises(DetectorError, match="runtime"):
        Detector(weights, device="cpu", runtime="tensorrt")
