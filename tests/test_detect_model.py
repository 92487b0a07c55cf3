"""YOLOv5 model: shapes, strides, the decode formula, both layouts, plain-data arch, bias prior."""

from __future__ import annotations

import math

import pytest
import torch

from dashcamd.detect import ArchitectureError, build_model, initialize_biases, yolov5_arch
from dashcamd.detect.arch import DEFAULT_ANCHORS_PX
from dashcamd.detect.model import SPP, SPPF, C3, Focus
from detect_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from detect_helpers import NAMES, random_model


@pytest.mark.parametrize("layout", ["v6", "v5.0"])
def test_training_and_eval_outputs(layout: str) -> None:
    model = random_model(layout=layout).train()
    x = torch.rand(2, 3, 64, 96)
    raw = model(x)
    assert [tuple(p.shape) for p in raw] == [(2, 3, 8, 12, 7), (2, 3, 4, 6, 7), (2, 3, 2, 3, 7)]
    model.eval()
    with torch.no_grad():
        decoded = model(x)
    assert decoded.shape == (2, 3 * (96 + 24 + 6), 7)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.detect.anchors_px.shape == (3, 3, 2)
    assert model.detect.anchors_px.flatten().tolist() == [v for level in DEFAULT_ANCHORS_PX for v in level]
    assert model.names == NAMES and model.detect.nc == 2
    assert ((decoded[..., 4:] >= 0) & (decoded[..., 4:] <= 1)).all()


def test_layouts_use_their_blocks() -> None:
    v6 = build_model(yolov5_arch("n", layout="v6"), NAMES)
    v5 = build_model(yolov5_arch("n", layout="v5.0"), NAMES)
    assert isinstance(v6.model[9], SPPF) and not any(isinstance(m, (Focus, SPP)) for m in v6.modules())
    assert isinstance(v5.model[0], Focus) and isinstance(v5.model[8], SPP) and isinstance(v5.model[9], C3)
    assert v6.model[0].conv.kernel_size == (6, 6) and v6.model[0].conv.stride == (2, 2)
    # depth multiple 0.33: v6 C3 repeats 3/6/9/3 -> 1/2/3/1, v5.0's 3/9/9 -> 1/3/3
    assert [len(v6.model[i].m) for i in (2, 4, 6, 8)] == [1, 2, 3, 1]
    assert [len(v5.model[i].m) for i in (2, 4, 6)] == [1, 3, 3]
    bn = v6.model[0].bn
    assert bn.eps == 1e-3 and bn.momentum == 0.03


def test_published_sizes_parameter_counts() -> None:
    # YOLOv5s v6 with 80 classes has 7,235,389 parameters in the published summary.
    model = build_model(yolov5_arch("s", nc=80), [str(i) for i in range(80)])
    assert sum(p.numel() for p in model.parameters()) == 7_235_389


def test_decode_matches_formula_for_one_cell() -> None:
    model = random_model()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        decoded = model(x)
        model.detect.train()  # raw head output, BatchNorm still in eval mode
        raw = model(x)
    level, anchor, gy, gx = 1, 2, 3, 1  # stride 16, grid 4x4
    t = raw[level][0, anchor, gy, gx]
    index = 3 * 8 * 8 + (anchor * 4 + gy) * 4 + gx
    expected_cx = (2 * torch.sigmoid(t[0]) - 0.5 + gx) * 16
    expected_h = (2 * torch.sigmoid(t[3])) ** 2 * 119  # anchor 2 of P4 is (59, 119)
    assert decoded[0, index, 0].item() == pytest.approx(expected_cx.item(), abs=1e-4)
    assert decoded[0, index, 3].item() == pytest.approx(expected_h.item(), abs=1e-4)
    assert decoded[0, index, 6].item() == pytest.approx(torch.sigmoid(t[6]).item(), abs=1e-6)


def test_arch_is_plain_data(tmp_path) -> None:
    arch = yolov5_arch("s", nc=2, layout="v5.0")
    torch.save(arch, tmp_path / "arch.pt")
    assert torch.load(tmp_path / "arch.pt", weights_only=True) == arch


def test_bad_arch_is_a_typed_error() -> None:
    arch = yolov5_arch("n")
    arch["backbone"][1][2] = "GhostConv"
    with pytest.raises(ArchitectureError, match="GhostConv"):
        build_model(arch, NAMES)
    with pytest.raises(ArchitectureError, match="class names"):
        build_model(yolov5_arch("n"), ["plate"])
    with pytest.raises(ValueError, match="size"):
        yolov5_arch("q")


def test_initialize_biases_sets_the_prior() -> None:
    model = build_model(yolov5_arch("n"), NAMES)
    before = [conv.bias.detach().clone().view(3, 7) for conv in model.detect.m]
    initialize_biases(model)
    for level, (conv, stride) in enumerate(zip(model.detect.m, (8, 16, 32))):
        delta = conv.bias.detach().view(3, 7) - before[level]
        assert torch.allclose(delta[:, 4], torch.full((3,), math.log(8 / (640 / stride) ** 2)))
        assert torch.allclose(delta[:, 5:], torch.full((3, 2), math.log(0.6 / (2 - 0.99))))
        assert torch.equal(delta[:, :4], torch.zeros(3, 4))
