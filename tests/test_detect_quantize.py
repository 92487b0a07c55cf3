"""int8 on the CPU: ranges measured once by `train calibrate`, used by the detector without any image."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog.testing
import torch

from dashcamd.config import DetectorSettings
from dashcamd.detect import Detector
from dashcamd.detect.errors import CheckpointError, DetectorError
from dashcamd.detect.infer import choose_precision, letterbox, letterbox_geometry, letterbox_pixels
from dashcamd.detect.onnx_backend import OnnxRuntimeModel, _session, export_bytes
from dashcamd.detect.quantize import INPUT_NAME, PIXELS_NAME, head_scope, load_ranges, quantize, ranges_path
from dashcamd.train.calibrate import calibrate
from dashcamd.train.dataset import Sample
from detect_helpers import one_torch_thread, random_model, write_dashcamd_checkpoint  # noqa: F401

CPU = torch.device("cpu")


def _photos(folder: Path, count: int = 6) -> list[Sample]:
    """Smooth random pictures (a blurred noise field): activations like a photo's, not like white noise."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        small = rng.integers(0, 255, (12, 16, 3), np.uint8)
        path = folder / f"photo{i}.png"
        cv2.imwrite(str(path), cv2.resize(small, (160, 120), interpolation=cv2.INTER_CUBIC))
        samples.append(Sample(path, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
    return samples


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Random tiny weights with ranges measured on six pictures; (weights path, fp32 reference model)."""
    folder = tmp_path_factory.mktemp("int8")
    weights = folder / "tiny.pt"
    reference = write_dashcamd_checkpoint(weights, random_model(seed=5))
    document = calibrate(weights, _photos(folder / "photos"), count=6, size_px=96)
    assert document["images"] == 6 and ranges_path(weights).is_file()
    return weights, reference


def test_int8_model_output_stays_close_to_fp32(calibrated) -> None:
    weights, reference = calibrated
    int8 = OnnxRuntimeModel(reference, threads=1, int8_ranges=load_ranges(weights))
    image = cv2.imread(str(weights.parent / "photos" / "photo0.png"))[:, :, ::-1].copy()
    x = torch.from_numpy(cv2.resize(image, (128, 96))).permute(2, 0, 1)[None].float() / 255  # another shape
    with torch.inference_mode():
        expected, got = reference(x), int8(x)
    assert got.shape == expected.shape
    scores_error = (got[..., 4:] - expected[..., 4:]).abs()
    assert scores_error.max() < 0.03 and scores_error.mean() < 0.005
    # Boxes are decoded in fp32 from int8 convolutions: within a few pixels, not the 2.5 px steps of an
    # int8 decode (which would show as a large mean error).
    box_error = (got[..., :4] - expected[..., :4]).abs()
    assert box_error.mean() < 0.5 and box_error.max() < 8.0


def test_int8_model_takes_the_pixels_with_the_outputs_of_its_quantized_float_input(calibrated) -> None:
    """``take_pixels`` drops the input's quantize step (scale 1/255, zero 0) for uint8 pixels: the outputs are
    bit-identical to the quantized model fed floats, whole levels or resized ones (rounded the same way)."""
    weights, reference = calibrated
    int8 = OnnxRuntimeModel(reference, threads=1, int8_ranges=load_ranges(weights))
    float_input = _session(quantize(export_bytes(reference, (64, 96)), head_scope(reference), load_ranges(weights)), 1)
    rng = np.random.default_rng(3)
    pixels = cv2.resize(rng.integers(0, 256, (2 * 8, 12, 3), np.uint8), (96, 2 * 64)).reshape(2, 64, 96, 3)
    whole = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    resized = torch.from_numpy(rng.uniform(0, 1, (2, 3, 64, 96)).astype(np.float32))
    resized[0, :, :, :] = (torch.arange(64 * 96).reshape(64, 96) % 255 + 0.5) / 255  # halves, as letterbox makes them
    session = int8.prepare((64, 96))
    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == [(PIXELS_NAME, "tensor(uint8)", [64, 96, 3])]
    with torch.inference_mode():
        for x in (whole, resized):
            (expected,) = float_input.run(None, {INPUT_NAME: x.numpy()})
            assert np.array_equal(int8(x).numpy(), expected)
        assert np.array_equal(int8.forward_pixels(pixels).numpy(), float_input.run(None, {INPUT_NAME: whole.numpy()})[0])


@pytest.mark.parametrize("frame_hw", [(90, 160), (160, 90)])  # grey above and below, left and right
def test_pixel_letterbox_is_the_float_letterbox_in_whole_levels(frame_hw) -> None:
    geometry = letterbox_geometry(*frame_hw, 96)
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (geometry.resized_h, geometry.resized_w, 3), np.uint8) for _ in range(2)]
    expected = letterbox(torch.from_numpy(np.stack(frames)), geometry) * 255
    got = letterbox_pixels(frames, geometry)
    assert got.shape == (2, geometry.input_h, geometry.input_w, 3) and (geometry.pad_top or geometry.pad_left)
    assert np.array_equal(got, expected.round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_detector_hands_only_shrunk_frames_to_int8_as_pixels(calibrated, monkeypatch) -> None:
    weights, _ = calibrated
    detector = Detector(weights, device="cpu", inference_size=96)
    calls = []
    forward_pixels = detector._model.forward_pixels
    monkeypatch.setattr(detector._model, "forward_pixels", lambda p: calls.append(p.shape) or forward_pixels(p))
    detector.detect([np.zeros((54, 96, 3), np.uint8)] * 3, source_hw=(90, 160))
    assert calls == [(3, 64, 96, 3)]
    detector.detect([np.zeros((90, 160, 3), np.uint8)])  # full size: resized in float, then rounded
    assert len(calls) == 2


def test_only_the_detect_head_stays_fp32(calibrated) -> None:
    """Quantizing the head's output convolutions cost dev-split AP (see ``head_scope``): in the int8 graph
    every convolution outside the head reads dequantized int8 weights, none inside it does."""
    import onnx

    weights, reference = calibrated
    scope = head_scope(reference)
    graph = onnx.load_from_string(quantize(export_bytes(reference, (96, 96)), scope, load_ranges(weights))).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    head = [conv for conv in convs if conv.name.startswith(scope)]
    body = [conv for conv in convs if not conv.name.startswith(scope)]
    assert len(head) == 3 and body
    assert not any(conv.input[1] in dequantized for conv in head)
    assert all(conv.input[1] in dequantized for conv in body)


def test_auto_precision_is_int8_only_for_weights_with_their_own_ranges(calibrated, tmp_path) -> None:
    weights, _ = calibrated
    detector = Detector(weights, device="cpu", inference_size=96)
    assert (detector.runtime, detector.precision) == ("onnxruntime", "int8")
    frame = np.zeros((90, 160, 3), np.uint8)
    int8_found = detector.detect([frame])[0]
    assert isinstance(int8_found, list)

    uncalibrated = tmp_path / "other.pt"
    write_dashcamd_checkpoint(uncalibrated, random_model(seed=6))
    assert Detector(uncalibrated, device="cpu", inference_size=96).precision == "fp32"
    with pytest.raises(DetectorError, match="calibrate"):
        Detector(uncalibrated, device="cpu", precision="int8")

    # Ranges copied beside different weights are not theirs: fp32 again, never wrong ranges.
    ranges_path(uncalibrated).write_bytes(ranges_path(weights).read_bytes())
    assert load_ranges(uncalibrated) is None
    assert Detector(uncalibrated, device="cpu", inference_size=96).precision == "fp32"

    ranges_path(uncalibrated).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        Detector(uncalibrated, device="cpu")
    ranges_path(uncalibrated).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="not a"):
        Detector(uncalibrated, device="cpu")


def test_ranges_that_do_not_fit_the_export_mean_fp32_under_auto_and_an_error_when_int8_is_asked(
        calibrated, tmp_path) -> None:
    """As after a torch upgrade whose exporter names tensors differently: found at start-up, not per clip."""
    weights, _ = calibrated
    stale = tmp_path / "stale.pt"
    stale.write_bytes(weights.read_bytes())
    document = json.loads(ranges_path(weights).read_text())
    data = document["ranges"]["data"]
    for name in [n for n in data if n.startswith("/model.0/")]:
        del data[name]
    ranges_path(stale).write_text(json.dumps(document))
    with structlog.testing.capture_logs() as logged:
        detector = Detector(stale, device="cpu", inference_size=96)
    assert detector.precision == "fp32"
    assert [e["running"] for e in logged if e["event"] == "detector_int8_unavailable"] == ["fp32"]
    assert isinstance(detector.detect([np.zeros((90, 160, 3), np.uint8)])[0], list)
    with pytest.raises(DetectorError, match="do not fit"):
        Detector(stale, device="cpu", inference_size=96, precision="int8")


def test_int8_start_up_leaves_no_file_behind(calibrated, tmp_path, monkeypatch) -> None:
    """Quantizing goes through files (onnxruntime's API takes paths): they live in a temporary folder
    that is removed, and nothing lands in the working directory (under systemd that is read-only /)."""
    weights, _ = calibrated
    cwd, temp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    detector = Detector(weights, device="cpu", inference_size=96)
    detector.detect([np.zeros((120, 90, 3), np.uint8)])  # a second shape, quantized on first use
    assert detector.precision == "int8"
    assert list(cwd.iterdir()) == [] and list(temp.iterdir()) == []


def test_precision_choice() -> None:
    cuda = torch.device("cuda")
    assert choose_precision("auto", cuda) == "fp16"
    assert choose_precision("auto", CPU, "onnxruntime", int8_ready=True) == "int8"
    assert choose_precision("auto", CPU, "onnxruntime", int8_ready=False) == "fp32"
    assert choose_precision("auto", CPU, "torch", int8_ready=True) == "fp32"
    assert choose_precision("int8", CPU, "onnxruntime", int8_ready=True) == "int8"
    assert choose_precision("fp32", CPU, "onnxruntime", int8_ready=True) == "fp32"
    for requested, runtime, ready, message in (("int8", "torch", True, "onnxruntime"),
                                                ("bf16", "onnxruntime", False, "torch"),
                                                ("fp16", "onnxruntime", False, "CUDA"),
                                                ("int4", "onnxruntime", True, "unknown")):
        with pytest.raises(DetectorError, match=message):
            choose_precision(requested, CPU, runtime, int8_ready=ready)


def test_shipped_weights_come_with_their_int8_ranges() -> None:
    """Weights re-exported without `python -m dashcamd.train calibrate` would silently run in fp32
    (half the CPU speed): this catches it, and checks the shipped ranges still quantize a 16:9 shape."""
    weights = DetectorSettings().weights
    assert load_ranges(weights) is not None, f"run: python -m dashcamd.train calibrate {weights}"
    detector = Detector(weights, device="cpu", thresholds={"plate": 0.1, "face": 0.1})
    assert detector.precision == "int8"
    frame = np.full((360, 640, 3), 128, np.uint8)
    (found,) = detector.detect([frame], source_hw=(1080, 1920))
    assert all(d.label in ("plate", "face") for d in found)
