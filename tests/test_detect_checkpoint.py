"""Weights formats: dashcamd's own, ultralytics train.py files (v6 and v5.0) read without their code,
ONNX; each must reproduce its reference forward. And the restricted unpickler must refuse code."""

from __future__ import annotations

import builtins
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from dashcamd.detect import CheckpointError, UnsafeCheckpointError, load_checkpoint, load_model
from dashcamd.detect.onnx_backend import export_onnx
from dashcamd.detect.unpickle import read_torch_archive
from detect_fake_yolov5 import write_ultralytics_checkpoint
from detect_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from detect_helpers import NAMES, random_model, write_dashcamd_checkpoint

TOLERANCE = 1e-3


def _max_abs_diff(reference: torch.nn.Module, loaded: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected, actual = reference(x), loaded(x)
    assert expected.shape == actual.shape
    return (expected - actual).abs().max().item()


@pytest.fixture(scope="module")
def dashcamd_weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    return path, write_dashcamd_checkpoint(path, random_model(seed=3))


def test_dashcamd_checkpoint_round_trip(dashcamd_weights) -> None:
    path, reference = dashcamd_weights
    raw = torch.load(path, weights_only=True)  # the format promises plain data + tensors only
    assert raw["format"] == "dashcamd-yolov5" and raw["version"] == 1 and raw["names"] == NAMES
    assert raw["meta"] == {"epochs": 1, "note": "test"}
    assert all(t.dtype == torch.float16 for t in raw["state_dict"].values() if t.is_floating_point())
    model = load_model(path)
    assert not model.training and model.names == NAMES
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _max_abs_diff(reference, model, torch.rand(2, 3, 64, 96)) < TOLERANCE
    resumed, meta = load_checkpoint(path)
    assert meta["epochs"] == 1 and resumed.arch == raw["arch"]


@pytest.mark.parametrize("layout", ["v6", "v5.0"])
def test_ultralytics_checkpoint_loads_without_its_code(tmp_path: Path, layout: str) -> None:
    path = tmp_path / f"yolov5_{layout}.pt"
    reference = write_ultralytics_checkpoint(path, layout, seed=4)
    assert "models" not in sys.modules and "models.yolo" not in sys.modules
    model = load_model(path)
    assert model.names == ["plate", "face"]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert torch.allclose(model.detect.anchors_px[2, 2], torch.tensor([373.0, 326.0]))
    assert _max_abs_diff(reference, model, torch.rand(2, 3, 64, 96)) < TOLERANCE


def test_loader_would_notice_a_wrong_layer(tmp_path: Path) -> None:
    """The agreement test can fail: the same file read into a model with one block swapped differs."""
    path = tmp_path / "yolov5.pt"
    reference = write_ultralytics_checkpoint(path, "v5.0", seed=5)
    model = load_model(path)
    focus = model.model[0]
    focus.forward = lambda x: focus.conv(torch.cat((x[..., ::2, ::2], x[..., ::2, 1::2],  # two slices swapped
                                                    x[..., 1::2, ::2], x[..., 1::2, 1::2]), 1))
    assert _max_abs_diff(reference, model, torch.rand(1, 3, 64, 64)) > TOLERANCE


def test_onnx_export_agrees_with_torch(dashcamd_weights, tmp_path: Path) -> None:
    path, reference = dashcamd_weights
    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(path, onnx_path, inference_size=64)
    model = load_model(onnx_path)
    assert model.names == NAMES and model.input_hw == (64, 64)
    assert _max_abs_diff(reference, model, torch.rand(3, 3, 64, 64)) < TOLERANCE  # batch is dynamic


class _RunsCode:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", [os.system, builtins.eval, builtins.exec])
def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path: Path, func) -> None:
    marker = tmp_path / "ran"
    command = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(func, command), "epoch": 1}, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"{func.__name__}"):
        load_model(path)
    assert not marker.exists()


def test_malicious_global_hidden_in_a_module_tree_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "yolov5.pt"
    write_ultralytics_checkpoint(path, "v6")
    # Same archive, with a payload beside the model: refused as a whole.
    payload = read_torch_archive(path)
    assert payload["ema"].global_name == "models.yolo.DetectionModel"
    evil = tmp_path / "evil.pt"
    torch.save({"model": None, "ema": None, "extra": _RunsCode(os.system, f"touch {marker}")}, evil)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|nt.system"):
        read_torch_archive(evil)
    assert not marker.exists()


def test_plain_pickle_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsCode(os.system, f"touch {marker}")))
    with pytest.raises(CheckpointError, match="not a torch zip archive"):
        load_model(path)
    assert not marker.exists()


def test_unknown_dict_and_missing_file_are_typed_errors(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="neither"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "missing.pt")
