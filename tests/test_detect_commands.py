"""detect / export-onnx commands through their functions, on images generated at test time."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

from dashcamd.detect import load_model
from dashcamd.detect.commands import run_detect, run_export_onnx
from detect_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from detect_helpers import grid_model, write_dashcamd_checkpoint


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "grid.pt"
    write_dashcamd_checkpoint(path, grid_model())
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    cv2.imwrite(str(root / "a.jpg"), np.full((48, 64, 3), 128, np.uint8))
    cv2.imwrite(str(root / "sub" / "b.PNG"), np.zeros((64, 32, 3), np.uint8))
    (root / "notes.txt").write_text("not an image")
    return root


def test_detect_json_lines(weights: Path, images: Path, capsys) -> None:
    with structlog.testing.capture_logs():  # logs would go to stdout; the CLI sends them to stderr
        code = run_detect([str(images)], weights, "cpu", json_lines=True, thresholds={"face": 0.5}, inference_size=64)
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(images / "a.jpg"), str(images / "sub" / "b.PNG")]
    for line in lines:
        assert line["boxes"]
        for x1, y1, x2, y2, label, score in line["boxes"]:
            assert label == "face" and 0.5 <= score <= 1
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    # The 48x64 image is letterboxed to 64x64 (8 px of padding above and below) but boxes are frame px.
    assert max(box[3] for box in lines[0]["boxes"]) == 48.0


def test_detect_readable_output_and_errors(weights: Path, images: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with structlog.testing.capture_logs():
        code = run_detect([str(images / "a.jpg"), str(broken)], weights, "cpu", json_lines=False,
                          thresholds={"face": 0.5}, inference_size=64)
        missing = run_detect([str(tmp_path / "missing")], weights, "cpu", False, None, 64)
    captured = capsys.readouterr()
    assert code == 1 and missing == 2
    assert captured.out.startswith(f"{images / 'a.jpg'}: ") and "face 1.00 at (" in captured.out
    assert "broken.jpg: not a readable image" in captured.err and "no such file or folder" in captured.err


def test_export_onnx_command(weights: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.onnx"
    assert run_export_onnx(weights, out, 64) == 0
    assert load_model(out).input_hw == (64, 64)
    assert run_export_onnx(out, tmp_path / "again.onnx", 64) == 2
    assert "export needs torch weights" in capsys.readouterr().err
