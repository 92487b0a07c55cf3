"""YOLOv5 face+plate detector in plain PyTorch: the layer blocks, the Detect head and the config builder.

Module attribute names (``conv``/``bn``/``act``, ``cv1``..``cv3``, ``m``) follow the published YOLOv5
checkpoints, so their state-dict keys (``model.<i>.<...>``) map one-to-one onto this model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dashcamd.detect.arch import Arch
from dashcamd.detect.errors import ArchitectureError

BN_EPS = 1e-3  # the YOLOv5 training recipe's BatchNorm settings; checkpoints were trained with them
BN_MOMENTUM = 0.03
STRIDE_PROBE_PX = 64  # input side of the dry run that measures each level's stride (small: it runs at every build)


def _same_padding(kernel: int, padding: int | None) -> int:
    return kernel // 2 if padding is None else padding


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, _same_padding(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 Conv, with a residual add when ``shortcut`` and the channel counts match."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(hidden, c_out, 3, 1, g=g)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with 3 convs: ``cv3(cat(m(cv1(x)), cv2(x)))``, ``m`` a chain of ``n`` Bottlenecks."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(c_in, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPP(nn.Module):
    """v5.0 spatial pyramid pooling: parallel stride-1 max pools of several kernel sizes."""

    def __init__(self, c_in: int, c_out: int, k: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(k) + 1), c_out, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=size, stride=1, padding=size // 2) for size in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


class SPPF(nn.Module):
    """SPP made fast: three chained pools of one kernel see the same fields as SPP(k, 2k-1, 3k-2)."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c_out, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), dim=1))


class Focus(nn.Module):
    """v5.0 stem: space-to-depth (every 2x2 pixel block to 4 channels), then a Conv."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = Conv(c_in * 4, c_out, k, s, p, g, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channel order (even rows, even cols), (odd, even), (even, odd), (odd, odd) as in v5.0 weights.
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(nn.Module):
    """Concatenate a list of feature maps along dimension ``d``."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Detect(nn.Module):
    """One 1x1 conv per level predicting, per anchor, (tx, ty, tw, th, objectness, class logits...).

    Buffers: ``anchors_px`` float32 (nl, na, 2) anchor (w, h) in input pixels; ``stride`` float32 (nl,)
    input pixels per grid cell (set by the model builder).
    """

    def __init__(self, nc: int, anchors_px: Sequence[Sequence[float]] | int, ch: Sequence[int]) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(ch)
        # An int means "na anchors, values to be filled in" (checkpoints that auto-computed their anchors).
        self.na = anchors_px if isinstance(anchors_px, int) else len(anchors_px[0]) // 2
        if isinstance(anchors_px, int):
            anchors = torch.zeros(self.nl, self.na, 2)
        else:
            if len(anchors_px) != self.nl:
                raise ArchitectureError(f"{len(anchors_px)} anchor levels for {self.nl} detection inputs")
            anchors = torch.tensor(anchors_px, dtype=torch.float32).view(self.nl, self.na, 2)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.register_buffer("anchors_px", anchors)
        self.register_buffer("stride", torch.zeros(self.nl))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        """Training: raw per level (B, na, ny, nx, 5+nc). Eval: decoded (B, N, 5+nc), see ``YoloV5.forward``."""
        raw = []
        for level, (conv, feat) in enumerate(zip(self.m, feats)):
            p = conv(feat)
            batch, _, ny, nx = p.shape
            raw.append(p.view(batch, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        return torch.cat([self._decode(level, p) for level, p in enumerate(raw)], dim=1)

    def _decode(self, level: int, p: torch.Tensor) -> torch.Tensor:
        if p.dtype == torch.bfloat16:
            # bf16 keeps 8 mantissa bits: decoded pixel coordinates would be off by up to 2 px at 640.
            p = p.float()
        batch, _, ny, nx, _ = p.shape
        ys = torch.arange(ny, device=p.device, dtype=p.dtype)
        xs = torch.arange(nx, device=p.device, dtype=p.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid_xy = torch.stack((grid_x, grid_y), dim=-1).view(1, 1, ny, nx, 2)
        anchor_wh = self.anchors_px[level].to(p.dtype).view(1, self.na, 1, 1, 2)
        y = p.sigmoid()
        xy = (y[..., 0:2] * 2 - 0.5 + grid_xy) * self.stride[level].to(p.dtype)
        wh = (y[..., 2:4] * 2) ** 2 * anchor_wh
        return torch.cat((xy, wh, y[..., 4:]), dim=-1).reshape(batch, -1, self.no)


_CHANNEL_LAYERS: dict[str, type[nn.Module]] = {
    "Conv": Conv, "Bottleneck": Bottleneck, "C3": C3, "SPP": SPP, "SPPF": SPPF, "Focus": Focus,
}


def _make_divisible(channels: float, divisor: int = 8) -> int:
    return int(math.ceil(channels / divisor) * divisor)


def _build_layers(arch: Arch) -> nn.Sequential:
    """Instantiate the ``backbone`` + ``head`` rows; each layer gets ``.f`` (input index/indices) and ``.i``."""
    try:
        nc, anchors = int(arch["nc"]), arch["anchors"]
        depth, width = float(arch["depth_multiple"]), float(arch["width_multiple"])
        rows = list(arch["backbone"]) + list(arch["head"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArchitectureError(f"architecture config is missing or has a bad key: {e}") from e
    out_channels: list[int] = []

    def channels_of(index: int) -> int:
        return out_channels[index] if out_channels else 3  # the first layer reads the RGB input

    layers = []
    for i, row in enumerate(rows):
        try:
            source, repeats, name, args = row
        except (TypeError, ValueError) as e:
            raise ArchitectureError(f"layer {i}: expected [from, number, module, args], got {row!r}") from e
        args = [nc if a == "nc" else anchors if a == "anchors" else a for a in args]
        repeats = max(round(repeats * depth), 1) if repeats > 1 else repeats
        if name in _CHANNEL_LAYERS:
            c_out = _make_divisible(args[0] * width)
            args = [channels_of(source), c_out, *args[1:]]
            if name == "C3":
                args.insert(2, repeats)  # C3 repeats its bottlenecks inside, not itself
                repeats = 1
            factory: Any = _CHANNEL_LAYERS[name]
        elif name == "Concat":
            c_out = sum(channels_of(j) for j in source)
            factory = Concat
        elif name == "nn.Upsample":
            c_out = channels_of(source)
            factory = nn.Upsample
        elif name == "Detect":
            if i != len(rows) - 1:
                raise ArchitectureError(f"layer {i}: Detect must be the last layer")
            args = [args[0], args[1], [channels_of(j) for j in source]]
            c_out = 0
            factory = Detect
        else:
            raise ArchitectureError(f"layer {i}: unsupported module {name!r}")
        try:
            layer = nn.Sequential(*(factory(*args) for _ in range(repeats))) if repeats > 1 else factory(*args)
        except (TypeError, ValueError) as e:
            raise ArchitectureError(f"layer {i}: {name}{tuple(args)} failed: {e}") from e
        layer.f, layer.i = source, i
        layers.append(layer)
        out_channels.append(c_out)
    if not layers or not isinstance(layers[-1], Detect):
        raise ArchitectureError("the last layer must be Detect")
    return nn.Sequential(*layers)


class YoloV5(nn.Module):
    """The whole detector. ``arch`` (plain data) and ``names`` are kept so a checkpoint can rebuild it."""

    def __init__(self, arch: Arch, names: Sequence[str]) -> None:
        super().__init__()
        self.arch = copy.deepcopy(arch)
        self.model = _build_layers(self.arch)
        self.names = list(names)
        if len(self.names) != self.detect.nc:
            raise ArchitectureError(f"{len(self.names)} class names for nc={self.detect.nc}")
        # Outputs of these layers are read again later (by Concat/Detect), so forward keeps them.
        self._saved = {j for layer in self.model for j in ([layer.f] if isinstance(layer.f, int) else layer.f)
                       if j != -1}
        self._measure_strides()

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    @property
    def stride(self) -> torch.Tensor:
        """float32 (nl,) input pixels per grid cell of each level."""
        return self.detect.stride

    def _measure_strides(self) -> None:
        was_training = self.training
        self.eval()  # eval: the dry run must not touch BatchNorm running statistics
        with torch.no_grad():
            probe = torch.zeros(1, 3, STRIDE_PROBE_PX, STRIDE_PROBE_PX)
            heights = [feat.shape[-2] for feat in self.forward_features(probe)]
        self.detect.stride.copy_(torch.tensor([STRIDE_PROBE_PX / h for h in heights]))
        self.train(was_training)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The Detect head's inputs, one (B, C_l, H/stride_l, W/stride_l) map per level."""
        outputs: list[torch.Tensor | None] = []
        for layer in self.model[:-1]:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self._saved else None)
        return [x if j == -1 else outputs[j] for j in self.detect.f]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """x: float (B, 3, H, W) RGB in [0, 1], H and W multiples of the largest stride.

        Training mode: list per level of raw (B, na, ny, nx, 5+nc) logits (for the loss).
        Eval mode: (B, N, 5+nc) with N = sum over levels of na*ny*nx: (cx, cy, w, h) in input pixels, then
        objectness and per-class scores, all in [0, 1].
        """
        return self.detect(self.forward_features(x))


def build_model(arch: Arch, names: Sequence[str]) -> YoloV5:
    """A freshly initialised YOLOv5 of ``arch`` (see ``dashcamd.detect.arch``) in training mode."""
    return YoloV5(arch, names)


def initialize_biases(model: YoloV5, class_frequency: torch.Tensor | None = None) -> None:
    """YOLOv5's prior for the Detect biases, so early training is not swamped by false positives.

    Objectness starts at about 8 objects per 640x640 image per level; class logits at 0.6/(nc-0.99), or
    the log of the class frequencies when given (float (nc,) counts).
    """
    head = model.detect
    with torch.no_grad():
        for conv, stride in zip(head.m, head.stride.tolist()):
            bias = conv.bias.view(head.na, head.no)
            bias[:, 4] += math.log(8 / (640 / stride) ** 2)
            if class_frequency is None:
                bias[:, 5:] += math.log(0.6 / (head.nc - 0.99))
            else:
                freq = class_frequency.to(bias.dtype)
                bias[:, 5:] += torch.log(freq / freq.sum())
